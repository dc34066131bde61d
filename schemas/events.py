"""Building events for producers and normalizing them for consumers."""

from __future__ import annotations

import copy
import uuid
from datetime import datetime, timezone
from typing import Any

from . import units
from .loader import SCHEMA_VERSION
from .terms import Term, default_terms
from .times import format_time, parse_time
from .validate import _to_canonical, validate_or_raise

__all__ = ["make_event", "normalize_event", "parse_time"]


def make_event(
    kind: str,
    patient_id: str,
    occurred_at: datetime,
    body: dict[str, Any],
    *,
    source: str,
    recorded_at: datetime | None = None,
    event_id: uuid.UUID | str | None = None,
) -> dict[str, Any]:
    """A valid event (or EventValidationError listing why it cannot be one).

    `recorded_at` defaults to now (UTC) and `event_id` to a random uuid4; producers that must
    emit the same id when they re-send the same fact (so that consumers deduplicate) pass a
    uuid5 derived from it instead.
    """
    event = {
        "event_id": str(event_id if event_id is not None else uuid.uuid4()),
        "patient_id": patient_id,
        "kind": kind,
        "occurred_at": format_time(occurred_at),
        "recorded_at": format_time(recorded_at or datetime.now(timezone.utc)),
        "source": source,
        "schema_version": SCHEMA_VERSION,
        "body": copy.deepcopy(body),
    }
    return validate_or_raise(event)


def normalize_event(event: dict[str, Any]) -> dict[str, Any]:
    """A validated copy of `event` with its quantities in canonical units and terms resolved.

    Measured quantities gain `canonical_value`, `canonical_unit` and `term_iri` next to the
    original `value` and `unit` (kept for provenance): on the body for lab and ctDNA events, on
    `measures.tumor_volume` for imaging, on `dose` for treatments. Imaging and treatment bodies
    also gain the `term_iri` of their modality or treatment type; a treatment's fraction counts
    sent as integral numbers (30.0) become ints. The result is the internal,
    normalized form; it no longer validates as a wire event.
    """
    out = _copy_json(validate_or_raise(event))
    body = out["body"]
    terms = default_terms()
    kind = out["kind"]
    if kind == "lab":
        _canonicalize(body, terms.lookup("loinc", body["code"]))
    elif kind == "ctdna":
        _canonicalize(body, terms.for_ctdna_measure(body["measure"]))
    elif kind == "imaging":
        body["term_iri"] = terms.for_modality(body["modality"]).iri
        volume = body.get("measures", {}).get("tumor_volume")
        if volume is not None:
            _canonicalize(volume, terms.lookup("local", "tumor-volume"))
    elif kind == "treatment":
        treatment = terms.for_treatment(body["type"])
        body["term_iri"] = treatment.iri
        for count in ("fraction_number", "fractions_planned"):
            # JSON Schema's "integer" admits 30.0 (JSON has one number type); a count is an
            # xsd:integer in RDF. Bounded by the schema, the conversion is exact.
            if type(body.get(count)) is float:
                body[count] = int(body[count])
        dose = body.get("dose")
        if dose is not None:
            # Radiation doses become Gy; drug doses (mg, mg/m2, mg/kg) have no common unit.
            canonical = "Gy" if body["type"] == "radiotherapy" else dose["unit"]
            dose["canonical_value"] = _convert(dose["value"], dose["unit"], canonical)
            dose["canonical_unit"] = canonical
    return out


def _canonicalize(quantity: dict[str, Any], term: Term) -> None:
    assert term.canonical_unit is not None, f"{term.iri} is not a quantity"
    quantity["canonical_value"] = _convert(quantity["value"], quantity["unit"], term.canonical_unit)
    quantity["canonical_unit"] = term.canonical_unit
    quantity["term_iri"] = term.iri


def _convert(value: Any, unit: str, to_unit: str) -> float:
    """units.convert(value, unit, to_unit), to the last bit and with the same errors.

    Numbers take validate's conversion by a cached exact factor (int arithmetic instead of a
    `Fraction` per event; tests/schemas/test_contract_fastpath.py holds it equal to units'),
    anything else (not seen after validation) goes to units.convert itself.
    """
    if type(value) is float or type(value) is int:
        return _to_canonical(value, unit, to_unit)
    return units.convert(value, unit, to_unit)


# Leaves returned as they are without a call: most of a document is leaves.
_IMMUTABLE_LEAVES = frozenset({str, int, float, bool, type(None)})


def _copy_json(value: Any) -> Any:
    """A deep copy of validated JSON (dicts, lists, immutable leaves), ~5x faster than deepcopy."""
    if isinstance(value, dict):
        return {k: v if type(v) in _IMMUTABLE_LEAVES else _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [v if type(v) in _IMMUTABLE_LEAVES else _copy_json(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy_json(v) for v in value)
    return value

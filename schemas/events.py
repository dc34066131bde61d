"""Building events for producers and normalizing them for consumers."""

from __future__ import annotations

import copy
import uuid
from datetime import datetime, timezone
from typing import Any

from . import units
from .loader import CONTRACT_VERSION, known_fields
from .terms import NAMESPACES, Term, TermTable, default_terms, drug_system
from .times import format_time, parse_time
from .validate import _to_canonical, format_path, validate_or_raise

__all__ = ["extensions", "make_event", "normalize_event", "parse_time"]


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
        "schema_version": CONTRACT_VERSION,
        "body": copy.deepcopy(body),
    }
    return validate_or_raise(event)


def normalize_event(event: dict[str, Any]) -> dict[str, Any]:
    """A validated copy of `event` with its quantities in canonical units and terms resolved.

    Measured quantities gain `canonical_value`, `canonical_unit` and `term_iri` next to the
    original `value` and `unit` (kept for provenance): on the body for lab and ctDNA events, on
    `measures.tumor_volume` for imaging, on `dose` for treatments. Imaging and treatment bodies
    also gain the `term_iri` of their modality or treatment type; a treatment's counts sent as
    integral numbers (30.0) become ints. The result is the internal, normalized form; it no
    longer validates as a wire event. Besides:

    - `extensions`: {path: value} of every field the contract does not name ("body.phase"),
      each kept where it was sent as well;
    - a censored lab or ctDNA result has `comparator`; one sent as `below_lod: true` becomes
      comparator "<" with the lod as `value` (a reading sent with it moves to `reading`), and
      `canonical_lod` / `canonical_reading` are the lod and reading in the canonical unit;
    - a drug gains `system` as a short name (rxnorm, ncit, snomed, atc; an `rxnorm` alone
      becomes code and system), `codes` (the IRIs of its code and of the table's other codes
      of the same drug; a name alone that is an ingredient of the table is coded by it),
      `term_iri` (None for a code the table lacks) and, missing a name, the table's name;
    - a drug dose's canonical value is in mg/m2 where the event's body size makes it
      computable (else it stays in its own unit), and `mg` is the dose in mg where computable
      (None otherwise): schemas.units.drug_dose;
    - `segmentation_labels` become {int label: meaning}.
    """
    out = _copy_json(validate_or_raise(event))
    body = out["body"]
    terms = default_terms()
    kind = out["kind"]
    out["extensions"] = extensions(out)
    if kind == "lab":
        _canonicalize_result(body, terms.lookup("loinc", body["code"]))
    elif kind == "ctdna":
        _canonicalize_result(body, terms.for_ctdna_measure(body["measure"]))
    elif kind == "imaging":
        body["term_iri"] = terms.for_modality(body["modality"]).iri
        volume = body.get("measures", {}).get("tumor_volume")
        if volume is not None:
            _canonicalize(volume, terms.lookup("local", "tumor-volume"))
        labels = body.get("segmentation_labels")
        if labels is not None:
            body["segmentation_labels"] = {int(label): meaning for label, meaning in labels.items()}
    elif kind == "treatment":
        treatment = terms.for_treatment(body["type"])
        body["term_iri"] = treatment.iri
        for count in _COUNTS:
            # JSON Schema's "integer" admits 30.0 (JSON has one number type); a count is an
            # xsd:integer in RDF. Bounded by the schema, the conversion is exact.
            if type(body.get(count)) is float:
                body[count] = int(body[count])
        dose = body.get("dose")
        if dose is not None and body["type"] == "radiotherapy":
            dose["canonical_value"] = _convert(dose["value"], dose["unit"], "Gy")
            dose["canonical_unit"] = "Gy"
        elif dose is not None:
            per_m2, mg = units.drug_dose(dose["value"], dose["unit"], body.get("body_weight_kg"), body.get("body_surface_area_m2"))
            dose["canonical_value"] = per_m2 if per_m2 is not None else float(dose["value"])
            dose["canonical_unit"] = "mg/m2" if per_m2 is not None else dose["unit"]
            dose["mg"] = mg
        if isinstance(body.get("drug"), dict):
            _code_drug(body["drug"], terms)
    return out


_COUNTS = ("fraction_number", "fractions_planned", "cycle", "cycles_planned", "day_of_cycle", "line_of_therapy")


def extensions(event: dict[str, Any]) -> dict[str, Any]:
    """{path: value} of every field of a valid event that the contract does not name (paths as
    validate() writes them: "body.phase", "body.drug.atc_code"). Fields of objects the
    contract names are looked into; an extension's own value is taken whole."""
    found: dict[str, Any] = {}

    def walk(node: dict[str, Any], tree: dict[str, Any], segments: tuple[Any, ...]) -> None:
        for key, value in node.items():
            sub = tree.get(key)
            if sub is None:
                found[format_path((*segments, key))] = value
            elif sub and type(value) is dict:
                walk(value, sub, (*segments, key))

    walk(event, known_fields(event["kind"]), ())
    return found


def _canonicalize_result(body: dict[str, Any], term: Term) -> None:
    """A lab or ctDNA result, censored or not, with its lod and reading in canonical units."""
    if body.get("below_lod") is True:
        if "value" in body:
            body["reading"] = body["value"]
        body["value"] = body["lod"]
        body["comparator"] = "<"
    _canonicalize(body, term)
    for sent, canonical in (("lod", "canonical_lod"), ("reading", "canonical_reading")):
        if sent in body:
            body[canonical] = _convert(body[sent], body["unit"], body["canonical_unit"])


def _code_drug(drug: dict[str, Any], terms: TermTable) -> None:
    if "code" in drug:
        drug["system"] = drug_system(drug["system"])
    elif "rxnorm" in drug:
        drug["code"], drug["system"] = drug["rxnorm"], "rxnorm"
    known = terms.drug(drug["system"], drug["code"]) if "code" in drug else terms.drug_by_name(drug["name"])
    if known is not None and "code" not in drug:
        drug["code"], drug["system"] = known.code, known.system
    codes = [NAMESPACES[drug["system"]] + drug["code"]] if "code" in drug else []
    if drug.get("rxnorm") and drug["system"] != "rxnorm":
        codes.append(NAMESPACES["rxnorm"] + drug["rxnorm"])
    if known is not None:
        codes.extend(t.iri for t in terms.drug_equivalents(known))
        drug.setdefault("name", known.display)
    drug["codes"] = list(dict.fromkeys(codes))
    drug["term_iri"] = known.iri if known is not None else None


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

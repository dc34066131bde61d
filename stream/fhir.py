"""FHIR R4 Observations (mCODE) converted to internal events.

Accepted on the lab and ctDNA topics beside native events:

- TumorMarkerTest and other LOINC-coded quantitative results (``valueQuantity``) -> a lab event
  with that LOINC code;
- TumorSize (LOINC 21889-1, the size in a component: 33728-7 longest dimension, else
  33729-5 additional dimension; or a ``valueQuantity``) -> a lab event with code 21889-1 and
  the longest dimension (cm or mm, converted to mm by the contract's units);
- GenomicVariant with a variant allele fraction component (LOINC 81258-6) -> a ctDNA event of
  measure ``vaf`` with the gene (48018-6) and the HGVS change (48004-6, 81290-9, 81252-9); a
  VAF whose unit is given as text only ("decimal", "percent") is read as a fraction or a
  percentage.

The patient pseudonym is the id of ``Observation.subject`` (``Patient/<id>``) when that id is a
valid pseudonym; anything else is refused rather than guessed (a real identifier must never
become a Kafka key). The event id is a UUID derived from the resource's identity (identifier
system|value, else ``Observation/<id>`` and its version), so a re-sent resource is a duplicate.
A date without a time (``2019-04-01``) is read as noon UTC of that day, which keeps the date
in every zone within 12 hours of UTC; a time without a zone is refused (FHIR forbids it).

Nothing but the fields named above is read: the narrative (``text``), names and record numbers
of the resource never reach an event.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from schemas import SCHEMA_VERSION

FHIR_NAMESPACE = uuid.UUID("1f6f4f0e-3b7a-5c55-9d8e-0b0f9b8a2c11")
LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
MCODE = "http://hl7.org/fhir/us/mcode/StructureDefinition/"

TUMOR_SIZE = "21889-1"
LONGEST_DIMENSION = "33728-7"
OTHER_DIMENSION = "33729-5"
VAF = "81258-6"
GENE_STUDIED = "48018-6"
HGVS_CODES = ("48004-6", "81290-9", "81252-9")  # c.HGVS, g.HGVS, discrete variant

# A VAF is a number fraction (LOINC property NFr). Feeds, the Genomics Reporting IG's own
# examples among them, often give its unit as text only (``"unit": "decimal"``, no ``code``):
# these words name a plain fraction or a percentage without doubt. Any other text goes to the
# contract, which refuses a unit it does not know rather than guess a factor of 100.
_FRACTION_UNITS = {
    "decimal": "1", "decimal fraction": "1", "fraction": "1", "ratio": "1", "proportion": "1",
    "percent": "%", "percentage": "%",
}

_PSEUDONYM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,63}\Z")
_FHIR_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})\Z")
_FHIR_DATETIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?(Z|[+-][0-9]{2}:[0-9]{2})?\Z"
)
_GENE_SYMBOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}\Z")


class FhirError(ValueError):
    """A FHIR resource that cannot become an event; ``field`` is a FHIRPath-like location."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


def is_fhir(document: object) -> bool:
    return isinstance(document, dict) and "resourceType" in document


@dataclass(frozen=True)
class Converted:
    event: dict[str, Any]
    profile: str  # "tumor-marker", "tumor-size" or "genomic-variant"


def observation_to_event(resource: Mapping[str, Any], *, source: str = "fhir") -> Converted:
    """The internal event for a FHIR R4 Observation, or FhirError saying why there is none."""
    if resource.get("resourceType") != "Observation":
        raise FhirError("resourceType", f"expected an Observation, got {str(resource.get('resourceType'))[:40]!r}")
    status = resource.get("status")
    if status in ("entered-in-error", "cancelled", "registered"):
        raise FhirError("Observation.status", f"status {status!r} carries no usable result")
    patient_id = _pseudonym(resource)
    occurred_at = _effective(resource)
    recorded_at = _instant(resource.get("issued"), "Observation.issued") if resource.get("issued") else occurred_at
    loinc = _loinc_codes(resource.get("code"), "Observation.code")
    profiles = [str(p) for p in (resource.get("meta") or {}).get("profile") or []]

    if TUMOR_SIZE in loinc or any(p.startswith(MCODE + "mcode-tumor-size") for p in profiles):
        value, unit = _tumor_size(resource)
        kind, profile = "lab", "tumor-size"
        body: dict[str, Any] = {"code": TUMOR_SIZE, "value": value, "unit": unit}
    elif _component(resource, VAF) is not None or any(p.startswith(MCODE + "mcode-genomic-variant") for p in profiles):
        kind, profile = "ctdna", "genomic-variant"
        body = _genomic_variant(resource)
    else:
        kind, profile = "lab", "tumor-marker"
        body = _quantitative_result(resource, loinc)
    method = _text_of(resource.get("method"))
    if method and kind == "lab":
        body["method"] = method[:512]
    event = {
        "event_id": _event_id(resource),
        "patient_id": patient_id,
        "kind": kind,
        "occurred_at": occurred_at,
        "recorded_at": recorded_at,
        "source": _source(resource, source),
        "schema_version": SCHEMA_VERSION,
        "body": body,
    }
    return Converted(event, profile)


# -- parts ----------------------------------------------------------------------------------


def _pseudonym(resource: Mapping[str, Any]) -> str:
    subject = resource.get("subject")
    reference = subject.get("reference") if isinstance(subject, Mapping) else None
    if not isinstance(reference, str) or not reference:
        raise FhirError("Observation.subject.reference", "a reference to the patient (Patient/<pseudonym>) is required")
    resource_type, _, ident = reference.rpartition("/")
    if resource_type.rsplit("/", 1)[-1] != "Patient" or not _PSEUDONYM.match(ident):
        # Not echoed: the reference may be a real identifier.
        raise FhirError(
            "Observation.subject.reference",
            "must be Patient/<pseudonym> with a pseudonym of 3 to 64 letters, digits, '.', '_' or '-'",
        )
    return ident


def _effective(resource: Mapping[str, Any]) -> str:
    for key in ("effectiveDateTime", "effectiveInstant"):
        if key in resource:
            return _instant(resource[key], f"Observation.{key}")
    period = resource.get("effectivePeriod")
    if isinstance(period, Mapping) and period.get("start"):
        return _instant(period["start"], "Observation.effectivePeriod.start")
    raise FhirError("Observation.effective[x]", "the time of the observation (effectiveDateTime or effectivePeriod.start) is required")


def _instant(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise FhirError(field, "expected a FHIR dateTime string")
    day = _FHIR_DATE.match(value)
    if day:
        return f"{value}T12:00:00Z"
    if not _FHIR_DATETIME.match(value):
        raise FhirError(field, f"{value!r:.40} is not a full FHIR date or dateTime (year or month precision is too coarse)")
    if not (value.endswith("Z") or re.search(r"[+-][0-9]{2}:[0-9]{2}\Z", value)):
        raise FhirError(field, f"{value!r:.40} has a time but no zone offset (FHIR requires one)")
    date_part, _, rest = value.partition("T")
    # Contract times carry seconds: add them when FHIR omitted them (hh:mm).
    time_part = re.match(r"([0-9]{2}:[0-9]{2})(:[0-9]{2}(\.[0-9]+)?)?(.*)\Z", rest)
    assert time_part is not None
    hhmm, seconds, _, zone = time_part.groups()
    return f"{date_part}T{hhmm}{seconds or ':00'}{zone}"


def _codings(concept: object) -> list[Mapping[str, Any]]:
    if not isinstance(concept, Mapping):
        return []
    return [c for c in concept.get("coding") or [] if isinstance(c, Mapping)]


def _loinc_codes(concept: object, field: str) -> list[str]:
    return [str(c.get("code")) for c in _codings(concept) if c.get("system") == LOINC_SYSTEM and c.get("code")]


def _text_of(concept: object) -> str | None:
    if not isinstance(concept, Mapping):
        return None
    if isinstance(concept.get("text"), str) and concept["text"].strip():
        return concept["text"].strip()
    for coding in _codings(concept):
        label = coding.get("display") or coding.get("code")
        if isinstance(label, str) and label.strip():
            return label.strip()
    return None


def _quantity(q: object, field: str) -> tuple[float, str]:
    if not isinstance(q, Mapping):
        raise FhirError(field, "a valueQuantity is required")
    value = q.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FhirError(f"{field}.value", "a numeric value is required")
    comparator = q.get("comparator")
    if comparator:
        raise FhirError(f"{field}.comparator", f"a censored value ({comparator!r}) is not a measurement the twin can use")
    system, code, unit = q.get("system"), q.get("code"), q.get("unit")
    if code and system == UCUM_SYSTEM:
        return value, str(code)
    if code and system is None:
        return value, str(code)
    if unit and not code and system in (None, UCUM_SYSTEM):
        return value, str(unit)
    raise FhirError(f"{field}.code", "the unit must be a UCUM code (valueQuantity.system http://unitsofmeasure.org)")


def _component(resource: Mapping[str, Any], loinc: str) -> Mapping[str, Any] | None:
    for component in resource.get("component") or []:
        if isinstance(component, Mapping) and loinc in _loinc_codes(component.get("code"), "component.code"):
            return component
    return None


def _components(resource: Mapping[str, Any], loinc: str) -> list[Mapping[str, Any]]:
    return [
        c for c in resource.get("component") or []
        if isinstance(c, Mapping) and loinc in _loinc_codes(c.get("code"), "component.code")
    ]


def _tumor_size(resource: Mapping[str, Any]) -> tuple[float, str]:
    for loinc in (LONGEST_DIMENSION, OTHER_DIMENSION):
        sizes = _components(resource, loinc)
        if sizes:
            measured = [_quantity(c.get("valueQuantity"), f"Observation.component[{loinc}].valueQuantity") for c in sizes]
            return max(measured, key=lambda vu: _mm(vu))
    if "valueQuantity" in resource:
        return _quantity(resource["valueQuantity"], "Observation.valueQuantity")
    raise FhirError(
        "Observation.component", f"a tumour size needs a dimension (component {LONGEST_DIMENSION} or {OTHER_DIMENSION}) with a valueQuantity"
    )


def _mm(value_unit: tuple[float, str]) -> float:
    from schemas import convert  # noqa: PLC0415

    try:
        return convert(value_unit[0], value_unit[1], "mm")
    except ValueError:
        return float("-inf")  # the contract will report the unit


def _quantitative_result(resource: Mapping[str, Any], loinc: Sequence[str]) -> dict[str, Any]:
    if "valueQuantity" not in resource:
        present = next((k for k in resource if k.startswith("value")), None)
        what = f"{present} (a qualitative or non-numeric result)" if present else "no value"
        raise FhirError(
            f"Observation.{present or 'value[x]'}",
            f"has {what}; a lab event carries a quantity, so a valueQuantity is required",
        )
    if not loinc:
        systems = sorted({str(c.get("system")) for c in _codings(resource.get("code"))})
        raise FhirError(
            "Observation.code", f"needs a LOINC coding (system http://loinc.org); found {', '.join(systems)[:160] or 'none'}"
        )
    value, unit = _quantity(resource["valueQuantity"], "Observation.valueQuantity")
    return {"code": loinc[0], "value": value, "unit": unit}


def _genomic_variant(resource: Mapping[str, Any]) -> dict[str, Any]:
    vaf = _component(resource, VAF)
    if vaf is None:
        raise FhirError(
            f"Observation.component[{VAF}]",
            "a genomic variant needs its variant allele fraction (component LOINC 81258-6 with a valueQuantity) to be a ctDNA measurement",
        )
    quantity = vaf.get("valueQuantity")
    value, unit = _quantity(quantity, f"Observation.component[{VAF}].valueQuantity")
    if isinstance(quantity, Mapping) and not quantity.get("code"):
        unit = _FRACTION_UNITS.get(unit.strip().lower(), unit)
    body: dict[str, Any] = {"measure": "vaf", "value": value, "unit": unit}
    gene = _component(resource, GENE_STUDIED)
    if gene is not None:
        symbol = _gene_symbol(gene.get("valueCodeableConcept"))
        if symbol:
            body["gene"] = symbol
    for loinc in HGVS_CODES:
        change = _component(resource, loinc)
        if change is not None:
            text = _hgvs(change.get("valueCodeableConcept"))
            if text:
                body["variant_hgvs"] = text[:512]
                break
    method = _text_of(resource.get("method"))
    if method:
        body["assay"] = method[:512]
    return body


def _gene_symbol(concept: object) -> str | None:
    for coding in _codings(concept):
        for candidate in (coding.get("display"), coding.get("code")):
            if isinstance(candidate, str) and _GENE_SYMBOL.match(candidate):
                return candidate
    return None


def _hgvs(concept: object) -> str | None:
    for coding in _codings(concept):
        for candidate in (coding.get("code"), coding.get("display")):
            if isinstance(candidate, str) and ":" in candidate and candidate.strip():
                return candidate.strip()
    return _text_of(concept)


def _event_id(resource: Mapping[str, Any]) -> str:
    identifiers = [i for i in resource.get("identifier") or [] if isinstance(i, Mapping) and i.get("value")]
    if identifiers:
        name = f"identifier:{identifiers[0].get('system', '')}|{identifiers[0]['value']}"
    elif resource.get("id"):
        version = (resource.get("meta") or {}).get("versionId", "")
        name = f"Observation/{resource['id']}/_history/{version}"
    else:
        # No identity at all: the content itself is the identity (a re-send is a duplicate).
        canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        name = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    return str(uuid.uuid5(FHIR_NAMESPACE, name))


def _source(resource: Mapping[str, Any], default: str) -> str:
    meta_source = (resource.get("meta") or {}).get("source")
    if isinstance(meta_source, str) and meta_source.strip():
        return meta_source.strip()[:256]
    return default

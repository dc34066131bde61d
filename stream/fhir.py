"""FHIR R4 Observations and MedicationAdministrations (mCODE) converted to internal events.

Observations are accepted on the lab and ctDNA topics beside native events:

- TumorMarkerTest and other LOINC-coded quantitative results (``valueQuantity``) -> a lab event
  with that LOINC code;
- TumorSize (LOINC 21889-1, the size in a component: 33728-7 longest dimension, else
  33729-5 additional dimension; or a ``valueQuantity``) -> a lab event with code 21889-1 and
  the longest dimension (cm or mm, converted to mm by the contract's units);
- GenomicVariant with a variant allele fraction component (LOINC 81258-6) -> a ctDNA event of
  measure ``vaf`` with the gene (48018-6) and the HGVS change (48004-6, 81290-9, 81252-9); a
  VAF whose unit is given as text only ("decimal", "percent") is read as a fraction or a
  percentage.

A quantity with ``comparator`` (<, <=, >=, >) is a censored result: its value is the limit, and
the event carries the comparator (a result below an assay's limit is a result).

MedicationAdministrations (mCODE CancerRelatedMedicationAdministration) are accepted on the
treatment topic and become chemotherapy events: the drug from ``medicationCodeableConcept``
or a contained Medication (``medicationReference`` "#id"), its first coding in RxNorm, NCIt,
SNOMED CT or ATC as the code and the text or a display as the name; ``dosage.dose`` in UCUM
(mg, mg/m2 or mg/kg: the contract says what else is refused) and ``dosage.route``; the time
from ``effectiveDateTime`` or ``effectivePeriod.start``. Only a given dose is an event: status
completed or in-progress (stopped, on-hold, not-done, entered-in-error and unknown are refused:
the dose given is not known).

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

from schemas import CONTRACT_VERSION
from schemas.terms import DRUG_SYSTEMS, drug_system

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
    profile: str  # "tumor-marker", "tumor-size", "genomic-variant" or "medication-administration"


RESOURCE_TOPIC_KINDS: Mapping[str, tuple[str, ...]] = {
    "Observation": ("lab", "ctdna"),
    "MedicationAdministration": ("treatment",),
}


def resource_to_event(resource: Mapping[str, Any], *, source: str = "fhir") -> Converted:
    """The internal event for a FHIR R4 Observation or MedicationAdministration, or FhirError."""
    kind = resource.get("resourceType")
    if kind == "MedicationAdministration":
        return medication_administration_to_event(resource, source=source)
    if kind == "Observation":
        return observation_to_event(resource, source=source)
    raise FhirError(
        "resourceType", f"expected an Observation or a MedicationAdministration, got {str(kind)[:40]!r}"
    )


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
        kind, profile = "lab", "tumor-size"
        body: dict[str, Any] = {"code": TUMOR_SIZE, **_result(*_tumor_size(resource))}
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
        "schema_version": CONTRACT_VERSION,
        "body": body,
    }
    return Converted(event, profile)


_GIVEN = ("completed", "in-progress")


def medication_administration_to_event(resource: Mapping[str, Any], *, source: str = "fhir") -> Converted:
    """The chemotherapy event of a FHIR R4 MedicationAdministration, or FhirError saying why not."""
    what = "MedicationAdministration"
    if resource.get("resourceType") != what:
        raise FhirError("resourceType", f"expected a MedicationAdministration, got {str(resource.get('resourceType'))[:40]!r}")
    status = resource.get("status")
    if status not in _GIVEN:
        raise FhirError(
            f"{what}.status",
            f"status {str(status)[:40]!r} is not a given dose (completed or in-progress are; a stopped, held or "
            "cancelled administration says nothing certain about what the patient received)",
        )
    patient_id = _pseudonym(resource, what)
    occurred_at = _effective(resource, what)
    dosage = resource.get("dosage")
    if not isinstance(dosage, Mapping) or "dose" not in dosage:
        raise FhirError(f"{what}.dosage.dose", "the dose given is required (a SimpleQuantity in UCUM: mg, mg/m2 or mg/kg)")
    value, unit, comparator = _quantity(dosage["dose"], f"{what}.dosage.dose")
    if comparator:
        raise FhirError(f"{what}.dosage.dose.comparator", "a dose given is a quantity, not a bound")
    body: dict[str, Any] = {"type": "chemotherapy", "drug": _drug(resource), "dose": {"value": value, "unit": unit}}
    route = _text_of(dosage.get("route"))
    if route:
        body["route"] = route[:512]
    event = {
        "event_id": _event_id(resource),
        "patient_id": patient_id,
        "kind": "treatment",
        "occurred_at": occurred_at,
        "recorded_at": occurred_at,  # a MedicationAdministration has no issued time
        "source": _source(resource, source),
        "schema_version": CONTRACT_VERSION,
        "body": body,
    }
    return Converted(event, "medication-administration")


def _drug(resource: Mapping[str, Any]) -> dict[str, Any]:
    field = "MedicationAdministration.medication[x]"
    concept = resource.get("medicationCodeableConcept")
    if concept is None:
        reference = (resource.get("medicationReference") or {}).get("reference")
        if not isinstance(reference, str) or not reference.startswith("#"):
            raise FhirError(
                field,
                "a medicationCodeableConcept or a reference to a contained Medication (#id) is required: a Medication "
                "elsewhere cannot be resolved here",
            )
        contained = [r for r in resource.get("contained") or [] if isinstance(r, Mapping)]
        medication = next((r for r in contained if r.get("resourceType") == "Medication" and r.get("id") == reference[1:]), None)
        if medication is None:
            raise FhirError("MedicationAdministration.medicationReference", f"no contained Medication {reference[:40]!r}")
        concept, field = medication.get("code"), "Medication.code"
    drug: dict[str, Any] = {}
    for coding in _codings(concept):
        system, code = drug_system(str(coding.get("system"))), coding.get("code")
        if system is not None and isinstance(code, str) and DRUG_SYSTEMS[system][1].match(code):
            drug.update(code=code, system=system)
            break
    name = _text_of(concept)
    if name:
        drug["name"] = name[:512]
    if not drug:
        raise FhirError(field, "the drug needs a name (text or display) or a coding in RxNorm, NCIt, SNOMED CT or ATC")
    return drug


# -- parts ----------------------------------------------------------------------------------


def _pseudonym(resource: Mapping[str, Any], what: str = "Observation") -> str:
    subject = resource.get("subject")
    reference = subject.get("reference") if isinstance(subject, Mapping) else None
    if not isinstance(reference, str) or not reference:
        raise FhirError(f"{what}.subject.reference", "a reference to the patient (Patient/<pseudonym>) is required")
    resource_type, _, ident = reference.rpartition("/")
    if resource_type.rsplit("/", 1)[-1] != "Patient" or not _PSEUDONYM.match(ident):
        # Not echoed: the reference may be a real identifier.
        raise FhirError(
            f"{what}.subject.reference",
            "must be Patient/<pseudonym> with a pseudonym of 3 to 64 letters, digits, '.', '_' or '-'",
        )
    return ident


def _effective(resource: Mapping[str, Any], what: str = "Observation") -> str:
    for key in ("effectiveDateTime", "effectiveInstant"):
        if key in resource:
            return _instant(resource[key], f"{what}.{key}")
    period = resource.get("effectivePeriod")
    if isinstance(period, Mapping) and period.get("start"):
        return _instant(period["start"], f"{what}.effectivePeriod.start")
    raise FhirError(f"{what}.effective[x]", f"the time of the {what} (effectiveDateTime or effectivePeriod.start) is required")


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


_COMPARATORS = ("<", "<=", ">=", ">")


def _quantity(q: object, field: str) -> tuple[float, str, str | None]:
    """(value, UCUM unit, comparator or None) of a FHIR Quantity; a comparator makes the value
    the limit of a censored result."""
    if not isinstance(q, Mapping):
        raise FhirError(field, "a valueQuantity is required")
    value = q.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FhirError(f"{field}.value", "a numeric value is required")
    comparator = q.get("comparator")
    if comparator is not None and comparator not in _COMPARATORS:
        raise FhirError(f"{field}.comparator", f"{str(comparator)[:20]!r} is not a FHIR comparator (<, <=, >=, >)")
    system, code, unit = q.get("system"), q.get("code"), q.get("unit")
    if code and system == UCUM_SYSTEM:
        return value, str(code), comparator
    if code and system is None:
        return value, str(code), comparator
    if unit and not code and system in (None, UCUM_SYSTEM):
        return value, str(unit), comparator
    raise FhirError(f"{field}.code", "the unit must be a UCUM code (Quantity.system http://unitsofmeasure.org)")


def _result(value: float, unit: str, comparator: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"value": value, "unit": unit}
    if comparator:
        body["comparator"] = comparator
    return body


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


def _tumor_size(resource: Mapping[str, Any]) -> tuple[float, str, str | None]:
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


def _mm(value_unit: tuple[float, str, str | None]) -> float:
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
    return {"code": loinc[0], **_result(*_quantity(resource["valueQuantity"], "Observation.valueQuantity"))}


def _genomic_variant(resource: Mapping[str, Any]) -> dict[str, Any]:
    vaf = _component(resource, VAF)
    if vaf is None:
        raise FhirError(
            f"Observation.component[{VAF}]",
            "a genomic variant needs its variant allele fraction (component LOINC 81258-6 with a valueQuantity) to be a ctDNA measurement",
        )
    quantity = vaf.get("valueQuantity")
    value, unit, comparator = _quantity(quantity, f"Observation.component[{VAF}].valueQuantity")
    if isinstance(quantity, Mapping) and not quantity.get("code"):
        unit = _FRACTION_UNITS.get(unit.strip().lower(), unit)
    body: dict[str, Any] = {"measure": "vaf", **_result(value, unit, comparator)}
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
    resource_type = str(resource.get("resourceType"))
    if identifiers:
        name = f"identifier:{identifiers[0].get('system', '')}|{identifiers[0]['value']}"
    elif resource.get("id"):
        version = (resource.get("meta") or {}).get("versionId", "")
        name = f"{resource_type}/{resource['id']}/_history/{version}"
    else:
        # No identity at all: the content itself is the identity (a re-send is a duplicate).
        canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        name = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    if resource_type != "Observation" and not name.startswith(resource_type + "/"):
        # Another resource type with the same identifier is another event. Observations keep
        # the names they had before other resources were read, so their ids stay stable.
        name = f"{resource_type}/{name}"
    return str(uuid.uuid5(FHIR_NAMESPACE, name))


def _source(resource: Mapping[str, Any], default: str) -> str:
    meta_source = (resource.get("meta") or {}).get("source")
    if isinstance(meta_source, str) and meta_source.strip():
        return meta_source.strip()[:256]
    return default

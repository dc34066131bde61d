"""Official FHIR examples through the FHIR conversion and the whole normalizer: mCODE 4.0.0,
Genomics Reporting 3.0.0 and the FHIR R4 Observation examples (npm packages, CC0).

What the package holds decides the assertions: its TumorSize examples and its GenomicVariant
examples that carry a variant allele fraction normalize; its TumorMarkerTest examples are all
qualitative (valueCodeableConcept: ER/PR/HER2/EGFR positive or negative) or coded outside LOINC
(Oncotype DX, NCBI GTR), which the lab contract (a LOINC code with a quantity) cannot carry, so
they are dead-lettered with a reason naming the element; a quantitative TumorMarkerTest made
from the official one normalizes.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from ingest_support import mcode_observations

from stream.deadletter import DeadLetter
from stream.decode import decode_jsonld
from stream.fhir import FhirError, observation_to_event
from stream.normalizer import Normalizer, NormalizerSettings, Observation, SourceRecord
from stream.topics import Topics

TOPICS = Topics("fhir")


def _normalize(resource: dict, kind: str) -> Observation | DeadLetter:
    normalizer = Normalizer(NormalizerSettings(), TOPICS, clock=lambda: datetime(2030, 1, 1, tzinfo=timezone.utc))
    record = SourceRecord(TOPICS.event_topic(kind), 0, 0, None, json.dumps(resource).encode())
    result = normalizer.process([record])
    return (result.observations or result.dead_letters)[0]


def test_tumor_size_examples_normalize(mcode_examples: Path) -> None:
    examples = mcode_observations(mcode_examples, "mcode-tumor-size")
    assert len(examples) >= 2
    for name, resource in examples:
        outcome = _normalize(resource, "lab")
        assert isinstance(outcome, Observation), (name, getattr(outcome, "reason", ""))
        decoded = decode_jsonld(outcome.value)
        assert decoded.code == "http://loinc.org/rdf#21889-1" and decoded.unit == "mm"
        longest = max(
            c["valueQuantity"]["value"] for c in resource["component"]
            if c["code"]["coding"][0]["code"] == "33728-7"
        )
        assert decoded.value == pytest.approx(longest * 10)  # cm -> mm
        assert decoded.patient_id == resource["subject"]["reference"].split("/")[-1]


def test_genomic_variants_with_vaf_normalize_as_ctdna(mcode_examples: Path) -> None:
    examples = mcode_observations(mcode_examples, "mcode-genomic-variant")
    with_vaf = [(n, r) for n, r in examples if any(
        c["code"]["coding"][0].get("code") == "81258-6" for c in r.get("component", []))]
    assert len(with_vaf) >= 1
    for name, resource in with_vaf:
        outcome = _normalize(resource, "ctdna")
        assert isinstance(outcome, Observation), (name, getattr(outcome, "reason", ""))
        decoded = decode_jsonld(outcome.value)
        assert decoded.kind == "ctdna" and decoded.unit == "1" and 0 <= decoded.value <= 1
        assert decoded.gene and decoded.variant_hgvs
    for name, resource in examples:
        if (name, resource) not in with_vaf:
            outcome = _normalize(resource, "ctdna")
            assert isinstance(outcome, DeadLetter) and outcome.stage == "fhir" and "81258-6" in outcome.reason


def test_tumor_marker_examples(mcode_examples: Path) -> None:
    examples = mcode_observations(mcode_examples, "mcode-tumor-marker-test")
    assert len(examples) >= 1
    for name, resource in examples:
        outcome = _normalize(resource, "lab")
        if "valueQuantity" in resource and any(c.get("system") == "http://loinc.org" for c in resource["code"]["coding"]):
            assert isinstance(outcome, Observation), (name, getattr(outcome, "reason", ""))
        else:
            assert isinstance(outcome, DeadLetter) and outcome.stage == "fhir", name
            assert "valueQuantity" in outcome.reason or "LOINC" in outcome.reason
    # The official resource, made quantitative (PSA, LOINC 2857-1), normalizes.
    resource = copy.deepcopy(examples[0][1])
    resource.pop("valueCodeableConcept", None)
    resource["code"] = {"coding": [{"system": "http://loinc.org", "code": "2857-1"}]}
    resource["valueQuantity"] = {"value": 4.2, "unit": "ng/mL", "system": "http://unitsofmeasure.org", "code": "ng/mL"}
    outcome = _normalize(resource, "lab")
    assert isinstance(outcome, Observation), getattr(outcome, "reason", "")
    decoded = decode_jsonld(outcome.value)
    assert (decoded.code, decoded.value, decoded.unit) == ("http://loinc.org/rdf#2857-1", 4.2, "ng/mL")


def test_event_id_is_stable_and_narrative_is_not_carried(mcode_examples: Path) -> None:
    name, resource = mcode_observations(mcode_examples, "mcode-tumor-size")[0]
    first, second = observation_to_event(resource).event, observation_to_event(copy.deepcopy(resource)).event
    assert first["event_id"] == second["event_id"]
    assert "text" not in json.dumps(first["body"]) or resource.get("text", {}).get("div", "") not in json.dumps(first)


def test_dates_without_zone_are_refused() -> None:
    resource = {
        "resourceType": "Observation", "status": "final", "subject": {"reference": "Patient/VP-0001"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "2857-1"}]},
        "effectiveDateTime": "2024-02-12T08:40:00",
        "valueQuantity": {"value": 1.0, "system": "http://unitsofmeasure.org", "code": "ng/mL"},
    }
    with pytest.raises(FhirError, match="zone"):
        observation_to_event(resource)
    resource["effectiveDateTime"] = "2024-02"
    with pytest.raises(FhirError, match="precision"):
        observation_to_event(resource)
    resource["effectiveDateTime"] = "2024-02-12"
    assert observation_to_event(resource).event["occurred_at"] == "2024-02-12T12:00:00Z"


# -- other official packages: foreign inputs never crash the normalizer ---------------------


def _vaf_component(resource: dict) -> dict | None:
    for component in resource.get("component", []):
        if any(c.get("system") == "http://loinc.org" and c.get("code") == "81258-6" for c in component["code"].get("coding", [])):
            return component
    return None


def test_genomics_reporting_variants_with_vaf_normalize_as_ctdna(genomics_examples: Path) -> None:
    """Every GenomicVariant example of the Genomics Reporting IG 3.0.0 that carries a VAF and a
    patient becomes a ctDNA observation with that fraction (most give its unit as the text
    "decimal", no UCUM code); every other Observation example is dead-lettered with a reason
    that names a FHIR element, none with an internal failure."""
    examples = [(p.name, json.loads(p.read_text(encoding="utf-8"))) for p in sorted(genomics_examples.glob("Observation-*.json"))]
    assert len(examples) >= 50
    normalized = 0
    for name, resource in examples:
        outcome = _normalize(resource, "ctdna")
        vaf = _vaf_component(resource)
        if vaf is not None and str((resource.get("subject") or {}).get("reference", "")).startswith("Patient/"):
            assert isinstance(outcome, Observation), (name, getattr(outcome, "reason", ""))
            decoded = decode_jsonld(outcome.value)
            assert decoded.kind == "ctdna" and decoded.unit == "1"
            assert decoded.value == pytest.approx(vaf["valueQuantity"]["value"])
            normalized += 1
        else:
            assert isinstance(outcome, DeadLetter), name
            assert outcome.stage in ("fhir", "code", "unit"), (name, outcome.stage, outcome.reason)
            assert outcome.reason.startswith(("Observation.", "body.")), (name, outcome.reason)
    assert normalized >= 5


def test_vaf_unit_words_and_unknown_unit_text() -> None:
    resource = {
        "resourceType": "Observation", "id": "v1", "status": "final", "subject": {"reference": "Patient/PSN-00001"},
        "effectiveDateTime": "2024-02-12",
        "code": {"coding": [{"system": "http://loinc.org", "code": "69548-6"}]},
        "component": [{
            "code": {"coding": [{"system": "http://loinc.org", "code": "81258-6"}]},
            "valueQuantity": {"value": 6.6, "unit": "percent", "system": "http://unitsofmeasure.org"},
        }],
    }
    outcome = _normalize(resource, "ctdna")
    assert isinstance(outcome, Observation), getattr(outcome, "reason", "")
    assert decode_jsonld(outcome.value).value == pytest.approx(0.066)  # 6.6 % as a fraction
    # A unit text that says nothing certain is not guessed: the contract names it.
    resource["component"][0]["valueQuantity"]["unit"] = "units"
    outcome = _normalize(resource, "ctdna")
    assert isinstance(outcome, DeadLetter) and outcome.stage == "unit" and "'units'" in outcome.reason


def test_r4_example_observations_are_normalized_or_dead_lettered_with_a_reason(r4_observation_examples: Path) -> None:
    """The official FHIR R4 Observation examples (vital signs, panels, genetics, qualitative
    results...) on both FHIR topics: none crashes a stage. What the service does not model (a
    LOINC code outside the term table, a qualitative value, no time) is dead-lettered with a
    reason naming the element."""
    files = sorted(r4_observation_examples.glob("Observation-*.json"))
    assert len(files) >= 50
    stages: dict[str, int] = {}
    for path in files:
        resource = json.loads(path.read_text(encoding="utf-8"))
        for kind in ("lab", "ctdna"):
            outcome = _normalize(resource, kind)
            if isinstance(outcome, DeadLetter):
                assert outcome.stage in ("fhir", "code", "unit", "schema"), (path.name, outcome.stage, outcome.reason)
                assert outcome.reason.startswith(("Observation.", "body.")), (path.name, outcome.reason)
                stages[outcome.stage] = stages.get(outcome.stage, 0) + 1
    # Both kinds of refusal occur: the FHIR conversion's and the term table's.
    assert stages.get("fhir", 0) > 0 and stages.get("code", 0) > 0


# -- MedicationAdministration on the treatment topic ---------------------------------------------


def test_mcode_medication_administrations_normalize_as_drug_treatments(mcode_examples: Path) -> None:
    """mCODE 4.0.0's CancerRelatedMedicationAdministration examples: each is a given dose in
    UCUM mg of an RxNorm-coded drug, and becomes a chemotherapy event carrying that drug and dose
    (in mg: the examples give no body size to convert it)."""
    files = sorted(mcode_examples.glob("MedicationAdministration-*.json"))
    assert len(files) >= 5
    for path in files:
        resource = json.loads(path.read_text(encoding="utf-8"))
        outcome = _normalize(resource, "treatment")
        assert isinstance(outcome, Observation), (path.name, getattr(outcome, "reason", ""))
        decoded = decode_jsonld(outcome.value)
        coding = resource["medicationCodeableConcept"]["coding"][0]
        dose = resource["dosage"]["dose"]
        assert decoded.kind == "treatment" and decoded.treatment_type == "chemotherapy"
        assert decoded.rxnorm == coding["code"] and decoded.drug_name
        assert (decoded.dose, decoded.dose_unit) == (pytest.approx(dose["value"]), dose["code"])
        assert decoded.patient_id == resource["subject"]["reference"].split("/")[-1]


def test_r4_medication_administrations_are_normalized_or_dead_lettered_with_a_reason(
    r4_medication_administration_examples: Path,
) -> None:
    """The official FHIR R4 MedicationAdministration examples (infusions in mL, tablets, patches,
    insulin units, a held and a cancelled one): what is a given dose in mg, mg/m2 or mg/kg of a
    named or coded drug normalizes; the rest is dead-lettered with a reason naming the element."""
    files = sorted(r4_medication_administration_examples.glob("MedicationAdministration-*.json"))
    assert len(files) >= 10
    normalized = 0
    for path in files:
        resource = json.loads(path.read_text(encoding="utf-8"))
        outcome = _normalize(resource, "treatment")
        dose = (resource.get("dosage") or {}).get("dose") or {}
        if isinstance(outcome, Observation):
            decoded = decode_jsonld(outcome.value)
            assert resource["status"] in ("completed", "in-progress") and dose.get("code") in ("mg", "mg/m2", "mg/kg")
            assert decoded.reported_unit in (None, dose["code"]) and decoded.drug_name
            normalized += 1
        else:
            assert outcome.stage in ("fhir", "schema", "unit"), (path.name, outcome.stage, outcome.reason)
            assert outcome.reason.startswith(("MedicationAdministration.", "Medication.", "body.")), (path.name, outcome.reason)
    assert normalized >= 3
    # On another topic a MedicationAdministration is routed away with the reason.
    outcome = _normalize(json.loads(files[0].read_text(encoding="utf-8")), "lab")
    assert isinstance(outcome, DeadLetter) and "treatment topic" in outcome.reason


def test_a_censored_fhir_quantity_is_a_censored_result() -> None:
    from schemas import example  # noqa: PLC0415

    resource = example("lab.fhir-censored")
    outcome = _normalize(resource, "lab")
    assert isinstance(outcome, Observation), getattr(outcome, "reason", "")
    decoded = decode_jsonld(outcome.value)
    assert (decoded.comparator, decoded.value, decoded.unit) == ("<", 0.1, "ng/mL")
    resource["valueQuantity"]["comparator"] = "~"
    outcome = _normalize(resource, "lab")
    assert isinstance(outcome, DeadLetter) and outcome.reason.startswith("Observation.valueQuantity.comparator")

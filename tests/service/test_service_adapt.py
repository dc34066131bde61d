"""Decoded observations to typed ones (stream.adapt), without a broker: pixels come through
verified claim checks under the imaging root, and whatever cannot be used says why."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from service_support import Cohort

from assimilation.observations import CtdnaObservation, ImagingObservation, MarkerObservation, TreatmentEvent
from stream.adapt import AdaptConfig, AdaptError, Unsupported, adapt, decode_record, tissue_claim
from stream.volumes import claim_check, read_nifti


def _first(cohort: Cohort, kind: str):
    record = next(r for r in cohort.records if r.kind == kind)
    return record, decode_record(record.value)


def test_every_kind_becomes_its_typed_observation(cohort: Cohort):
    config = AdaptConfig(cohort.root)
    kinds = {}
    for record in cohort.records:
        observation = adapt(decode_record(record.value), config, record.value)
        assert observation.event_id == record.event_id and observation.patient_id == record.patient_id
        kinds.setdefault(record.kind, type(observation))
    assert kinds == {"imaging": ImagingObservation, "lab": MarkerObservation, "ctdna": CtdnaObservation,
                     "treatment": TreatmentEvent}
    _, lab = _first(cohort, "lab")
    marker = adapt(lab, config)
    assert marker.code == "2532-0" and marker.unit == "U/L"  # the LOINC code, not its IRI


def test_a_study_reads_its_volumes_and_the_anatomy(cohort: Cohort):
    record, decoded = _first(cohort, "imaging")
    study = adapt(decoded, AdaptConfig(cohort.root), record.value)
    density, spacing = read_nifti(cohort.root / decoded.density_map.uri)
    assert spacing == study.spacing_mm == (5.0, 5.0, 5.0)
    assert np.array_equal(study.density, np.asarray(density, dtype=np.float32))
    assert study.segmentation.shape == study.tissue.shape == (16, 16, 16)
    assert set(np.unique(study.tissue)) <= {0, 1, 2} and study.tumor_volume_ml == decoded.volume_ml
    assert study.recorded_at == decoded.recorded_at is not None  # the data time travels too
    # Without the anatomy fallback the published RDF has no tissue map (yet): no anatomy.
    # the anatomy arrives as a verified claim check in the observation, no fallback needed
    assert decoded.tissue_map is not None
    no_fallback = adapt(decoded, AdaptConfig(cohort.root, anatomy_fallback=None), record.value)
    assert np.array_equal(no_fallback.tissue, study.tissue)


def test_a_tissue_claim_check_in_the_rdf_is_used_and_verified(cohort: Cohort):
    record, decoded = _first(cohort, "imaging")
    anatomy = cohort.root / decoded.patient_id / "anatomy.nii.gz"
    claim = claim_check(anatomy, cohort.root, format="nifti", content="tissue")
    doc = json.loads(record.value)
    node = {"@type": ["ot:ClaimCheck"], "ot:uri": {"@value": claim["uri"], "@type": "xsd:anyURI"},
            "ot:sha256": claim["sha256"], "ot:byteSize": claim["size"], "ot:format": "nifti"}
    doc["@graph"][0]["ot:tissueMap"] = node
    value = json.dumps(doc).encode()
    assert tissue_claim(decoded, value).sha256 == claim["sha256"]
    study = adapt(decoded, AdaptConfig(cohort.root, anatomy_fallback=None), value)
    assert study.tissue is not None and (study.tissue > 0).any()

    # the decoder's own claim (the normalizer publishes ot:tissueMap) is verified the same way
    assert decoded.tissue_map is not None
    tampered = dataclasses.replace(decoded, tissue_map=dataclasses.replace(decoded.tissue_map, sha256="f" * 64))
    with pytest.raises(AdaptError) as caught:
        adapt(tampered, AdaptConfig(cohort.root), record.value)
    assert caught.value.stage == "claim-check" and "sha" in caught.value.reason.lower()


@pytest.mark.parametrize(
    ("change", "stage"),
    [
        (lambda c: dataclasses.replace(c, sha256="0" * 64), "claim-check"),
        (lambda c: dataclasses.replace(c, size=c.size + 1), "claim-check"),
        (lambda c: dataclasses.replace(c, uri="../" + c.uri), "claim-check"),
        (lambda c: dataclasses.replace(c, uri="/etc/passwd"), "claim-check"),
        (lambda c: dataclasses.replace(c, uri=c.uri + ".missing"), "claim-check"),
    ],
)
def test_a_claim_check_that_does_not_resolve_or_verify_is_refused(cohort: Cohort, change, stage):
    _, decoded = _first(cohort, "imaging")
    bad = dataclasses.replace(decoded, density_map=change(decoded.density_map))
    with pytest.raises(AdaptError) as caught:
        adapt(bad, AdaptConfig(cohort.root))
    assert caught.value.stage == stage and caught.value.reason


def test_no_imaging_root_refuses_pixels(cohort: Cohort):
    _, decoded = _first(cohort, "imaging")
    with pytest.raises(AdaptError) as caught:
        adapt(decoded, AdaptConfig(None))
    assert caught.value.stage == "claim-check"


def test_unmodelled_events_are_unsupported_and_unusable_doses_refused(cohort: Cohort):
    config = AdaptConfig(cohort.root)
    _, ctdna = _first(cohort, "ctdna")
    with pytest.raises(Unsupported):
        adapt(dataclasses.replace(ctdna, ctdna_measure="variant_allele_fraction"), config)
    _, treatment = _first(cohort, "treatment")
    with pytest.raises(Unsupported):
        adapt(dataclasses.replace(treatment, treatment_type="surgery"), config)
    chemo = next(decode_record(r.value) for r in cohort.records
                 if r.kind == "treatment" and decode_record(r.value).treatment_type == "chemotherapy")
    # A dose in mg or mg/kg that no body size converted is carried as it is, saying its unit.
    for unit in ("mg", "mg/kg"):
        typed = adapt(dataclasses.replace(chemo, dose_unit=unit, reported_value=None, reported_unit=None), config)
        assert (typed.dose, typed.unit, typed.reported_unit, typed.dose_mg_per_m2) == (chemo.dose, unit, unit, None)
    assert adapt(chemo, config).dose_mg_per_m2 == chemo.dose
    with pytest.raises(AdaptError) as caught:
        adapt(dataclasses.replace(chemo, dose_unit="g"), config)
    assert caught.value.stage == "adapt" and "'g'" in caught.value.reason and "mg/kg" in caught.value.reason
    _, lab = _first(cohort, "lab")
    with pytest.raises(AdaptError):
        adapt(dataclasses.replace(lab, value=-1.0), config)


@pytest.mark.parametrize("value", [b"", b"\xff\xfe", b"[]", b'{"@context": {}, "@graph": []}', b"null"])
def test_undecodable_values_raise_decode_errors(value):
    with pytest.raises(AdaptError) as caught:
        decode_record(value)
    assert caught.value.stage == "decode"

"""The term table: the codes the contract promises, consistent IRIs and units."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from schemas import TERMS, ContractError, Term, TermTable, UnknownCodeError, units
from schemas.terms import LOCAL_NAMESPACE, NAMESPACES

REQUIRED = [
    ("loinc", "2857-1", "http://loinc.org/rdf#2857-1", "ng/mL"),
    ("loinc", "2039-6", "http://loinc.org/rdf#2039-6", "ng/mL"),
    ("loinc", "10334-1", "http://loinc.org/rdf#10334-1", "[iU]/mL"),
    ("loinc", "24108-3", "http://loinc.org/rdf#24108-3", "[iU]/mL"),
    ("loinc", "6875-9", "http://loinc.org/rdf#6875-9", "[iU]/mL"),
    ("loinc", "2532-0", "http://loinc.org/rdf#2532-0", "U/L"),
    ("loinc", "21889-1", "http://loinc.org/rdf#21889-1", "mm"),
    ("loinc", "81258-6", "http://loinc.org/rdf#81258-6", "1"),
    ("snomed", "113091000", "http://snomed.info/id/113091000", None),
    ("snomed", "77477000", "http://snomed.info/id/77477000", None),
    ("snomed", "82918005", "http://snomed.info/id/82918005", None),
    ("snomed", "1217123003", "http://snomed.info/id/1217123003", None),
    ("snomed", "367336001", "http://snomed.info/id/367336001", None),
    ("ncit", "C3058", "http://purl.obolibrary.org/obo/NCIT_C3058", None),
    ("ncit", "C71732", "http://purl.obolibrary.org/obo/NCIT_C71732", None),
    ("ncit", "C2926", "http://purl.obolibrary.org/obo/NCIT_C2926", None),
    ("ncit", "C2919", "http://purl.obolibrary.org/obo/NCIT_C2919", None),
    ("ncit", "C8294", "http://purl.obolibrary.org/obo/NCIT_C8294", None),
    ("local", "ctdna-tumor-fraction", LOCAL_NAMESPACE + "ctdna-tumor-fraction", "1"),
    ("local", "cfdna-concentration", LOCAL_NAMESPACE + "cfdna-concentration", "ng/mL"),
    ("local", "ctdna-copies", LOCAL_NAMESPACE + "ctdna-copies", "{copies}/mL"),
    ("local", "tumor-volume", LOCAL_NAMESPACE + "tumor-volume", "mL"),
]


@pytest.mark.parametrize(("system", "code", "iri", "unit"), REQUIRED)
def test_promised_terms_are_present(system: str, code: str, iri: str, unit: str | None) -> None:
    term = TERMS.lookup(system, code)
    assert (term.iri, term.canonical_unit) == (iri, unit)
    assert term.display
    assert TERMS.by_iri(iri) is term


def test_displays_name_what_the_codes_mean() -> None:
    assert "Prostate specific" in TERMS.lookup("loinc", "2857-1").display
    assert "Magnetic resonance" in TERMS.for_modality("MR").display
    assert "tomography" in TERMS.for_modality("CT").display
    assert "Positron emission" in TERMS.for_modality("PT").display
    assert "Radiotherapy" in TERMS.for_treatment("radiotherapy").display
    assert "Chemotherapy" in TERMS.for_treatment("chemotherapy").display
    assert TERMS.lookup("ncit", "C3058").display == "Glioblastoma"


def test_table_is_consistent() -> None:
    assert len(TERMS) >= len(REQUIRED)
    for term in TERMS:
        assert term.iri == NAMESPACES[term.system] + term.code
        assert term.canonical_unit is None or units.is_known_unit(term.canonical_unit)
        if term.system == "local":
            assert term.notes.startswith("LOCAL code"), term


@pytest.mark.parametrize(
    ("measure", "code", "unit"),
    [
        ("tumor_fraction", "ctdna-tumor-fraction", "1"),
        ("vaf", "81258-6", "1"),
        ("copies_per_ml", "ctdna-copies", "{copies}/mL"),
        ("cfdna_concentration", "cfdna-concentration", "ng/mL"),
    ],
)
def test_ctdna_measures_map_to_terms(measure: str, code: str, unit: str) -> None:
    term = TERMS.for_ctdna_measure(measure)
    assert (term.code, term.canonical_unit) == (code, unit)


def test_unknown_codes_raise_a_contract_error() -> None:
    with pytest.raises(UnknownCodeError, match="'99999-9' is not a known LOINC code"):
        TERMS.lookup("loinc", "99999-9")
    with pytest.raises(UnknownCodeError, match="not a known code system"):
        TERMS.lookup("icd10", "C71.9")
    with pytest.raises(UnknownCodeError, match="expected one of: CT, MR, PT"):
        TERMS.for_modality("XR")
    with pytest.raises(UnknownCodeError):
        TERMS.by_iri("http://loinc.org/rdf#0000-0")
    assert issubclass(UnknownCodeError, ContractError) and issubclass(ContractError, ValueError)


def test_forecast_quantities_resolve() -> None:
    assert TERMS.for_forecast_quantity("tumor_volume_ml").canonical_unit == "mL"
    assert TERMS.for_forecast_quantity("marker:2039-6").code == "2039-6"
    assert TERMS.for_forecast_quantity("burden") is None


def test_construction_refuses_an_inconsistent_table() -> None:
    good = Term("loinc", "2857-1", "http://loinc.org/rdf#2857-1", "PSA", "tumor_marker", "ng/mL")
    with pytest.raises(ContractError, match="duplicate"):
        TermTable([good, good])
    with pytest.raises(ContractError, match=re.escape("expected http://loinc.org/rdf#2857-1")):
        TermTable([dataclasses.replace(good, iri="http://loinc.org/2857-1")])
    with pytest.raises(ContractError, match=re.escape("units.py does not know")):
        TermTable([dataclasses.replace(good, canonical_unit="NG/ML")])
    with pytest.raises(UnknownCodeError):
        TermTable([good], {("dicom_modality", "MR"): ("snomed", "113091000")})


def test_term_is_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TERMS.lookup("loinc", "2857-1").code = "2039-6"  # type: ignore[misc]


def test_terms_are_read_on_first_use_not_at_import() -> None:
    probe = (
        "import schemas, schemas.terms as t\n"
        "before = t.default_terms.cache_info().currsize\n"
        "schemas.TERMS.lookup('loinc', '2857-1')\n"
        "print(before, t.default_terms.cache_info().currsize)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True)
    assert out.stdout.split() == ["0", "1"], out.stderr

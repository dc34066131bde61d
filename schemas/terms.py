"""The ontology term table: codes the contract understands, their IRIs and canonical units.

The table is data (``data/terms.csv``); ``data/term_keys.csv`` maps the contract's own keys
(DICOM modality, ctDNA measure, treatment type, forecast quantity) to rows of it.

Systems and their IRI namespaces:

- ``loinc``  http://loinc.org/rdf#
- ``snomed`` http://snomed.info/id/
- ``ncit``   http://purl.obolibrary.org/obo/NCIT_
- ``rxnorm`` http://purl.bioontology.org/ontology/RXNORM/ (drug ingredients, by RxCUI)
- ``atc``    http://purl.bioontology.org/ontology/UATC/ (WHO ATC drug classes; no rows yet)
- ``local``  https://w3id.org/oncotwin/code# -- a LOCAL code system for what no standard
  terminology codes: ctDNA tumor fraction (``ctdna-tumor-fraction``, canonical unit ``1``),
  cfDNA concentration (``cfdna-concentration``, ``ng/mL``), ctDNA mutant copies
  (``ctdna-copies``, ``{copies}/mL``) and imaging-derived tumor volume (``tumor-volume``,
  ``mL``). Replace them with standard codes once such codes exist; the IRIs are then the
  only thing consumers of the RDF would see change.

Drugs (category ``drug``) are rows of RxNorm ingredients, with NCIt rows where the NCIt code
was confirmed; ``drug_ncit`` keys tie an RxCUI to its NCIt code. A drug event may carry any
well-formed code of ``DRUG_SYSTEMS``: one the table lacks is accepted and recorded as sent
(``TermTable.drug`` answers None for it).
"""

from __future__ import annotations

import csv
import functools
import io
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources

from . import units
from .errors import ContractError, UnknownCodeError

NAMESPACES: Mapping[str, str] = {
    "loinc": "http://loinc.org/rdf#",
    "snomed": "http://snomed.info/id/",
    "ncit": "http://purl.obolibrary.org/obo/NCIT_",
    "local": "https://w3id.org/oncotwin/code#",
    "rxnorm": "http://purl.bioontology.org/ontology/RXNORM/",
    "atc": "http://purl.bioontology.org/ontology/UATC/",
}
LOCAL_NAMESPACE = NAMESPACES["local"]

_TERM_COLUMNS = ["system", "code", "iri", "display", "category", "canonical_unit", "notes"]
_KEY_COLUMNS = ["key_type", "key", "system", "code"]
_MARKER_PREFIX = "marker:"

# The code systems a drug may be coded in: short name -> (FHIR system URI, code format).
DRUG_SYSTEMS: Mapping[str, tuple[str, re.Pattern[str]]] = {
    "rxnorm": ("http://www.nlm.nih.gov/research/umls/rxnorm", re.compile(r"[0-9]{1,10}\Z")),
    "ncit": ("http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl", re.compile(r"C[0-9]{1,7}\Z")),
    "snomed": ("http://snomed.info/sct", re.compile(r"[1-9][0-9]{5,17}\Z")),
    "atc": ("http://www.whocc.no/atc", re.compile(r"[A-Z]([0-9]{2}([A-Z]([A-Z]([0-9]{2})?)?)?)?\Z")),
}
DRUG_CODE_FORMATS: Mapping[str, str] = {
    "rxnorm": "an RxCUI of 1 to 10 digits (e.g. 37776)",
    "ncit": "C and 1 to 7 digits (e.g. C1244)",
    "snomed": "an SCTID of 6 to 18 digits",
    "atc": "an ATC code such as L01AX03 (or one of its levels, e.g. L01)",
}
_DRUG_SYSTEM_BY_URI = {uri: name for name, (uri, _) in DRUG_SYSTEMS.items()}

# What a segmentation's labels may mean (imaging.json segmentation_labels; a test holds the two
# equal) and which of them are tumour: the visible tumour (a study's 0/1 segmentation) is their
# union. The BraTS convention, read where an event gives no mapping: 1 necrotic / non-enhancing
# core, 2 peritumoral oedema (SNFH in BraTS 2023), 4 enhancing tumour (BraTS 2017-2021) or 3
# (BraTS 2023).
SEGMENTATION_MEANINGS = ("tumor", "necrosis", "edema", "enhancing", "resection_cavity", "background")
TUMOUR_MEANINGS = frozenset({"tumor", "necrosis", "edema", "enhancing"})
BRATS_LABELS: Mapping[int, str] = {1: "necrosis", 2: "edema", 3: "enhancing", 4: "enhancing"}


def drug_system(system: str) -> str | None:
    """The short name of a drug code system given by short name or FHIR URI, else None."""
    if system in DRUG_SYSTEMS:
        return system
    return _DRUG_SYSTEM_BY_URI.get(system)


@dataclass(frozen=True)
class Term:
    system: str
    code: str
    iri: str
    display: str
    category: str
    canonical_unit: str | None  # None for terms that are not quantities (modalities, ...)
    notes: str = ""


class TermTable:
    """Immutable lookup over terms; construction checks the table is consistent."""

    def __init__(
        self,
        terms: Iterable[Term],
        keys: Mapping[tuple[str, str], tuple[str, str]] | None = None,
    ) -> None:
        self._by_code: dict[tuple[str, str], Term] = {}
        self._by_iri: dict[str, Term] = {}
        for term in terms:
            _check_term(term)
            if (term.system, term.code) in self._by_code:
                raise ContractError(f"duplicate term {term.system}:{term.code}")
            if term.iri in self._by_iri:
                raise ContractError(f"duplicate IRI {term.iri}")
            self._by_code[term.system, term.code] = term
            self._by_iri[term.iri] = term
        self._keys: dict[tuple[str, str], Term] = {}
        for key, (system, code) in (keys or {}).items():
            self._keys[key] = self.lookup(system, code)
        self._drug_names = {
            t.display.casefold(): t for t in self._by_code.values() if t.category == "drug" and t.system == "rxnorm"
        }
        # drug_ncit keys: RxCUI -> NCIt term; and the way back.
        self._same_drug: dict[Term, tuple[Term, ...]] = {}
        for (key_type, rxcui), ncit in self._keys.items():
            if key_type == "drug_ncit":
                rxnorm = self.lookup("rxnorm", rxcui)
                self._same_drug[rxnorm] = (*self._same_drug.get(rxnorm, ()), ncit)
                self._same_drug[ncit] = (*self._same_drug.get(ncit, ()), rxnorm)

    @classmethod
    def from_csv(cls, terms_csv: str, keys_csv: str = "") -> TermTable:
        """Build a table from the text of a terms CSV and (optionally) a keys CSV."""
        terms = [
            Term(
                system=row["system"],
                code=row["code"],
                iri=row["iri"],
                display=row["display"],
                category=row["category"],
                canonical_unit=row["canonical_unit"] or None,
                notes=row["notes"],
            )
            for row in _read_csv(terms_csv, _TERM_COLUMNS)
        ]
        keys = {
            (row["key_type"], row["key"]): (row["system"], row["code"])
            for row in (_read_csv(keys_csv, _KEY_COLUMNS) if keys_csv else [])
        }
        return cls(terms, keys)

    def __iter__(self) -> Iterator[Term]:
        return iter(self._by_code.values())

    def __len__(self) -> int:
        return len(self._by_code)

    def lookup(self, system: str, code: str) -> Term:
        try:
            return self._by_code[system, code]
        except (KeyError, TypeError):
            pass
        if not isinstance(system, str) or system not in NAMESPACES:
            raise UnknownCodeError(
                f"{system!r:.40} is not a known code system (expected one of: "
                f"{', '.join(NAMESPACES)})"
            )
        raise UnknownCodeError(f"{code!r:.60} is not a known {_SYSTEM_NAMES[system]} code")

    def by_iri(self, iri: str) -> Term:
        try:
            return self._by_iri[iri]
        except (KeyError, TypeError):
            raise UnknownCodeError(f"{iri!r:.120} is not the IRI of a known term") from None

    def for_key(self, key_type: str, key: str) -> Term:
        """The term the contract's own key maps to, e.g. ("dicom_modality", "MR")."""
        try:
            return self._keys[key_type, key]
        except (KeyError, TypeError):
            known = sorted(k for t, k in self._keys if t == key_type)
            raise UnknownCodeError(
                f"{key!r:.60} is not a known {key_type} (expected one of: {', '.join(known)})"
            ) from None

    def for_modality(self, modality: str) -> Term:
        return self.for_key("dicom_modality", modality)

    def for_ctdna_measure(self, measure: str) -> Term:
        return self.for_key("ctdna_measure", measure)

    def for_treatment(self, treatment_type: str) -> Term:
        return self.for_key("treatment_type", treatment_type)

    def drug(self, system: str, code: str) -> Term | None:
        """The drug term of a code (system by short name), or None where the table lacks it."""
        term = self._by_code.get((system, code))
        return term if term is not None and term.category == "drug" else None

    def drug_by_name(self, name: str) -> Term | None:
        """The RxNorm ingredient whose name is ``name`` (case aside), or None."""
        return self._drug_names.get(name.strip().casefold()) if isinstance(name, str) else None

    def drug_equivalents(self, term: Term) -> tuple[Term, ...]:
        """The other codes of the same drug (drug_ncit keys: an RxNorm ingredient's NCIt code,
        and an NCIt drug's RxNorm ingredient)."""
        return self._same_drug.get(term, ())

    def for_forecast_quantity(self, name: str) -> Term | None:
        """The term of a forecast quantity; None for model-internal ones such as "burden"."""
        if isinstance(name, str) and name.startswith(_MARKER_PREFIX):
            return self.lookup("loinc", name.removeprefix(_MARKER_PREFIX))
        if name == "burden":
            return None
        return self.for_key("forecast_quantity", name)


_SYSTEM_NAMES = {
    "loinc": "LOINC", "snomed": "SNOMED CT", "ncit": "NCIt", "local": "local", "rxnorm": "RxNorm", "atc": "ATC",
}


def _check_term(term: Term) -> None:
    namespace = NAMESPACES.get(term.system)
    if namespace is None:
        raise ContractError(f"term {term.code!r} has unknown system {term.system!r}")
    if term.iri != namespace + term.code:
        raise ContractError(
            f"term {term.system}:{term.code} has IRI {term.iri}, expected {namespace + term.code}"
        )
    if term.canonical_unit is not None and not units.is_known_unit(term.canonical_unit):
        raise ContractError(
            f"term {term.system}:{term.code} has canonical unit {term.canonical_unit!r}, "
            "which units.py does not know"
        )


def _read_csv(text: str, columns: list[str]) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames != columns:
        raise ContractError(f"CSV header {reader.fieldnames} differs from {columns}")
    return [{k: (v or "").strip() for k, v in row.items()} for row in reader]


@functools.cache
def default_terms() -> TermTable:
    """The package's term table, read once on first use."""
    data = resources.files(__package__).joinpath("data")
    return TermTable.from_csv(
        data.joinpath("terms.csv").read_text(encoding="utf-8"),
        data.joinpath("term_keys.csv").read_text(encoding="utf-8"),
    )


def __getattr__(name: str) -> TermTable:
    # `TERMS` is loaded on first access, so importing schemas costs no file reads.
    if name == "TERMS":
        return default_terms()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

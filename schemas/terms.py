"""The ontology term table: codes the contract understands, their IRIs and canonical units.

The table is data (``data/terms.csv``); ``data/term_keys.csv`` maps the contract's own keys
(DICOM modality, ctDNA measure, treatment type, forecast quantity) to rows of it.

Systems and their IRI namespaces:

- ``loinc``  http://loinc.org/rdf#
- ``snomed`` http://snomed.info/id/
- ``ncit``   http://purl.obolibrary.org/obo/NCIT_
- ``local``  https://w3id.org/oncotwin/code# -- a LOCAL code system for what no standard
  terminology codes: ctDNA tumor fraction (``ctdna-tumor-fraction``, canonical unit ``1``),
  cfDNA concentration (``cfdna-concentration``, ``ng/mL``), ctDNA mutant copies
  (``ctdna-copies``, ``{copies}/mL``) and imaging-derived tumor volume (``tumor-volume``,
  ``mL``). Replace them with standard codes once such codes exist; the IRIs are then the
  only thing consumers of the RDF would see change.
"""

from __future__ import annotations

import csv
import functools
import io
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
}
LOCAL_NAMESPACE = NAMESPACES["local"]

_TERM_COLUMNS = ["system", "code", "iri", "display", "category", "canonical_unit", "notes"]
_KEY_COLUMNS = ["key_type", "key", "system", "code"]
_MARKER_PREFIX = "marker:"


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

    def for_forecast_quantity(self, name: str) -> Term | None:
        """The term of a forecast quantity; None for model-internal ones such as "burden"."""
        if isinstance(name, str) and name.startswith(_MARKER_PREFIX):
            return self.lookup("loinc", name.removeprefix(_MARKER_PREFIX))
        if name == "burden":
            return None
        return self.for_key("forecast_quantity", name)


_SYSTEM_NAMES = {"loinc": "LOINC", "snomed": "SNOMED CT", "ncit": "NCIt", "local": "local"}


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

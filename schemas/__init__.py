"""The oncotwin event contract.

JSON Schemas for the clinical events (imaging, lab, ctdna, treatment) and for published
forecasts, the ontology term table, UCUM unit conversion, validation that never raises, and
helpers to build and normalize events. This package reads only its own files and imports no
other oncotwin package.
"""

from __future__ import annotations

from typing import Any

from .errors import ContractError, IncompatibleUnitError, UnknownCodeError, UnknownUnitError
from .events import make_event, normalize_event
from .loader import (
    CONTRACT_VERSION,
    EVENT_KINDS,
    EXAMPLES_DIR,
    SCHEMA_NAMES,
    SCHEMA_VERSION,
    example,
    example_names,
    load_schema,
    schema_id,
    schema_registry,
)
from .terms import NAMESPACES, Term, TermTable
from .times import format_time, parse_time
from .units import convert, to_canonical
from .validate import (
    EventValidationError,
    ValidationIssue,
    is_valid,
    validate,
    validate_forecast,
    validate_or_raise,
)

__all__ = [
    "CONTRACT_VERSION",
    "EVENT_KINDS",
    "EXAMPLES_DIR",
    "NAMESPACES",
    "SCHEMA_NAMES",
    "SCHEMA_VERSION",
    "TERMS",
    "ContractError",
    "EventValidationError",
    "IncompatibleUnitError",
    "Term",
    "TermTable",
    "UnknownCodeError",
    "UnknownUnitError",
    "ValidationIssue",
    "convert",
    "example",
    "example_names",
    "format_time",
    "is_valid",
    "load_schema",
    "make_event",
    "normalize_event",
    "parse_time",
    "schema_id",
    "schema_registry",
    "to_canonical",
    "validate",
    "validate_forecast",
    "validate_or_raise",
]


def __getattr__(name: str) -> Any:
    # TERMS is read from the CSV on first access, not at import.
    if name == "TERMS":
        from .terms import default_terms

        return default_terms()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

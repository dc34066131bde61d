"""Access to the package's own files: JSON Schemas, their registry, and example documents.

All `$ref`s between our schemas resolve through an in-memory `referencing.Registry`; it has no
retriever, so an unknown reference fails instead of reaching for the network.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from .errors import ContractError

PACKAGE_DIR = Path(__file__).resolve().parent
SCHEMAS_DIR = PACKAGE_DIR / "json"
EXAMPLES_DIR = PACKAGE_DIR / "examples"

SCHEMA_VERSION = "1.0"
EVENT_KINDS: tuple[str, ...] = ("imaging", "lab", "ctdna", "treatment")
SCHEMA_NAMES: tuple[str, ...] = ("envelope", *EVENT_KINDS, "forecast")
ID_BASE = "https://w3id.org/oncotwin/schemas/"


def schema_id(name: str) -> str:
    return f"{ID_BASE}{name}/{SCHEMA_VERSION}"


def load_schema(name: str) -> dict[str, Any]:
    """A copy of the named JSON Schema ("envelope", "imaging", ..., "forecast")."""
    return copy.deepcopy(_schema(name))


def example(kind: str) -> dict[str, Any]:
    """A fresh copy of the example document for an event kind or "forecast"."""
    if kind not in (*EVENT_KINDS, "forecast"):
        raise ContractError(
            f"no example named {kind!r:.40} (expected one of: {', '.join(EVENT_KINDS)}, forecast)"
        )
    document: dict[str, Any] = json.loads((EXAMPLES_DIR / f"{kind}.json").read_text("utf-8"))
    return document


@functools.cache
def schema_registry() -> Registry:
    resources = [
        (schema_id(name), Resource.from_contents(_schema(name), default_specification=DRAFT202012))
        for name in SCHEMA_NAMES
    ]
    return Registry().with_resources(resources).crawl()


@functools.cache
def _schema(name: str) -> dict[str, Any]:
    if name not in SCHEMA_NAMES:
        raise ContractError(
            f"no schema named {name!r:.40} (expected one of: {', '.join(SCHEMA_NAMES)})"
        )
    schema: dict[str, Any] = json.loads((SCHEMAS_DIR / f"{name}.json").read_text("utf-8"))
    if schema.get("$id") != schema_id(name):
        raise ContractError(
            f"{name}.json has $id {schema.get('$id')!r}, expected {schema_id(name)}"
        )
    return schema

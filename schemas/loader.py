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

# The version in the schemas' $ids: it names the documents of major version 1 and stays while
# only minor versions follow (references to the schemas keep resolving).
SCHEMA_VERSION = "1.0"
# What producers write in an event's schema_version: 1.1 added optional fields (censored
# results, drug codes and body size, course facts, segmentation labels, a study without a
# series) and opened every body to extensions. The contract reads every 1.x alike.
CONTRACT_VERSION = "1.1"
EVENT_KINDS: tuple[str, ...] = ("imaging", "lab", "ctdna", "treatment")
SCHEMA_NAMES: tuple[str, ...] = ("envelope", *EVENT_KINDS, "forecast")
ID_BASE = "https://w3id.org/oncotwin/schemas/"


def schema_id(name: str) -> str:
    return f"{ID_BASE}{name}/{SCHEMA_VERSION}"


def load_schema(name: str) -> dict[str, Any]:
    """A copy of the named JSON Schema ("envelope", "imaging", ..., "forecast")."""
    return copy.deepcopy(_schema(name))


def example(name: str) -> dict[str, Any]:
    """A fresh copy of an example document: an event kind or "forecast" (the base example), or
    "<kind>.<variant>" (one variant of what the contract accepts, see example_names())."""
    names = example_names()
    if name not in names:
        raise ContractError(f"no example named {name!r:.60} (expected one of: {', '.join(names)})")
    document: dict[str, Any] = json.loads((EXAMPLES_DIR / f"{name}.json").read_text("utf-8"))
    return document


@functools.cache
def example_names() -> tuple[str, ...]:
    """Every example: the base one of each event kind and the forecast, then the variants
    ("lab.censored", "treatment.fhir-medication-administration", ...). A variant whose name
    starts with "fhir-" is a FHIR R4 resource for the kind's topic, not a native event."""
    stems = sorted(p.stem for p in EXAMPLES_DIR.glob("*.json"))
    bases = [n for n in (*EVENT_KINDS, "forecast") if n in stems]
    return (*bases, *(s for s in stems if s not in bases))


@functools.cache
def known_fields(kind: str) -> dict[str, Any]:
    """The fields the contract names for events of ``kind``, as a tree: field name -> the tree
    of the object it holds ({} for a value whose fields the contract does not name: a number,
    an array, a free-form map such as segmentation_labels). Gathered from the schema through
    its $refs, allOf/anyOf/oneOf and then/else branches; a field outside the tree is an
    extension (schemas.events)."""
    if kind not in EVENT_KINDS:
        raise ContractError(f"no event kind {kind!r:.40} (expected one of: {', '.join(EVENT_KINDS)})")
    return _fields(_schema(kind), schema_registry().resolver(base_uri=schema_id(kind)), 0)


_FIELD_SOURCES = ("allOf", "anyOf", "oneOf", "then", "else")  # not "if": a condition names no field


def _fields(node: Any, resolver: Any, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(node, dict) or depth > 16:  # our schemas nest 6 deep at most
        return out
    if isinstance(node.get("$ref"), str):
        resolved = resolver.lookup(node["$ref"])
        _merge(out, _fields(resolved.contents, resolved.resolver, depth + 1))
    for key in _FIELD_SOURCES:
        branches = node.get(key)
        for branch in branches if isinstance(branches, list) else [branches]:
            _merge(out, _fields(branch, resolver, depth + 1))
    for name, sub in (node.get("properties") or {}).items():
        _merge(out, {name: _fields(sub, resolver, depth + 1)})
    return out


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for name, tree in other.items():
        _merge(into.setdefault(name, {}), tree)


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

"""The schema files themselves: valid draft 2020-12, stable ids, refs resolved offline."""

from __future__ import annotations

import re

import pytest
from jsonschema import Draft202012Validator
from referencing.exceptions import Unresolvable

from schemas import (
    EVENT_KINDS,
    EXAMPLES_DIR,
    SCHEMA_NAMES,
    example,
    example_names,
    load_schema,
    schema_id,
    schema_registry,
    validate,
    validate_forecast,
)
from schemas.times import DATETIME_PATTERN


def _refs(node: object):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_is_valid_draft_2020_12_with_stable_id(name: str) -> None:
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://w3id.org/oncotwin/schemas/{name}/1.0"


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_every_ref_resolves_through_the_registry(name: str) -> None:
    resolver = schema_registry().resolver(base_uri=schema_id(name))
    refs = list(_refs(load_schema(name)))
    for ref in refs:
        assert resolver.lookup(ref).contents is not None, ref
    if name != "envelope":
        assert any(r.startswith(schema_id("envelope")) for r in refs), "shared defs not reused"


def test_registry_never_fetches_unknown_references() -> None:
    with pytest.raises(Unresolvable):
        schema_registry().resolver().lookup("https://example.org/not-ours.json")


def _closes(node: object) -> bool:
    """Whether a schema refuses fields it does not name anywhere (a false additional- or
    unevaluatedProperties)."""
    if isinstance(node, dict):
        if node.get("additionalProperties") is False or node.get("unevaluatedProperties") is False:
            return True
        return any(_closes(v) for v in node.values())
    return isinstance(node, list) and any(_closes(v) for v in node)


def test_event_schemas_admit_unknown_fields_and_forecasts_do_not() -> None:
    # Producers add fields: an event's consumer tolerates them (carried as extensions); the
    # forecast is our own output, closed so that a typo in it is caught here.
    for name in ("envelope", *EVENT_KINDS):
        assert not _closes(load_schema(name)), name
    for kind in EVENT_KINDS:
        assert load_schema(kind)["properties"]["kind"] == {"const": kind}
    assert load_schema("forecast")["additionalProperties"] is False


def test_datetime_pattern_in_code_matches_the_schema() -> None:
    assert load_schema("envelope")["$defs"]["dateTime"]["pattern"] == DATETIME_PATTERN


def test_load_schema_hands_out_copies() -> None:
    load_schema("lab")["$defs"]["body"]["properties"].clear()
    assert validate(example("lab")) == []


@pytest.mark.parametrize("name", [n for n in example_names() if n != "forecast"])
def test_every_event_example_validates(name: str) -> None:
    from stream.fhir import resource_to_event  # noqa: PLC0415  (a FHIR variant is converted first)

    document = example(name)
    kind = name.split(".")[0]
    event = resource_to_event(document).event if ".fhir-" in name else document
    assert event["kind"] == kind
    assert validate(event) == []


def test_forecast_example_validates() -> None:
    assert validate_forecast(example("forecast")) == []


def test_examples_use_pseudonyms_one_base_per_kind_and_named_variants() -> None:
    names = sorted(p.stem for p in EXAMPLES_DIR.glob("*.json"))
    assert sorted(example_names()) == names
    assert {n for n in names if "." not in n} == {*EVENT_KINDS, "forecast"}
    for name in names:
        assert re.fullmatch(r"(imaging|lab|ctdna|treatment|forecast)(\.[a-z0-9-]+)?", name), name
        document = example(name)
        pseudonym = document["subject"]["reference"].split("/")[-1] if "resourceType" in document else document["patient_id"]
        assert re.fullmatch(r"VP-\d{4}", pseudonym)
    # The base examples are today's contract as first published: they stay valid as they are.
    assert all(example(kind)["schema_version"] == "1.0" for kind in EVENT_KINDS)

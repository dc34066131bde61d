"""validate() answers every input with a list of issues: it never raises, whatever arrives."""

from __future__ import annotations

import copy
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import (
    TERMS,
    ValidationIssue,
    convert,
    example,
    example_names,
    load_schema,
    normalize_event,
    validate,
    validate_forecast,
)
from schemas.units import KNOWN_UNITS, dimension_of

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

any_text = st.text(st.characters(exclude_categories=()), max_size=12)  # lone surrogates too
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**320)
    | st.floats()  # NaN and infinities included
    | any_text
    | st.sampled_from(["VP-0001", "2857-1", "%", "ng/mL", "2024-02-30T00:00:00Z", "lab", "imaging"])
)
json_like = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=16,
)


def _locations(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _locations(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _locations(value, (*prefix, index))
    return found


@st.composite
def mutated_examples(draw: st.DrawFn) -> Any:
    """A valid example with one to three fields replaced, removed or added."""
    document: Any = example(draw(st.sampled_from([n for n in example_names() if ".fhir-" not in n])))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        where = draw(st.sampled_from(_locations(document)))
        if not where:
            document = draw(json_like)
            continue
        parent = document
        for key in where[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[where[-1]] = draw(json_like)
        elif action == "delete" and isinstance(parent, dict):
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[draw(any_text)] = draw(json_like)
    return document


def _assert_well_formed(issues: object) -> None:
    assert isinstance(issues, list)
    for issue in issues:
        assert isinstance(issue, ValidationIssue)
        assert issue.message.startswith(issue.path)
        # dead-letter reasons are written as UTF-8: lone surrogates must arrive escaped
        issue.message.encode("utf-8")


@FUZZ
@given(json_like)
def test_random_json_never_makes_validation_raise(junk: Any) -> None:
    _assert_well_formed(validate(junk))
    _assert_well_formed(validate_forecast(junk))


@FUZZ
@given(mutated_examples())
def test_mutated_examples_never_make_validation_raise(document: Any) -> None:
    before = repr(document)
    issues = validate(document)
    _assert_well_formed(issues)
    _assert_well_formed(validate_forecast(document))
    assert repr(document) == before  # validation does not modify its input
    if not issues:
        # whatever passes validation can be normalized, to finite canonical values
        normalized = normalize_event(document)
        for quantity in (normalized["body"], normalized["body"].get("dose") or {}):
            if "canonical_value" in quantity:
                assert math.isfinite(quantity["canonical_value"])


LAB_CODES = sorted(t.code for t in TERMS if t.system == "loinc" and t.canonical_unit)
CTDNA_MEASURES = ["tumor_fraction", "vaf", "copies_per_ml", "cfdna_concentration"]
quantity_values = (
    st.floats()
    | st.integers(min_value=-(10**6), max_value=10**6)
    | st.integers(min_value=10**12 - 2, max_value=10**12 + 2)  # about the schemas' bound
    | st.sampled_from([2**53 + 1, 2**63, 2**64, 1e12, 1e12 + 1.0])
)


@FUZZ
@given(
    st.sampled_from([("lab", c) for c in LAB_CODES] + [("ctdna", m) for m in CTDNA_MEASURES]),
    quantity_values,
    st.sampled_from(sorted(KNOWN_UNITS)),
)
def test_quantities_are_accepted_exactly_when_they_make_sense(
    coded: tuple[str, str], value: float, unit: str
) -> None:
    kind, key = coded
    event = example(kind)
    event["body"].update(value=value, unit=unit)
    if kind == "lab":
        event["body"]["code"] = key
        term = TERMS.lookup("loinc", key)
    else:
        event["body"]["measure"] = key
        term = TERMS.for_ctdna_measure(key)
    canonical = term.canonical_unit
    bound = load_schema(kind)["$defs"]["body"]["properties"]["value"]["maximum"]
    expected_ok = (
        math.isfinite(value)
        and 0 <= value <= bound
        and dimension_of(unit) == dimension_of(canonical)
        and (canonical != "1" or convert(value, unit, canonical) <= 1)
    )
    issues = validate(event)
    assert (issues == []) == expected_ok, issues
    if expected_ok:
        body = normalize_event(event)["body"]
        assert body["canonical_value"] == convert(value, unit, canonical)
        assert (body["canonical_unit"], body["term_iri"]) == (canonical, term.iri)
    else:
        assert {issue.path for issue in issues} <= {"body.value", "body.unit"}


def test_self_referencing_structures_do_not_hang() -> None:
    loop: dict[str, Any] = example("lab")
    loop["body"]["self"] = loop
    _assert_well_formed(validate(loop))
    listed: list[Any] = []
    listed.append(listed)
    _assert_well_formed(validate({"kind": "lab", "body": listed}))


def test_deeply_nested_values_do_not_exhaust_the_stack() -> None:
    deep: Any = 1.0
    for _ in range(5000):
        deep = [deep]
    event = copy.deepcopy(example("forecast"))
    event["diagnostics"] = {"deep": deep}
    _assert_well_formed(validate_forecast(event))
    issues = validate({"kind": "lab", "body": {"value": deep}})
    assert [issue.message for issue in issues] == ["body: is nested more than 64 levels deep"]

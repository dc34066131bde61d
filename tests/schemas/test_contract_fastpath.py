"""The compiled fast path (schemas/fastpath.py) and the slow path agree on every document.

validate() trusts the fast path's "valid" without a second look, so the two must agree on what
is valid; and validate()'s issue list must be the same with the fast path on or off.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_contract_fuzz import json_like, mutated_examples
from test_contract_validate import (
    FORECAST_NEGATIVES,
    NEGATIVES,
    VALID_VARIANTS,
    _forecast,
    _with,
)

import schemas
from schemas import EVENT_KINDS, SCHEMA_NAMES, example_names, fastpath, load_schema, times, units
from schemas import example as example_of

validation = sys.modules["schemas.validate"]  # the module; `schemas.validate` is the function

# Each example validates on both paths; 4000 examples per test have been run once as well.
EQUIVALENCE = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# Every native example, variants included (lab.censored, treatment.chemotherapy-mg-kg, ...):
# the FHIR ones are resources, not documents of the contract's schemas.
DOCUMENTS = tuple(n for n in example_names() if ".fhir-" not in n)


def _schema_name(document: Any, forecast: bool) -> str:
    if forecast:
        return "forecast"
    kind = document.get("kind") if isinstance(document, dict) else None
    return kind if isinstance(kind, str) and kind in EVENT_KINDS else "envelope"


def _slow_schema_valid(name: str, document: Any) -> bool:
    return not list(validation._schema_findings(name, document))


def _issues(document: Any, forecast: bool, fast: bool) -> list[schemas.ValidationIssue]:
    saved = fastpath.ENABLED
    fastpath.ENABLED = fast
    try:
        before = repr(document)
        issues = (schemas.validate_forecast if forecast else schemas.validate)(document)
        assert repr(document) == before  # neither path modifies its input
        return issues
    finally:
        fastpath.ENABLED = saved


def assert_paths_agree(document: Any, forecast: bool = False, full: bool = True) -> bool | None:
    """The fast verdict (when it gives one) equals the slow schema check; validate() is the
    same with the fast path on and off. Returns the fast verdict.

    `full=False` skips validating again with the fast path on where the fast path declined:
    validate() then runs the very same slow function on the very same input.
    """
    name = _schema_name(document, forecast)
    verdict = fastpath.verdict(name, document)
    if verdict is not None:
        assert verdict == _slow_schema_valid(name, document), (name, document)
    slow = _issues(document, forecast, fast=False)
    if full or verdict is True:
        fast = _issues(document, forecast, fast=True)
        assert fast == slow, (document, fast, slow)
    if verdict is False:
        assert slow  # what the compiled validator refuses, the slow path words
    if isinstance(document, dict):
        validate_fast = validation._passes_fast(
            name,
            document,
            validation._forecast_semantics if forecast else validation._event_semantics,
        )
        assert validate_fast == (verdict is True and not slow), (document, slow)
    return verdict


# -- the switch and the compiled validators ------------------------------------------------


def test_every_schema_compiles_for_the_fast_path() -> None:
    for name in SCHEMA_NAMES:
        assert fastpath._validator(name) is not None, name


@pytest.mark.parametrize("kind", DOCUMENTS)
def test_examples_take_the_fast_path(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    document = example_of(kind)
    assert fastpath.verdict(kind.split(".")[0], document) is True
    assert assert_paths_agree(document, forecast=kind == "forecast") is True

    def no_slow_path(*args: object) -> None:
        raise AssertionError("a valid example went down the slow path")

    monkeypatch.setattr(validation, "_check_slowly", no_slow_path)
    if kind == "forecast":
        assert schemas.validate_forecast(document) == []
    else:
        assert schemas.validate(document) == []


def test_the_switch_sends_everything_down_the_slow_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastpath, "ENABLED", False)
    calls: list[object] = []
    monkeypatch.setattr(fastpath, "verdict", lambda *args: calls.append(args))
    assert schemas.validate(example_of("lab")) == []
    assert calls == []


def test_the_environment_variable_turns_the_fast_path_off() -> None:
    import subprocess

    code = "from schemas import fastpath; print(fastpath.ENABLED)"
    for value, expected in (("0", "False"), ("1", "True")):
        done = subprocess.run(
            [sys.executable, "-c", code],
            env={"ONCOTWIN_FAST_VALIDATE": value, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        )
        assert done.stdout.strip() == expected


def test_a_failing_fast_path_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def is_valid(self, instance: object) -> bool:
            raise RuntimeError("boom")

    monkeypatch.setattr(fastpath, "_validator", lambda name: Broken())
    assert fastpath.verdict("lab", example_of("lab")) is None
    event = example_of("lab")
    del event["source"]
    assert [i.path for i in schemas.validate(event)] == ["source"]
    assert schemas.validate(example_of("lab")) == []


def test_unknown_references_are_not_fetched() -> None:
    schema = {"$ref": "https://example.org/elsewhere.json"}
    with pytest.raises(Exception, match="not one of the contract's schemas"):
        fastpath.jsonschema_rs.Draft202012Validator(
            schema, registry=fastpath._registry(), retriever=fastpath._refuse_retrieval
        )


# -- what the two engines read differently -------------------------------------------------

NOT_PLAIN: list[tuple[str, Callable[[dict[str, Any]], object]]] = [
    ("tuple", lambda e: e["body"].update(voxel_spacing_mm=(1.0, 1.0, 1.0))),
    ("nan", lambda e: e["body"]["measures"]["tumor_volume"].update(value=math.nan)),
    ("inf", lambda e: e["body"]["measures"]["tumor_volume"].update(value=-math.inf)),
    ("huge int", lambda e: e["body"]["dicom_uri"].update(size=10**400)),
    ("int key", lambda e: e["body"].update({1: "x"})),
    ("surrogate", lambda e: e.update(source="feed\ud800")),
    ("surrogate key", lambda e: e["body"].update({"\udc00": 1})),
    ("bytes", lambda e: e.update(source=b"pacs-feed")),
    ("str subclass", lambda e: e.update(source=type("S", (str,), {})("pacs-feed"))),
    ("int subclass", lambda e: e["body"]["dicom_uri"].update(size=type("I", (int,), {})(5))),
    ("shared", lambda e: e["body"].update(segmentation_uri=e["body"]["dicom_uri"])),
    ("cycle", lambda e: e["body"].update(self=e)),
]


@pytest.mark.parametrize(("label", "change"), NOT_PLAIN, ids=[label for label, _ in NOT_PLAIN])
def test_what_is_not_plain_json_is_left_to_the_slow_path(
    label: str, change: Callable[[dict[str, Any]], object]
) -> None:
    event = example_of("imaging")
    change(event)
    assert fastpath.verdict("imaging", event) is None
    assert _issues(event, False, fast=True) == _issues(event, False, fast=False)


def test_an_enum_is_not_taken_for_its_value() -> None:
    import enum

    class Feed(enum.Enum):
        PACS = "pacs-feed"

    event = example_of("imaging")
    event["source"] = Feed.PACS
    assert fastpath.verdict("imaging", event) is None
    assert [i.path for i in schemas.validate(event)] == ["source"]


def test_deep_nesting_is_left_to_the_slow_path() -> None:
    deep: Any = 1.0
    for _ in range(fastpath.MAX_DEPTH + 2):
        deep = [deep]
    forecast = example_of("forecast")
    forecast["diagnostics"] = {"deep": deep}
    assert fastpath.verdict("forecast", forecast) is None
    assert_paths_agree(forecast, forecast=True)
    shallow = example_of("forecast")
    shallow["diagnostics"] = {"deep": [[[[1.0]]]]}
    assert fastpath.verdict("forecast", shallow) is True


def test_python_whitespace_is_spelled_out_exactly() -> None:
    everything = "".join(map(chr, range(0x110000)))
    assert "".join(re.findall(r"\s", everything)) == fastpath.PY_WHITESPACE


def _code_points(pattern: str) -> list[str]:
    """Every code point (but surrogates and most astral ones) for a pattern with \\s or \\S;
    for the others, whose classes are ASCII, the first blocks, the whitespace and full-width
    forms (look-alike digits and letters)."""
    if "\\s" in pattern or "\\S" in pattern:
        points = [*range(0xD800), *range(0xE000, 0x10000), *range(0x10000, 0x110000, 7)]
    else:
        points = [*range(0x800), *map(ord, fastpath.PY_WHITESPACE), *range(0xFF00, 0x10000)]
    return [chr(c) for c in points]


def _patterns(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            elif key not in ("const", "enum", "default", "examples"):
                yield from _patterns(value)
    elif isinstance(node, list):
        for item in node:
            yield from _patterns(item)


ALL_PATTERNS = sorted({p for name in SCHEMA_NAMES for p in _patterns(load_schema(name))})


@pytest.mark.parametrize("pattern", ALL_PATTERNS)
def test_compiled_patterns_match_what_python_matches_for_every_code_point(pattern: str) -> None:
    """Each pattern against every code point alone and between a letter and a digit."""
    points = _code_points(pattern)
    carriers = [points, ["a" + c + "1" for c in points]]
    python = validation._ecma_regex(pattern)
    compiled = fastpath.jsonschema_rs.Draft202012Validator(
        {"items": {"pattern": fastpath.rust_pattern(pattern)}}
    )
    for strings in carriers:
        rust_misses = {error.instance_path[0] for error in compiled.iter_errors(strings)}
        python_misses = {i for i, s in enumerate(strings) if not python.search(s)}
        assert rust_misses == python_misses, [strings[i] for i in rust_misses ^ python_misses][:9]


@pytest.mark.parametrize(
    "pattern", [r"\d", r"\w+", r"\bx", r"[a[b]]", r"[a&&b]", r"[a--b]", r"[a~~b]", "a\\"]
)
def test_patterns_the_engines_read_differently_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        fastpath.rust_pattern(pattern)


# -- unit conversion with cached factors ---------------------------------------------------

UNIT_PAIRS = [
    (unit, canonical)
    for canonical in sorted(units.KNOWN_UNITS)
    for unit in units.compatible_units(canonical)
]
numbers = (
    st.floats()
    | st.integers()
    | st.integers(min_value=10**305, max_value=10**320)
    | st.integers(min_value=-(10**320), max_value=-(10**305))
    | st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324, 100, 0.1, 1.7976931348623157e308])
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(UNIT_PAIRS), numbers)
def test_cached_conversion_equals_units_to_canonical(pair: tuple[str, str], value: float) -> None:
    unit, canonical = pair
    expected = units.to_canonical(value, unit, canonical)
    got = validation._to_canonical(value, unit, canonical)
    assert got == expected or (math.isnan(got) and math.isnan(expected))
    assert math.copysign(1, got) == math.copysign(1, expected) or math.isnan(expected)


def test_cached_conversion_raises_as_units_does() -> None:
    for unit, canonical in [("furlongs", "ng/mL"), ("U/L", "ng/mL"), ("NG/ML", "ng/mL")]:
        with pytest.raises(Exception) as theirs:
            units.to_canonical(1.0, unit, canonical)
        with pytest.raises(Exception) as ours:
            validation._to_canonical(1.0, unit, canonical)
        assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)
    assert validation._unit_factor("%", "1") == (1, 100)
    assert Fraction(*validation._unit_factor("mg/L", "ng/mL")) == 1000


# -- agreement over a corpus ---------------------------------------------------------------


@pytest.mark.parametrize(("kind", "change"), VALID_VARIANTS)
def test_valid_variants_agree(kind: str, change: Callable[[Any], None]) -> None:
    assert assert_paths_agree(_with(kind, change)) is True


@pytest.mark.parametrize(
    ("kind", "change", "path", "words"),
    NEGATIVES,
    ids=[f"{kind}:{path}:{words[:24]}" for kind, _, path, words in NEGATIVES],
)
def test_targeted_negatives_agree(
    kind: str, change: Callable[[Any], None], path: str, words: str
) -> None:
    assert_paths_agree(_with(kind, change))


@pytest.mark.parametrize(("change", "path", "words"), FORECAST_NEGATIVES)
def test_forecast_negatives_agree(change: Callable[[Any], None], path: str, words: str) -> None:
    assert_paths_agree(_forecast(change), forecast=True)


def _leaves(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, (*prefix, index))
    else:
        yield prefix


def _replaced(document: Any, where: tuple[Any, ...], value: object) -> Any:
    document = copy.deepcopy(document)
    parent = document
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    return document


# Values that sit on an edge of one engine or the other, by the kind of field they go to.
TEXT_EDGES: list[object] = [
    "",
    " ",
    "\x1c",
    "feed\x1f",
    "\u00a0",
    "\ufeff",
    "\u200b",
    "\u3000x",
    "x\n",
    "VP-0001\r",
    "\u00e9" * 3,
    "\U0001f600" * 3,
    "A" * 64,
    "1" * 65,
]
TIME_EDGES: list[object] = [
    "2024-02-29T00:00:00Z",
    "2023-02-29T00:00:00Z",
    "2024-04-31T00:00:00Z",
    "2024-02-12T23:59:60Z",
    "2024-02-12T24:00:00Z",
    "2024-02-12T08:60:00Z",
    "2024-02-12T08:40:00z",
    "2024-02-12t08:40:00Z",
    "2024-02-12T08:40:00+24:00",
    "2024-02-12T08:40:00+23:59",
    "2024-02-12T08:40:00+05:60",
    "2024-02-12T08:40:00.123456789Z",
    "2024-02-12T08:40:00.Z",
    "0000-01-01T00:00:00Z",
    "0001-01-01T00:00:00Z",
    "1969-12-31T23:59:59.999999Z",
    "1970-01-01T00:00:00Z",
    "1970-01-01T00:00:00.000999Z",
    "1970-01-01T00:00:00.001Z",
    "1970-01-01T01:00:00.001+01:00",
    "1970-01-01T00:59:59.999+01:00",
    "9999-12-31T23:59:59.999999-23:59",
    "2024-02-12T08:40:00-00:00",
    "2024-02-12T08:40:00",
    "2024-02-12 08:40:00Z",
]
UUID_EDGES: list[object] = [
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "b7f71896-f7cc-fda3-f8ba-a772f42e8bf6",
    "B7F71896-F7CC-5DA3-98BA-A772F42E8BF6",
    "{b7f71896-f7cc-5da3-98ba-a772f42e8bf6}",
    "b7f71896f7cc5da398baa772f42e8bf6",
    "urn:uuid:b7f71896-f7cc-5da3-98ba-a772f42e8bf6",
]
LOCATION_EDGES: list[object] = [
    "patients/a..b/x",
    "patients/../x",
    "patients/..",
    "..",
    "a/./b",
    "./x",
    "C:\\x",
    "x y",
    "x\x1cy",
    "x\u00a0y",
    "x\ufeffy",
    "http://host:99999/x",
    "http://host:65535/x y",
    "https://host/",
    "https://host",
    "https://ho_st/x",
    "file:/x",
    "file:",
    "file:/x\u2003",
    "/abs",
]
UID_EDGES: list[object] = ["1.2.3", "1..2", "1.", "0", "1" * 64, "1" * 65, "\u0661.2"]
NUMBER_EDGES: list[object] = [0, -0.0, 1, 1.0, 1.5, -1, 31, 1e308, 10**30, 2**64, 5e-324]
# On and about the schemas' bounds, as ints and floats: the engines must compare them alike.
BOUND_EDGES: list[object] = [
    0.001, 0.000999, 1000, 1000.0, 1001, 1000.0000000001, 36525, 36525.5, 10**6, 10**6 + 1,
    10**9, 1e9 + 0.5, 10**12, 1e12, 10**12 + 1, 2**40, 2**40 + 1, 2**53 + 1, 2**63, 2**64 - 1,
]
ANY_EDGES: list[object] = [None, True, [1.0, 1.0, 1.0], "%"]

_UUID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}\Z")
_UID = re.compile(r"[0-9]+(\.[0-9]+)+\Z")


def _edges_for(where: tuple[Any, ...], value: object) -> list[object]:
    if isinstance(value, str):
        if times._DATETIME_RE.match(value):
            return [*TIME_EDGES, *ANY_EDGES]
        if _UUID.match(value):
            return [*UUID_EDGES, *TEXT_EDGES[:4], *ANY_EDGES]
        if where[-1] == "uri":
            return [*LOCATION_EDGES, *ANY_EDGES]
        if _UID.match(value):
            return [*UID_EDGES, *ANY_EDGES]
        return [*TEXT_EDGES, *ANY_EDGES]
    return [*NUMBER_EDGES, *BOUND_EDGES, *ANY_EDGES]


def _edge_corpus() -> Iterator[tuple[Any, bool]]:
    for kind in DOCUMENTS:
        base = example_of(kind)
        for where in _leaves(base):
            for value in _edges_for(where, _get(base, where)):
                yield _replaced(base, where, value), kind == "forecast"


def test_every_edge_value_at_every_field_agrees() -> None:
    verdicts = [assert_paths_agree(doc, forecast, full=False) for doc, forecast in _edge_corpus()]
    assert len(verdicts) > 1500
    assert verdicts.count(None) == 0  # all plain JSON: the fast path answered every one
    assert verdicts.count(True) > 300 and verdicts.count(False) > 1000


# -- agreement over generated documents ----------------------------------------------------

EDGE_STRINGS = [
    v
    for v in [*TEXT_EDGES, *TIME_EDGES, *UUID_EDGES, *LOCATION_EDGES, *UID_EDGES, *ANY_EDGES]
    if isinstance(v, str)
]
json_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12) | st.sampled_from(
    [v for v in EDGE_STRINGS]
)
plain_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text
    | st.sampled_from([*EDGE_STRINGS, *NUMBER_EDGES, *BOUND_EDGES, None, True])
)
plain_json = st.recursive(
    plain_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def plain_mutations(draw: st.DrawFn) -> tuple[Any, bool]:
    """An example with one to three fields replaced, removed or added, still plain JSON."""
    kind = draw(st.sampled_from(DOCUMENTS))
    document: Any = example_of(kind)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        locations = [where for where in _all_locations(document) if where]
        if not locations:
            break
        where = draw(st.sampled_from(locations))
        parent = document
        for key in where[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[where[-1]] = draw(plain_json)
        elif action == "delete" and isinstance(parent, dict):
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[draw(json_text)] = draw(plain_json)
    return document, kind == "forecast"


def _all_locations(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _all_locations(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _all_locations(value, (*prefix, index))
    return found


@EQUIVALENCE
@given(plain_mutations())
def test_mutated_plain_documents_agree(case: tuple[Any, bool]) -> None:
    document, forecast = case
    assert_paths_agree(document, forecast)


@st.composite
def strings_at_patterned_fields(draw: st.DrawFn) -> tuple[Any, bool]:
    """A valid example with one string field (and its neighbours' kind) set to any text."""
    kind = draw(st.sampled_from(DOCUMENTS))
    document = example_of(kind)
    strings = [w for w in _leaves(document) if isinstance(_get(document, w), str)]
    where = draw(st.sampled_from(strings))
    original = _get(document, where)
    text = draw(
        json_text
        | st.builds(
            lambda i, c: original[:i] + c + original[i:],
            st.integers(min_value=0, max_value=len(original)),
            st.characters(exclude_categories=("Cs",)),
        )
        | st.builds(
            lambda i: original[:i] + original[i + 1 :],
            st.integers(min_value=0, max_value=max(len(original) - 1, 0)),
        )
    )
    return _replaced(document, where, text), kind == "forecast"


def _get(document: Any, where: tuple[Any, ...]) -> Any:
    for key in where:
        document = document[key]
    return document


@EQUIVALENCE
@given(strings_at_patterned_fields())
def test_edited_strings_agree(case: tuple[Any, bool]) -> None:
    document, forecast = case
    assert_paths_agree(document, forecast)


@EQUIVALENCE
@given(
    st.sampled_from(["lab", "ctdna"]),
    numbers,
    st.sampled_from(sorted(units.KNOWN_UNITS)),
)
@example("ctdna", 100, "%")
@example("ctdna", 100.00000000000001, "%")
@example("ctdna", 1, "1")
def test_quantities_agree(kind: str, value: float, unit: str) -> None:
    event = example_of(kind)
    event["body"].update(value=value, unit=unit)
    assert_paths_agree(event)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_examples())
def test_fuzzed_documents_agree(document: Any) -> None:
    assert_paths_agree(document)
    assert_paths_agree(document, forecast=True)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_like)
def test_random_json_agrees(junk: Any) -> None:
    assert_paths_agree(junk)
    assert_paths_agree(junk, forecast=True)

"""Checking events and forecasts against the contract.

`validate` answers with a list of `ValidationIssue`s and never raises, whatever it is given:
the stream worker turns the issues into a dead-letter reason, and bad input must never stop it.
Beyond the JSON Schemas (whose numbers all have bounds, each explained by a `$comment`) it
checks what a schema cannot express: codes known to the term table, units convertible to the
term's canonical unit, finite numbers, fractions within [0, 1], times a Kafka record
timestamp can carry (schemas.times.EARLIEST_TIME), censored results that say one thing (a
reading under its limit of detection), drug codes in their system's format, positions within
a course (fraction, cycle, day) within what the course plans.

Fields the contract does not name are not judged: they are extensions (schemas.events).
"""

from __future__ import annotations

import functools
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

from jsonschema import Draft202012Validator, FormatChecker, ValidationError
from jsonschema.exceptions import best_match
from jsonschema.validators import extend

from . import fastpath, units
from .errors import ContractError, IncompatibleUnitError, UnknownCodeError, UnknownUnitError
from .loader import EVENT_KINDS, load_schema, schema_registry
from .terms import DRUG_CODE_FORMATS, DRUG_SYSTEMS, Term, TermTable, default_terms, drug_system
from .times import parse_time

Segments = tuple[Any, ...]
Finding = tuple[Segments, str]


@dataclass(frozen=True)
class ValidationIssue:
    path: str  # "body.value", "horizons[0].quantities['marker:2857-1']" or "(root)"
    message: str  # readable on its own: starts with the path

    def __str__(self) -> str:
        return self.message


class EventValidationError(ContractError):
    """Raised by `validate_or_raise`; `issues` lists everything found, not just the first."""

    def __init__(self, issues: Sequence[ValidationIssue], what: str = "event") -> None:
        self.issues: tuple[ValidationIssue, ...] = tuple(issues)
        shown = "; ".join(issue.message for issue in self.issues[:5])
        more = f" (and {len(self.issues) - 5} more)" if len(self.issues) > 5 else ""
        super().__init__(f"{what} is invalid: {shown}{more}")


def validate(event: object) -> list[ValidationIssue]:
    """Every way `event` breaks the event contract; an empty list when it is valid."""
    if not isinstance(event, dict):
        return [_issue((), f"expected a JSON object, got {_json_type(event)}")]
    kind = event.get("kind")
    schema = kind if isinstance(kind, str) and kind in EVENT_KINDS else "envelope"
    return _check(schema, event, _event_semantics)


def validate_forecast(forecast: object) -> list[ValidationIssue]:
    """Every way `forecast` breaks the forecast contract; an empty list when it is valid."""
    if not isinstance(forecast, dict):
        return [_issue((), f"expected a JSON object, got {_json_type(forecast)}")]
    return _check("forecast", forecast, _forecast_semantics)


def is_valid(event: object) -> bool:
    return not validate(event)


def validate_or_raise(event: object) -> dict[str, Any]:
    """Return `event` unchanged if valid, else raise EventValidationError with all issues."""
    issues = validate(event)
    if issues:
        raise EventValidationError(issues)
    return cast(dict[str, Any], event)


# -- driver -------------------------------------------------------------------------------

Semantics = Callable[[dict[str, Any], TermTable], Iterable[Finding]]


def _check(schema: str, document: dict[str, Any], semantics: Semantics) -> list[ValidationIssue]:
    if fastpath.ENABLED and _passes_fast(schema, document, semantics):
        return []
    return _check_slowly(schema, document, semantics)


def _passes_fast(schema: str, document: dict[str, Any], semantics: Semantics) -> bool:
    """Nothing to report, as found by the compiled validator and the semantic checks.

    When this says True the slow path would find nothing either (fastpath's docstring says
    why; tests/schemas/test_contract_fastpath.py holds the two to it). Anything else, a
    failure included, leaves the document to the slow path, which words what is wrong.
    """
    try:
        if fastpath.verdict(schema, document) is not True:
            return False
        for _ in semantics(document, default_terms()):
            return False
    except Exception:
        return False
    return True


def _check_slowly(
    schema: str, document: dict[str, Any], semantics: Semantics
) -> list[ValidationIssue]:
    issues: list[ValidationIssue] = []

    def guarded(stage: Callable[[], Iterable[Finding]]) -> list[Finding]:
        # The promise is "never raises"; a stage defeated by pathological input says so and
        # does not hide what the other stages found.
        try:
            return list(stage())
        except Exception as exc:
            reason = f"{type(exc).__name__}: {_short(exc, 120)}"
            issues.append(_issue((), f"could not be fully checked ({reason})"))
            return []

    values = guarded(lambda: _value_findings(document))
    if any(text == _TOO_DEEP for _, text in values):
        return [_issue(segments, text) for segments, text in values]  # see _MAX_DEPTH
    unbounded = {segments for segments, _ in values}
    issues.extend(
        _issue(s, text)
        for s, text in guarded(lambda: _schema_findings(schema, document, unbounded))
    )
    flagged = {issue.path for issue in issues}
    for segments, text in [*values, *guarded(lambda: semantics(document, default_terms()))]:
        issue = _issue(segments, text)
        # One complaint per field: a value the schema already rejected is not judged again.
        if issue.path not in flagged:
            issues.append(issue)
            flagged.add(issue.path)
    return list(dict.fromkeys(issues))


def _issue(segments: Segments, text: str) -> ValidationIssue:
    path = format_path(segments)
    return ValidationIssue(path, f"{path}: {text}")


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def format_path(segments: Iterable[Any]) -> str:
    """("body", "voxel_spacing_mm", 1) -> "body.voxel_spacing_mm[1]"; () -> "(root)"."""
    path = ""
    for segment in segments:
        if isinstance(segment, str) and _IDENTIFIER.match(segment):
            path += f".{segment}" if path else segment
        elif isinstance(segment, int) and not isinstance(segment, bool):
            path += f"[{segment}]"
        else:
            # repr() escapes quotes, control characters and lone surrogates, so a path is
            # always printable and encodable as UTF-8.
            path += f"[{_short(segment, 60)}]"
    return path or "(root)"


# -- JSON Schema --------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _ecma_regex(pattern: str) -> re.Pattern[str]:
    # JSON Schema patterns are ECMA-262 regexes, whose `$` matches only at the very end of the
    # input; Python's `$` also matches before a final newline, which would let "VP-0001\n"
    # through as a pseudonym (a different Kafka key than "VP-0001").
    out: list[str] = []
    in_class = escaped = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "$":
            out.append(r"\Z")
            continue
        out.append(char)
    return re.compile("".join(out))


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _ecma_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = extend(Draft202012Validator, {"pattern": _pattern})

FORMAT_CHECKER = FormatChecker()


@FORMAT_CHECKER.checks("date-time", raises=ContractError)
def _is_date_time(instance: object) -> bool:
    # The envelope's pattern insists on the zone; this catches impossible dates (Feb 30) and
    # times before times.EARLIEST_TIME, which no Kafka record timestamp can carry.
    if isinstance(instance, str):
        parse_time(instance)
    return True


@functools.cache
def _validator(name: str) -> Any:
    return _Validator(load_schema(name), registry=schema_registry(), format_checker=FORMAT_CHECKER)


_BOUNDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})


def _schema_findings(
    name: str, document: object, unbounded: Iterable[Segments] = ()
) -> Iterator[Finding]:
    """What the named schema finds; `unbounded` are paths of numbers that are not finite (or
    beyond the float range), whose bounds are not reported: "must be finite" says it better."""
    findings = [f for error in _validator(name).iter_errors(document) for f in _describe(error)]
    # A string that misses its pattern usually fails its format too: say it once.
    patterned = {segments for segments, text, keyword in findings if keyword == "pattern"}
    skipped = set(unbounded)
    for segments, text, keyword in findings:
        if keyword == "format" and segments in patterned:
            continue
        if keyword in _BOUNDS and segments in skipped:
            continue
        yield segments, text


def _describe(error: ValidationError) -> Iterator[tuple[Segments, str, str]]:
    segments = tuple(error.absolute_path)
    keyword = str(error.validator)
    if keyword == "required":
        present = error.instance if isinstance(error.instance, dict) else {}
        for name in error.validator_value:
            if name not in present:
                yield (*segments, name), "required field is missing", keyword
    elif keyword in ("anyOf", "oneOf") and error.context:
        alternatives = error.context
        if all(e.validator == "required" and not e.relative_path for e in alternatives):
            names = ", ".join(repr(n) for e in alternatives for n in e.validator_value)
            yield segments, f"needs at least one of {names}", keyword
        else:
            best = best_match(alternatives)
            if best is not None:
                yield from _describe(best)
    elif "propertyNames" in error.absolute_schema_path:
        # A rejected name has no path of its own: point at the offending field.
        description = error.schema.get("description") if isinstance(error.schema, dict) else None
        text = (
            f"{_short(error.instance, 80)} is not {description}" if description else error.message
        )
        yield (*segments, error.instance), _clip(text, 300), keyword
    elif keyword in ("pattern", "format"):
        if isinstance(error.cause, ContractError):  # ours, already readable (parse_time)
            text = str(error.cause)
        else:
            description = (
                error.schema.get("description") if isinstance(error.schema, dict) else None
            )
            wanted = description or f"a valid {error.validator_value}"
            text = f"{_short(error.instance, 80)} is not {wanted}"
        yield segments, _clip(text, 300), keyword
    else:
        yield segments, _clip(error.message, 300), keyword


# -- values -------------------------------------------------------------------------------


# Events are 4 levels deep and free-form diagnostics get ample room; beyond this a document is
# junk, and jsonschema's repr() of it for messages would exhaust the stack.
_MAX_DEPTH = 64
_TOO_DEEP = f"is nested more than {_MAX_DEPTH} levels deep"


def _value_findings(document: object) -> Iterator[Finding]:
    """NaN, infinities, integers beyond the float range, and absurd nesting, anywhere."""
    stack: list[tuple[Segments, object]] = [((), document)]
    visited: set[int] = set()
    while stack:
        segments, node = stack.pop()
        if isinstance(node, float):
            if not math.isfinite(node):
                yield segments, f"must be a finite number (got {node!r})"
        elif isinstance(node, int) and not isinstance(node, bool):
            if abs(node) > sys.float_info.max:
                yield segments, "is too large to be a number (beyond the float range)"
        elif isinstance(node, (dict, list, tuple)):
            if len(segments) > _MAX_DEPTH:
                yield segments[:1], _TOO_DEEP  # the top-level field holding it
                return
            if id(node) in visited:  # not JSON, but must not loop forever either
                continue
            visited.add(id(node))
            children = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend(((*segments, key), value) for key, value in children)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: object) -> TypeGuard[int | float]:
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_number(value) and abs(value) <= sys.float_info.max


def _quantity_findings(
    base: Segments, quantity: dict[str, Any], term: Term, value_key: str = "value"
) -> Iterator[Finding]:
    value, unit, canonical = quantity.get(value_key), quantity.get("unit"), term.canonical_unit
    if canonical is None or not isinstance(unit, str):
        return
    try:
        converted = _to_canonical(value if _is_number(value) else 0.0, unit, canonical)
    except (UnknownUnitError, IncompatibleUnitError) as exc:
        yield (*base, "unit"), str(exc)
        return
    if not _is_number(value):
        return
    if not math.isfinite(converted):
        shown = _short(value, 40)
        yield (*base, value_key), f"{shown} {unit} is out of range once converted to {canonical}"
    elif canonical == "1" and not 0 <= converted <= 1:
        yield (
            (*base, value_key),
            (f"{value!r} {unit} is {converted:g} as a fraction; a fraction must lie within [0, 1]"),
        )


def _to_canonical(value: int | float, unit: str, canonical: str) -> float:
    """units.to_canonical(value, unit, canonical), to the last bit, with the factor cached.

    Every valid lab, ctDNA and imaging event converts one quantity; `Fraction` arithmetic made
    that most of the semantic checks' cost. Same errors, same correctly rounded result (a
    test compares the two over every pair of known units).
    """
    numerator, denominator = _unit_factor(unit, canonical)
    if isinstance(value, float) and not math.isfinite(value):
        return value * (numerator / denominator)  # as units._scale: inf or nan stays so
    top, bottom = value.as_integer_ratio() if isinstance(value, float) else (int(value), 1)
    try:
        # int / int is correctly rounded, as float(Fraction(value) * factor) is
        return (top * numerator) / (bottom * denominator)
    except OverflowError:
        return -math.inf if value < 0 else math.inf


@functools.lru_cache(maxsize=1024)
def _unit_factor(unit: str, canonical: str) -> tuple[int, int]:
    """The exact factor from `unit` to `canonical`; raises as units.convert does."""
    units.convert(0.0, unit, canonical)  # UnknownUnitError / IncompatibleUnitError, worded there
    factor = units._entry(unit)[1] / units._entry(canonical)[1]  # noqa: SLF001 (same package)
    return factor.numerator, factor.denominator


# -- semantics per document kind ----------------------------------------------------------


def _event_semantics(event: dict[str, Any], terms: TermTable) -> Iterator[Finding]:
    body = event.get("body")
    if not isinstance(body, dict):
        return
    kind = event.get("kind")
    if kind == "lab":
        code = body.get("code")
        if isinstance(code, str):
            try:
                term = terms.lookup("loinc", code)
            except UnknownCodeError as exc:
                yield ("body", "code"), f"{exc} (not in the term table)"
            else:
                yield from _quantity_findings(("body",), body, term)
                yield from _censoring_findings(body, term)
    elif kind == "ctdna":
        measure = body.get("measure")
        if isinstance(measure, str):
            try:
                term = terms.for_ctdna_measure(measure)
            except UnknownCodeError:
                return  # the schema's enum has already said so
            yield from _quantity_findings(("body",), body, term)
            yield from _censoring_findings(body, term)
    elif kind == "imaging":
        measures = body.get("measures")
        volume = measures.get("tumor_volume") if isinstance(measures, dict) else None
        if isinstance(volume, dict):
            term = terms.lookup("local", "tumor-volume")
            yield from _quantity_findings(("body", "measures", "tumor_volume"), volume, term)
    elif kind == "treatment":
        yield from _within(body, "fraction_number", "fractions_planned", "fraction {} is beyond the {} planned")
        yield from _within(body, "cycle", "cycles_planned", "cycle {} is beyond the {} planned")
        yield from _within(body, "day_of_cycle", "cycle_length_days", "day {} is beyond a cycle of {} days")
        drug = body.get("drug")
        if isinstance(drug, dict):
            yield from _drug_findings(drug)


def _within(body: dict[str, Any], position: str, count: str, text: str) -> Iterator[Finding]:
    number, planned = body.get(position), body.get(count)
    # A count out of its own bounds (0 cycles planned) is the schema's to report, once.
    if _is_number(number) and _is_number(planned) and planned > 0 and number > planned:
        yield ("body", position), text.format(_short(number, 20), _short(planned, 20))


_CENSORED_BELOW = ("<", "<=")


def _censoring_findings(body: dict[str, Any], term: Term) -> Iterator[Finding]:
    """A censored result says one thing: a comparator or below_lod, a reading under its lod."""
    comparator, value, lod = body.get("comparator"), body.get("value"), body.get("lod")
    if "lod" in body:
        yield from _quantity_findings(("body",), body, term, value_key="lod")
    if body.get("below_lod") is True:
        if comparator is not None:
            yield ("body", "comparator"), (
                "cannot be given with below_lod: true (a result below the limit of detection is '< lod'; "
                "send one of the two)"
            )
        if _is_finite(value) and _is_finite(lod) and value > lod:
            yield ("body", "value"), (
                f"{_short(value, 40)} is above the lod {_short(lod, 40)}: with below_lod: true, value is the "
                "assay's reading under its limit of detection"
            )
    elif comparator == "<" and _is_number(value) and value == 0:
        yield ("body", "value"), "'< 0' is no result: nothing lies below 0 (a limit of detection is positive)"


def _drug_findings(drug: dict[str, Any]) -> Iterator[Finding]:
    """A drug's code in its system's format; its rxnorm, when also given, the same RxCUI."""
    code, system = drug.get("code"), drug.get("system")
    short = drug_system(system) if isinstance(system, str) else None
    if short is None or not isinstance(code, str):
        return  # the schema has said what is missing or unknown
    if not DRUG_SYSTEMS[short][1].match(code):
        yield ("body", "drug", "code"), f"{_short(code, 40)} is not {DRUG_CODE_FORMATS[short]} (system {system})"
    rxnorm = drug.get("rxnorm")
    if short == "rxnorm" and isinstance(rxnorm, str) and rxnorm != code:
        yield ("body", "drug", "rxnorm"), (
            f"{_short(rxnorm, 20)} differs from body.drug.code {_short(code, 20)}, the drug's RxCUI (send one)"
        )


def _forecast_semantics(forecast: dict[str, Any], terms: TermTable) -> Iterator[Finding]:
    horizons = forecast.get("horizons")
    if not isinstance(horizons, list):
        return
    for index, horizon in enumerate(horizons):
        quantities = horizon.get("quantities") if isinstance(horizon, dict) else None
        if not isinstance(quantities, dict):
            continue
        for name, interval in quantities.items():
            if not isinstance(interval, dict) or not isinstance(name, str):
                continue
            base: Segments = ("horizons", index, "quantities", name)
            lo, median, hi = interval.get("lo"), interval.get("median"), interval.get("hi")
            if _is_finite(lo) and _is_finite(median) and _is_finite(hi) and not lo <= median <= hi:
                ordered = f"lo={lo!r}, median={median!r}, hi={hi!r}"
                yield base, f"interval must satisfy lo <= median <= hi ({ordered})"
            try:
                term = terms.for_forecast_quantity(name)
            except UnknownCodeError as exc:
                if name.startswith("marker:"):
                    yield base, f"{exc} (not in the term table)"
                continue
            if term is not None:
                unit_only = {"unit": interval.get("unit")}
                yield from _quantity_findings(base, unit_only, term)


# -- text helpers -------------------------------------------------------------------------


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    if _is_number(value):
        return "number"
    return names.get(type(value), type(value).__name__)


def _short(value: object, limit: int) -> str:
    try:
        text = value if isinstance(value, BaseException) else repr(value)
        text = str(text)
    except Exception:  # e.g. repr of an int with more digits than Python will print
        text = f"<{type(value).__name__}>"
    return _clip(text, limit)


def _clip(text: str, limit: int) -> str:
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"

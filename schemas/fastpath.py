"""A compiled first look at documents, so that valid ones are accepted in a few microseconds.

`validate.py` words its issues through the `jsonschema` package, which resolves every `$ref`
through `referencing` on each call: 0.3 to 1 ms per event. Most events are valid and need no
words, so `verdict` first asks a validator compiled once per schema by `jsonschema-rs` (Rust)
whether the document conforms. Only a "no" (or no answer) sends the document down the slow
path, which finds and words the issues; a "yes" is final.

A "yes" here must therefore mean exactly what it means on the slow path. What differs between
the two engines is closed off here, and tests/schemas/test_contract_fastpath.py holds them to
agreement over examples, every targeted negative and hypothesis-generated documents:

- Input: jsonschema-rs takes tuples for arrays, an Enum for its value and converts lone
  surrogates lossily, where the slow path sees a non-array, a non-string and the surrogate.
  `verdict` answers only for plain JSON built of exact dict / list / str / int / float / bool /
  None, with string keys, finite numbers within the float range, UTF-8-encodable strings, no
  shared or cyclic containers and at most `MAX_DEPTH` levels; anything else gets None.
- Patterns: the slow path runs them with Python's `re` (`$` made to mean end of input, as in
  ECMA-262); Rust's `\\s` is not Python's (which also counts U+001C..U+001F as space). The
  compiled schemas spell `\\s` / `\\S` out as Python's set of 29 characters, and refuse any
  other letter escape (`\\d`, `\\w`, `\\b` ... differ too), which none of our schemas uses.
- Formats: "date-time" is checked by the same `parse_time` as on the slow path (so a zone-less
  time, Feb 30 or a time before 1970 is refused); "uuid" by jsonschema-rs, which agrees with the slow path on every
  string the canonical-form pattern beside it admits.
- References: the same six schema files under their `$id`s, and no retrieval: an unknown
  `$ref` fails rather than reaching for the network.

`ENABLED` (environment ONCOTWIN_FAST_VALIDATE=0 turns it off) switches the fast path; with it
off, or without jsonschema-rs installed, every document takes the slow path.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from .errors import ContractError
from .loader import SCHEMA_NAMES, load_schema, schema_id
from .times import parse_time

try:  # an optional speed-up: without it every document takes the slow path
    import jsonschema_rs
except ImportError:  # pragma: no cover - jsonschema-rs is a declared dependency
    jsonschema_rs = None

ENABLED: bool = jsonschema_rs is not None and os.environ.get("ONCOTWIN_FAST_VALIDATE", "1") != "0"

MAX_DEPTH = 64  # as validate._MAX_DEPTH: deeper documents are left to the slow path

# What Python's `re` matches with \s in a str pattern (= str.isspace); a test checks it over
# every code point, and that the compiled patterns agree with Python's on every code point.
PY_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_FLOAT_MAX = sys.float_info.max


def verdict(name: str, document: object) -> bool | None:
    """Whether `document` conforms to the named JSON Schema; None when this path can't tell.

    True and False agree with the slow path's schema check (`validate._schema_findings` finding
    nothing, or something). None: not plain JSON (see the module's docstring), the fast path
    switched off or unavailable, or jsonschema-rs failed; the caller then takes the slow path.
    """
    if not (type(document) is dict or type(document) is list):
        return None
    try:
        if not _plain(document, 0, set()):
            return None
        validator = _validator(name)
        if validator is None:
            return None
        return bool(validator.is_valid(document))
    except Exception:  # e.g. RecursionError, or anything jsonschema-rs raises
        return None


def _plain(node: dict[Any, Any] | list[Any], depth: int, seen: set[int]) -> bool:
    """`node` (an exact dict or list) is JSON both engines read alike; see the docstring."""
    if depth > MAX_DEPTH or id(node) in seen:
        return False
    seen.add(id(node))
    if type(node) is dict:
        for key in node:
            if type(key) is not str or not (key.isascii() or _utf8(key)):
                return False
        values: Any = node.values()
    else:
        values = node
    for value in values:
        kind = type(value)
        if kind is str:
            if not (value.isascii() or _utf8(value)):
                return False
        elif kind is float or kind is int:
            # NaN fails both comparisons; ints are compared exactly, as the slow path does
            if not -_FLOAT_MAX <= value <= _FLOAT_MAX:
                return False
        elif kind is dict or kind is list:
            if not _plain(value, depth + 1, seen):
                return False
        elif not (value is None or kind is bool):
            return False
    return True


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


# -- compiled validators ------------------------------------------------------------------


def _date_time(instance: str) -> bool:
    # The slow path's FormatChecker runs the same parse_time (validate._is_date_time).
    try:
        parse_time(instance)
    except ContractError:
        return False
    return True


def _refuse_retrieval(uri: str) -> Any:
    raise ContractError(f"{uri!r:.120} is not one of the contract's schemas")


@functools.cache
def _registry() -> Any:
    resources = [(schema_id(n), _compiled_schema(load_schema(n))) for n in SCHEMA_NAMES]
    return jsonschema_rs.Registry(resources, retriever=_refuse_retrieval)


@functools.cache
def _validator(name: str) -> Any:
    """The compiled validator for a schema name; None when this path can't serve it."""
    if jsonschema_rs is None:
        return None
    try:
        return jsonschema_rs.Draft202012Validator(
            _compiled_schema(load_schema(name)),
            registry=_registry(),
            retriever=_refuse_retrieval,
            validate_formats=True,
            formats={"date-time": _date_time},
        )
    except Exception:  # e.g. a pattern _rust_pattern cannot translate: stay on the slow path
        return None


def warm_up() -> None:
    """Compile every validator now rather than on first use."""
    for name in SCHEMA_NAMES:
        _validator(name)


_NOT_SCHEMAS = frozenset({"const", "enum", "default", "examples", "description", "title"})


def _compiled_schema(node: Any) -> Any:
    """A copy of a schema whose `pattern`s jsonschema-rs runs as Python's `re` would."""
    if isinstance(node, list):
        return [_compiled_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _NOT_SCHEMAS:
            out[key] = value
        elif key == "pattern" and isinstance(value, str):
            out[key] = rust_pattern(value)
        else:
            out[key] = _compiled_schema(value)
    return out


_SPACE_CLASS = "[" + PY_WHITESPACE + "]"
_NONSPACE_CLASS = "[^" + PY_WHITESPACE + "]"


def rust_pattern(pattern: str) -> str:
    """`pattern` as jsonschema-rs should run it to match what validate.py's `re` matches.

    `\\s` and `\\S` become Python's whitespace set written out; other letter or digit escapes
    and Rust-only class syntax (nested classes, `&&`, `--`, `~~`) raise ValueError, as the two
    engines would read them differently.
    """
    out: list[str] = []
    in_class = escaped = False
    previous = ""
    for char in pattern:
        if escaped:
            escaped = False
            if char == "s":
                out.append(PY_WHITESPACE if in_class else _SPACE_CLASS)
            elif char == "S" and not in_class:
                out.append(_NONSPACE_CLASS)
            elif char.isalnum() or not char.isascii():
                raise ValueError(f"pattern {pattern!r} has an escape \\{char} Rust reads differently")
            else:
                out.append("\\" + char)
            previous = ""
            continue
        if char == "\\":
            escaped = True
            continue
        if in_class:
            if char == "[" or (char in "&-~" and previous == char):
                raise ValueError(f"pattern {pattern!r} uses class syntax Rust reads differently")
            in_class = char != "]"
        elif char == "[":
            in_class = True
        out.append(char)
        previous = char
    if escaped:
        raise ValueError(f"pattern {pattern!r} ends in a lone backslash")
    return "".join(out)

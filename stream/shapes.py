"""SHACL validation of event graphs against the shapes in ``schemas/shapes/``.

Two engines read the same shapes files:

- ``compiled`` (the default, used on the hot path): the shapes are compiled once into checks
  that run directly on ``stream.rdf`` node trees, one event graph at a time. It implements the
  SHACL Core subset our shapes use (class targets; property shapes with predicate and sequence
  paths; min/maxCount, datatype, nodeKind, class, in, hasValue, pattern, min/maxLength,
  min/maxInclusive, min/maxExclusive, node, not, or) and refuses to compile a shapes file that
  uses anything else, so it is never silently laxer than the shapes say. Tests run it side by
  side with pyshacl on valid graphs and on thousands of mutated ones and require the same
  verdicts and the same failing constraint components. A graph is first put to a fast
  conformance check (same verdict, no explanations: see "the fast conformance check" below);
  only the graphs it does not accept go through the checks that word the violations.
- ``pyshacl``: one pyshacl run over the union of a micro-batch of graphs; when the batch does
  not conform, each result is attributed to its event through its focus node, and only results
  that cannot be attributed trigger per-graph runs.

Why not pyshacl alone: pyshacl evaluates every property shape separately for every focus node
(about 70 µs each), which costs about 2 ms per event graph even in batches of 500; the
compiled engine costs about 20 µs per conforming graph (about 100 µs for one it rejects). See
bench/stream.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

from stream.rdf import RDF_TYPE, XSD, EventGraph, Iri, Lit, Node, compact

SH = "http://www.w3.org/ns/shacl#"
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
RDFS = "http://www.w3.org/2000/01/rdf-schema#"
XSD_STRING = XSD + "string"

ENGINES = ("compiled", "pyshacl")


def shapes_dir() -> Path:
    return Path(str(resources.files("schemas").joinpath("shapes")))


def shapes_text() -> str:
    """Every shapes file of schemas/shapes, concatenated in name order (Turtle)."""
    files = sorted(shapes_dir().glob("*.ttl"))
    if not files:
        raise FileNotFoundError(f"no SHACL shapes (*.ttl) in {shapes_dir()}")
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


@dataclass(frozen=True, slots=True)
class Violation:
    """One SHACL result: which node, along which path, which constraint, and why."""

    focus: str  # IRI, or "_:" plus a description for a blank node
    path: str  # compact path, "" for a constraint on the node itself
    component: str  # e.g. "sh:MinCountConstraintComponent"
    message: str
    shape: str = ""

    def describe(self) -> str:
        where = f"{self.focus} {self.path}".strip()
        return f"{where}: {self.message} ({self.component})"


class UnsupportedShapes(ValueError):
    """The shapes use SHACL features the compiled engine does not implement."""


# -- RDF term helpers for node trees ------------------------------------------------------

# A term of a node tree as the checks see it: ("iri", text) | ("bnode", Node) | ("lit", lex, dt)
Term = tuple[Any, ...]


def _term(value: Any) -> Term:
    if isinstance(value, Node):
        return ("iri", value.iri) if value.iri is not None else ("bnode", value)
    if isinstance(value, Iri):
        return ("iri", str(value))
    if isinstance(value, Lit):
        return ("lit", value.lex, None if value.datatype == XSD_STRING else value.datatype)
    if isinstance(value, bool):
        return ("lit", "true" if value else "false", XSD + "boolean")
    if isinstance(value, int):
        return ("lit", str(value), XSD + "integer")
    if isinstance(value, str):
        return ("lit", value, None)
    raise TypeError(f"not an RDF value: {type(value).__name__}")


def _rdflib_term(node: Any) -> Term:
    from rdflib import BNode, Literal, URIRef  # noqa: PLC0415

    if isinstance(node, URIRef):
        return ("iri", str(node))
    if isinstance(node, Literal):
        dt = str(node.datatype) if node.datatype is not None else None
        if node.language:
            return ("lit", str(node), "@" + node.language)
        return ("lit", str(node), None if dt == XSD_STRING else dt)
    if isinstance(node, BNode):
        return ("shape-bnode", str(node))
    raise UnsupportedShapes(f"unexpected term {node!r} in the shapes")


_XSD_DOUBLE_LEX = re.compile(r"^(\+|-)?([0-9]+(\.[0-9]*)?|\.[0-9]+)([Ee](\+|-)?[0-9]+)?$|^-?INF$|^\+INF$|^NaN$")
_XSD_DECIMAL_LEX = re.compile(r"^(\+|-)?([0-9]+(\.[0-9]*)?|\.[0-9]+)$")
_XSD_INTEGER_LEX = re.compile(r"^(\+|-)?[0-9]+$")
_XSD_DATETIME_LEX = re.compile(
    r"^-?[0-9]{4,}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})?$"
)
_NUMERIC = {XSD + "double", XSD + "float", XSD + "decimal", XSD + "integer"}


def _well_formed(lex: str, datatype: str | None) -> bool:
    """Whether a literal's lexical form is valid for its datatype (an ill-typed literal never
    satisfies sh:datatype)."""
    if datatype in (None, XSD_STRING) or (datatype or "").startswith("@"):
        return True
    if datatype in (XSD + "double", XSD + "float"):
        return bool(_XSD_DOUBLE_LEX.match(lex))
    if datatype == XSD + "decimal":
        return bool(_XSD_DECIMAL_LEX.match(lex))
    if datatype == XSD + "integer":
        return bool(_XSD_INTEGER_LEX.match(lex))
    if datatype == XSD + "boolean":
        return lex in ("true", "false", "1", "0")
    if datatype == XSD + "dateTime":
        if not _XSD_DATETIME_LEX.match(lex):
            return False
        try:
            datetime.fromisoformat(lex.replace("Z", "+00:00"))
        except ValueError:
            return False
        return True
    if datatype == XSD + "anyURI":
        return not any(c in lex for c in ' <>"{}|\\^`')
    return True


def _number(term: Term) -> float | Decimal | None:
    """The numeric value of a well-formed numeric literal, else None."""
    if term[0] != "lit" or term[2] not in _NUMERIC or not _well_formed(term[1], term[2]):
        return None
    lex = term[1]
    if term[2] in (XSD + "double", XSD + "float"):
        return float(lex.replace("INF", "inf"))
    try:
        return Decimal(lex)
    except InvalidOperation:
        return None


def _compare(a: float | Decimal, b: float | Decimal) -> int | None:
    """-1, 0, 1, or None when not comparable (NaN)."""
    if isinstance(a, float) and math.isnan(a) or isinstance(b, float) and math.isnan(b):
        return None
    if isinstance(a, Decimal) and isinstance(b, float) or isinstance(a, float) and isinstance(b, Decimal):
        a, b = float(a), float(b)
    return (a > b) - (a < b)  # type: ignore[operator]


# -- the compiled engine ------------------------------------------------------------------


class _GraphIndex:
    """Lookups over one event graph: node by IRI, types, values of a predicate."""

    __slots__ = ("by_iri", "nodes", "has_subclasses")

    def __init__(self, graph: EventGraph) -> None:
        self.by_iri: dict[str, list[Node]] = {}
        self.nodes = list(graph.nodes())
        self.has_subclasses = False
        for node in self.nodes:
            if node.iri is not None:
                self.by_iri.setdefault(node.iri, []).append(node)
            if not self.has_subclasses:
                self.has_subclasses = any(p == RDFS + "subClassOf" for p, _ in node.props)

    def nodes_for(self, term: Term) -> list[Node]:
        if term[0] == "bnode":
            return [term[1]]
        if term[0] == "iri":
            return self.by_iri.get(term[1], [])
        return []

    def types(self, term: Term) -> set[str]:
        """rdf:type values, closed over rdfs:subClassOf statements of the graph (SHACL instance)."""
        out: set[str] = set()
        for node in self.nodes_for(term):
            out.update(node.types)
        if self.has_subclasses:
            todo = list(out)
            while todo:
                for sup in self.objects(("iri", todo.pop()), RDFS + "subClassOf"):
                    if sup[0] == "iri" and sup[1] not in out:
                        out.add(sup[1])
                        todo.append(sup[1])
        return out

    def objects(self, term: Term, predicate: str) -> list[Term]:
        out: list[Term] = []
        seen: set[Any] = set()
        for node in self.nodes_for(term):
            if predicate == RDF_TYPE:
                values: Iterable[Any] = (Iri(t) for t in node.types)
            else:
                values = (v for p, v in node.props if p == predicate)
            for value in values:
                t = _term(value)
                key = (t[0], id(t[1])) if t[0] == "bnode" else t
                if key not in seen:  # RDF graphs are sets of triples
                    seen.add(key)
                    out.append(t)
        return out


Check = Callable[[_GraphIndex, Term, list[Term]], list[tuple[str, str]]]
"""(index, focus, value nodes) -> [(component, generic message)] for each failure."""

TermTest = Callable[[Any, Term], bool]
"""(index, value node) -> whether it passes, for the tests that look at the term alone (they
ignore the index; the fast path calls them with None)."""


@dataclass
class _Shape:
    iri: str
    path: tuple[str, ...] | None  # None for a node shape
    checks: list[tuple[str, Check]]  # (component, check)
    message: str | None
    target_classes: tuple[str, ...] = ()
    # The same constraints in structured form, for the fast conformance check (_FastGraph):
    min_count: int = 0
    max_count: int | None = None
    term_tests: list[TermTest] = field(default_factory=list)  # datatype, nodeKind, in, pattern, lengths, ranges
    has_values: list[Term] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    nodes: list[_Shape] = field(default_factory=list)
    nots: list[_Shape] = field(default_factory=list)
    ors: list[list[_Shape]] = field(default_factory=list)
    properties: list[_Shape] = field(default_factory=list)

    def value_nodes(self, index: _GraphIndex, focus: Term) -> list[Term]:
        if self.path is None:
            return [focus]
        current = [focus]
        for predicate in self.path:
            nxt: list[Term] = []
            for term in current:
                if term[0] != "lit":
                    nxt.extend(index.objects(term, predicate))
            current = nxt
        return current


_SUPPORTED_SHAPE_KEYS = {
    RDF + "type", SH + "targetClass", SH + "property", SH + "path", SH + "message", SH + "name",
    SH + "description", SH + "severity", RDFS + "comment", RDFS + "label",
    SH + "minCount", SH + "maxCount", SH + "datatype", SH + "nodeKind", SH + "class", SH + "in",
    SH + "hasValue", SH + "pattern", SH + "minLength", SH + "maxLength", SH + "minInclusive",
    SH + "maxInclusive", SH + "minExclusive", SH + "maxExclusive", SH + "node", SH + "not", SH + "or",
    SH + "order", SH + "group",
}


class CompiledShapes:
    """SHACL Core checks compiled from a shapes graph, run on ``EventGraph`` node trees."""

    def __init__(self, turtle: str) -> None:
        from rdflib import BNode, Graph, URIRef  # noqa: PLC0415
        from rdflib.collection import Collection  # noqa: PLC0415

        g = Graph().parse(data=turtle, format="turtle")
        self._g = g
        self._collection = Collection
        self._BNode = BNode
        self._URIRef = URIRef
        self._shapes: dict[str, _Shape] = {}
        node_shapes = set(g.subjects(URIRef(RDF_TYPE), URIRef(SH + "NodeShape")))
        node_shapes |= set(g.subjects(URIRef(SH + "targetClass"), None))
        for shape in node_shapes:
            for bad in ("deactivated", "targetNode", "targetSubjectsOf", "targetObjectsOf"):
                if any(True for _ in g.objects(shape, URIRef(SH + bad))):
                    raise UnsupportedShapes(f"{shape}: sh:{bad} is not supported by the compiled engine")
            self._compile(shape)
        self.targeted = [s for s in self._shapes.values() if s.target_classes]
        if not self.targeted:
            raise UnsupportedShapes("the shapes target nothing (no sh:targetClass)")
        self._fast = _FastShapes(self._shapes, self.targeted)

    # -- compilation ---------------------------------------------------------------------

    def _key(self, node: Any) -> str:
        return str(node) if isinstance(node, self._URIRef) else f"_:{node}"

    def _compile(self, shape: Any) -> _Shape:
        key = self._key(shape)
        existing = self._shapes.get(key)
        if existing is not None:
            return existing
        g, U = self._g, self._URIRef
        for p in g.predicates(shape, None):
            if str(p).startswith(SH) and str(p) not in _SUPPORTED_SHAPE_KEYS:
                raise UnsupportedShapes(f"{key}: {p} is not supported by the compiled engine")
        path_node = g.value(shape, U(SH + "path"))
        path = self._path(path_node) if path_node is not None else None
        message = g.value(shape, U(SH + "message"))
        compiled = _Shape(
            key,
            path,
            [],
            str(message) if message is not None else None,
            tuple(str(c) for c in g.objects(shape, U(SH + "targetClass"))),
        )
        self._shapes[key] = compiled  # before the children: shapes may refer to each other
        checks = compiled.checks

        def one(name: str) -> Any:
            values = list(g.objects(shape, U(SH + name)))
            if len(values) > 1:
                raise UnsupportedShapes(f"{key}: several sh:{name} values")
            return values[0] if values else None

        value = one("minCount")
        if value is not None:
            n = int(value)
            if path is None:
                raise UnsupportedShapes(f"{key}: sh:minCount on a node shape")
            compiled.min_count = n
            checks.append(("sh:MinCountConstraintComponent", _min_count(n, path)))
        value = one("maxCount")
        if value is not None:
            n = int(value)
            if path is None:
                raise UnsupportedShapes(f"{key}: sh:maxCount on a node shape")
            compiled.max_count = n
            checks.append(("sh:MaxCountConstraintComponent", _max_count(n, path)))

        def term_test(component: str, test: TermTest, message: str) -> None:
            compiled.term_tests.append(test)
            checks.append((component, _each(test, message)))

        for value in g.objects(shape, U(SH + "datatype")):
            term_test("sh:DatatypeConstraintComponent", _datatype(str(value)), f"Value is not Literal with datatype {compact(str(value))}")
        for value in g.objects(shape, U(SH + "nodeKind")):
            term_test("sh:NodeKindConstraintComponent", _node_kind(str(value)), f"Value is not of node kind {compact(str(value))}")
        for value in g.objects(shape, U(SH + "class")):
            cls = str(value)
            compiled.classes.append(cls)
            checks.append(("sh:ClassConstraintComponent", _class(cls)))
        for value in g.objects(shape, U(SH + "in")):
            allowed = {_rdflib_term(m) for m in self._collection(g, value)}
            # A blank node is in no list (and a ("bnode", Node) term is not hashable).
            term_test("sh:InConstraintComponent", lambda _i, t, allowed=allowed: t[0] != "bnode" and t in allowed, "Value is not in the allowed list")
        for value in g.objects(shape, U(SH + "hasValue")):
            wanted = _rdflib_term(value)
            compiled.has_values.append(wanted)
            checks.append(("sh:HasValueConstraintComponent", _has_value(wanted)))
        for value in g.objects(shape, U(SH + "pattern")):
            regex = re.compile(str(value))
            term_test("sh:PatternConstraintComponent", _pattern(regex), f"Value does not match pattern {str(value)!r}")
        for name, test in (("minLength", lambda n, m: n >= m), ("maxLength", lambda n, m: n <= m)):
            for value in g.objects(shape, U(SH + name)):
                limit = int(value)
                term_test(f"sh:{name[0].upper()}{name[1:]}ConstraintComponent", _length(limit, test), f"Value violates sh:{name} {limit}")
        for name, ok in (
            ("minInclusive", lambda c: c >= 0),
            ("maxInclusive", lambda c: c <= 0),
            ("minExclusive", lambda c: c > 0),
            ("maxExclusive", lambda c: c < 0),
        ):
            for value in g.objects(shape, U(SH + name)):
                bound = _number(_rdflib_term(value))
                if bound is None:
                    raise UnsupportedShapes(f"{key}: sh:{name} {value} is not a number")
                term_test(f"sh:{name[0].upper()}{name[1:]}ConstraintComponent", _range(bound, ok), f"Value violates sh:{name} {value}")
        for value in g.objects(shape, U(SH + "node")):
            target = self._compile(value)
            compiled.nodes.append(target)
            checks.append(("sh:NodeConstraintComponent", _each(lambda i, t, s=target: _conforms(s, i, t), f"Value does not conform to shape {target.iri}")))
        for value in g.objects(shape, U(SH + "not")):
            target = self._compile(value)
            compiled.nots.append(target)
            checks.append(("sh:NotConstraintComponent", _each(lambda i, t, s=target: not _conforms(s, i, t), "Value conforms to a shape it must not conform to")))
        for value in g.objects(shape, U(SH + "or")):
            options = [self._compile(m) for m in self._collection(g, value)]
            compiled.ors.append(options)
            checks.append(
                ("sh:OrConstraintComponent", _each(lambda i, t, opts=options: any(_conforms(s, i, t) for s in opts), "Value conforms to none of the sh:or shapes"))
            )
        for value in g.objects(shape, U(SH + "property")):
            prop = self._compile(value)
            if prop.path is None:
                raise UnsupportedShapes(f"{key}: sh:property {value} has no sh:path")
            compiled.properties.append(prop)
            checks.append(("sh:PropertyConstraintComponent", _property(prop)))
        return compiled

    def _path(self, node: Any) -> tuple[str, ...]:
        if isinstance(node, self._URIRef):
            return (str(node),)
        if isinstance(node, self._BNode):
            g, U = self._g, self._URIRef
            if g.value(node, U(RDF + "first")) is not None:
                members = list(self._collection(g, node))
                if all(isinstance(m, self._URIRef) for m in members) and members:
                    return tuple(str(m) for m in members)
        raise UnsupportedShapes(f"path {node} is not a predicate or a sequence of predicates")

    # -- validation ----------------------------------------------------------------------

    def validate(self, graph: EventGraph) -> list[Violation]:
        # Most graphs conform: decide that first with the fast check, which gives the same
        # verdict as the checks below (tests compare them on valid and mutated graphs) at a
        # fraction of the cost. Only a graph it rejects, or cannot decide, gets the reference
        # checks, which say which constraints fail and why.
        if self._fast.verdict(graph):  # True; not False (a violation) nor None (undecided)
            return []
        return self.violations(graph)

    def violations(self, graph: EventGraph) -> list[Violation]:
        """Every violation of the graph, by the reference checks (no fast path)."""
        index = _GraphIndex(graph)
        out: list[Violation] = []
        for node in index.nodes:
            if not node.types:
                continue
            focus = _term(node)
            classes = index.types(focus)
            for shape in self.targeted:
                if any(c in classes for c in shape.target_classes):
                    out.extend(_run(shape, index, focus))
        return list(dict.fromkeys(out))


def _run(shape: _Shape, index: _GraphIndex, focus: Term) -> list[Violation]:
    """Violations of ``shape`` at ``focus`` (property shapes report their own path)."""
    values = shape.value_nodes(index, focus)
    out: list[Violation] = []
    focus_text = None  # described when a violation is reported (most checks pass)
    for component, check in shape.checks:
        if component == "sh:PropertyConstraintComponent":
            out.extend(check(index, focus, values))  # type: ignore[arg-type]
            continue
        for generic in check(index, focus, values):
            if focus_text is None:
                focus_text = _describe_term(index, focus)
            path = "/".join(compact(p) for p in shape.path) if shape.path else ""
            out.append(Violation(focus_text, path, component, shape.message or generic[1], shape.iri))
    return out


def _conforms(shape: _Shape, index: _GraphIndex, focus: Term) -> bool:
    return not _run(shape, index, focus)


def _property(prop: _Shape) -> Check:
    def check(index: _GraphIndex, focus: Term, _values: list[Term]) -> list[Any]:
        return _run(prop, index, focus)

    return check


def _each(test: Callable[[_GraphIndex, Term], bool], message: str) -> Check:
    def check(index: _GraphIndex, focus: Term, values: list[Term]) -> list[tuple[str, str]]:
        return [("", message) for v in values if not test(index, v)]

    return check


def _min_count(n: int, path: tuple[str, ...]) -> Check:
    def check(index: _GraphIndex, focus: Term, values: list[Term]) -> list[tuple[str, str]]:
        return [] if len(values) >= n else [("", f"Less than {n} values on {'/'.join(compact(p) for p in path)}")]

    return check


def _max_count(n: int, path: tuple[str, ...]) -> Check:
    def check(index: _GraphIndex, focus: Term, values: list[Term]) -> list[tuple[str, str]]:
        return [] if len(values) <= n else [("", f"More than {n} values on {'/'.join(compact(p) for p in path)}")]

    return check


def _datatype(datatype: str) -> Callable[[_GraphIndex, Term], bool]:
    wanted = None if datatype == XSD_STRING else datatype

    def test(_index: _GraphIndex, t: Term) -> bool:
        return t[0] == "lit" and t[2] == wanted and _well_formed(t[1], t[2])

    return test


def _node_kind(kind: str) -> Callable[[_GraphIndex, Term], bool]:
    allowed = {
        SH + "IRI": {"iri"},
        SH + "BlankNode": {"bnode"},
        SH + "Literal": {"lit"},
        SH + "BlankNodeOrIRI": {"iri", "bnode"},
        SH + "BlankNodeOrLiteral": {"bnode", "lit"},
        SH + "IRIOrLiteral": {"iri", "lit"},
    }.get(kind)
    if allowed is None:
        raise UnsupportedShapes(f"unknown sh:nodeKind {kind}")
    return lambda _index, t: t[0] in allowed


def _class(cls: str) -> Check:
    def check(index: _GraphIndex, focus: Term, values: list[Term]) -> list[tuple[str, str]]:
        return [
            ("", f"Value does not have class {compact(cls)}")
            for v in values
            if v[0] == "lit" or cls not in index.types(v)
        ]

    return check


def _has_value(wanted: Term) -> Check:
    def check(index: _GraphIndex, focus: Term, values: list[Term]) -> list[tuple[str, str]]:
        return [] if wanted in values else [("", f"Missing expected value {wanted[1]}")]

    return check


def _pattern(regex: re.Pattern[str]) -> Callable[[_GraphIndex, Term], bool]:
    def test(_index: _GraphIndex, t: Term) -> bool:
        return t[0] != "bnode" and regex.search(t[1]) is not None

    return test


def _length(limit: int, ok: Callable[[int, int], bool]) -> Callable[[_GraphIndex, Term], bool]:
    def test(_index: _GraphIndex, t: Term) -> bool:
        return t[0] != "bnode" and ok(len(t[1]), limit)

    return test


def _range(bound: float | Decimal, ok: Callable[[int], bool]) -> Callable[[_GraphIndex, Term], bool]:
    def test(_index: _GraphIndex, t: Term) -> bool:
        value = _number(t)
        if value is None:
            return False
        c = _compare(value, bound)
        return c is not None and ok(c)

    return test


def _describe_focus(node: Node) -> str:
    if node.iri is not None:
        return node.iri
    kinds = ",".join(compact(t) for t in node.types) or "node"
    return f"_:{kinds}"


def _describe_term(index: _GraphIndex, term: Term) -> str:
    if term[0] == "iri":
        return term[1]
    if term[0] == "bnode":
        return _describe_focus(term[1])
    return term[1]


# -- the fast conformance check -----------------------------------------------------------
#
# The checks above say which constraints fail and why; that needs terms, a graph index and a
# description of every focus. Most graphs conform, though, and to say only *whether* a graph
# conforms the fast check below works on the node tree's own values (no term tuples), looks
# each node's properties up in one dict built per graph, memoizes the tests that depend on a
# value alone (codes, units, statuses and feed names repeat from one event to the next) and
# stops at the first failure. Its verdict must equal the reference checks' verdict exactly:
# where it cannot decide cheaply (subclass statements in the graph, two nodes with one IRI, a
# count above sh:maxCount, a value of an unexpected type) it raises _Undecided and the reference
# checks decide. tests/ingest/test_ingest_shapes_speed_equivalence.py compares the two.


class _Undecided(Exception):
    """The fast check leaves this graph to the reference checks."""


# Values of a node tree the fast check knows; anything else (a subclass of one of them, a float)
# goes to the reference checks, which accept or refuse it as they always did.
_VALUE_TYPES = frozenset({str, Iri, Lit, int, bool})
_XSD_INTEGER = XSD + "integer"
_XSD_BOOLEAN = XSD + "boolean"
_SUBCLASS_OF = RDFS + "subClassOf"
_MEMO_SIZE = 4096  # per test and kind of value; a full memo is cleared, not grown
_MEMO_KEY_LENGTH = 256  # longer lexical forms are tested, not remembered
_NO_PROPS: dict[str, list[Any]] = {}

Props = dict[str, list[Any]]  # a node's values by predicate, in the tree's own representation
FastCheck = Callable[["_FastGraph", Any, Props], bool]  # (graph, focus, focus's props) -> conforms


class _FastGraph:
    """One event graph as the fast check reads it: each node's values by predicate, nodes by IRI."""

    __slots__ = ("by_iri", "props", "focus")

    def __init__(self, graph: EventGraph) -> None:
        by_iri: dict[str, Node] = {}
        props: dict[int, Props] = {}  # by id(node): the nodes live as long as the graph
        focus: list[Node] = []
        stack = list(graph.resources)
        while stack:
            node = stack.pop()
            if type(node) is not Node:
                raise _Undecided
            if id(node) in props:  # one node object reached twice
                continue
            if node.iri is not None and by_iri.setdefault(node.iri, node) is not node:
                raise _Undecided  # two nodes of one IRI: the reference checks merge them
            if type(node.types) is not tuple:
                raise _Undecided  # types are looked up by tuple (see _FastShapes._by_types)
            values: Props = {}
            for predicate, value in node.props:
                same = values.get(predicate)
                if same is None:
                    values[predicate] = [value]
                else:
                    same.append(value)
                cls = type(value)
                if cls is Node:
                    stack.append(value)
                elif cls not in _VALUE_TYPES:
                    raise _Undecided
            if _SUBCLASS_OF in values:
                raise _Undecided  # rdfs:subClassOf in the data widens sh:class and the targets
            props[id(node)] = values
            if node.types:
                focus.append(node)
        self.by_iri = by_iri
        self.props = props
        self.focus = focus

    def props_of(self, value: Any) -> Props:
        """The values of a value node by predicate (none for a literal or an unknown IRI)."""
        cls = type(value)
        if cls is Node:
            return self.props[id(value)]  # an IRI node is the only node of its IRI
        if cls is Iri:
            node = self.by_iri.get(value)
            return self.props[id(node)] if node is not None else _NO_PROPS
        return _NO_PROPS

    def types_of(self, value: Any) -> tuple[str, ...] | None:
        """rdf:type values of a value node (no rdfs:subClassOf in the graph), None for a literal."""
        cls = type(value)
        if cls is Node:
            return value.types
        if cls is Iri:
            node = self.by_iri.get(value)
            return node.types if node is not None else ()
        return None

    def follow(self, props: Props, path: tuple[str, ...]) -> list[Any]:
        """Values along a sequence path, duplicates kept (at least as many as the reference's)."""
        current = props.get(path[0], [])
        for predicate in path[1:]:
            nxt: list[Any] = []
            for value in current:
                nxt.extend(self.props_of(value).get(predicate, ()))
            current = nxt
        return current


def _memoized(test: Callable[[Term], bool]) -> Callable[[Any], bool]:
    """``test(_term(value))`` for a value of the node tree, memoized by lexical form; the memo is
    keyed by kind of value (an Iri is equal to the str of its text, True to 1)."""
    strs: dict[str, bool] = {}
    iris: dict[str, bool] = {}
    ints: dict[int, bool] = {}
    lits: dict[str, dict[str, bool]] = {}  # by datatype, then lexical form
    true, false = test(("lit", "true", _XSD_BOOLEAN)), test(("lit", "false", _XSD_BOOLEAN))

    def remember(memo: dict[Any, bool], key: Any, term: Term) -> bool:
        verdict = test(term)
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        if type(key) is int or len(key) <= _MEMO_KEY_LENGTH:
            memo[key] = verdict
        return verdict

    def memoized(value: Any) -> bool:
        cls = type(value)
        if cls is str:
            verdict = strs.get(value)
            return remember(strs, value, ("lit", value, None)) if verdict is None else verdict
        if cls is Lit:
            datatype = value.datatype
            memo = lits.get(datatype)
            if memo is None:
                if len(lits) >= 8:  # a property has a datatype or two
                    lits.clear()
                memo = lits[datatype] = {}
            verdict = memo.get(value.lex)
            if verdict is None:
                verdict = remember(memo, value.lex, ("lit", value.lex, None if datatype == XSD_STRING else datatype))
            return verdict
        if cls is Iri or cls is Node and value.iri is not None:
            key = value if cls is Iri else value.iri  # an Iri is a key equal to its text
            verdict = iris.get(key)
            return remember(iris, key, ("iri", key)) if verdict is None else verdict
        if cls is int:
            verdict = ints.get(value)
            return remember(ints, value, ("lit", str(value), _XSD_INTEGER)) if verdict is None else verdict
        if cls is bool:
            return true if value else false
        return test(("bnode", value))  # a blank node (the tree holds nothing else, see _FastGraph)

    return memoized


def _all(tests: list[TermTest]) -> Callable[[Term], bool]:
    if len(tests) == 1:
        only = tests[0]
        return lambda term: only(None, term)

    def every(term: Term) -> bool:
        for test in tests:  # a loop rather than all(generator): runs once per new value
            if not test(None, term):
                return False
        return True

    return every


class _FastShapes:
    """The fast conformance check of every shape, and the checks each class of focus gets."""

    def __init__(self, shapes: Mapping[str, _Shape], targeted: list[_Shape]) -> None:
        self._checks: dict[str, FastCheck] = {}
        links: list[tuple[list[FastCheck], list[_Shape]]] = []
        for shape in shapes.values():
            self._checks[shape.iri] = self._build(shape, links)
        # Shapes refer to each other (and may do so in a cycle): link them once all are built.
        for checks, targets in links:
            checks.extend(self._checks[t.iri] for t in targets)
        # What a focus of a class is checked with. A node shape that only has property shapes
        # (most of them) is checked by running those directly: one call less per property.
        self._by_class: dict[str, list[FastCheck]] = {}
        for shape in targeted:
            if shape.path is None and shape.properties and _only_properties(shape):
                at_focus = [self._checks[p.iri] for p in shape.properties]
            else:
                at_focus = [self._checks[shape.iri]]
            for cls in shape.target_classes:
                checks = self._by_class.setdefault(cls, [])
                checks.extend(c for c in at_focus if c not in checks)
        self._by_types: dict[tuple[str, ...], list[FastCheck]] = {}

    def verdict(self, graph: EventGraph) -> bool | None:
        """Whether the graph conforms, or None when the fast check leaves it to the reference."""
        try:
            fast = _FastGraph(graph)
            for node in fast.focus:
                checks = self._by_types.get(node.types)
                if checks is None:
                    checks = self._targeting(node.types)
                props = fast.props[id(node)]
                for check in checks:
                    if not check(fast, node, props):
                        return False
        except _Undecided:
            return None
        return True

    def _targeting(self, types: tuple[str, ...]) -> list[FastCheck]:
        checks: list[FastCheck] = []
        for cls in types:
            checks.extend(c for c in self._by_class.get(cls, ()) if c not in checks)
        if len(self._by_types) >= _MEMO_SIZE:
            self._by_types.clear()
        self._by_types[types] = checks
        return checks

    @staticmethod
    def _build(shape: _Shape, links: list[tuple[list[FastCheck], list[_Shape]]]) -> FastCheck:
        path = shape.path
        if path is not None and RDF_TYPE in path:
            # rdf:type values come from Node.types, not from the props: leave it to the reference.
            def undecided(graph: _FastGraph, focus: Any, props: Props) -> bool:
                raise _Undecided

            return undecided
        predicate = path[0] if path is not None and len(path) == 1 else None
        low = shape.min_count
        high = shape.max_count if shape.max_count is not None else math.inf
        pure = _memoized(_all(shape.term_tests)) if shape.term_tests else None

        def counted(values: Sequence[Any]) -> bool:
            # ``values`` may hold a term twice (RDF graphs are sets): a count within the bounds
            # is within them without the duplicates too, unless the least count is above 1.
            count = len(values)
            if count < low:
                return False
            if count > high or low > 1:
                count = _distinct(values, predicate is not None)
                return low <= count <= high
            return True

        if predicate is not None and _only_counts_and_terms(shape):
            # The common case: one predicate, a count, tests of each value's term.
            def simple(graph: _FastGraph, focus: Any, props: Props) -> bool:
                values = props.get(predicate)
                if values is None:
                    return low == 0
                if (len(values) > high or low > 1) and not counted(values):
                    return False
                if pure is not None:
                    for value in values:
                        if not pure(value):
                            return False
                return True

            return simple

        has_values = [_memoized(lambda term, w=w: term == w) for w in shape.has_values]
        classes = tuple(shape.classes)
        nodes: list[FastCheck] = []
        nots: list[FastCheck] = []
        ors: list[list[FastCheck]] = [[] for _ in shape.ors]
        properties: list[FastCheck] = []
        links += [(nodes, shape.nodes), (nots, shape.nots), (properties, shape.properties)]
        links += list(zip(ors, shape.ors))

        def check(graph: _FastGraph, focus: Any, props: Props) -> bool:
            if predicate is not None:
                values = props.get(predicate, ())
            elif path is None:
                values = (focus,)
            else:
                values = graph.follow(props, path)
            if not counted(values):
                return False
            for value in values:
                if pure is not None and not pure(value):
                    return False
                if classes:
                    types = graph.types_of(value)
                    if types is None:
                        return False
                    for cls in classes:
                        if cls not in types:
                            return False
                if nodes or nots or ors:
                    value_props = graph.props_of(value)
                    for target in nodes:
                        if not target(graph, value, value_props):
                            return False
                    for target in nots:
                        if target(graph, value, value_props):
                            return False
                    for options in ors:
                        for option in options:
                            if option(graph, value, value_props):
                                break
                        else:
                            return False
            for has_value in has_values:
                for value in values:
                    if has_value(value):
                        break
                else:
                    return False
            # A property shape is checked at the focus of the shape that has it (see _property).
            for prop in properties:
                if not prop(graph, focus, props):
                    return False
            return True

        return check


def _only_counts_and_terms(shape: _Shape) -> bool:
    return not (shape.has_values or shape.classes or shape.nodes or shape.nots or shape.ors or shape.properties)


def _only_properties(shape: _Shape) -> bool:
    return shape.min_count == 0 and shape.max_count is None and not (
        shape.term_tests or shape.has_values or shape.classes or shape.nodes or shape.nots or shape.ors
    )


def _distinct(values: Sequence[Any], exact: bool) -> int:
    """How many distinct terms ``values`` holds, as the reference counts them (from one node's
    values; along a longer path the reference counts differently: leave that to it)."""
    if not exact:
        raise _Undecided
    keys = set()
    for value in values:
        term = _term(value)
        keys.add((term[0], id(term[1])) if term[0] == "bnode" else term)
    return len(keys)


# -- the pyshacl engine -------------------------------------------------------------------


class PyshaclShapes:
    """pyshacl over the union of a batch of graphs; results attributed by focus node."""

    def __init__(self, turtle: str) -> None:
        from rdflib import Graph  # noqa: PLC0415

        self._shapes = Graph().parse(data=turtle, format="turtle")

    def _run(self, triples: Iterable[tuple[Any, Any, Any]]) -> tuple[bool, list[tuple[Any, Violation]]]:
        import pyshacl  # noqa: PLC0415
        from rdflib import Graph, Namespace  # noqa: PLC0415

        data = Graph()
        for t in triples:
            data.add(t)
        conforms, report, _text = pyshacl.validate(data, shacl_graph=self._shapes, inference="none", advanced=False)
        if conforms:
            return True, []
        sh = Namespace(SH)
        out: list[tuple[Any, Violation]] = []
        for result in report.subjects(predicate=sh.resultSeverity):
            focus = report.value(result, sh.focusNode)
            path = report.value(result, sh.resultPath)
            component = report.value(result, sh.sourceConstraintComponent)
            message = report.value(result, sh.resultMessage)
            shape = report.value(result, sh.sourceShape)
            out.append(
                (
                    focus,
                    Violation(
                        str(focus),
                        _path_text(report, path),
                        compact(str(component)).replace(SH, "sh:") if component is not None else "",
                        str(message) if message is not None else "",
                        str(shape) if shape is not None else "",
                    ),
                )
            )
        return False, out

    def validate_batch(self, graphs: Sequence[EventGraph]) -> list[list[Violation]]:
        triples_per_graph = [g.triples() for g in graphs]
        owner: dict[str, set[int]] = {}
        for i, triples in enumerate(triples_per_graph):
            for s, _p, o in triples:
                owner.setdefault(str(s), set()).add(i)
                owner.setdefault(str(o), set()).add(i)
        conforms, results = self._run(t for triples in triples_per_graph for t in triples)
        out: list[list[Violation]] = [[] for _ in graphs]
        if conforms:
            return out
        unattributed: set[int] = set()
        for focus, violation in results:
            who = owner.get(str(focus))
            if who is not None and len(who) == 1:
                out[next(iter(who))].append(violation)
            else:
                # A node shared by several graphs (a patient): find out which one is at fault.
                unattributed |= who or set(range(len(graphs)))
        for i in sorted(unattributed):
            out[i] = [v for _, v in self._run(triples_per_graph[i])[1]]
        return out


def _path_text(report: Any, path: Any) -> str:
    if path is None:
        return ""
    from rdflib import BNode  # noqa: PLC0415
    from rdflib.collection import Collection  # noqa: PLC0415

    if isinstance(path, BNode):
        try:
            return "/".join(compact(str(p)) for p in Collection(report, path))
        except Exception:  # noqa: BLE001  (a path form we do not print)
            return str(path)
    return compact(str(path))


# -- the facade ---------------------------------------------------------------------------


class ShapeValidator:
    """Validate event graphs, a micro-batch at a time, with the chosen engine."""

    def __init__(self, engine: str = "compiled", turtle: str | None = None) -> None:
        if engine not in ENGINES:
            raise ValueError(f"SHACL engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        text = turtle if turtle is not None else shapes_text()
        self.engine = engine
        self._compiled = CompiledShapes(text) if engine == "compiled" else None
        self._pyshacl = PyshaclShapes(text) if engine == "pyshacl" else None

    def validate_batch(self, graphs: Sequence[EventGraph]) -> list[list[Violation]]:
        """Per graph, its violations (an empty list when it conforms)."""
        if not graphs:
            return []
        if self._compiled is not None:
            return [self._compiled.validate(g) for g in graphs]
        assert self._pyshacl is not None
        return self._pyshacl.validate_batch(graphs)

    def validate(self, graph: EventGraph) -> list[Violation]:
        return self.validate_batch([graph])[0]


def describe(violations: Sequence[Violation], limit: int = 5) -> str:
    """A one-line summary a person can act on."""
    shown = "; ".join(v.describe() for v in violations[:limit])
    more = f" (and {len(violations) - limit} more)" if len(violations) > limit else ""
    return shown + more


def components(violations: Iterable[Violation]) -> set[str]:
    return {v.component for v in violations}


def violations_by_focus(violations: Iterable[Violation]) -> Mapping[str, list[Violation]]:
    out: dict[str, list[Violation]] = {}
    for v in violations:
        out.setdefault(v.focus, []).append(v)
    return out

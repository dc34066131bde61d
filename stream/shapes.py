"""SHACL validation of event graphs against the shapes in ``schemas/shapes/``.

Two engines read the same shapes files:

- ``compiled`` (the default, used on the hot path): the shapes are compiled once into checks
  that run directly on ``stream.rdf`` node trees, one event graph at a time. It implements the
  SHACL Core subset our shapes use (class targets; property shapes with predicate and sequence
  paths; min/maxCount, datatype, nodeKind, class, in, hasValue, pattern, min/maxLength,
  min/maxInclusive, min/maxExclusive, node, not, or) and refuses to compile a shapes file that
  uses anything else, so it is never silently laxer than the shapes say. Tests run it side by
  side with pyshacl on valid graphs and on thousands of mutated ones and require the same
  verdicts and the same failing constraint components.
- ``pyshacl``: one pyshacl run over the union of a micro-batch of graphs; when the batch does
  not conform, each result is attributed to its event through its focus node, and only results
  that cannot be attributed trigger per-graph runs.

Why not pyshacl alone: pyshacl evaluates every property shape separately for every focus node
(about 70 µs each), which costs about 2 ms per event graph even in batches of 500; the
compiled checks cost tens of µs. See bench/stream.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
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


@dataclass
class _Shape:
    iri: str
    path: tuple[str, ...] | None  # None for a node shape
    checks: list[tuple[str, Check]]  # (component, check)
    message: str | None
    target_classes: tuple[str, ...] = ()

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
            checks.append(("sh:MinCountConstraintComponent", _min_count(n, path)))
        value = one("maxCount")
        if value is not None:
            n = int(value)
            if path is None:
                raise UnsupportedShapes(f"{key}: sh:maxCount on a node shape")
            checks.append(("sh:MaxCountConstraintComponent", _max_count(n, path)))
        for value in g.objects(shape, U(SH + "datatype")):
            checks.append(("sh:DatatypeConstraintComponent", _each(_datatype(str(value)), f"Value is not Literal with datatype {compact(str(value))}")))
        for value in g.objects(shape, U(SH + "nodeKind")):
            checks.append(("sh:NodeKindConstraintComponent", _each(_node_kind(str(value)), f"Value is not of node kind {compact(str(value))}")))
        for value in g.objects(shape, U(SH + "class")):
            cls = str(value)
            checks.append(("sh:ClassConstraintComponent", _class(cls)))
        for value in g.objects(shape, U(SH + "in")):
            allowed = {_rdflib_term(m) for m in self._collection(g, value)}
            checks.append(("sh:InConstraintComponent", _each(lambda _i, t, allowed=allowed: t in allowed, "Value is not in the allowed list")))
        for value in g.objects(shape, U(SH + "hasValue")):
            wanted = _rdflib_term(value)
            checks.append(("sh:HasValueConstraintComponent", _has_value(wanted)))
        for value in g.objects(shape, U(SH + "pattern")):
            regex = re.compile(str(value))
            checks.append(("sh:PatternConstraintComponent", _each(_pattern(regex), f"Value does not match pattern {str(value)!r}")))
        for name, test in (("minLength", lambda n, m: n >= m), ("maxLength", lambda n, m: n <= m)):
            for value in g.objects(shape, U(SH + name)):
                limit = int(value)
                checks.append(
                    (f"sh:{name[0].upper()}{name[1:]}ConstraintComponent", _each(_length(limit, test), f"Value violates sh:{name} {limit}"))
                )
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
                checks.append(
                    (f"sh:{name[0].upper()}{name[1:]}ConstraintComponent", _each(_range(bound, ok), f"Value violates sh:{name} {value}"))
                )
        for value in g.objects(shape, U(SH + "node")):
            target = self._compile(value)
            checks.append(("sh:NodeConstraintComponent", _each(lambda i, t, s=target: _conforms(s, i, t), f"Value does not conform to shape {target.iri}")))
        for value in g.objects(shape, U(SH + "not")):
            target = self._compile(value)
            checks.append(("sh:NotConstraintComponent", _each(lambda i, t, s=target: not _conforms(s, i, t), "Value conforms to a shape it must not conform to")))
        for value in g.objects(shape, U(SH + "or")):
            options = [self._compile(m) for m in self._collection(g, value)]
            checks.append(
                ("sh:OrConstraintComponent", _each(lambda i, t, opts=options: any(_conforms(s, i, t) for s in opts), "Value conforms to none of the sh:or shapes"))
            )
        for value in g.objects(shape, U(SH + "property")):
            prop = self._compile(value)
            if prop.path is None:
                raise UnsupportedShapes(f"{key}: sh:property {value} has no sh:path")
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
        index = _GraphIndex(graph)
        out: list[Violation] = []
        for node in index.nodes:
            if not node.types:
                continue
            classes = index.types(_term(node))
            for shape in self.targeted:
                if any(c in classes for c in shape.target_classes):
                    out.extend(_run(shape, index, _term(node), _describe_focus(node)))
        return list(dict.fromkeys(out))


def _run(shape: _Shape, index: _GraphIndex, focus: Term, focus_text: str) -> list[Violation]:
    """Violations of ``shape`` at ``focus`` (property shapes report their own path)."""
    values = shape.value_nodes(index, focus)
    out: list[Violation] = []
    for component, check in shape.checks:
        if component == "sh:PropertyConstraintComponent":
            out.extend(check(index, focus, values))  # type: ignore[arg-type]
            continue
        for generic in check(index, focus, values):
            path = "/".join(compact(p) for p in shape.path) if shape.path else ""
            out.append(Violation(focus_text, path, component, shape.message or generic[1], shape.iri))
    return out


def _conforms(shape: _Shape, index: _GraphIndex, focus: Term) -> bool:
    return not _run(shape, index, focus, "")


def _property(prop: _Shape) -> Check:
    def check(index: _GraphIndex, focus: Term, _values: list[Term]) -> list[Any]:
        text = _describe_term(index, focus)
        return _run(prop, index, focus, text)

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

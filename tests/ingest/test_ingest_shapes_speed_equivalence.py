"""The compiled engine's fast conformance check gives the reference checks' verdict.

``CompiledShapes.validate`` first asks a fast check whether a graph conforms and runs the
reference checks (which word the violations) only when it does not. The fast check must never
accept a graph the reference checks reject, nor reject one they accept: these tests compare the
two on mutated event graphs under our shapes, and on random graphs under shapes that use the
features our shapes do not (sh:node, sh:not, counts above 1, sequence paths, rdf:type paths...).
"""

from __future__ import annotations

import copy
import random

import pytest

from schemas import EVENT_KINDS, example, normalize_event
from stream.rdf import RDF_TYPE, XSD, EventGraph, Iri, Lit, Node, Provenance, build_event_graph, double
from stream.shapes import RDFS, CompiledShapes, shapes_text

SOURCE = Provenance("oncotwin.events.lab.v1", 0, 7)
ROUNDS = 8  # random mutants per property of each graph

POOL = [
    double(float("nan")),
    double(float("inf")),
    double(-1.0),
    double(0.5),
    double(2.5),
    Lit("1e400", XSD + "double"),
    Lit("abc", XSD + "double"),
    Lit("7", XSD + "integer"),
    Lit("7.0", XSD + "integer"),
    Lit("mg", XSD + "string"),
    Lit("2024-13-45T00:00:00Z", XSD + "dateTime"),
    Lit("2024-01-01T00:00:00Z", XSD + "dateTime"),
    Lit("a b", XSD + "anyURI"),
    "final",
    "completed",
    "treatment",
    "Gy",
    "mg",
    "1",
    "",
    "x" * 70,
    "f" * 64,
    "2.25.1",
    0,
    42,
    -3,
    True,
    False,
    Iri("http://example.org/not-a-code"),
    Iri("http://loinc.org/rdf#2857-1"),
    Iri("http://snomed.info/id/1217123003"),
    Iri("http://unitsofmeasure.org"),
    Iri("urn:uuid:not-a-uuid"),
    Iri("urn:uuid:01234567-89ab-cdef-0123-456789abcdef"),
    Iri("https://w3id.org/oncotwin/fhir/Patient/VP-0001"),
    Iri("http://hl7.org/fhir/Quantity"),
]
TYPES = [
    "http://hl7.org/fhir/Quantity",
    "http://hl7.org/fhir/Patient",
    "http://hl7.org/fhir/Observation",
    "https://w3id.org/oncotwin/ns#ClaimCheck",
    "https://w3id.org/oncotwin/ns#RadiotherapyFraction",
]


def _nodes(graph: EventGraph) -> list[Node]:
    return list(graph.nodes())


def _subtree(node: Node) -> list[Node]:
    return list(EventGraph("", "", "", [node]).nodes())


def _pool_value(rng: random.Random, graph: EventGraph, at: Node) -> object:
    """A value for a property of ``at``: a literal or IRI, or a node of the graph (shared,
    copied or referred to by its IRI), never one that would make the tree a cycle."""
    r = rng.random()
    candidates = [n for n in _nodes(graph) if not any(m is at for m in _subtree(n))]
    if r < 0.1 and candidates:
        return rng.choice(candidates)  # the same node object reached twice
    if r < 0.2:
        return copy.deepcopy(rng.choice(_nodes(graph)))  # a second node, maybe of the same IRI
    if r < 0.25:
        node = rng.choice(_nodes(graph))
        return Iri(node.iri) if node.iri else Node(None, (rng.choice(TYPES),))
    return rng.choice(POOL)


def _mutants(graph: EventGraph, rng: random.Random, rounds: int) -> list[EventGraph]:
    """One, two or three random mutations of a graph, ``rounds`` times per node property."""
    out = []
    slots = sum(len(n.props) + 1 for n in _nodes(graph))
    for _ in range(slots * rounds):
        g = copy.deepcopy(graph)
        for _ in range(rng.choice((1, 1, 2, 3))):
            node = rng.choice(_nodes(g))
            op = rng.choice(("drop", "replace", "duplicate", "same-twice", "retype", "addtype", "subclass", "move"))
            if op in ("drop", "replace", "same-twice", "move") and not node.props:
                continue
            j = rng.randrange(len(node.props)) if node.props else 0
            if op == "drop":
                del node.props[j]
            elif op == "replace":
                node.props[j] = (node.props[j][0], _pool_value(rng, g, node))
            elif op == "duplicate":
                predicate = rng.choice(node.props)[0] if node.props else RDF_TYPE
                node.props.append((predicate, _pool_value(rng, g, node)))
            elif op == "same-twice":
                node.props.append(node.props[j])
            elif op == "retype":
                node.types = () if node.types else (rng.choice(TYPES),)
            elif op == "addtype":
                node.types = (*node.types, rng.choice(TYPES))
            elif op == "subclass":
                node.props.append((RDFS + "subClassOf", Iri(rng.choice(TYPES))))
            else:  # a value moved to another node (not into its own subtree)
                value = node.props[j][1]
                inside = _subtree(value) if isinstance(value, Node) else []
                other = rng.choice(_nodes(g))
                if not any(m is other for m in inside):
                    other.props.append(node.props.pop(j))
        out.append(g)
    return out


def _graphs(cohort_events: list[dict]) -> list[EventGraph]:
    events = [example(kind) for kind in EVENT_KINDS]
    events += [next(e for e in cohort_events if e["kind"] == k) for k in EVENT_KINDS]
    events += [e for e in cohort_events if e["kind"] == "treatment" and e["body"]["type"] == "chemotherapy"][:1]
    return [build_event_graph(normalize_event(e), SOURCE) for e in events]


def _agree(engine: CompiledShapes, graph: EventGraph) -> bool | None:
    """The fast verdict (None: undecided), after checking it against the reference checks."""
    fast = engine._fast.verdict(graph)
    reference = engine.violations(graph)
    if fast is not None:
        assert fast == (not reference), (fast, [v.describe() for v in reference], graph.jsonld())
    assert engine.validate(graph) == reference  # the same violations, words and order
    return fast


@pytest.fixture(scope="module")
def engine() -> CompiledShapes:
    return CompiledShapes(shapes_text())


def test_fast_check_accepts_every_valid_graph(engine, cohort_events: list[dict]) -> None:
    graphs = _graphs(cohort_events)
    assert all(engine._fast.verdict(g) is True for g in graphs)
    assert all(_agree(engine, g) for g in graphs)


def test_fast_check_agrees_with_the_reference_on_mutants(engine, cohort_events: list[dict]) -> None:
    rng = random.Random(20261124)
    verdicts = [_agree(engine, m) for g in _graphs(cohort_events) for m in _mutants(g, rng, rounds=ROUNDS)]
    decided = [v for v in verdicts if v is not None]
    print(f"{len(verdicts)} mutants, {len(decided)} decided by the fast check, {sum(decided)} conform")
    assert len(verdicts) > 2000
    assert len(decided) > 0.7 * len(verdicts)  # the fast check decides most graphs itself
    assert 0.1 * len(decided) < sum(decided) < 0.9 * len(decided)  # both verdicts exercised


# -- shapes with the features our shapes do not use ----------------------------------------

EX = "http://example.org/"
FEATURES = """
@prefix sh: <http://www.w3.org/ns/shacl#> . @prefix ex: <http://example.org/> .
@prefix xsd: <http://www.w3.org/2001/XMLSchema#> . @prefix rdf: <http://www.w3.org/1999/02/22-rdf-syntax-ns#> .
ex:S1 a sh:NodeShape ; sh:targetClass ex:C ;
    sh:property [ sh:path ex:p ; sh:minCount 1 ; sh:maxCount 2 ; sh:datatype xsd:integer ; sh:maxInclusive 40 ] ,
                [ sh:path ( ex:q ex:p ) ; sh:maxCount 1 ; sh:minCount 1 ] ,
                [ sh:path ex:r ; sh:minCount 2 ; sh:nodeKind sh:BlankNodeOrIRI ] ;
    sh:not [ sh:path ex:q ; sh:minCount 2 ] .
ex:S2 a sh:NodeShape ; sh:targetClass ex:D ;
    sh:or ( [ sh:path ex:p ; sh:hasValue 1 ] [ sh:path ex:q ; sh:in ( ex:a "x" ) ; sh:minCount 1 ] ) ;
    sh:property [ sh:path ex:q ; sh:node ex:S3 ] , [ sh:path ex:r ; sh:maxCount 0 ] .
ex:S3 a sh:NodeShape ;
    sh:property [ sh:path ex:p ; sh:class ex:C ; sh:maxCount 1 ] .
ex:S4 sh:targetClass ex:E ; sh:path ex:q ; sh:nodeKind sh:IRI ; sh:pattern "^http" ; sh:maxLength 20 ;
    sh:property [ sh:path ex:p ; sh:minCount 1 ] .
ex:S5 a sh:NodeShape ; sh:targetClass ex:E ;
    sh:property [ sh:path ( ex:q ex:q ex:p ) ; sh:class ex:D ; sh:maxCount 2 ] ,
                [ sh:path ex:p ; sh:hasValue "x" ; sh:minLength 1 ; sh:datatype xsd:string ] .
ex:S6 a sh:NodeShape ; sh:targetClass ex:F ; sh:property [ sh:path rdf:type ; sh:minCount 2 ] .
"""
VALUES = [Iri(EX + "a"), Iri(EX + "b"), Iri(EX + "d"), Iri(EX + "zz"), "x", "1", "", 1, 2, 41, True, Lit("1", XSD + "integer"),
          Lit("x", XSD + "string"), Lit("1.5", XSD + "double"), Lit("z", XSD + "integer")]


def _random_graph(rng: random.Random) -> EventGraph:
    def node(depth: int) -> Node:
        iri = rng.choice((None, None, None, None, EX + "a", EX + "b", EX + "c", EX + "d"))
        types = tuple(rng.sample([EX + "C", EX + "D", EX + "E", EX + "F"], rng.choice((0, 1, 1, 2))))
        out = Node(iri, types)
        for _ in range(rng.randrange(5)):
            predicate = rng.choice((EX + "p", EX + "p", EX + "q", EX + "r", RDF_TYPE))
            if rng.random() < 0.02:
                predicate = RDFS + "subClassOf"
            value = node(depth + 1) if depth < 3 and rng.random() < 0.35 else rng.choice(VALUES)
            out.add(predicate, value)
        return out

    return EventGraph("e", "p", "lab", [node(0) for _ in range(rng.choice((1, 2)))])


def test_fast_check_agrees_with_the_reference_on_other_features() -> None:
    engine = CompiledShapes(FEATURES)
    rng = random.Random(7)
    verdicts = [_agree(engine, _random_graph(rng)) for _ in range(4000)]
    decided = [v for v in verdicts if v is not None]
    print(f"{len(verdicts)} graphs, {len(decided)} decided by the fast check, {sum(decided)} conform")
    assert len(decided) > 0.5 * len(verdicts)
    assert 0.05 * len(decided) < sum(decided) < 0.95 * len(decided)


def _c_node(*props: tuple[str, object]) -> EventGraph:
    """A focus of ex:S1; with no ``props`` given, one that conforms."""
    node = Node(EX + "a", (EX + "C",))
    for predicate, value in props or (
        ("p", 1), ("q", Node(None, (), [(EX + "p", "v")])), ("r", Iri(EX + "x")), ("r", Iri(EX + "y")),
    ):
        node.add(EX + predicate, value)
    return EventGraph("e", "p", "lab", [node])


SHARED = Node(None, (), [(EX + "p", "v")])
EDGE_CASES = {
    "conforms": (_c_node(), True, True),
    "one value twice is one value (minCount 2)": (
        _c_node(("p", 1), ("q", Node(None, (), [(EX + "p", "v")])), ("r", Iri(EX + "x")), ("r", Iri(EX + "x"))),
        False, False,
    ),
    "an IRI and its node are one value (minCount 2)": (
        _c_node(("p", 1), ("q", Node(None, (), [(EX + "p", "v")])), ("r", Iri(EX + "x")), ("r", Node(EX + "x"))),
        False, False,
    ),
    "three equal integers are one value (maxCount 2)": (
        _c_node(("p", 1), ("p", Lit("1", XSD + "integer")), ("p", 1), ("q", Node(None, (), [(EX + "p", "v")])),
                ("r", Iri(EX + "x")), ("r", Iri(EX + "y"))),
        True, True,
    ),
    "two blank nodes are two values (sh:not minCount 2)": (
        _c_node(("p", 1), ("q", Node(None, (), [(EX + "p", "v")])), ("q", Node(None, (), [(EX + "p", "v")])),
                ("r", Iri(EX + "x")), ("r", Iri(EX + "y"))),
        False, False,
    ),
    "a path goes on through an IRI to its node": (
        EventGraph("e", "p", "lab", [
            Node(EX + "a", (EX + "C",), [(EX + "p", 1), (EX + "q", Iri(EX + "b")), (EX + "r", Iri(EX + "x")), (EX + "r", Iri(EX + "y"))]),
            Node(EX + "b", (), [(EX + "p", "v")]),
        ]),
        True, True,
    ),
    "a subclass of a target class is targeted too (the fast check leaves subclasses)": (
        EventGraph("e", "p", "lab", [
            Node(EX + "a", (EX + "Sub",)), Node(EX + "Sub", (), [(RDFS + "subClassOf", Iri(EX + "C"))]),
        ]),
        False, None,
    ),
    "one blank node reached twice is one value (the fast check leaves the path count)": (
        _c_node(("p", 1), ("q", SHARED), ("q", SHARED), ("r", Iri(EX + "x")), ("r", Iri(EX + "y"))),
        True, None,
    ),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_fast_check_counts_values_as_the_reference_does(case: str) -> None:
    engine = CompiledShapes(FEATURES)
    graph, conforms, fast = EDGE_CASES[case]
    assert (not engine.violations(graph)) is conforms
    assert engine._fast.verdict(graph) is fast
    assert _agree(engine, graph) is fast


def test_a_blank_node_is_in_no_sh_in_list(engine, cohort_events: list[dict]) -> None:
    from stream.shapes import PyshaclShapes, components  # noqa: PLC0415

    graph = _graphs(cohort_events)[0]
    graph.primary.props = [(p, Node(None, ()) if p.endswith("/status") else v) for p, v in graph.primary.props]
    expected = PyshaclShapes(shapes_text()).validate_batch([graph])[0]
    assert components(expected) == {"sh:InConstraintComponent"}
    assert components(engine.validate(graph)) == components(expected)

"""The Oxigraph store: the default graph holds exactly the union of the events' triples, each
event marked stored; loading an event again adds nothing, so a load cut short is completed when
the event comes back; one bad graph does not keep a batch out; an older store (one named graph
per event) is moved into this layout when opened."""

from __future__ import annotations

from pathlib import Path

import pyoxigraph as ox
import pytest

from schemas import example, normalize_event
from stream.rdf import EVENT_PREFIX, Provenance, build_event_graph
from stream.rdfstore import RdfStore

SOURCE = Provenance("oncotwin.events.lab.v1", 0, 7)


def _graphs(n: int, kind: str = "lab", first: int = 0) -> list:
    out = []
    for i in range(first, first + n):
        event = example(kind)
        event["event_id"] = f"00000000-0000-4000-8000-{i:012d}"
        out.append(build_event_graph(normalize_event(event), SOURCE))
    return out


def _triples(text: str) -> set:
    """The triples of N-Triples text as Oxigraph holds them (typed literals in canonical form)."""
    scratch = ox.Store()
    scratch.load(text, format=ox.RdfFormat.N_TRIPLES)
    return {(q.subject, q.predicate, q.object) for q in scratch}


def _stored(store: RdfStore) -> set:
    return {(q.subject, q.predicate, q.object) for q in store._store.quads_for_pattern(None, None, None, ox.DefaultGraph())}


@pytest.fixture(params=["disk", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> RdfStore:
    return RdfStore(tmp_path / "rdf" if request.param == "disk" else None)


def test_the_default_graph_is_the_union_of_the_events_triples(store: RdfStore) -> None:
    graphs = _graphs(4) + _graphs(1, "imaging", first=4)  # the lab events share their patient's triples
    assert store.add_graphs(graphs) == 5
    expected = set().union(*(_triples(g.ntriples()) for g in graphs))
    assert _stored(store) == expected
    assert not any(isinstance(t, ox.BlankNode) for triple in expected for t in triple)
    for g in graphs:
        assert store.contains_event(g.event_id)
    assert sorted(store.event_ids()) == sorted({g.event_id for g in graphs})
    # Adding them again (a redelivered batch) writes nothing.
    before = len(store)
    assert store.add_graphs(graphs) == 0
    assert len(store) == before
    rows = store.select("SELECT (COUNT(*) AS ?n) WHERE { ?o a fhir:Observation }")
    assert rows == [{"n": "5"}]
    # Markers stay out of the default graph that queries see.
    assert store.select("SELECT (COUNT(*) AS ?n) WHERE { ?e ot:stored ?t }") == [{"n": "0"}]


def test_the_same_event_always_gives_the_same_triples() -> None:
    (a,) = _graphs(1, "imaging")
    (b,) = _graphs(1, "imaging")
    assert a.ntriples() == b.ntriples() and "_:" not in a.ntriples()
    # The store's triples are the published graph's, blank nodes aside.
    assert len(_triples(a.ntriples())) == a.nquads().count("\n")


def test_an_event_loaded_but_not_marked_is_loaded_again_without_duplicates(store: RdfStore) -> None:
    (graph,) = _graphs(1)
    assert store.write([(graph.event_id, graph.ntriples())]) == [graph.event_id]  # a failed batch: not marked
    assert not store.contains_event(graph.event_id)
    assert store.add_graphs([graph]) == 1
    assert _stored(store) == _triples(graph.ntriples())
    assert store.contains_event(graph.event_id)


def test_a_load_a_crash_cut_short_is_completed_when_the_event_comes_back(tmp_path: Path) -> None:
    kept, cut = _graphs(2)
    store = RdfStore(tmp_path / "rdf")
    store.add_graphs([kept])
    lines = cut.ntriples().splitlines(keepends=True)
    store._load("".join(lines[: len(lines) // 2]))  # the crash: half the triples, no marker
    store.flush()
    del store
    again = RdfStore(tmp_path / "rdf")
    assert again.contains_event(kept.event_id) and not again.contains_event(cut.event_id)
    assert again.add_graphs([cut]) == 1
    assert _stored(again) == _triples(kept.ntriples()) | _triples(cut.ntriples())


def test_a_graph_the_store_refuses_does_not_keep_the_batch_out(store: RdfStore) -> None:
    good, bad, other = _graphs(3)
    # An IRI that passes our N-Triples check but not Oxigraph's parser (invalid percent escape),
    # after the event's first lines: a refused load must leave none of them behind.
    text = bad.ntriples().replace("https://w3id.org/oncotwin/fhir/Patient/", "https://w3id.org/%zz/")
    assert text.index("%zz") > text.index("\n")
    written = store.add_ntriples([(good.event_id, good.ntriples()), (bad.event_id, text), (other.event_id, other.ntriples())])
    assert written == 2
    assert store.contains_event(good.event_id) and store.contains_event(other.event_id)
    assert not store.contains_event(bad.event_id)
    assert _stored(store) == _triples(good.ntriples()) | _triples(other.ntriples())


def test_loads_are_cut_into_runs_of_whole_events(store: RdfStore, monkeypatch: pytest.MonkeyPatch) -> None:
    graphs = _graphs(7)
    lines = graphs[0].ntriples().count("\n")
    monkeypatch.setattr("stream.rdfstore.LOAD_TRIPLES", 2 * lines + 1)
    loads: list[str] = []
    real = store._load
    monkeypatch.setattr(store, "_load", lambda text, *a: (loads.append(text), real(text, *a))[1])
    assert store.add_graphs(graphs) == 7
    assert [t.count("\n") for t in loads[:-1]] == [2 * lines, 2 * lines, 2 * lines, lines]  # then the markers
    assert _stored(store) == set().union(*(_triples(g.ntriples()) for g in graphs))


def test_the_store_survives_a_reopen(tmp_path: Path) -> None:
    graphs = _graphs(3)
    store = RdfStore(tmp_path / "rdf")
    store.add_graphs(graphs)
    store.flush()
    del store
    again = RdfStore(tmp_path / "rdf")
    assert all(again.contains_event(g.event_id) for g in graphs)
    assert not again.contains_event("00000000-0000-4000-8000-999999999999")
    assert again.add_graphs(graphs) == 0  # the seen-filter is rebuilt from the markers


def test_a_store_of_the_older_layout_is_moved_into_the_default_graph(tmp_path: Path) -> None:
    (marked,) = _graphs(1, "imaging")
    (unmarked,) = _graphs(1, first=1)
    old = ox.Store(str(tmp_path / "rdf"))  # one named graph per event, as oncotwin wrote before
    old.load(marked.nquads() + unmarked.nquads(), format=ox.RdfFormat.N_QUADS)
    stored = ox.Literal("true", datatype=ox.NamedNode("http://www.w3.org/2001/XMLSchema#boolean"))
    old.add(ox.Quad(ox.NamedNode(EVENT_PREFIX + marked.event_id), ox.NamedNode("https://w3id.org/oncotwin/ns#stored"),
                    stored, ox.NamedNode("https://w3id.org/oncotwin/graph/stored")))
    old.flush()
    del old
    store = RdfStore(tmp_path / "rdf")
    assert [g.value for g in store._store.named_graphs()] == ["https://w3id.org/oncotwin/graph/stored"]
    triples = _stored(store)
    assert len(triples) == marked.nquads().count("\n")  # the unmarked (cut short) graph is dropped
    assert not any(isinstance(t, ox.BlankNode) for triple in triples for t in triple)
    assert store.contains_event(marked.event_id) and not store.contains_event(unmarked.event_id)
    rows = store.select("SELECT (COUNT(*) AS ?n) WHERE { ?o a fhir:Observation }")
    assert rows == [{"n": "1"}]
    assert store.add_graphs([unmarked]) == 1

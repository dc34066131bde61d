"""The Oxigraph store: one named graph per event, marked stored; loads are idempotent and
recover a load cut short; one bad graph does not keep a batch out."""

from __future__ import annotations

from pathlib import Path

import pyoxigraph as ox
import pytest

from schemas import example, normalize_event
from stream.rdf import EVENT_PREFIX, Provenance, build_event_graph
from stream.rdfstore import RdfStore

SOURCE = Provenance("oncotwin.events.lab.v1", 0, 7)


def _graphs(n: int) -> list:
    out = []
    for i in range(n):
        event = example("lab")
        event["event_id"] = f"00000000-0000-4000-8000-{i:012d}"
        out.append(build_event_graph(normalize_event(event), SOURCE))
    return out


def _quads_of(store: RdfStore, event_id: str) -> int:
    return len(list(store._store.quads_for_pattern(None, None, None, ox.NamedNode(EVENT_PREFIX + event_id))))


@pytest.fixture(params=["disk", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> RdfStore:
    return RdfStore(tmp_path / "rdf" if request.param == "disk" else None)


def test_every_quad_is_stored_once_and_the_event_is_seen(store: RdfStore) -> None:
    graphs = _graphs(5)
    assert store.add_graphs(graphs) == 5
    for g in graphs:
        assert store.contains_event(g.event_id)
        assert _quads_of(store, g.event_id) == g.nquads().count("\n")
    assert sorted(store.event_ids()) == sorted(g.event_id for g in graphs)
    # Adding them again (a redelivered batch) writes nothing: blank nodes are not duplicated.
    before = len(store)
    assert store.add_graphs(graphs) == 0
    assert len(store) == before
    rows = store.select("SELECT (COUNT(*) AS ?n) WHERE { ?o a fhir:Observation }")
    assert rows == [{"n": "5"}]


def test_a_graph_loaded_but_not_marked_is_written_again_whole(store: RdfStore) -> None:
    (graph,) = _graphs(1)
    assert store.write([(graph.event_id, graph.nquads())]) == [graph.event_id]  # not marked: a failed batch
    assert not store.contains_event(graph.event_id)
    assert store.add_graphs([graph]) == 1
    assert _quads_of(store, graph.event_id) == graph.nquads().count("\n")  # blank nodes not doubled


def test_a_graph_a_crash_left_without_its_marker_is_cleared_on_open(tmp_path: Path) -> None:
    kept, cut = _graphs(2)
    store = RdfStore(tmp_path / "rdf")
    store.add_graphs([kept])
    lines = cut.nquads().splitlines(keepends=True)
    store._load("".join(lines[: len(lines) // 2]))  # a bulk load cut short by a crash
    store.flush()
    del store
    again = RdfStore(tmp_path / "rdf")
    assert _quads_of(again, cut.event_id) == 0 and not again.contains_event(cut.event_id)
    assert _quads_of(again, kept.event_id) == kept.nquads().count("\n") and again.contains_event(kept.event_id)
    assert again.add_graphs([cut]) == 1
    assert _quads_of(again, cut.event_id) == len(lines)


def test_a_graph_the_store_refuses_does_not_keep_the_batch_out(store: RdfStore) -> None:
    good, bad, other = _graphs(3)
    # An IRI that passes our N-Quads check but not Oxigraph's parser (invalid percent escape).
    text = bad.nquads().replace("https://w3id.org/oncotwin/fhir/Patient/", "https://w3id.org/%zz/", 1)
    written = store.add_nquads([(good.event_id, good.nquads()), (bad.event_id, text), (other.event_id, other.nquads())])
    assert written == 2
    assert store.contains_event(good.event_id) and store.contains_event(other.event_id)
    assert not store.contains_event(bad.event_id) and _quads_of(store, bad.event_id) == 0


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

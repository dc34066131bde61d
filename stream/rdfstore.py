"""The RDF store: Oxigraph (pyoxigraph) on disk, one named graph per event.

The graph of an event is named by the event's IRI (``urn:uuid:<event_id>``). The store is also
the normalizer's durable seen-set: an event it holds was published before, and a redelivered
copy (after a restart, a rebalance, a producer retry) is skipped.

Writes are Oxigraph's bulk load of N-Quads (about twice as fast as a transactional load, and
the GIL is released meanwhile) followed by one small transaction of marker quads
(``<urn:uuid:ID> ot:stored true`` in the graph ``STORED_GRAPH``). Only a marker makes an event
"seen": a crash inside a bulk load can leave part of a graph without its marker, and such
graphs are cleared when the store is opened (the event is written again when it comes back;
Oxigraph renames blank nodes on every load, so loading over a partial graph would duplicate
them).

"Is this event new?" is answered by an in-memory Bloom filter over the markers
(``stream.seen``), built when the store opens: new events, the common case, never touch
RocksDB; a "maybe" is confirmed by a point lookup of the marker.

Oxigraph lets one process write a store directory; the running normalizer owns it and answers
SPARQL for others over HTTP (``stream.agents``), while ``RdfStore.open`` serves tools when no
normalizer runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyoxigraph as ox

from stream.rdf import EVENT_PREFIX, OT, PREFIXES, EventGraph
from stream.seen import SeenFilter

log = logging.getLogger(__name__)

SPARQL_PREFIXES = "".join(f"PREFIX {p}: <{ns}>\n" for p, ns in PREFIXES.items())

STORED_GRAPH = "https://w3id.org/oncotwin/graph/stored"
_STORED = ox.NamedNode(OT + "stored")
_TRUE = ox.Literal("true", datatype=ox.NamedNode("http://www.w3.org/2001/XMLSchema#boolean"))
_STORED_GRAPH = ox.NamedNode(STORED_GRAPH)


class StoreError(RuntimeError):
    """The store cannot be opened (locked by another process, corrupt) or a query failed."""


class RdfStore:
    """An Oxigraph store in ``path`` (or in memory when ``path`` is None)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        try:
            if self.path is None:
                self._store = ox.Store()
            else:
                self.path.mkdir(parents=True, exist_ok=True)
                self._store = ox.Store(str(self.path))
        except OSError as exc:
            raise StoreError(
                f"cannot open the RDF store at {self.path}: {exc} "
                "(a running normalizer holds it: query it through its SPARQL endpoint instead)"
            ) from exc
        self._seen = SeenFilter()
        marked = 0
        for event_id in self.event_ids():  # ~0.9 s per 100k stored events (measured)
            self._seen.add(event_id)
            marked += 1
        self._written: set[str] = set()  # loaded by this process, not marked yet
        self._clear_unmarked_graphs(marked)

    def _event_graphs(self) -> Iterable[ox.NamedNode]:
        return (g for g in self._store.named_graphs() if isinstance(g, ox.NamedNode) and g.value.startswith(EVENT_PREFIX))

    def _clear_unmarked_graphs(self, marked: int) -> None:
        # Every marker has its graph (an event is marked only once written), so as many event
        # graphs as markers means none is stale: a count (~0.2 s per 100k) instead of a point
        # lookup per graph (~2 s per 100k), which only a crash mid-load makes necessary.
        if sum(1 for _ in self._event_graphs()) == marked:
            return
        stale = [graph for graph in self._event_graphs() if not self.contains_event(graph.value[len(EVENT_PREFIX):])]
        for graph in stale:
            self._store.remove_graph(graph)
        if stale:
            log.warning("cleared %d event graph(s) left without a stored marker (a load cut short)", len(stale))

    # -- writing -------------------------------------------------------------------------

    def add_graphs(self, graphs: Sequence[EventGraph]) -> int:
        """Store event graphs; returns how many were written (see ``add_nquads``)."""
        return self.add_nquads([(g.event_id, g.nquads()) for g in graphs])

    def add_nquads(self, events: Sequence[tuple[str, str]]) -> int:
        """Store (event id, N-Quads of its graph) pairs and mark them stored; returns how many."""
        written = self.write(events)
        self.mark(written)
        return len(written)

    def write(self, events: Sequence[tuple[str, str]]) -> list[str]:
        """Load the graphs of events not yet marked, without marking them; returns their ids.

        A graph this process loaded without marking it is cleared first (those an earlier
        process left were cleared when the store opened). A batch the
        store refuses is retried event by event so that one bad graph does not keep the others
        out; the refused ones are logged and left out. Thread-safe: the normalizer runs it
        while its batch is being published, and marks the events once that is acknowledged.
        """
        todo = [(eid, text) for eid, text in events if not self.contains_event(eid)]
        if not todo:
            return []
        for eid, _ in todo:
            if eid in self._written:
                self._remove_graph(eid)
        try:
            self._load("".join(text for _, text in todo))
            self._written.update(eid for eid, _ in todo)
            return [eid for eid, _ in todo]
        except (SyntaxError, ValueError) as exc:
            log.error("the RDF store refused a batch (%s); loading its events one by one", exc)
        for eid, _ in todo:  # the refused load may have written part of the batch
            self._remove_graph(eid)
        written = []
        for eid, text in todo:
            try:
                self._load(text)
                written.append(eid)
                self._written.add(eid)
            except (SyntaxError, ValueError) as one:
                log.error("the RDF store refused the graph of event %s: %s", eid, one)
                self._remove_graph(eid)
        return written

    def _remove_graph(self, event_id: str) -> None:
        graph = ox.NamedNode(EVENT_PREFIX + event_id)
        if self._store.contains_named_graph(graph):
            self._store.remove_graph(graph)

    def mark(self, event_ids: Sequence[str]) -> None:
        """Mark events stored (one transaction): from now on they count as seen."""
        if event_ids:
            self._store.extend([ox.Quad(ox.NamedNode(EVENT_PREFIX + e), _STORED, _TRUE, _STORED_GRAPH) for e in event_ids])
            self._seen.update(event_ids)
            self._written.difference_update(event_ids)

    def _load(self, nquads: str) -> None:
        if self.path is None:
            self._store.load(nquads, format=ox.RdfFormat.N_QUADS)  # in memory: one transaction is cheap
        else:
            self._store.bulk_load(nquads, format=ox.RdfFormat.N_QUADS)

    def flush(self) -> None:
        if self.path is not None:
            self._store.flush()

    # -- seen-set ------------------------------------------------------------------------

    def contains_event(self, event_id: str) -> bool:
        if event_id not in self._seen:
            return False
        # A point lookup: a pattern scan costs 2-3x more and grows with the files bulk loads leave.
        return ox.Quad(ox.NamedNode(EVENT_PREFIX + event_id), _STORED, _TRUE, _STORED_GRAPH) in self._store

    def event_ids(self) -> Iterable[str]:
        for quad in self._store.quads_for_pattern(None, _STORED, _TRUE, _STORED_GRAPH):
            text = quad.subject.value
            if text.startswith(EVENT_PREFIX):
                yield text[len(EVENT_PREFIX):]

    def __len__(self) -> int:
        return len(self._store)

    # -- reading -------------------------------------------------------------------------

    def query(self, sparql: str, *, with_prefixes: bool = True) -> Any:
        """Run SPARQL over every graph (the union is the default graph); our prefixes are
        declared unless ``with_prefixes`` is False."""
        text = (SPARQL_PREFIXES + sparql) if with_prefixes else sparql
        try:
            return self._store.query(text, use_default_graph_as_union=True)
        except SyntaxError as exc:
            raise StoreError(f"SPARQL syntax error: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"SPARQL query failed: {exc}") from exc

    def query_json(self, sparql: str) -> dict[str, Any]:
        """SELECT/ASK results as SPARQL 1.1 JSON (a CONSTRUCT returns its triples as N-Triples text)."""
        results = self.query(sparql)
        if isinstance(results, ox.QuerySolutions):
            return json.loads(results.serialize(format=ox.QueryResultsFormat.JSON))
        if isinstance(results, ox.QueryBoolean):
            return {"head": {}, "boolean": bool(results)}
        triples = "".join(f"{t}\n" for t in results)
        return {"head": {}, "ntriples": triples}

    def select(self, sparql: str) -> list[dict[str, str]]:
        """SELECT rows as {variable: value text} (IRIs and literals' lexical forms)."""
        results = self.query(sparql)
        if not isinstance(results, ox.QuerySolutions):
            raise StoreError("select() needs a SELECT query")
        names = [v.value for v in results.variables]
        rows = []
        for solution in results:
            row = {}
            for name in names:
                term = solution[name]
                if term is not None:
                    row[name] = term.value
            rows.append(row)
        return rows


def rows_as_table(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a SPARQL JSON SELECT result, for printing."""
    if "boolean" in document:
        return ["boolean"], [[str(document["boolean"]).lower()]]
    if "ntriples" in document:
        return ["triple"], [[line] for line in document["ntriples"].splitlines()]
    names = list(document.get("head", {}).get("vars", []))
    rows = []
    for binding in document.get("results", {}).get("bindings", []):
        rows.append([binding.get(n, {}).get("value", "") for n in names])
    return names, rows

"""The RDF store: Oxigraph (pyoxigraph) on disk, one named graph per event.

The graph of an event is named by the event's IRI (``urn:uuid:<event_id>``), so the store is
also the normalizer's durable seen-set: an event whose graph is in the store was published
before, and a redelivered copy (after a restart, a rebalance, a producer retry) is skipped.

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

from stream.rdf import EVENT_PREFIX, PREFIXES, EventGraph

log = logging.getLogger(__name__)

SPARQL_PREFIXES = "".join(f"PREFIX {p}: <{ns}>\n" for p, ns in PREFIXES.items())


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

    # -- writing -------------------------------------------------------------------------

    def add_graphs(self, graphs: Sequence[EventGraph]) -> int:
        """Add every event graph (one transaction); returns the number of quads written."""
        quads: list[Any] = []
        for graph in graphs:
            quads.extend(graph.quads())
        if quads:
            self._store.extend(quads)
        return len(quads)

    def flush(self) -> None:
        if self.path is not None:
            self._store.flush()

    # -- seen-set ------------------------------------------------------------------------

    def contains_event(self, event_id: str) -> bool:
        return bool(self._store.contains_named_graph(ox.NamedNode(EVENT_PREFIX + event_id)))

    def event_ids(self) -> Iterable[str]:
        for graph in self._store.named_graphs():
            text = graph.value if isinstance(graph, ox.NamedNode) else ""
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

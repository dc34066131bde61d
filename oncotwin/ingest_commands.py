"""Ingestion commands of the ``oncotwin`` CLI: produce, replay, normalize, sparql.

``oncotwin.cli`` calls ``register(app)``; the commands only parse options and wire settings
to ``stream`` (the logic lives there).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _kafka():  # type: ignore[no-untyped-def]
    from stream import KafkaSettings  # noqa: PLC0415

    try:
        return KafkaSettings.from_env()
    except ValueError as exc:
        console.print(f"[red]settings error:[/] {exc}")
        raise typer.Exit(2) from exc


def _time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    from schemas import ContractError, parse_time  # noqa: PLC0415

    try:
        return parse_time(value)
    except ContractError as exc:
        console.print(f"[red]{option}:[/] {exc}")
        raise typer.Exit(2) from exc


def _report(summary, what: str) -> None:  # type: ignore[no-untyped-def]
    for problem in summary.problems[:20]:
        console.print(f"[yellow]rejected[/] {problem}")
    if len(summary.problems) > 20:
        console.print(f"... and {summary.rejected - 20} more rejected")
    console.print(
        f"{what}: [green]{summary.sent} sent[/], {summary.rejected} rejected locally, "
        f"{summary.failed} failed" + (f", {summary.skipped} outside the time window" if summary.skipped else "")
    )
    if summary.failed:
        raise typer.Exit(1)


def _with_broker(kafka):  # type: ignore[no-untyped-def]
    from stream import ensure_broker, ensure_topics  # noqa: PLC0415
    from stream.topics import Topics  # noqa: PLC0415

    kafka, broker = ensure_broker(kafka)
    if broker is not None:
        console.print(
            f"[yellow]no KAFKA_BOOTSTRAP_SERVERS: started an embedded broker at {kafka.bootstrap_servers} "
            "for this command only[/]"
        )
    ensure_topics(kafka, Topics.from_settings(kafka))
    return kafka, broker


def register(app: typer.Typer) -> None:
    """Add the ingestion commands to the ``oncotwin`` app."""

    @app.command("produce")
    def produce_command(
        files: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="JSONL logs, JSON events, FHIR Observations or Bundles"),
    ) -> None:
        """Send events (or FHIR R4 Observations) to their Kafka topics, keyed by patient pseudonym.

        Invalid records are refused before sending and listed with their line and reason."""
        from stream.replay import produce  # noqa: PLC0415

        kafka, broker = _with_broker(_kafka())
        try:
            summary = produce(kafka, files)
        finally:
            if broker is not None:
                broker.stop()
        _report(summary, "produce")

    @app.command("replay")
    def replay_command(
        log: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL event log"),
        speed: float = typer.Option(0.0, "--speed", help="event time per wall time (86400: a day per second); 0: as fast as possible"),
        since: str = typer.Option(None, "--from", help="first event time to send (ISO 8601 with zone)"),
        until: str = typer.Option(None, "--until", help="send events before this time (ISO 8601 with zone)"),
    ) -> None:
        """Replay an event log in event-time order, keeping event times as record timestamps."""
        from stream.replay import replay  # noqa: PLC0415

        start, end = _time(since, "--from"), _time(until, "--until")
        if speed < 0:
            console.print("[red]--speed must be >= 0[/]")
            raise typer.Exit(2)
        kafka, broker = _with_broker(_kafka())
        try:
            summary = replay(kafka, log, speed=speed or None, since=start, until=end)
        finally:
            if broker is not None:
                broker.stop()
        _report(summary, "replay")

    @app.command("normalize")
    def normalize_command(
        batch: int = typer.Option(None, "--batch", min=1, help="records per micro-batch (ONCOTWIN_NORMALIZER_BATCH)"),
        web_port: int = typer.Option(None, "--web-port", min=0, help="SPARQL endpoint port, 0 for none (ONCOTWIN_NORMALIZER_WEB_PORT)"),
    ) -> None:
        """Run the normalizer until Ctrl-C or SIGTERM: events -> checked RDF -> observations topic
        and RDF store; bad records -> dead-letter topic."""
        from dataclasses import replace  # noqa: PLC0415

        from stream.agents import AgentSettings, run  # noqa: PLC0415
        from stream.normalizer import NormalizerSettings  # noqa: PLC0415

        level = os.environ.get("ONCOTWIN_LOG_LEVEL", "INFO").upper()
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            settings = NormalizerSettings.from_env()
            agent = AgentSettings.from_env()
        except ValueError as exc:
            console.print(f"[red]settings error:[/] {exc}")
            raise typer.Exit(2) from exc
        if batch is not None:
            agent = replace(agent, batch_size=batch)
        if web_port is not None:
            agent = replace(agent, web_port=web_port)
        raise typer.Exit(run(_kafka(), settings, agent, loglevel=level.lower()))

    @app.command("sparql")
    def sparql_command(
        query: str = typer.Argument(..., help="SPARQL query; prefixes fhir: loinc: sct: ncit: otc: ot: prov: xsd: are predeclared"),
        endpoint: str = typer.Option(None, "--endpoint", help="SPARQL endpoint of a running normalizer (default: http://HOST:PORT/sparql from ONCOTWIN_NORMALIZER_WEB_*)"),
        as_json: bool = typer.Option(False, "--json", help="print SPARQL 1.1 JSON results"),
    ) -> None:
        """Query every patient's history in the RDF store (through the running normalizer when
        there is one, else by opening the store under ONCOTWIN_DATA_DIR/rdf)."""
        from stream.agents import AgentSettings  # noqa: PLC0415
        from stream.rdfstore import RdfStore, StoreError, rows_as_table  # noqa: PLC0415

        agent = AgentSettings.from_env()
        url = endpoint or (f"http://{agent.web_host}:{agent.web_port}/sparql" if agent.web_port else None)
        result = None
        if url:
            try:
                with urllib.request.urlopen(f"{url}?{urllib.parse.urlencode({'query': query})}", timeout=30) as response:
                    result = json.loads(response.read())
            except urllib.error.HTTPError as exc:
                console.print(f"[red]query refused:[/] {exc.read().decode(errors='replace')[:500]}")
                raise typer.Exit(1) from exc
            except (urllib.error.URLError, OSError):
                if endpoint:
                    console.print(f"[red]no SPARQL endpoint answers at {endpoint}[/]")
                    raise typer.Exit(1) from None
        if result is None:
            try:
                result = RdfStore(agent.store_path).query_json(query)
            except StoreError as exc:
                console.print(f"[red]{exc}[/]")
                raise typer.Exit(1) from exc
        if as_json:
            console.print_json(json.dumps(result))
            return
        header, rows = rows_as_table(result)
        table = Table(*header)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        console.print(f"{len(rows)} row(s)")

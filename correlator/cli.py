"""``stacklens``: the correlator's command line. Today: the signal catalog; ``serve``, ``import``,
``why``, ``top``, ``slo``, ``requests`` and ``demo`` come with the correlator issues."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from collector import __version__
from collector.signals import SIGNALS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="stacklens: why did TTFT/TPOT p99 get worse, and on which GPU?")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stacklens {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """stacklens command line."""


@app.command()
def signals(
    output: Annotated[str, typer.Option("-o", "--output", help="table or json")] = "table",
) -> None:
    """The signal catalog: canonical names and units, and the DCGM and OpenTelemetry names accepted."""
    rows = [
        {"signal": s.name, "unit": s.unit, "kind": s.kind, "group": str(s.group), "scope": s.scope,
         "dcgm": s.dcgm.name if s.dcgm else None, "otel": s.otel.name if s.otel else None,
         "description": s.description}
        for s in SIGNALS.values()
    ]
    if output == "json":
        typer.echo(json.dumps(rows, indent=2))
        return
    if output != "table":
        raise typer.BadParameter("use table or json", param_hint="--output")
    table = Table("signal", "unit", "kind", "DCGM name", "OTel name", "description")
    for r in rows:
        table.add_row(r["signal"], r["unit"], r["kind"], r["dcgm"] or "", r["otel"] or "", r["description"])
    Console(no_color=bool(os.environ.get("NO_COLOR"))).print(table)


def main() -> None:
    app()

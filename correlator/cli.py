"""``stacklens``: the correlator's command line (the contract is in DESIGN.md).

Query commands open the database read-only; when ``stacklens serve`` holds it, they ask serve's JSON
API instead (its address is in ``<db>.serve.json``), so queries run while ingest goes on.
Exit codes: 0 ok, 1 error, 2 usage, 3 a regression was found and ``--fail-on-regression`` was given.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from collector import __version__
from collector.signals import SIGNALS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="stacklens: why did TTFT/TPOT p99 get worse, and on which GPU?")

DbOpt = Annotated[str, typer.Option("--db", help="DuckDB file", envvar="STACKLENS_DB")]
OutOpt = Annotated[str, typer.Option("-o", "--output", help="table, json or csv")]
SinceOpt = Annotated[str | None, typer.Option("--since", help="incident start: RFC 3339 or relative (15m)")]
UntilOpt = Annotated[str | None, typer.Option("--until", help="incident end (default: the last data)")]
ServiceOpt = Annotated[str | None, typer.Option("--service", help="only this service.name")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="only this model")]
NodeOpt = Annotated[str | None, typer.Option("--node", help="only this node")]


def _console(stderr: bool = False) -> Console:
    return Console(no_color=bool(os.environ.get("NO_COLOR")), stderr=stderr, highlight=False)


def _fail(message: str, code: int = 1) -> typer.Exit:
    _console(stderr=True).print(f"stacklens: {message}", markup=False)
    return typer.Exit(code)


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


# -- querying ---------------------------------------------------------------------------------------
def query(kind: str, db: str, params: dict[str, Any]) -> Any:
    """Run a query on ``db`` directly, or through the API of the ``serve`` that holds it."""
    import duckdb

    from correlator.analysis.queries import QueryError, run
    from correlator.analysis.timeparse import TimeParseError
    from correlator.analysis.why import NoData
    from correlator.server.serve import sidecar_path

    if not Path(db).exists():
        raise _fail(f"no database at {db}: run `stacklens demo`, `stacklens serve --db {db}` or "
                    f"`stacklens import --db {db} FILE`")
    try:
        con = duckdb.connect(db, read_only=True)
    except duckdb.IOException as e:
        side = sidecar_path(db)
        if "lock" not in str(e).lower() or not side.exists():
            raise _fail(f"cannot open {db}: {e}") from e
        return _query_api(json.loads(side.read_text())["api"], kind, params)
    try:
        return run(kind, con, params)
    except NoData as e:
        raise _fail(str(e)) from e
    except (QueryError, TimeParseError) as e:
        raise _fail(str(e), 2) from e
    except duckdb.CatalogException as e:
        raise _fail(f"{db} is not a stacklens database: {e}") from e
    finally:
        con.close()


def _query_api(api: str, kind: str, params: dict[str, Any]) -> Any:
    qs = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None and k != "slo_file"})
    req = urllib.request.Request(f"{api}/api/v1/{kind}?{qs}")
    token = os.environ.get("STACKLENS_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        msg = json.loads(e.read() or b"{}").get("error", str(e))
        raise _fail(msg, 2 if e.code == 400 else 1) from e
    except OSError as e:
        raise _fail(f"the database is held by `stacklens serve`, whose API at {api} does not answer: {e}") from e


def _emit_rows(rows: list[dict[str, Any]], output: str, title: str) -> None:
    if output == "json":
        typer.echo(json.dumps(rows, indent=2))
    elif output == "csv":
        buf = io.StringIO()
        if rows:
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        typer.echo(buf.getvalue(), nl=False)
    else:
        if not rows:
            _console().print(f"{title}: nothing in this window")
            return
        t = Table(*rows[0].keys(), title=title)
        for r in rows:
            t.add_row(*(_cell(v) for v in r.values()))
        _console().print(t)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _check_output(output: str) -> None:
    if output not in ("table", "json", "csv"):
        raise _fail("--output must be table, json or csv", 2)


@app.command()
def why(
    db: DbOpt = "stacklens.duckdb", since: SinceOpt = None, until: UntilOpt = None,
    baseline_since: Annotated[str | None, typer.Option("--baseline-since")] = None,
    baseline_until: Annotated[str | None, typer.Option("--baseline-until")] = None,
    service: ServiceOpt = None, model: ModelOpt = None, node: NodeOpt = None,
    metric: Annotated[str, typer.Option("--metric", help="ttft, tpot or auto")] = "auto",
    output: OutOpt = "table",
    plot: Annotated[str | None, typer.Option("--plot", help="draw latency and evidence to this PNG")] = None,
    fail_on_regression: Annotated[bool, typer.Option("--fail-on-regression")] = False,
) -> None:
    """Root cause of a latency regression: the cause, the culprit GPU and the evidence."""
    _check_output(output)
    doc = query("why", db, {"since": since, "until": until, "baseline_since": baseline_since,
                            "baseline_until": baseline_until, "service": service, "model": model, "node": node,
                            "metric": metric})
    if output == "json":
        typer.echo(json.dumps(doc, indent=2))
    elif output == "csv":
        _emit_rows([{"rank": f["rank"], "cause": f["cause"], "subcause": f.get("subcause"), "score": f["score"],
                     "explained_share": f["explained_share"], "node": f["culprit"]["node"],
                     "gpu": f["culprit"]["gpu"], "signal": e["signal"], "baseline": e["baseline"],
                     "incident": e["incident"], "robust_z": e["robust_z"]}
                    for f in doc["findings"] for e in (f["evidence"] or [{"signal": None, "baseline": None,
                                                                          "incident": None, "robust_z": None}])],
                   "csv", "")
    else:
        print_why(doc)
    if plot:
        from correlator.analysis.plot import plot_why

        plot_why(db, doc, plot)
    if fail_on_regression and doc["regression"]["detected"]:
        raise typer.Exit(3)


def print_why(doc: dict[str, Any], console: Console | None = None) -> None:
    c = console or _console()
    reg = doc["regression"]
    c.print(f"[bold]{doc['verdict']}[/bold]")
    c.print(f"incident {doc['query']['window'][0]} → {doc['query']['window'][1]}, baseline "
            f"{doc['query']['baseline'][0]} → {doc['query']['baseline'][1]}; {reg['metric']}: "
            f"{_cell(reg['baseline_s'])} s → {_cell(reg['incident_s'])} s over {reg.get('incident_requests')} requests")
    if not doc["findings"]:
        return
    t = Table("#", "cause", "culprit", "score", "explains", "evidence (baseline → incident, robust z)",
              title="findings")
    for f in doc["findings"]:
        cul = f["culprit"]
        where = f"{cul['node']} GPU {cul['gpu_index']}" if cul.get("gpu_index") is not None else str(cul["node"])
        if cul.get("pid"):
            where += f" pid {cul['pid']}"
        ev = "\n".join(f"{e['signal']}: {_cell(e['baseline'])} → {_cell(e['incident'])} {e['unit']}"
                       + (f" (z {e['robust_z']})" if e.get("robust_z") is not None else "") for e in f["evidence"])
        t.add_row(str(f["rank"]), f"{f['cause']}/{f['subcause']}" if f.get("subcause") else f["cause"], where,
                  f"{f['score']:.2f}", f"{f['explained_share']:.0%}", ev)
    c.print(t)


@app.command("top")
def top_cmd(db: DbOpt = "stacklens.duckdb", since: SinceOpt = None, until: UntilOpt = None,
            service: ServiceOpt = None, model: ModelOpt = None, node: NodeOpt = None,
            metric: Annotated[str, typer.Option("--metric")] = "ttft", output: OutOpt = "table") -> None:
    """GPUs and replicas ranked by their share of the excess latency, with energy per output token."""
    _check_output(output)
    rows = query("top", db, {"since": since, "until": until, "service": service, "model": model, "node": node,
                             "metric": metric})
    _emit_rows(rows, output, f"GPUs by {metric.upper()} impact")


@app.command("slo")
def slo_cmd(db: DbOpt = "stacklens.duckdb", since: SinceOpt = None, until: UntilOpt = None,
            service: ServiceOpt = None, model: ModelOpt = None, node: NodeOpt = None,
            slo_file: Annotated[str | None, typer.Option("--slo-file", help="TOML with [[slo]] contracts")] = None,
            output: OutOpt = "table") -> None:
    """TTFT/TPOT percentiles and SLO attainment by model and node (default SLOs: TTFT p99 ≤ 500 ms,
    TPOT p99 ≤ 100 ms)."""
    _check_output(output)
    if slo_file:
        from correlator.analysis.reports import load_slos

        try:
            load_slos(slo_file)
        except ValueError as e:
            raise _fail(str(e), 2) from e
    rows = query("slo", db, {"since": since, "until": until, "service": service, "model": model, "node": node,
                             "slo_file": slo_file})
    _emit_rows(rows, output, "SLO attainment")


@app.command("requests")
def requests_cmd(db: DbOpt = "stacklens.duckdb", since: SinceOpt = None, until: UntilOpt = None,
                 service: ServiceOpt = None, model: ModelOpt = None, node: NodeOpt = None,
                 metric: Annotated[str, typer.Option("--metric")] = "ttft",
                 limit: Annotated[int, typer.Option("--limit")] = 20, output: OutOpt = "table") -> None:
    """The slowest requests, each with the state of its GPU when it started."""
    _check_output(output)
    rows = query("requests", db, {"since": since, "until": until, "service": service, "model": model, "node": node,
                                  "metric": metric, "limit": limit})
    _emit_rows(rows, output, f"slowest requests by {metric.upper()}")


# -- ingest -----------------------------------------------------------------------------------------
@app.command()
def serve(
    db: DbOpt = "stacklens.duckdb",
    otlp_grpc: Annotated[str, typer.Option("--otlp-grpc", help="HOST:PORT, or 'off'")] = "127.0.0.1:4317",
    otlp_http: Annotated[str, typer.Option("--otlp-http", help="HOST:PORT, or 'off'")] = "127.0.0.1:4318",
    api: Annotated[str, typer.Option("--api", help="HOST:PORT of the JSON API and /metrics, or 'off'")]
    = "127.0.0.1:8686",
    prometheus_url: Annotated[str | None, typer.Option("--prometheus-url", help="pull dcgm-exporter and vLLM "
                                                                                "series from this Prometheus")] = None,
    prometheus_interval: Annotated[float, typer.Option("--prometheus-interval", help="seconds")] = 15.0,
    token: Annotated[str | None, typer.Option("--token", envvar="STACKLENS_TOKEN",
                                              help="bearer token (required off loopback)")] = None,
    tls_cert: Annotated[str | None, typer.Option("--tls-cert")] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key")] = None,
    retention: Annotated[str | None, typer.Option("--retention", help="delete data older than this (7d)")] = None,
    detect_interval: Annotated[float, typer.Option("--detect-interval", help="online detection every this many "
                                                   "seconds (0: off)")] = 10.0,
    db_threads: Annotated[int | None, typer.Option("--db-threads", min=1, help="DuckDB worker threads (default: one "
                                                   "per core; 1 ingests with the least CPU, queries on one core)")]
    = None,
    spool: Annotated[bool, typer.Option("--spool/--no-spool", help="acknowledge an export once its body is on "
                                        "the fsynced spool (DB.spool/) and commit in large groups (the default); "
                                        "--no-spool: only once its own commit is done")] = True,
    grafana_url: Annotated[str | None, typer.Option("--grafana-url", envvar="STACKLENS_GRAFANA_URL",
                                                    help="post findings as Grafana annotations")] = None,
    grafana_token: Annotated[str | None, typer.Option("--grafana-token", envvar="STACKLENS_GRAFANA_TOKEN",
                                                      help="Grafana service-account token")] = None,
) -> None:
    """The correlator: OTLP receivers, the DuckDB store, online detection, the JSON API and /metrics."""
    from correlator.analysis.timeparse import TimeParseError, parse_duration_ns
    from correlator.server.api import api_routes
    from correlator.server.serve import Correlator, ServeConfig, ServeConfigError

    def addr(a: str) -> str | None:
        return None if a == "off" else a

    try:
        retention_s = parse_duration_ns(retention) / 1e9 if retention else None
        cfg = ServeConfig(db=db, otlp_grpc=addr(otlp_grpc), otlp_http=addr(otlp_http), api=addr(api),
                          prometheus_url=prometheus_url, prometheus_interval_s=prometheus_interval, token=token,
                          tls_cert=tls_cert, tls_key=tls_key, retention_s=retention_s,
                          detect_interval_s=detect_interval, grafana_url=grafana_url, grafana_token=grafana_token,
                          db_threads=db_threads, spool=spool)
        correlator = Correlator(cfg, lambda store, stats: api_routes(store, stats, token))
    except (ServeConfigError, TimeParseError) as e:
        raise _fail(str(e), 2) from e
    # handlers first: a SIGTERM that comes while the receivers already listen but the rest still starts
    # must stop the server cleanly, not kill it with DuckDB's file open
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from correlator.server.allocator import keep_freed_memory

    keep_freed_memory()  # multi-megabyte exports reuse freed pages instead of faulting fresh ones in
    try:
        addresses = correlator.start()
    except Exception as e:
        raise _fail(f"cannot start: {e}") from e
    err = _console(stderr=True)
    err.print(f"stacklens serve: {db}; " + ", ".join(f"{k} {v}" for k, v in addresses.items()), markup=False)
    while not stop.wait(60.0):
        if retention_s and correlator.store is not None:
            import time

            correlator.store.prune(time.time_ns() - int(retention_s * 1e9))
    correlator.stop()


@app.command("import")
def import_cmd(db: DbOpt = "stacklens.duckdb",
               paths: Annotated[list[str] | None, typer.Argument(help="OTLP JSON lines or Parquet files/dirs")]
               = None,
               prometheus_url: Annotated[str | None, typer.Option(
                   "--prometheus-url", help="pull dcgm-exporter and vLLM series of --since..--until from this "
                                            "Prometheus instead of reading files")] = None,
               since: Annotated[str, typer.Option("--since", help="with --prometheus-url: RFC 3339 or relative "
                                                                  "(1h)")] = "1h",
               until: Annotated[str, typer.Option("--until", help="with --prometheus-url: RFC 3339, relative "
                                                                  "or now")] = "now") -> None:
    """Load OTLP JSON lines (the OTel Collector's file exporter) or Parquet (an export) into the database,
    or pull a time window of dcgm-exporter and vLLM series from Prometheus."""
    from correlator.ingest.files import ImportFileError, expand, read_otlp_jsonl, read_parquet
    from correlator.store.duckdb_store import Store, StoreError

    if prometheus_url:
        if paths:
            raise _fail("give either files or --prometheus-url, not both", 2)
        _import_prometheus(db, prometheus_url, since, until)
        return
    if not paths:
        raise _fail("give at least one file or directory to import", 2)
    try:
        store = Store(db)
    except StoreError as e:
        raise _fail(str(e)) from e
    total = 0
    try:
        for p in expand(paths):
            batch = read_parquet(p) if p.suffix == ".parquet" else read_otlp_jsonl(p)
            store.write(batch)
            total += batch.row_count()
            _console(stderr=True).print(f"{p}: {batch.row_count()} rows", markup=False)
        store.catch_up_rollups()  # the per-minute GPU summaries `why` reads, written now rather than later
    except (ImportFileError, StoreError) as e:
        raise _fail(str(e)) from e
    finally:
        store.close()
    typer.echo(f"imported {total} rows into {db}")


def _import_prometheus(db: str, url: str, since: str, until: str) -> None:
    """``stacklens import --prometheus-url``: one pull of a window; ranges pulled before are skipped."""
    import time

    from correlator.analysis.timeparse import TimeParseError, parse_time_ns
    from correlator.ingest.prometheus_pull import PrometheusPuller
    from correlator.store.duckdb_store import Store, StoreError

    now = time.time_ns()
    try:
        since_ns, until_ns = parse_time_ns(since, now), parse_time_ns(until, now)
    except TimeParseError as e:
        raise _fail(str(e), 2) from e
    if since_ns >= until_ns:
        raise _fail("--since must be before --until", 2)
    try:
        store = Store(db)
    except StoreError as e:
        raise _fail(str(e)) from e
    try:
        puller = PrometheusPuller(url, store=store)
        result = puller.pull(since_ns / 1e9, until_ns / 1e9)
        store.catch_up_rollups()
    except ValueError as e:
        raise _fail(str(e), 2) from e
    finally:
        store.close()
    if result.errors:
        raise _fail(f"pulled {result.rows} rows, then: " + "; ".join(result.errors))
    typer.echo(f"imported {result.rows} rows ({result.samples} samples of {result.series} series) from {url} "
               f"into {db}")


@app.command("export")
def export_cmd(db: DbOpt = "stacklens.duckdb",
               directory: Annotated[str, typer.Argument(help="target directory")] = "stacklens-parquet") -> None:
    """Write every table as hive-partitioned Parquet (day=…/node=…) for archives and other engines."""
    from correlator.store.duckdb_store import Store, StoreError

    try:
        store = Store(db)
        written = store.export_parquet(directory)
        store.close()
    except StoreError as e:
        raise _fail(str(e)) from e
    typer.echo("\n".join(written))


@app.command()
def demo(
    fault: Annotated[str, typer.Option("--fault", help="the fault to inject")] = "pcie_saturation",
    db: DbOpt = "stacklens-demo.duckdb",
    seed: Annotated[int, typer.Option("--seed")] = 7,
    scenario: Annotated[str | None, typer.Option("--scenario", help="a scenario TOML instead of --fault")] = None,
    nvml: Annotated[bool, typer.Option("--nvml", help="also send this machine's real GPUs (NVML) through the "
                                                      "agent's path")] = False,
) -> None:
    """A simulated 2-node x 4-GPU fleet with one fault, through the real pipeline, to a verdict."""
    from correlator.demo import run_demo

    code = run_demo(fault=fault, db=db, seed=seed, scenario_path=scenario, console=_console(stderr=True),
                    out=_console(), nvml=nvml)
    raise typer.Exit(code)


@app.command()
def simulate(
    otlp_endpoint: Annotated[str, typer.Option("--otlp-endpoint", envvar="OTEL_EXPORTER_OTLP_ENDPOINT",
                                               help="OTLP/HTTP base URL (a correlator or a collector)")]
    = "http://127.0.0.1:4318",
    fault: Annotated[str, typer.Option("--fault", help="the fault to inject, or 'drift' for none")] = "pcie_saturation",
    fault_after: Annotated[str, typer.Option("--fault-after", help="simulated time before the fault")] = "20m",
    duration: Annotated[str, typer.Option("--duration", help="simulated time to run")] = "24h",
    speed: Annotated[float, typer.Option("--speed", help="simulated seconds per wall second")] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 7,
    scenario: Annotated[str | None, typer.Option("--scenario", help="a scenario TOML instead of --fault")] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="STACKLENS_TOKEN", help="bearer token")] = None,
) -> None:
    """Stream a simulated fleet with a fault to an OTLP endpoint in (accelerated) real time."""
    from dataclasses import replace

    from collector.simfleet import FAULT_KINDS, Fault, Scenario, load_scenario
    from correlator.analysis.timeparse import TimeParseError, parse_duration_ns
    from correlator.demo import run_simulate
    from correlator.server.serve import require_http_url

    try:
        if scenario:
            sc = load_scenario(scenario)
        else:
            if fault not in FAULT_KINDS:
                raise ValueError(f"unknown fault {fault!r}; choose one of: {', '.join(FAULT_KINDS)}")
            onset_s = parse_duration_ns(fault_after) / 1e9
            faults = () if fault == "drift" else (Fault(fault, 1, 2, onset_s),)
            sc = Scenario(seed=seed, faults=faults)
        sc = replace(sc, duration_s=parse_duration_ns(duration) / 1e9)
        if not speed > 0:
            raise ValueError("--speed must be positive")
        require_http_url("--otlp-endpoint", otlp_endpoint)
    except (ValueError, TimeParseError) as e:
        raise _fail(str(e), 2) from e
    headers = (("authorization", f"Bearer {token}"),) if token else ()
    raise typer.Exit(run_simulate(sc, otlp_endpoint, speed, headers, _console(stderr=True)))


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
    _console().print(table)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

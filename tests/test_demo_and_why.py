"""The main job end to end: a simulated fleet with a fault, sent over OTLP/HTTP into the correlator, to a
verdict that names the injected cause and GPU; and the CLI's contracts around it (exit codes, JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import duckdb
import pytest
from rich.console import Console
from typer.testing import CliRunner

from collector.simfleet import Fault, Fleet, Scenario, fault_scenario, load_scenario
from correlator.analysis.online import Incident, OnlineDetector
from correlator.analysis.timeparse import TimeParseError, parse_duration_ns, parse_time_ns
from correlator.analysis.why import RootCause, WhyQuery
from correlator.cli import app
from correlator.demo import run_demo, run_simulate


@pytest.fixture(scope="module")
def pcie_demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("demo")
    scenario = d / "s.toml"
    # workload "synthetic": the same token lengths whether or not ../shared/data is beside the checkout
    scenario.write_text("nodes = 2\ngpus_per_node = 4\nduration_s = 420.0\nseed = 3\nworkload = 'synthetic'\n"
                        "[[faults]]\nkind = 'pcie_saturation'\nnode = 1\ngpu = 2\nonset_s = 240.0\n")
    db = d / "demo.duckdb"
    quiet = Console(file=open(d / "log.txt", "w"))  # noqa: SIM115 - closed with the process
    assert run_demo("pcie_saturation", str(db), 3, str(scenario), quiet, quiet) == 0
    return db


def test_demo_verdict_names_the_injected_pcie_fault_and_gpu(pcie_demo_db: Path) -> None:
    fleet = Fleet(load_scenario(pcie_demo_db.parent / "s.toml"))
    truth = fleet.ground_truth[0]
    con = duckdb.connect(str(pcie_demo_db), read_only=True)
    doc = RootCause(con).why(WhyQuery())
    con.close()
    # (the ratio depends on the token-length source: the Azure trace beside the checkout, or its lognormal fit)
    assert doc["regression"]["detected"] and doc["regression"]["ratio"] > 1.4
    top = doc["findings"][0]
    assert (top["cause"], top["subcause"]) == ("interconnect", "pcie")
    assert top["culprit"]["gpu"] == truth.gpu_uuid and top["culprit"]["node"] == "node-2"
    assert top["culprit"]["mapping"] == "placement"
    assert top["explained_share"] > 0.8
    sig = {e["signal"]: e for e in top["evidence"]}
    assert sig["pcie_rx_bytes_per_s"]["incident"] > 10 * sig["pcie_rx_bytes_per_s"]["baseline"]
    # the detected onset is within a minute of the injected one
    onset = parse_time_ns(doc["query"]["window"][0], 0)
    assert abs(onset - truth.onset_ns) <= 90 * 10**9


def test_cli_why_json_contract_and_fail_on_regression_exit_code(pcie_demo_db: Path) -> None:
    r = CliRunner().invoke(app, ["why", "--db", str(pcie_demo_db), "-o", "json", "--fail-on-regression"])
    assert r.exit_code == 3, r.output
    doc = json.loads(r.output)
    assert set(doc) >= {"query", "regression", "findings", "verdict"}
    f = doc["findings"][0]
    assert set(f) >= {"rank", "cause", "subcause", "score", "explained_share", "culprit", "window", "evidence"}
    assert set(f["culprit"]) >= {"node", "gpu", "pod", "pid", "mapping"}
    assert set(f["evidence"][0]) >= {"signal", "unit", "baseline", "incident", "robust_z"}


def test_cli_top_requests_slo_answer_on_the_demo_database(pcie_demo_db: Path) -> None:
    runner = CliRunner()
    top = json.loads(runner.invoke(app, ["top", "--db", str(pcie_demo_db), "-o", "json", "--since", "3m"]).output)
    assert top[0]["node"] == "node-2" and top[0]["gpu_index"] in (2, 3)  # the TP-2 replica holding GPU 2
    assert top[0]["energy_per_token_j"] and top[0]["energy_per_token_j"] > 0
    reqs = json.loads(runner.invoke(app, ["requests", "--db", str(pcie_demo_db), "-o", "json", "--limit", "5"]).output)
    assert len(reqs) == 5 and reqs[0]["ttft_s"] >= reqs[-1]["ttft_s"] and reqs[0]["sm_clock_mhz"]
    slo = runner.invoke(app, ["slo", "--db", str(pcie_demo_db), "-o", "csv"])
    assert slo.exit_code == 0 and "attainment" in slo.output.splitlines()[0]


def test_cli_errors_have_clear_messages_and_exit_codes(tmp_path: Path, pcie_demo_db: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["why", "--db", str(tmp_path / "none.duckdb")])
    assert r.exit_code == 1 and "no database" in r.output
    r = runner.invoke(app, ["why", "--db", str(pcie_demo_db), "--metric", "latency"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["why", "--db", str(pcie_demo_db), "--since", "yesterday-ish"])
    assert r.exit_code == 2 and "RFC 3339" in r.output


def test_healthy_fleet_with_benign_drift_is_not_blamed(tmp_path: Path) -> None:
    quiet = Console(file=open(tmp_path / "log.txt", "w"))  # noqa: SIM115
    s = tmp_path / "h.toml"
    s.write_text("duration_s = 420.0\nseed = 5\nworkload = 'synthetic'\n")
    assert run_demo("drift", str(tmp_path / "h.duckdb"), 5, str(s), quiet, quiet) == 0
    con = duckdb.connect(str(tmp_path / "h.duckdb"), read_only=True)
    doc = RootCause(con).why(WhyQuery())
    # nor by the online detector, replayed every 10 s over what it would have known
    detector = OnlineDetector()
    start = Fleet(load_scenario(s)).s.start_ns
    for t_s in range(150, 421, 10):
        assert detector.step(con, start + t_s * 10**9, store=False) == [], t_s
    con.close()
    assert not doc["regression"]["detected"] and doc["findings"] == []


def test_online_detector_confirms_the_fault_within_a_minute_of_onset(pcie_demo_db: Path) -> None:
    """Replayed every 10 s over what ``serve`` would have known at each time (spans arrive when requests end)."""
    truth = Fleet(load_scenario(pcie_demo_db.parent / "s.toml")).ground_truth[0]
    con = duckdb.connect(str(pcie_demo_db), read_only=True)
    detector = OnlineDetector()
    confirmed: list[Incident] = []
    t = truth.onset_ns - 90 * 10**9
    shown: list[int] = []  # evaluations whose last minute showed the regression (the detector's latest document)
    while t <= truth.onset_ns + 120 * 10**9 and not confirmed:
        confirmed = detector.step(con, t, store=False)
        assert detector.last is not None
        if detector.last["regression"]["detected"]:
            shown.append(t)
        t += 10 * 10**9
    con.close()
    assert confirmed, "no finding within two minutes of onset"
    inc = confirmed[0]
    # the confirming evaluation's own document is the detector's latest, and it shows the regression
    assert shown and shown[-1] == inc.confirmed_ns
    assert inc.key[:2] == ("interconnect", "pcie") and inc.key[3] == truth.gpu_uuid
    assert inc.confirmed_ns is not None and 0 < inc.confirmed_ns - truth.onset_ns <= 60 * 10**9


def test_scenario_files_are_validated() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        Scenario.from_dict({"faults": [{"kind": "meteor"}]})
    with pytest.raises(ValueError, match="outside the fleet"):
        Scenario.from_dict({"faults": [{"kind": "power_cap", "node": 5}]})
    with pytest.raises(ValueError, match="unknown scenario keys"):
        Scenario.from_dict({"gpus": 3})
    assert fault_scenario("power_cap").faults == (Fault("power_cap", 1, 2, 600.0, 1e9, 1.0),)


def test_times_parse_rfc3339_and_relative() -> None:
    assert parse_duration_ns("1h30m") == 5400 * 10**9
    assert parse_time_ns("15m", 10**13) == 10**13 - 900 * 10**9
    assert parse_time_ns("2026-11-22T14:02:00Z", 0) == 1795356120 * 10**9
    with pytest.raises(TimeParseError):
        parse_time_ns("soon", 0)


def test_simulate_streams_a_fleet_anchored_at_now_and_paced_to_the_clock(correlator: Any) -> None:
    """`stacklens simulate`'s engine: simulated time starts at the (injected) clock's now, one simulated
    second per wall second at speed 1, through a real correlator's OTLP/HTTP receiver."""
    now = [1_800_000_000.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    scenario = Scenario(nodes=1, gpus_per_node=2, seed=2, duration_s=30.0, workload="synthetic",
                        faults=(Fault("power_cap", 0, 1, 10.0),))
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - closed with the process
    code = run_simulate(scenario, correlator.addresses["otlp_http"], 1.0, (), quiet, clock=lambda: now[0],
                        sleep=sleep)
    assert code == 0
    # paced: 30 simulated seconds took 30 (fake) wall seconds, and one more for the requests still running
    assert 30.0 <= sum(slept) <= 31.0 and max(slept) <= 1.0
    assert correlator.store is not None
    correlator.store.flush()
    with correlator.store.reader() as cur:
        (n_req, first_ns), = cur.execute("SELECT count(*), min(start_ns) FROM requests").fetchall()
        (n_gpu,), = cur.execute("SELECT count(DISTINCT gpu_id) FROM gpu_samples").fetchall()
        (limit_w,), = cur.execute(
            "SELECT min(value) FROM gpu_samples JOIN signals s USING (signal_id) JOIN gpus g USING (gpu_id) "
            "WHERE s.name = 'power_limit_w' AND g.gpu_index = 1").fetchall()
    assert n_req > 20 and n_gpu == 2
    assert abs(first_ns / 1e9 - 1_800_000_000.0) < 5  # anchored at the clock's now, not the scenario's start
    assert limit_w < 700  # the fault reached the wire


def test_simulate_cli_refuses_bad_arguments() -> None:
    r = CliRunner().invoke(app, ["simulate", "--fault", "nope"])
    assert r.exit_code == 2 and "unknown fault" in r.output
    r = CliRunner().invoke(app, ["simulate", "--speed", "0"])
    assert r.exit_code == 2 and "--speed" in r.output

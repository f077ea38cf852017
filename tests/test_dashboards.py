"""The generated Grafana dashboards: the checked-in JSON is exactly what the generator writes, ids and
refIds are set and unique, the datasources are the provisioned uids, and every metric a query names is
one the agent, the correlator, vLLM or the recording rules actually produce."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from collector.signals import ENGINE_SIGNALS, SIGNALS
from dashboards import generate
from dashboards.common import INFINITY_UID, PROMETHEUS_UID
from dashboards.queries import infinity_queries, interpolate, panels, prometheus_queries

REPO = Path(__file__).resolve().parent.parent
DOCS = {p.stem: json.loads(p.read_text()) for p in sorted(generate.GENERATED.glob("*.json"))}


def test_generator_output_matches_the_checked_in_json(tmp_path: Path) -> None:
    assert generate.main(["--out", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in generate.GENERATED.glob("*.json"))
    for name in written:
        assert (tmp_path / name).read_text() == (generate.GENERATED / name).read_text(), (
            f"{name} is stale: run python -m dashboards.generate")
    assert generate.main(["--check"]) == 0


def test_check_reports_a_stale_file(tmp_path: Path) -> None:
    generate.write(tmp_path)
    (tmp_path / "incident.json").write_text("{}\n")
    (tmp_path / "old.json").write_text("{}\n")
    assert generate.check(tmp_path) == ["incident.json", "old.json"]
    assert generate.main(["--check", "--out", str(tmp_path)]) == 1


def test_generation_is_deterministic() -> None:
    a = {k: generate.render(v) for k, v in generate.dashboards().items()}
    b = {k: generate.render(v) for k, v in generate.dashboards().items()}
    assert a == b


def test_the_four_dashboards_with_unique_uids() -> None:
    assert set(DOCS) == {"fleet-overview", "incident", "gpu-drilldown", "serving-engine"}
    uids = [d["uid"] for d in DOCS.values()]
    assert len(set(uids)) == len(uids) and all(u.startswith("stacklens-") for u in uids)


@pytest.mark.parametrize("name", sorted(DOCS))
def test_panel_ids_and_ref_ids_are_explicit_and_unique(name: str) -> None:
    doc = DOCS[name]
    ids = [p.get("id") for p in panels(doc)]
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert [i for i, n in Counter(ids).items() if n > 1] == []
    for p in panels(doc):
        if p["type"] == "row":
            continue
        refs = [t.get("refId") for t in p["targets"]]
        assert refs and all(refs), p["title"]
        assert len(set(refs)) == len(refs), p["title"]
        assert p["gridPos"]["w"] > 0 and p["gridPos"]["h"] > 0


@pytest.mark.parametrize("name", sorted(DOCS))
def test_variables_and_datasources(name: str) -> None:
    doc = DOCS[name]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert list(variables)[:5] == ["datasource", "cluster", "node", "gpu", "model"]
    assert variables["datasource"]["current"]["value"] == PROMETHEUS_UID
    for v in ("cluster", "node", "gpu", "model"):
        assert variables[v]["includeAll"] and variables[v]["allValue"] == ".*"
    used = set()
    for p in panels(doc):
        for t in p.get("targets", []):
            ds: dict[str, str] = t.get("datasource") or p["datasource"]
            used.add((ds["type"], ds["uid"]))
    assert used <= {("prometheus", "${datasource}"), ("yesoreyeram-infinity-datasource", INFINITY_UID)}
    assert doc["annotations"]["list"][0]["expr"].startswith("max by (cause, sub_cause, node, gpu) (stacklens_finding")


def _known_metrics() -> set[str]:
    names = {"up", "stacklens_gpu_info", "stacklens_xid_events_total", "DCGM_FI_DEV_XID_ERRORS"}
    for s in SIGNALS.values():
        names.add(s.prometheus_name + ("_total" if s.kind == "counter" and not s.name.endswith("_total") else ""))
        names.update(src.name for src in (s.dcgm, *s.dcgm_aliases) if src is not None)
    for metric in ("ttft", "tpot"):
        names.update(f"stacklens_request_{metric}_seconds_{x}" for x in ("bucket", "count", "sum"))
    names.update({"stacklens_findings", "stacklens_finding_onset_seconds"})
    for es in ENGINE_SIGNALS.values():
        names.update(src for src in es.sources if src.startswith("vllm:"))
    for src in ("time_to_first_token", "inter_token_latency", "time_per_output_token", "request_queue_time",
                "e2e_request_latency"):
        names.add(f"vllm:{src}_seconds_bucket")
    for rules in (REPO / "deploy" / "prometheus" / "rules").glob("*.yml"):
        names.update(re.findall(r"^\s*- record:\s*(\S+)\s*$", rules.read_text(), re.MULTILINE))
    return names


_METRIC = re.compile(r"(?<![\w:$])((?:DCGM_FI_|stacklens_|stacklens:|vllm:)[\w:]+)(?=\s*[{\[)]|\s*$|\s)")


@pytest.mark.parametrize("name", sorted(DOCS))
def test_every_metric_named_is_one_that_exists(name: str) -> None:
    known = _known_metrics()
    values = dict.fromkeys(("datasource", "cluster", "node", "gpu", "model"), ".*")
    for q in prometheus_queries(DOCS[name]):
        expr = interpolate(q.expr, values)
        named = set(_METRIC.findall(expr))
        assert named, f"{q.where}: no metric found in {expr!r}"
        assert named <= known, f"{q.where}: unknown metrics {sorted(named - known)} in {expr!r}"


def test_engine_dashboard_reads_current_and_renamed_vllm_metrics() -> None:
    queries = [q.expr for q in prometheus_queries(DOCS["serving-engine"])]
    exprs = " ".join(queries)
    for new, old in (("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
                     ("vllm:num_preemptions_total", "vllm:num_preemptions"),
                     ("vllm:prompt_tokens_total", "vllm:prompt_tokens"),
                     ("vllm:inter_token_latency_seconds_bucket", "vllm:time_per_output_token_seconds_bucket")):
        # one expression reads both names: `<current> or <renamed>`
        assert any(re.search(rf"{re.escape(new)}\{{.* or .*{re.escape(old)}\{{", e) for e in queries), (new, old)
    for metric in ("vllm:num_requests_waiting", "vllm:num_requests_running"):
        assert metric in exprs


def test_incident_dashboard_reads_the_correlator_api_through_infinity() -> None:
    queries = infinity_queries(DOCS["incident"])
    urls = {t["url"] for _, t in queries}
    assert urls == {"/api/v1/why", "/api/v1/findings"}
    selectors: dict[str, Any] = {t["root_selector"]: [c["selector"] for c in t["columns"]] for _, t in queries}
    assert {"cause", "culprit.gpu", "explained_share", "evidence"} <= set(selectors["findings"])
    assert {"signal", "baseline", "incident"} <= set(selectors["findings[0].evidence"])

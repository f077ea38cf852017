"""What the four dashboards share: datasources, template variables, label selectors and panel helpers.

Everything is built with the pinned ``grafana-foundation-sdk``; the Infinity datasource has no builder
in the SDK, so :class:`InfinityQuery` implements the SDK's ``Dataquery`` variant for it. Panel ids and
query refIds are always given explicitly (:class:`Ids`), so the generated JSON is stable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.builders import stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

PROMETHEUS_UID = "stacklens-prometheus"
INFINITY_UID = "stacklens-infinity"
INFINITY_TYPE = "yesoreyeram-infinity-datasource"

# Panels query whatever Prometheus the datasource variable names (its default: the provisioned one).
PROM = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
INFINITY = model.DataSourceRef(type_val=INFINITY_TYPE, uid=INFINITY_UID)

# --- label selectors (Grafana interpolates the variables; "All" is the regex .*) ---------------------
# The agent's series carry dcgm-exporter's labels (Hostname, gpu, UUID, ...); `cluster` is a target label.
GPU = 'cluster=~"$cluster", Hostname=~"$node", gpu=~"$gpu"'
NODE = 'cluster=~"$cluster", Hostname=~"$node"'
# The correlator's histograms: `gpu` lists the replica's GPU indices ("0,1" under tensor parallelism).
REQ = 'cluster=~"$cluster", node=~"$node", gpu=~"(.*,)?($gpu)(,.*)?", model=~"$model"'
# vLLM's own metrics: model_name; the scrape config adds Hostname and cluster.
ENGINE = 'cluster=~"$cluster", Hostname=~"$node", model_name=~"$model"'
FINDINGS = 'cluster=~"$cluster", node=~"$node"'

# SLOs the rules alert on (deploy/prometheus/rules); the dashboards show attainment against the same.
TTFT_SLO_S = "0.5"
TPOT_SLO_S = "0.1"
SLO_TARGET = 0.99

# clock-event reasons that mean the clocks are held down (not idle, not application clocks)
THROTTLE_REASONS = "sw_power_cap|hw_slowdown|sw_thermal|hw_thermal|hw_power_brake|sync_boost"


def quantile(q: float, metric: str, selector: str, by: str = "model") -> str:
    return (f"histogram_quantile({q}, sum by (le, {by}) "
            f"(rate({metric}_bucket{{{selector}}}[$__rate_interval])))")


class Ids:
    """Explicit panel ids, in the order panels are added."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(self) -> int:
        self._next += 1
        return self._next


@dataclass(frozen=True)
class Q:
    """One Prometheus query of a panel."""

    ref: str
    expr: str
    legend: str = ""
    instant: bool = False


def prom_target(q: Q) -> prom.Dataquery:
    t = prom.Dataquery().ref_id(q.ref).expr(q.expr).datasource(PROM)
    if q.legend:
        t = t.legend_format(q.legend)
    if q.instant:
        t = t.instant().format(PromQueryFormat.TABLE)
    return t


# --- the Infinity datasource (the correlator's JSON API) ----------------------------------------------
@dataclass(frozen=True)
class Column:
    selector: str
    text: str
    type: str = "string"  # string, number, timestamp


class InfinityQuery(cogvariants.Dataquery):
    """A JSON query of the Infinity datasource (backend parser), relative to the datasource's URL (the
    correlator's API, e.g. http://stacklens:8686)."""

    def __init__(self, ref_id: str, url: str, root_selector: str, columns: Sequence[Column],
                 params: Sequence[tuple[str, str]] = ()) -> None:
        self.ref_id = ref_id
        self.url = url
        self.root_selector = root_selector
        self.columns = list(columns)
        self.params = list(params)

    def to_json(self) -> dict[str, object]:
        return {
            "refId": self.ref_id,
            "datasource": INFINITY.to_json(),
            "type": "json",
            "source": "url",
            "parser": "backend",
            "format": "table",
            "url": self.url,
            "url_options": {"method": "GET", "data": "",
                            "params": [{"key": k, "value": v} for k, v in self.params]},
            "root_selector": self.root_selector,
            "columns": [{"selector": c.selector, "text": c.text, "type": c.type} for c in self.columns],
            "filters": [],
        }


class Infinity(cogbuilder.Builder[cogvariants.Dataquery]):
    def __init__(self, query: InfinityQuery) -> None:
        self._query = query

    def build(self) -> InfinityQuery:
        return self._query


# the dashboard's time range, as the correlator's API reads it (RFC 3339)
TIME_RANGE_PARAMS = (("since", "${__from:date:iso}"), ("until", "${__to:date:iso}"))


# --- template variables ------------------------------------------------------------------------------
def _query_var(name: str, label: str, query: str, description: str) -> dash.QueryVariable:
    return (dash.QueryVariable(name).label(label).description(description).datasource(PROM)
            .query(query)
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.NATURAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(model.VariableOption(selected=True, text="All", value="$__all")))


def variables() -> list[cogbuilder.Builder[model.VariableModel]]:
    """datasource, cluster, node (the agent's Hostname), gpu (index), model: every dashboard's filters."""
    return [
        dash.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
        .current(model.VariableOption(selected=True, text=PROMETHEUS_UID, value=PROMETHEUS_UID)),
        _query_var("cluster", "Cluster", "label_values(stacklens_gpu_info, cluster)",
                   "The `cluster` target label of the agents' scrape jobs."),
        _query_var("node", "Node", 'label_values(stacklens_gpu_info{cluster=~"$cluster"}, Hostname)',
                   "The node (the agent's Hostname label)."),
        _query_var("gpu", "GPU", 'label_values(stacklens_gpu_info{cluster=~"$cluster", Hostname=~"$node"}, gpu)',
                   "GPU index on the node (dcgm-exporter's gpu label)."),
        _query_var("model", "Model", 'label_values(stacklens_request_ttft_seconds_count{cluster=~"$cluster"}, model)',
                   "Served model, from the correlator's request histograms."),
    ]


def findings_annotation() -> dash.AnnotationQuery:
    """The correlator's findings on every time axis: one mark at the onset of each finding's incident."""
    return (dash.AnnotationQuery().name("stacklens findings").datasource(PROM).enable(True).icon_color("red")
            .expr(f"max by (cause, sub_cause, node, gpu) (stacklens_finding_onset_seconds{{{FINDINGS}}}) * 1000"))


GRAFANA = model.DataSourceRef(type_val="grafana", uid="-- Grafana --")


def posted_findings_annotation() -> dash.AnnotationQuery:
    """The findings the correlator posts to Grafana's own annotation store (``serve --grafana-url``):
    incident regions tagged ``stacklens``, with the culprit and the share explained in their text."""
    return (dash.AnnotationQuery().name("stacklens findings (posted)").datasource(GRAFANA).enable(True)
            .icon_color("orange").type("tags")
            .target(dash.AnnotationTarget().type("tags").tags(["stacklens"]).match_any(True).limit(100)))


# Prometheus annotation options the SDK's AnnotationQuery has no field for (added to its JSON).
ANNOTATION_EXTRA: dict[str, object] = {
    "useValueForTime": True, "step": "1m",
    "titleFormat": "{{cause}}/{{sub_cause}}", "textFormat": "culprit {{node}} GPU {{gpu}}",
    "tagKeys": "cause,sub_cause,node,gpu",
}


def dashboard(uid: str, title: str, description: str, tags: Sequence[str]) -> dash.Dashboard:
    link = (dash.DashboardLink("stacklens").type(model.DashboardLinkType.DASHBOARDS).tags(["stacklens"])
            .as_dropdown(True).include_vars(True).keep_time(True))
    links: list[cogbuilder.Builder[model.DashboardLink]] = [link]
    return (dash.Dashboard(title).uid(uid).description(description).tags(["stacklens", *tags])
            .timezone("utc").time("now-1h", "now").refresh("30s").editable()
            .tooltip(model.DashboardCursorSync.CROSSHAIR).variables(variables())
            .annotation(findings_annotation()).annotation(posted_findings_annotation()).links(links))


# --- panels ------------------------------------------------------------------------------------------
def _grid(w: int, h: int) -> model.GridPos:
    return model.GridPos(h=h, w=w)


def _legend() -> VizLegendOptions:
    return (VizLegendOptions().display_mode(common.LegendDisplayMode.TABLE).placement(common.LegendPlacement.BOTTOM)
            .show_legend(True).calcs(["mean", "max", "lastNotNull"]))


def ts(ids: Ids, title: str, queries: Sequence[Q], unit: str, description: str = "", w: int = 12, h: int = 8,
       right_axis: Sequence[tuple[str, str]] = ()) -> timeseries.Panel:
    """A time series panel. ``right_axis``: (refId, unit) of queries drawn on a right-hand axis."""
    p = (timeseries.Panel().id(ids()).title(title).description(description).datasource(PROM).unit(unit)
         .grid_pos(_grid(w, h)).legend(_legend()).fill_opacity(8).line_width(1)
         .targets([prom_target(q) for q in queries]))
    for ref, right_unit in right_axis:
        p = p.override_by_query(ref, [
            model.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
            model.DynamicConfigValue(id_val="unit", value=right_unit)])
    return p


def timeline(ids: Ids, title: str, queries: Sequence[Q], description: str = "", w: int = 12,
             h: int = 8) -> statetimeline.Panel:
    return (statetimeline.Panel().id(ids()).title(title).description(description).datasource(PROM)
            .grid_pos(_grid(w, h)).show_value(common.VisibilityMode.NEVER).merge_values(True)
            .mappings([model.ValueMap(options={
                "0": model.ValueMappingResult(text="ok", color="green"),
                "1": model.ValueMappingResult(text="held down", color="red")})])
            .targets([prom_target(q) for q in queries]))


def stat_panel(ids: Ids, title: str, queries: Sequence[Q], unit: str, description: str = "", w: int = 6,
               h: int = 4, thresholds: Sequence[tuple[float | None, str]] = ()) -> stat.Panel:
    p = (stat.Panel().id(ids()).title(title).description(description).datasource(PROM).unit(unit)
         .grid_pos(_grid(w, h)).graph_mode(common.BigValueGraphMode.AREA)
         .color_mode(common.BigValueColorMode.VALUE)
         .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
         .targets([prom_target(q) for q in queries]))
    if thresholds:
        p = p.thresholds(dash.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(
            [model.Threshold(value=v, color=c) for v, c in thresholds]))
    return p


def prom_table(ids: Ids, title: str, queries: Sequence[Q], description: str = "", w: int = 24,
               h: int = 7, hide: Sequence[str] = ("Time",)) -> table.Panel:
    return (table.Panel().id(ids()).title(title).description(description).datasource(PROM)
            .grid_pos(_grid(w, h)).targets([prom_target(q) for q in queries])
            .with_transformation(model.DataTransformerConfig(id_val="merge", options={}))
            .with_transformation(model.DataTransformerConfig(id_val="organize", options={
                "excludeByName": dict.fromkeys(hide, True)})))


def infinity_table(ids: Ids, title: str, query: InfinityQuery, description: str = "", w: int = 24,
                   h: int = 8) -> table.Panel:
    return (table.Panel().id(ids()).title(title).description(description)
            .datasource(INFINITY).grid_pos(_grid(w, h)).targets([Infinity(query)]))


def row(ids: Ids, title: str) -> dash.Row:
    return dash.Row(title).id(ids())


@dataclass
class Board:
    """A dashboard under construction: its builder and its panel ids."""

    builder: dash.Dashboard
    ids: Ids = field(default_factory=Ids)

    def row(self, title: str) -> Board:
        self.builder = self.builder.with_row(row(self.ids, title))
        return self

    def add(self, *panels: cogbuilder.Builder[model.Panel]) -> Board:
        for p in panels:
            self.builder = self.builder.with_panel(p)
        return self

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = _plain(self.builder.build())
        for a in doc.get("annotations", {}).get("list", []):
            if a.get("expr"):
                a.update(ANNOTATION_EXTRA)
        return doc


def _plain(o: Any) -> Any:
    """The SDK's objects as plain JSON values (what its JSONEncoder writes)."""
    to_json = getattr(o, "to_json", None)
    if callable(to_json):
        return _plain(to_json())
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_plain(v) for v in o]
    return o

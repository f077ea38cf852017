"""Reading the queries back out of generated dashboard JSON: every PromQL expression (panel targets,
annotations, template variables) and every Infinity query, and Grafana's variable interpolation, so the
tests can run each expression against a real Prometheus and each Infinity query against the correlator."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# what Grafana puts for its built-in interval variables, as a test would choose them
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
_VAR = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),)?\s*(\w+)\s*\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class PromQuery:
    where: str  # "panel 3 'Title' A", "annotation 'name'", "variable gpu"
    expr: str
    label: str | None = None  # for label_values(): the label whose values the variable lists


def panels(doc: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels inside collapsed rows included."""
    for p in doc.get("panels", []):
        yield p
        yield from p.get("panels", []) or []


def prometheus_queries(doc: Mapping[str, Any]) -> list[PromQuery]:
    out: list[PromQuery] = []
    for p in panels(doc):
        for t in p.get("targets", []) or []:
            if (t.get("datasource") or p.get("datasource") or {}).get("type") == "prometheus":
                out.append(PromQuery(f"panel {p['id']} {p.get('title')!r} {t['refId']}", t["expr"]))
    for a in doc.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append(PromQuery(f"annotation {a['name']!r}", a["expr"]))
    for v in doc.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v["query"] if isinstance(v["query"], str) else v["query"].get("query", "")
        m = _LABEL_VALUES.match(q)
        if m:
            out.append(PromQuery(f"variable {v['name']}", m.group(1) or "{__name__=~\".+\"}", m.group(2)))
        else:
            out.append(PromQuery(f"variable {v['name']}", q))
    return out


def infinity_queries(doc: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"panel {p['id']} {p.get('title')!r} {t['refId']}", t) for p in panels(doc)
            for t in p.get("targets", []) or []
            if (t.get("datasource") or {}).get("type") == "yesoreyeram-infinity-datasource"]


def interpolate(text: str, values: Mapping[str, str]) -> str:
    """Grafana's variable interpolation, for the variables in ``values`` and the built-in intervals."""
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in values:
            return values[name]
        if name in BUILTINS:
            return BUILTINS[name]
        raise KeyError(f"no value for ${name} in {text!r}")

    return _VAR.sub(sub, text)

"""Agent configuration from, in order of precedence: command-line flags, ``STACKLENS_AGENT_*``
environment variables, a TOML config file (``--config`` or ``STACKLENS_AGENT_CONFIG``), defaults.
The OTLP exporter additionally honours the standard ``OTEL_EXPORTER_OTLP_*`` variables.

Anything malformed raises :class:`ConfigError` naming the setting and where it came from; the CLI
turns that into exit code 2.
"""

from __future__ import annotations

import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from collector.export.otlp_transport import ConfigError

__all__ = ["AgentSettings", "ConfigError", "env_var", "parse_duration", "resolve_settings"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str | float | int, what: str) -> float:
    """'100ms', '1s', '2m', '1.5' (seconds) -> seconds."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a duration such as 1s or 100ms, got {text!r}")
    if isinstance(text, int | float):
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"{what}: expected a duration such as 1s or 100ms, got {text!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


@dataclass(frozen=True, slots=True)
class AgentSettings:
    interval_s: float = 1.0
    slow_interval_s: float = 10.0
    # slowly changing GPU signals (temperatures, limits, error totals, framebuffer) and host signals
    medium_interval_s: float = 1.0
    host_interval_s: float = 1.0
    placement_interval_s: float = 1.0
    simulate: bool = False
    simulate_gpus: int = 8
    simulate_model: str = "H100-SXM"
    # a scenario file of the simulated fleet (collector/simfleet.py): this node's GPUs with its engines'
    # load and its faults instead of the simple simulated node
    simulate_scenario: str = ""
    simulate_node: int = 0
    seed: int = 0
    node_name: str = ""
    k8s_node_name: str = ""
    otlp_endpoint: str = ""
    otlp_protocol: str = ""
    otlp_headers: str | None = None
    prometheus_port: int = 9400
    prometheus_address: str = "0.0.0.0"
    pod_resources_socket: str = "/var/lib/kubelet/pod-resources/kubelet.sock"
    xid_events: bool = True
    pcie_counter_poll: bool = True  # poll the 32-bit PCIe byte counters at their wrap-safe period
    export_buffer_bytes: int = 16 << 20
    export_interval_s: float = 1.0  # samples are batched and sent at most this often
    log_level: str = "info"


_FIELD_TYPES = {f.name: f.type for f in fields(AgentSettings)}
ENV_PREFIX = "STACKLENS_AGENT_"


def env_var(setting: str) -> str:
    """The environment variable of a setting: STACKLENS_AGENT_INTERVAL for interval_s."""
    return ENV_PREFIX + setting.removesuffix("_s").upper()


def _coerce(name: str, value: Any, origin: str) -> Any:
    kind = _FIELD_TYPES[name]
    where = f"{name} ({origin})"
    if name.endswith("_s"):
        return parse_duration(value, where)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if kind == "str | None":
        return None if value is None else str(value)
    if not isinstance(value, str | int | float):
        raise ConfigError(f"{where}: expected text, got {value!r}")
    return str(value)


def load_file(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    # settings may sit at the top level or under [agent]
    table = raw.get("agent", raw)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [agent] must be a table")
    # file keys are the user-facing names: `interval`, not the internal `interval_s`
    by_key = {name.removesuffix("_s"): name for name in _FIELD_TYPES}
    unknown = sorted(set(table) - set(by_key) - {"agent"})
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(by_key))}")
    return {by_key[k]: _coerce(by_key[k], v, str(path)) for k, v in table.items() if k != "agent"}


def resolve_settings(flags: Mapping[str, Any], env: Mapping[str, str], config_file: Path | None) -> AgentSettings:
    """Merge the sources; ``flags`` holds only the flags the user actually gave."""
    merged: dict[str, Any] = {}
    path = config_file or (Path(env[ENV_PREFIX + "CONFIG"]) if env.get(ENV_PREFIX + "CONFIG") else None)
    if path is not None:
        merged.update(load_file(path))
    for name in _FIELD_TYPES:
        var = env_var(name)
        if (value := env.get(var)) is not None:
            merged[name] = _coerce(name, value, f"${var}")
    for name, value in flags.items():
        if value is not None:
            merged[name] = _coerce(name, value, "flag")
    if not merged.get("k8s_node_name") and env.get("NODE_NAME"):
        merged["k8s_node_name"] = env["NODE_NAME"]  # the downward-API convention in DaemonSets
    if not merged.get("node_name"):
        merged["node_name"] = merged.get("k8s_node_name") or socket.gethostname()
    settings = AgentSettings(**merged)
    validate(settings)
    return settings


def validate(s: AgentSettings) -> None:
    if not 0.1 <= s.interval_s <= 3600:
        raise ConfigError(f"interval must be between 100ms and 1h, got {s.interval_s}s")
    if s.slow_interval_s < s.interval_s:
        raise ConfigError("slow_interval must not be shorter than interval")
    for name in ("medium_interval_s", "host_interval_s", "placement_interval_s"):
        if not 0 < getattr(s, name) <= 3600:
            raise ConfigError(f"{name.removesuffix('_s')} must be above 0 and at most 1h, got {getattr(s, name)}s")
    if not 0 <= s.prometheus_port <= 65535:
        raise ConfigError(f"prometheus_port must be 0 (off) to 65535, got {s.prometheus_port}")
    if not 1 <= s.simulate_gpus <= 64:
        raise ConfigError(f"simulate_gpus must be 1 to 64, got {s.simulate_gpus}")
    if s.simulate_scenario:
        from collector.simfleet import load_scenario

        try:
            scenario = load_scenario(s.simulate_scenario)
        except ValueError as e:
            raise ConfigError(f"simulate_scenario: {e}") from e
        if not 0 <= s.simulate_node < scenario.nodes:
            raise ConfigError(f"simulate_node must be 0 to {scenario.nodes - 1} for that scenario, "
                              f"got {s.simulate_node}")
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level must be debug, info, warning or error, got {s.log_level!r}")
    if not 0 <= s.export_interval_s <= 60:
        raise ConfigError(f"export_interval must be between 0 and 60s, got {s.export_interval_s}s")
    if s.export_buffer_bytes < 1 << 16:
        raise ConfigError("export_buffer_bytes must be at least 65536")

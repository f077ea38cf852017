"""Build the NVML stand-in and write its scripts (format: README.md beside this file)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("nvml_standin.c")


def build_standin(out_dir: Path) -> Path:
    """Compile the stand-in into ``out_dir/libnvidia-ml.so.1`` (skipped when up to date)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / "libnvidia-ml.so.1"
    if lib.exists() and lib.stat().st_mtime >= SOURCE.stat().st_mtime:
        return out_dir
    tmp = out_dir / f".libnvidia-ml.so.1.{os.getpid()}"
    proc = subprocess.run(
        ["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-pthread", "-o", str(tmp),
         str(SOURCE)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building the NVML stand-in failed:\n{proc.stderr}")
    tmp.replace(lib)  # atomic: parallel builders never load a half-written library
    return out_dir


class StandinScript:
    """A script for the stand-in: system settings, then ``gpu.<index|*>.<key> values...`` lines."""

    def __init__(self) -> None:
        self._system: dict[str, str] = {}
        self._gpu: dict[tuple[str, str], str] = {}

    def driver(self, version: str) -> StandinScript:
        self._system["driver"] = version
        return self

    def gpus(self, count: int) -> StandinScript:
        self._system["gpus"] = str(count)
        return self

    def system(self, key: str, value: object) -> StandinScript:
        """Any system setting: ``nvml``, ``cuda``, ``init_error``, ``clock_base_us``, ``clock_step_us``."""
        self._system[key] = str(value)
        return self

    def set(self, gpu: int | None, key: str, *values: object) -> StandinScript:
        """A GPU setting; ``gpu=None`` sets the ``gpu.*`` default. Several values form a sequence read
        one per tick (the last repeats)."""
        if not values:
            raise ValueError(f"{key}: at least one value")
        self._gpu[("*" if gpu is None else str(gpu), key)] = " ".join(str(v) for v in values)
        return self

    def text(self) -> str:
        lines = [f"{k} {v}" for k, v in self._system.items()]
        lines += [f"gpu.{g}.{k} {v}" for (g, k), v in self._gpu.items()]
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> Path:
        path.write_text(self.text())
        return path


def standin_env(lib_dir: Path, script: Path, call_log: Path | None = None) -> dict[str, str]:
    """The environment for a subprocess that loads the stand-in instead of a real libnvidia-ml."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib_dir), env.get("LD_LIBRARY_PATH", "")) if p)
    env["NVML_STANDIN_SCRIPT"] = str(script)
    if call_log is not None:
        env["NVML_STANDIN_CALL_LOG"] = str(call_log)
    else:
        env.pop("NVML_STANDIN_CALL_LOG", None)
    return env


def read_call_log(path: Path) -> dict[tuple[str, int, str], int]:
    """(symbol, device, key) -> calls, from the log the stand-in writes at nvmlShutdown and unload."""
    out: dict[tuple[str, int, str], int] = {}
    for line in path.read_text().splitlines():
        sym, dev, key, count = line.split()
        out[(sym, int(dev), key)] = int(count)
    return out

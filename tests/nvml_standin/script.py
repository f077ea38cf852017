"""Build the NVML stand-in and write its scripts (format: README.md beside this file).

A process loads the stand-in instead of NVIDIA's library when ``LD_LIBRARY_PATH`` names the build
folder before Python starts, so tests run pynvml in a subprocess::

    lib = build_standin(tmp_path / "lib")
    script = StandinScript().gpus(8).set(None, "temp.gpu", 45, 46).write(tmp_path / "s.txt")
    subprocess.run([sys.executable, "-c", code], env=standin_env(lib, script), check=True)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("nvml_standin.c")
LIBRARY_NAME = "libnvidia-ml.so.1"
MAX_GPUS = 64
GCC_FLAGS = ("-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-pthread")


def build_standin(out_dir: Path) -> Path:
    """Compile the stand-in into ``out_dir/libnvidia-ml.so.1`` and return ``out_dir``.

    Skipped when that library is already newer than the source. Warnings are errors. Raises
    RuntimeError, with gcc's messages, when gcc is missing or the build fails.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / LIBRARY_NAME
    if lib.exists() and lib.stat().st_mtime > SOURCE.stat().st_mtime:
        return out_dir
    tmp = out_dir / f".{LIBRARY_NAME}.{os.getpid()}"
    try:
        proc = subprocess.run(
            ["gcc", *GCC_FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise RuntimeError(f"building the NVML stand-in needs gcc, which is not on PATH: {exc}") from exc
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building the NVML stand-in ({SOURCE}) failed:\n{proc.stderr}")
    tmp.replace(lib)  # atomic: parallel builders never load a half-written library
    return out_dir


def _token(value: object, what: str) -> str:
    text = str(value)
    if not text or any(c.isspace() for c in text) or "#" in text:
        raise ValueError(f"{what}: {text!r} must be one word without '#'")
    return text


class StandinScript:
    """A script for the stand-in: system settings, then ``gpu.<index|*>.<key> values...`` lines.

    Every method returns the script, so calls chain. Setting a key again replaces its value.
    """

    def __init__(self) -> None:
        self._system: dict[str, str] = {}
        self._gpu: dict[tuple[str, str], str] = {}

    def driver(self, version: str) -> StandinScript:
        """What nvmlSystemGetDriverVersion returns."""
        return self.system("driver", version)

    def nvml(self, version: str) -> StandinScript:
        """What nvmlSystemGetNVMLVersion returns."""
        return self.system("nvml", version)

    def cuda(self, version: int) -> StandinScript:
        """What nvmlSystemGetCudaDriverVersion returns (13000 for CUDA 13.0)."""
        return self.system("cuda", version)

    def gpus(self, count: int) -> StandinScript:
        """The device count, 0 to 64."""
        if not 0 <= count <= MAX_GPUS:
            raise ValueError(f"gpus: {count} is not between 0 and {MAX_GPUS}")
        return self.system("gpus", count)

    def init_error(self, code: int) -> StandinScript:
        """nvmlInit fails with this NVML error code (9: NVML_ERROR_DRIVER_NOT_LOADED)."""
        return self.system("init_error", code)

    def clock(self, base_us: int, step_us: int) -> StandinScript:
        """Field-value timestamps: ``base_us + tick * step_us`` (microseconds)."""
        return self.system("clock_base_us", base_us).system("clock_step_us", step_us)

    def system(self, key: str, value: object) -> StandinScript:
        """Any system setting: ``driver``, ``nvml``, ``cuda``, ``gpus``, ``init_error``, ``clock_base_us``,
        ``clock_step_us``."""
        self._system[_token(key, "system key")] = _token(value, key)
        return self

    def set(self, gpu: int | None, key: str, *values: object) -> StandinScript:
        """A GPU setting; ``gpu=None`` sets the ``gpu.*`` default, which a GPU's own setting overrides.
        Several values form a sequence read one per tick (the last repeats); ``"NS"`` or ``"ERR:<code>"``
        in place of a value makes that read fail. Text settings (``name``, ...) take their words as given."""
        if gpu is not None and not 0 <= gpu < MAX_GPUS:
            raise ValueError(f"{key}: GPU index {gpu} is not between 0 and {MAX_GPUS - 1}")
        if not values:
            raise ValueError(f"{key}: at least one value")
        text = " ".join(str(v) for v in values)
        if "\n" in text or "#" in text or not text.strip():
            raise ValueError(f"{key}: {text!r} must be one non-empty line without '#'")
        self._gpu[("*" if gpu is None else str(gpu), _token(key, "GPU key"))] = text
        return self

    def text(self) -> str:
        """The script as the stand-in reads it."""
        lines = [f"{k} {v}" for k, v in self._system.items()]
        lines += [f"gpu.{g}.{k} {v}" for (g, k), v in self._gpu.items()]
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> Path:
        """Write the script to ``path`` and return ``path``."""
        path.write_text(self.text())
        return path


def standin_env(lib_dir: Path, script: Path, call_log: Path | None = None) -> dict[str, str]:
    """A copy of os.environ for a subprocess that loads the stand-in instead of a real libnvidia-ml:
    ``LD_LIBRARY_PATH`` starts with ``lib_dir``, ``NVML_STANDIN_SCRIPT`` names ``script``, and
    ``NVML_STANDIN_CALL_LOG`` names ``call_log`` (removed when None)."""
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

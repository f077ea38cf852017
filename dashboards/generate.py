"""Writes the dashboards as Grafana JSON into ``dashboards/generated/`` (checked in).

    python -m dashboards.generate           # regenerate
    python -m dashboards.generate --check   # exit 1 if the checked-in JSON differs from the code
    python -m dashboards.generate --out DIR # write elsewhere
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dashboards import engine, fleet, gpu, incident
from dashboards.common import Board

GENERATED = Path(__file__).resolve().parent / "generated"
BOARDS: dict[str, Callable[[], Board]] = {
    "fleet-overview": fleet.build,
    "incident": incident.build,
    "gpu-drilldown": gpu.build,
    "serving-engine": engine.build,
}


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def dashboards() -> dict[str, dict[str, Any]]:
    """File stem -> dashboard JSON."""
    return {name: build().to_json() for name, build in BOARDS.items()}


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, doc in dashboards().items():
        path = directory / f"{name}.json"
        path.write_text(render(doc), encoding="utf-8")
        out.append(path)
    return out


def check(directory: Path) -> list[str]:
    """Names of the files that differ from what the code generates (missing or extra ones included)."""
    want = {f"{name}.json": render(doc) for name, doc in dashboards().items()}
    have = {p.name for p in directory.glob("*.json")} if directory.is_dir() else set()
    stale = [n for n, text in want.items() if not (directory / n).is_file()
             or (directory / n).read_text(encoding="utf-8") != text]
    return sorted(stale + sorted(have - set(want)))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dashboards.generate", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    p.add_argument("--out", type=Path, default=GENERATED, help=f"directory (default {GENERATED})")
    args = p.parse_args(argv)
    if args.check:
        stale = check(args.out)
        if stale:
            print(f"dashboards out of date in {args.out}: {', '.join(stale)}; run python -m dashboards.generate",
                  file=sys.stderr)
            return 1
        return 0
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

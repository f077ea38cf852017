"""Figures: the whole agent's CPU share at a 100 ms cadence, and its resident memory after an hour.

Both run the real agent against the C stand-in for ``libnvidia-ml.so.1`` (8 GPUs, every field
supported), exporting OTLP/HTTP to a local receiver and serving /metrics that is scraped once a second
(``--scrape-every 15`` for Prometheus's common setting: each scrape costs ~4-5 ms on the 2-core CI machine).

1. ``realtime``: the ``stacklens-agent`` process at ``--interval 100ms`` for ``--seconds``; its CPU
   time over wall time (utime+stime from /proc), side by side with the same process at 1 s.
2. ``hour``: one hour of 100 ms cycles (36,000) run accelerated in one process with an injected
   clock; resident memory sampled along the way (a leak shows as growth, not only as a final value),
   with the export endpoint down for the middle third so the bounded buffer fills and drains.

    python -m benchmarks.agent_cpu_memory --seconds 30

Before/after on a shared, noisy machine: ``--compare TREE`` runs the agent of another source tree (e.g.
``git archive HEAD | tar -x -C /tmp/base``) alternating with this one's, ``--rounds`` times each, and
reports both medians (only the 100 ms runs)::

    python -m benchmarks.agent_cpu_memory --seconds 30 --rounds 4 --compare /tmp/base
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from benchmarks.nvml_call_overhead import REPO, machine, standard_script


class _Sink(BaseHTTPRequestHandler):
    received = 0
    down = False

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if _Sink.down:
            self.send_response(503)
            self.end_headers()
            return
        _Sink.received += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return


def _receiver() -> tuple[ThreadingHTTPServer, int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def _cpu_s(pid: int) -> float:
    return _cpu_s_of(Path(f"/proc/{pid}/stat"))


def _rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of each live thread of ``pid`` (threads that ended are only in the process's total)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out[int(task.name)] = _cpu_s_of(task / "stat")
    return out


def _cpu_s_of(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def realtime(env: dict[str, str], seconds: float, interval: str, port: int, *extra: str,
             tree: Path = REPO, scrape_every_s: float = 1.0) -> dict[str, Any]:
    """One agent process (of the source tree ``tree``) at ``interval`` for ``seconds``, its /metrics scraped every
    ``scrape_every_s`` (from the start): its CPU share."""
    free = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector.cli", "--interval", interval, "--otlp-endpoint", f"http://127.0.0.1:{port}",
         "--prometheus-port", str(free), "--prometheus-address", "127.0.0.1", "--log-level", "warning", *extra],
        env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(3.0)  # start-up (imports, NVML init) is not the steady state
        threads0 = _thread_cpu_s(proc.pid)
        cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
        end = t0 + seconds
        next_scrape = t0 + scrape_every_s
        while time.monotonic() < end:
            time.sleep(max(0.0, min(next_scrape, end) - time.monotonic()))
            if time.monotonic() < next_scrape:
                continue
            next_scrape += scrape_every_s
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{free}/metrics", timeout=5).read()
        cpu1, t1 = _cpu_s(proc.pid), time.monotonic()
        threads1 = _thread_cpu_s(proc.pid)
        rss = _rss_mb(proc.pid)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    scraped = f" (/metrics every {scrape_every_s:g} s)" if scrape_every_s != 1.0 else ""
    return {"interval": interval + (" " + " ".join(extra) if extra else "") + scraped,
            "cpu_share_of_one_core": (cpu1 - cpu0) / (t1 - t0), "rss_mb": rss,
            # per thread that lived through the run (by thread id, in start order), share of one core
            "threads": [round((threads1[tid] - threads0[tid]) / (t1 - t0), 5)
                        for tid in sorted(threads1) if tid in threads0],
            "tree": str(tree), "stderr_tail": err.decode()[-300:]}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hour(port: int, cycles: int) -> dict[str, Any]:
    from collector.agent import Agent
    from collector.cli import OtlpSink, PrometheusSink
    from collector.export.otlp_encode import OtlpMetricsEncoder, ResourceInfo
    from collector.export.otlp_transport import HttpTransport, OtlpConfig
    from collector.export.prometheus import PrometheusExposition
    from collector.export.queue import ExportQueue
    from collector.host import HostSource
    from collector.nvml.source import NvmlGpuSource

    queue = ExportQueue(HttpTransport(OtlpConfig(f"http://127.0.0.1:{port}/v1/metrics")), backoff_max_s=1.0)
    queue.start()
    exposition = PrometheusExposition("bench-node")
    clock = [1_767_225_600_000_000_000]

    def now() -> int:
        clock[0] += 100_000_000
        return clock[0]

    # as the daemon at 100 ms: medium tier and host signals every tenth cycle, OTLP encoded once a second
    otlp = OtlpSink(OtlpMetricsEncoder(ResourceInfo("bench-node")), queue, snapshots_per_request=10)
    agent = Agent("bench-node", NvmlGpuSource(clock_ns=now, xid_events=False, interval_s=0.1),
                  [otlp, PrometheusSink(exposition)], HostSource(), None, interval_s=0.1, clock_ns=now)
    agent.open()
    trajectory = []
    start = time.process_time()
    for i in range(cycles):
        if i == cycles // 3:
            _Sink.down = True  # the correlator goes away for a third of the hour
        if i == 2 * cycles // 3:
            _Sink.down = False
        agent.cycle()
        if i % 10 == 0:
            exposition.render()  # a scrape per simulated second
        if i % (cycles // 12) == 0:
            trajectory.append({"cycle": i, "rss_mb": round(_rss_mb(), 1), "queued_mb": round(
                queue.stats.queued_bytes / 2**20, 1)})
        if i % 50 == 0:
            time.sleep(0)  # let the export thread run
    cpu = time.process_time() - start
    otlp.flush()
    queue.flush(30)
    trajectory.append({"cycle": cycles, "rss_mb": round(_rss_mb(), 1), "queued_mb": 0.0})
    stats = queue.stats
    agent.close()
    queue.stop()
    return {"cycles": cycles, "cpu_ms_per_cycle_incl_export": 1e3 * cpu / cycles, "rss_trajectory": trajectory,
            "final_rss_mb": trajectory[-1]["rss_mb"], "sent_snapshots": stats.sent_snapshots,
            "sent_batches": stats.sent_batches,
            "dropped_requests": stats.dropped_requests}


def compare(env: dict[str, str], seconds: float, port: int, other: Path, rounds: int,
            scrape_every_s: float = 1.0) -> dict[str, Any]:
    """The agent of ``other`` and of this tree at 100 ms, alternating (which goes first alternates too)."""
    shares: dict[str, list[float]] = {"other": [], "this": []}
    runs = []
    for i in range(rounds):
        order = (("other", other), ("this", REPO)) if i % 2 == 0 else (("this", REPO), ("other", other))
        for name, tree in order:
            r = realtime(env, seconds, "100ms", port, tree=tree, scrape_every_s=scrape_every_s)
            shares[name].append(100 * r["cpu_share_of_one_core"])
            runs.append({"which": name, **r})
            print(f"{name:6} {100 * r['cpu_share_of_one_core']:.2f} %  threads {r['threads']}", flush=True)
    return {"machine": machine(), "other": str(other), "runs": runs,
            "median_other_pct": statistics.median(shares["other"]),
            "median_this_pct": statistics.median(shares["this"]),
            "other_pct": shares["other"], "this_pct": shares["this"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--cycles", type=int, default=36_000)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the 100 ms run this many times (a shared machine is noisy: report every run)")
    parser.add_argument("--skip-hour", action="store_true", help="only the real-time runs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--scrape-every", type=float, default=1.0, metavar="S",
                        help="scrape /metrics every S seconds (default 1; Prometheus is commonly set to 15 or 30)")
    parser.add_argument("--compare", type=Path, metavar="TREE",
                        help="another source tree: its agent at 100 ms alternating with this one's, --rounds each")
    args = parser.parse_args()
    if "NVML_STANDIN_SCRIPT" not in os.environ:
        from tests.nvml_standin.script import build_standin, standin_env

        tmp = Path(tempfile.mkdtemp(prefix="stacklens-bench-"))
        lib = build_standin(tmp / "lib")
        script = standard_script(8).write(tmp / "script.txt")
        return subprocess.call([sys.executable, "-m", "benchmarks.agent_cpu_memory", *sys.argv[1:]],
                               env=standin_env(lib, script), cwd=REPO)
    server, port = _receiver()
    env = dict(os.environ)
    if args.compare is not None:
        compared = compare(env, args.seconds, port, args.compare.resolve(), max(1, args.rounds), args.scrape_every)
        server.shutdown()
        if args.json:
            args.json.write_text(json.dumps(compared, indent=2))
        print(json.dumps({k: v for k, v in compared.items() if k != "runs"}, indent=2))
        return 0
    runs = []
    for _ in range(max(1, args.rounds)):
        runs.append(realtime(env, args.seconds, "100ms", port, scrape_every_s=args.scrape_every))
        # the same without the XID thread (the stand-in's nvmlEventSetWait blocks on a condition, as the driver
        # blocks in the kernel: this shows the thread's own cost)
        runs.append(realtime(env, args.seconds, "100ms", port, "--no-xid-events", scrape_every_s=args.scrape_every))
    fast, no_xid = runs[0], runs[1]
    slow = realtime(env, args.seconds, "1s", port, scrape_every_s=args.scrape_every)
    accelerated = hour(port, args.cycles) if not args.skip_hour else None
    server.shutdown()
    result: dict[str, Any] = {"machine": machine(), "realtime_100ms": fast, "realtime_100ms_no_xid_thread": no_xid,
              "realtime_100ms_all_rounds": runs, "realtime_1s": slow, "accelerated_hour": accelerated}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"\n8 stand-in GPUs on {result['machine']['cpu']} ({result['machine']['cores']} cores)")
    print(f"{'cadence':26} {'CPU % of one core':>18} {'RSS MB':>8}")
    for r in (*runs, slow):
        print(f"{r['interval']:26} {100 * r['cpu_share_of_one_core']:18.2f} {r['rss_mb']:8.1f}")
    print(f"ratio 100ms/1s CPU: {fast['cpu_share_of_one_core'] / max(slow['cpu_share_of_one_core'], 1e-9):.1f}x")
    if accelerated is not None:
        print(f"accelerated hour: {accelerated['cycles']} cycles, {accelerated['cpu_ms_per_cycle_incl_export']:.3f} "
              f"ms CPU per cycle incl. export, RSS {[p['rss_mb'] for p in accelerated['rss_trajectory']]} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

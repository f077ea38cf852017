"""A real GPU workload for checking the agent on a machine with a GPU: bf16 matrix products (compute,
power, clocks, temperature) interleaved with pinned host<->device copies (PCIe traffic), in phases so the
signals move: idle, compute only, compute + copies, copies only, idle.

    python devtools/gpu_workload.py --phase-s 8
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--phase-s", type=float, default=8.0)
    parser.add_argument("--log", default="-")
    args = parser.parse_args()
    dev = torch.device("cuda")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    host = torch.empty(512 << 20, dtype=torch.uint8).pin_memory()  # 512 MiB
    devbuf = torch.empty_like(host, device=dev)
    copy_stream = torch.cuda.Stream()
    phases = [("idle", False, False), ("compute", True, False), ("compute+pcie", True, True),
              ("pcie", False, True), ("idle", False, False)]
    log = []
    for name, compute, copies in phases:
        start = time.time()
        n_mm = n_copy = 0
        while time.time() - start < args.phase_s:
            if compute:
                for _ in range(20):
                    a @ b
                n_mm += 20
            if copies:
                with torch.cuda.stream(copy_stream):
                    devbuf.copy_(host, non_blocking=True)
                    host.copy_(devbuf, non_blocking=True)
                n_copy += 2
            if not compute and not copies:
                time.sleep(0.05)
            torch.cuda.synchronize()
        elapsed = time.time() - start
        log.append({"phase": name, "start_s": start, "end_s": time.time(),
                    "tflops": n_mm * 2 * 8192**3 / elapsed / 1e12,
                    "pcie_gb_per_s_each_way": n_copy / 2 * (512 << 20) / elapsed / 1e9})
        print(json.dumps(log[-1]), flush=True)


if __name__ == "__main__":
    main()

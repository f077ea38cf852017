#!/usr/bin/env bash
# Runs the agent against a real GPU (device machine): the per-call benchmark, `--once` on the idle
# GPU, then the agent at 100 ms exporting OTLP/HTTP to a local receiver and serving /metrics while a
# PyTorch workload moves power, clocks, temperature and PCIe traffic. Results go to $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
for w in wheels/*.whl; do [ -e "$w" ] && python3 -m pip install -q --no-deps --no-index "$w" 2>&1 | tail -1; done
nvidia-smi --query-gpu=name,driver_version,pstate,power.limit,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max --format=csv > "$OUT/nvidia-smi.csv" 2>&1
python3 -c 'import pynvml,sys; print(sys.version); print("nvidia-ml-py", pynvml.__file__)' > "$OUT/versions.txt" 2>&1
python3 -m benchmarks.nvml_call_overhead --cycles 300 --repeat 1000 --json "$OUT/overhead.json" > "$OUT/overhead.txt" 2>&1
python3 -m collector.cli --once -o json > "$OUT/once_idle.json" 2> "$OUT/once_idle.err"
python3 -m collector.cli --once -o table > "$OUT/once_idle_table.txt" 2>&1
python3 devtools/otlp_http_receiver.py --port 14318 --out "$OUT/otlp_summary.json" --seconds 60 > "$OUT/receiver.log" 2>&1 &
RECV=$!
sleep 1
python3 devtools/gpu_workload.py --phase-s 9 > "$OUT/workload.jsonl" 2> "$OUT/workload.err" &
WL=$!
python3 -m collector.cli --interval 100ms --cycles 480 -o json --otlp-endpoint http://127.0.0.1:14318 \
  --prometheus-port 19400 --prometheus-address 127.0.0.1 > "$OUT/agent.jsonl" 2> "$OUT/agent.err" &
AG=$!
sleep 20; curl -s 127.0.0.1:19400/metrics > "$OUT/metrics_mid.txt"
python3 -m collector.cli --once -o table > "$OUT/once_busy_table.txt" 2>&1
wait $AG; echo "agent rc=$?" >> "$OUT/agent.err"
wait $WL; wait $RECV
ps -o pid,rss,cputime,cmd -p $$ > /dev/null
python3 devtools/summarize_run.py "$OUT" > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"; tail -20 "$OUT/overhead.txt"

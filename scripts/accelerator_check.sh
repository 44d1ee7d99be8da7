#!/usr/bin/env bash
# Accelerator check: run the device-parametrised tests on a GPU and the optimizer-step benchmark there,
# then print ONE summary line:
#   ACCELERATOR_CHECK device=cuda torch=2.13.0 gpu="NVIDIA H200" tests=P passed/F failed/S skipped \
#     bench_adamw_ms=gx_adapter:X,torch_fused:Y ... status=PASS|FAIL
#
# Usage: scripts/accelerator_check.sh [--cpu] [--quick]
#   --cpu    run the same tests and benchmark on CPU (what CI and a machine without a GPU can do)
#   --quick  a 1M-param benchmark instead of 25M (about a minute on CPU)
# Env: PYTHON (default: python3), GX_CHECK_OUT (a folder for the logs; default: a temporary one).
#
# The tests take their device from the `device` fixture (tests/conftest.py, GX_TEST_DEVICE):
#   tests/test_device.py               every transform vs CPU, no host sync in update, apply_if_finite
#                                      counters, the per-example engine, inductor fullgraph step
#   tests/test_compile_graph_breaks.py compiled steps (eager and inductor backends) vs eager
# Exit code: 0 when every test passed (skips allowed) and the benchmark ran, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
device=""
bench_args=(--threads 1)
for arg in "$@"; do
  case "$arg" in
    --cpu) device=cpu ;;
    --quick) bench_args+=(--quick) ;;
    *) echo "unknown argument $arg (use --cpu, --quick)" >&2; exit 2 ;;
  esac
done
if [ -z "$device" ]; then
  if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    device=cuda
  else
    echo "accelerator_check: no CUDA device visible to torch; run with --cpu for the CPU mode" >&2
    exit 1
  fi
fi
out="${GX_CHECK_OUT:-$(mktemp -d)}"
mkdir -p "$out"
start=$(date +%s)

export GX_TEST_DEVICE="$device"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$py" -m pytest -q -p no:cacheprovider -rfEs \
  tests/test_device.py tests/test_compile_graph_breaks.py > "$out/tests.txt" 2>&1
tests_rc=$?
tail -n 25 "$out/tests.txt"
counts=$(grep -Eo '[0-9]+ (passed|failed|skipped|error|errors)' "$out/tests.txt" | tail -n 4 | awk '{printf "%s %s/", $1, $2}')

PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$py" benchmarks/optimizer_step.py --device "$device" \
  --configs "adamw:gx_adapter,adamw:gx_eager,adamw:torch_foreach,adamw:torch_fused,clip+adamw:gx_adapter,clip+adamw:torch_fused" \
  --json "$out/bench.json" "${bench_args[@]}" > "$out/bench.txt" 2>&1
bench_rc=$?
tail -n 20 "$out/bench.txt"
bench=$("$py" - "$out/bench.json" <<'PY'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except Exception as e:  # benchmark failed before writing
    print(f"unavailable({type(e).__name__})"); sys.exit()
rows = data.get("results", data) if isinstance(data, dict) else data
items = rows.items() if isinstance(rows, dict) else ((r.get("key"), r) for r in rows)
parts = [f"{k}:{r['median_ms']:.2f}" for k, r in items if isinstance(r, dict) and "median_ms" in r]
print(",".join(parts) or "none")
PY
)
gpu=$("$py" -c "import torch; print(torch.cuda.get_device_name(0) if '$device' == 'cuda' else 'none')" 2>/dev/null)
torch_v=$("$py" -c "import torch; print(torch.__version__)")
status=PASS
if [ "$tests_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ]; then status=FAIL; fi
echo "ACCELERATOR_CHECK device=$device torch=$torch_v gpu=\"$gpu\" tests=${counts%/} bench_ms=$bench" \
  "time=$(( $(date +%s) - start ))s logs=$out status=$status"
[ "$status" = PASS ]

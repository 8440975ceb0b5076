#!/usr/bin/env bash
# One check for a machine with a GPU, installing nothing (the lent image has torch and triton
# but no DALI, flash-attn or PyAV): CUDA kernel and attention parity tests, bench.kernels and
# bench.throughput at paper size, then a summary. Under 8 minutes (stage limits sum to 475 s; on
# an H200: tests 95 s, bench.kernels 45 s before it also profiled device time and the tests grew;
# bench.throughput at 5 steps per timing ran past 210 s, hence 3); a stage may also use the
# seconds the earlier ones left unused; results are copied to $OUT after each stage, so a run
# cut short keeps what it measured.
#   FASTMAVIL_COMMIT=<sha> bash bench/gpu_check.sh   # from the repository root; results in
#                                                    # bench/results/ (the sha: a copied tree's
#                                                    # git metadata can be stale)
#   FASTMAVIL_COMMIT=<sha> bash bench/gpu_check.sh extra
#       the follow-up measurements instead, under 9.4 minutes (one device call): the same
#       tests and bench.kernels, then R4 with compiled blocks (--compile), the curriculum
#       views of R1/R4/R3 with the FLOPs batch rule (--batch-rule flops) and bench.kernels in
#       training's setting (--dtype amp), most decisive first
set -uo pipefail
mode=${1:-default}
case $mode in default|extra) ;; *) echo "usage: bash bench/gpu_check.sh [extra]" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
out=${OUT:-bench/results}
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
status=()
slack=0  # seconds the stages so far left unused (or overran): the next stage gets (or pays) them

run() {  # name, timeout seconds (plus the slack, at least 1), command...
  local name=$1 limit=$(($2 + slack))
  shift 2
  limit=$((limit < 1 ? 1 : limit))
  local start=$SECONDS
  echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"  # KILL 10 s after a TERM left unheeded
  local rc=${PIPESTATUS[0]} used=$((SECONDS - start))
  slack=$((limit - used))
  status+=("$(printf '%-34s rc=%-3s %4ss' "$name" "$rc" "$used")")
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$log"
started=$(mktemp)  # records written after this are this run's
trap 'rm -f "$started"' EXIT
keep() {  # the device tool returns what lands under $OUT (at most 8 files): this run's records
  [ "$out" = "bench/results" ] && return 0
  find bench/results -maxdepth 1 -type f -newer "$started" \
    \( -name 'kernels-*.csv' -o -name 'throughput-*-base*.json' -o -name 'throughput-*-base*.png' \
    -o -name 'profile-*.txt' \) -exec cp {} "$out"/ \;
  return 0
}
# Triton compiles each kernel variant once per process: pytest-xdist (when present) spreads the
# compiles over the cores.
workers=$(python -c "import xdist" 2>/dev/null && echo "-n 12")
run "kernel + attention tests (CUDA)" 130 python -m pytest -q -p no:cacheprovider $workers \
  tests/kernels tests/test_attention.py tests/data/test_fbank.py
run "bench.kernels" 90 python -m bench.kernels
keep
if [ "$mode" = extra ]; then
  run "bench.throughput (base, compile)" 150 python -m bench.throughput --size base --steps 3 \
    --compile --no-curriculum configs/r4.toml
  keep
  # curriculum views only (the batch rule leaves the comparison unchanged): R1's single shape,
  # the projection's baseline, then R4 and R3; each view is saved as soon as it is measured
  run "bench.throughput (base, flops rule)" 130 python -m bench.throughput --size base --steps 3 \
    --no-compare --batch-rule flops configs/r1.toml configs/r4.toml configs/r3.toml
  keep
  run "bench.kernels (amp)" 60 python -m bench.kernels --dtype amp
  keep
else
  run "bench.throughput (base)" 255 python -m bench.throughput --size base --steps 3
  keep
fi
echo "=== summary" | tee -a "$log"
printf '%s\n' "${status[@]}" | tee -a "$log"
python - "$out" <<'PY' 2>&1 | tee -a "$log"
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("throughput-*-base*.json")):
    record = json.loads(path.read_text())
    print(path.name)
    for r in record["configs"]:
        f = r["fast"]
        mfu = "-" if f["mfu"] is None else f"{f['mfu']:.1%}"
        print(f"{pathlib.Path(r['config']).stem:6s} speedup {r['speedup']:.2f}x  fast "
              f"{f['samples_per_s']:.1f} samples/s  MFU {mfu}")
    view = record["curriculum"].get("r4", {})
    if view:
        def show(key, text):  # "-" where an older record lacks the key
            return text.format(view[key]) if key in view else "-"
        print(f"R4 ({view.get('batch_rule', 'tokens')} rule) step-time spread "
              f"{show('step_ms_spread', '±{:.1%}')} (FLOPs {show('flops_spread', '±{:.1%}')}); "
              f"epoch vs R1 {show('relative_to_r1', '{:.2f}x')}, "
              f"vs R3 {show('relative_to_r3', '{:.2f}x')}")
PY

#!/usr/bin/env bash
# One-shot check of lora-da on a bare GPU machine (see README.md, "GPU").
#
#   bench/device_prepare.sh                  # here: the cp312 wheel + scipy-openblas32 into .whl/
#   OUT=/some/dir bench/device_check.sh      # there, from the repository root, with .whl/ carried
#   bench/device_check.sh --dry-run          # here, on a CPU: the same steps with tiny sizes
#
# Everything goes under $OUT (a temporary folder if unset), at most 8 files:
# log.txt (every step's output, appended), summary.txt (one line per step),
# junit_kernels.xml and junit_cuda.xml (the GPU tests), kfac_kernels.json,
# lobpcg.md and init_overhead.md (the benchmarks). Each step runs under its own
# `timeout`, and the whole script stops starting steps after $DEVICE_CHECK_BUDGET
# seconds (default 470, so it ends within 8 minutes), always keeping time for the
# offset-overflow probe, which runs last in its own process (an illegal address
# there kills only its CUDA context). A failed step does not stop the others;
# the exit status is 1 when any step failed or timed out.
#
# Options: --dry-run (CPU, tiny sizes; the steps that need CUDA are skipped, saying
# so); --wheels DIR (default .whl: the wheels to install with pip --no-index;
# a dry run installs wheels only when --wheels is given). $PYTHON picks the interpreter
# (default python3).
set -u
cd "$(dirname "$0")/.."

DRY=0
WHEELS=.whl
WHEELS_GIVEN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS="${2:?--wheels needs a folder}"; WHEELS_GIVEN=1; shift ;;
    --wheels=*) WHEELS="${1#--wheels=}"; WHEELS_GIVEN=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$1' (use --dry-run, --wheels DIR)" >&2; exit 2 ;;
  esac
  shift
done

OUT="${OUT:-$(mktemp -d /tmp/device_check.XXXXXX)}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
PY="${PYTHON:-python3}"
export DRY WHEELS OUT PY  # read by the steps written as functions (run by timeout in a child bash)
BUDGET="${DEVICE_CHECK_BUDGET:-470}"
PROBE_RESERVE=60  # seconds kept for the last step, the probe
export PYTHONUNBUFFERED=1
START=$SECONDS
FAILED=0

log() { printf '%s\n' "$@" | tee -a "$LOG"; }  # one line per argument

record() {  # name status seconds note
  printf '%-22s %-8s %5ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY" >>"$LOG"
  echo "== $1: $2 (${3}s) $4"
}

# step NAME LIMIT RESERVE COMMAND...: run COMMAND under timeout, output appended to the log.
step() {
  local name="$1" limit="$2" reserve="$3"
  shift 3
  local left=$((BUDGET - (SECONDS - START) - reserve))
  if [ "$left" -lt 10 ]; then
    log "" "=== $name: not run, the script's time budget (${BUDGET}s) is spent"
    record "$name" SKIP 0 "time budget spent"
    FAILED=1
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "" "=== $name (limit ${limit}s) $(date -u +%H:%M:%S): $*"
  local begin=$SECONDS
  if [ "$(type -t "$1")" = function ]; then  # a step written as a function of this script
    timeout -k 10 "$limit" bash -c '"$@"' step "$@" >>"$LOG" 2>&1
  else
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  fi
  local rc=$?
  local took=$((SECONDS - begin))
  if [ $rc -eq 0 ]; then
    record "$name" PASS "$took" ""
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "$name" TIMEOUT "$took" "stopped after ${limit}s"
    FAILED=1
  else
    record "$name" FAIL "$took" "exit status $rc"
    FAILED=1
  fi
  return $rc
}

skip() {  # name reason
  log "" "=== $1: skipped: $2"
  record "$1" SKIP 0 "$2"
}

has_cuda() { [ "$DRY" -eq 0 ]; }

if [ "$DRY" -eq 1 ]; then
  export TRITON_INTERPRET=1  # the Triton kernels run under the interpreter on the CPU
  log "device_check.sh --dry-run: CPU, tiny sizes; steps that need CUDA are skipped; output in $OUT"
else
  log "device_check.sh: output in $OUT; budget ${BUDGET}s"
fi

# 1. environment
environment() {
  date -u
  uname -a
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  elif [ "$DRY" -eq 1 ]; then
    echo "nvidia-smi: not found (dry run: no GPU expected)"
  else
    echo "nvidia-smi: not found"; return 1
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -2
  echo "cpus: $(nproc); $(free -g 2>/dev/null | sed -n 2p)"
  df -h /tmp | tail -1
  "$PY" - "$DRY" <<'EOF'
import importlib.metadata, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "numpy", "transformers", "peft", "pytest", "pytest-xdist", "hypothesis",
             "safetensors", "tqdm", "scipy-openblas32", "scikit-build-core", "pybind11", "lora-da"):
    try:
        print(name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print(name, "not installed")
import torch
print("torch.version.cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability(), f"{torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB")
elif sys.argv[1] == "0":
    sys.exit("no CUDA device visible to torch")
EOF
}
export -f environment
step environment 30 $PROBE_RESERVE environment

# 2. install from the carried wheels (pip, no index, no dependencies: the machine has the rest)
SITE="${DEVICE_CHECK_SITE:-/tmp/lora_da_site}"
[ "$DRY" -eq 1 ] && SITE="$(mktemp -d /tmp/device_check_site.XXXXXX)"
export SITE
install_wheels() {
  ls -l "$WHEELS"/*.whl || { echo "no wheels in $WHEELS (run bench/device_prepare.sh here first, and carry $WHEELS)"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl || return 1
  PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$SITE" "$DRY" <<'EOF'
import os, sys
site, dry = sys.argv[1], sys.argv[2] == "1"
import lora_da
print("lora_da from", lora_da.__file__)
info = lora_da.build_info()
print("build_info", info)
if not dry:
    if not os.path.realpath(lora_da.__file__).startswith(os.path.realpath(site)):
        sys.exit(f"lora_da was imported from {lora_da.__file__}, not from the installed wheel in {site}")
    if not info["cuda"]:
        sys.exit("the installed lora_da._core has no CUDA backend (build the wheel with LORA_DA_CUDA=ON)")
EOF
}
export -f install_wheels
if [ "$DRY" -eq 1 ] && [ "$WHEELS_GIVEN" -eq 0 ]; then
  skip install "dry run without --wheels: using the lora_da importable here"
elif step install 90 $PROBE_RESERVE install_wheels; then
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# 3. smoke test: compiled LOBPCG fp32/fp64 on the dense, operator and fallback paths; one Triton call
if has_cuda; then
  step smoke 90 $PROBE_RESERVE "$PY" bench/device_smoke.py --device cuda
else
  step smoke 90 $PROBE_RESERVE "$PY" bench/device_smoke.py --device cpu
fi

# 4. the GPU tests: every kernel test (compiled, autotuned kernels) and the other CUDA-marked tests
XDIST=""
if has_cuda && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 4"; fi
if has_cuda; then
  # shellcheck disable=SC2086
  step tests_kernels 150 $PROBE_RESERVE "$PY" -m pytest tests/test_kernels_*.py -q -p no:cacheprovider $XDIST \
    --junitxml="$OUT/junit_kernels.xml"
  # shellcheck disable=SC2086
  step tests_cuda 60 $PROBE_RESERVE "$PY" -m pytest tests -m cuda -q -p no:cacheprovider $XDIST \
    --ignore-glob='*test_kernels_*' --junitxml="$OUT/junit_cuda.xml"
else
  skip tests_kernels "dry run: the kernel tests need CUDA here (under the interpreter they take minutes)"
  step tests_cuda 60 $PROBE_RESERVE "$PY" -m pytest tests/test_native.py -q -p no:cacheprovider -k build_info \
    --junitxml="$OUT/junit_cuda.xml"
fi

# 5. Triton statistics kernels against a measured bf16 matmul (Llama-7B shapes, 262144 tokens)
if has_cuda; then
  kfac_bench() {
    "$PY" bench/bench_kfac_kernels.py --save || return 1
    local saved
    saved=$(ls -t bench/results/kfac_kernels_*.json 2>/dev/null | head -1)
    [ -n "$saved" ] && cp "$saved" "$OUT/kfac_kernels.json"
  }
  export -f kfac_bench
  step kfac_kernels 80 $PROBE_RESERVE kfac_bench
else
  step kfac_kernels 60 $PROBE_RESERVE "$PY" bench/bench_kfac_kernels.py --smoke
fi

# 6. init overhead on a Llama-7B-shaped model: ours vs the published recipe vs one plain forward+backward
if has_cuda; then
  step init_overhead 180 $PROBE_RESERVE "$PY" bench/bench_init_overhead.py --case llama7b-shaped --layers 2 \
    --samples 256 --length 1024 --output "$OUT/init_overhead.md"
else
  step init_overhead 90 $PROBE_RESERVE "$PY" bench/bench_init_overhead.py --case llama7b-shaped --device cpu \
    --layers 1 --hidden 64 --intermediate 172 --heads 4 --vocab 256 --samples 8 --length 16 \
    --output "$OUT/init_overhead.md"
fi

# 7. the batched LOBPCG benchmark (on the GPU where the script takes --device)
if "$PY" bench/bench_lobpcg.py --help 2>/dev/null | grep -q -- "--device"; then
  LOBPCG_ARGS=(--sizes 576 4096 --batch 30 --device cuda)
  [ "$DRY" -eq 1 ] && LOBPCG_ARGS=(--sizes 64 --batch 2 --device cpu)
else
  log "bench_lobpcg.py takes no --device: it runs on the CPU (n = 576 only)"
  LOBPCG_ARGS=(--sizes 576 --batch 30)
  [ "$DRY" -eq 1 ] && LOBPCG_ARGS=(--sizes 64 --batch 2)
fi
step lobpcg 60 $PROBE_RESERVE "$PY" bench/bench_lobpcg.py "${LOBPCG_ARGS[@]}" --output "$OUT/lobpcg.md"

# 8. offset-overflow probe (T = 200000, d = 11008: offsets past 2^31), last, in its own process
if has_cuda; then
  step offset_probe 90 0 "$PY" bench/offset_probe.py --tokens 200000 --d-in 11008 --d-out 4096 --device cuda
else
  step offset_probe 60 0 "$PY" bench/offset_probe.py --tokens 300 --d-in 70 --d-out 45 --device cpu
fi

[ "$DRY" -eq 1 ] && rm -rf "$SITE"
count=$(find "$OUT" -type f | wc -l)
{
  echo ""
  echo "=== summary ($((SECONDS - START))s in all; $count files under \$OUT)"
  cat "$SUMMARY"
} | tee -a "$LOG"
if [ "$count" -gt 8 ]; then
  echo "device_check.sh: $count files under $OUT, more than the 8 that come back" | tee -a "$LOG"
  FAILED=1
fi
exit $FAILED

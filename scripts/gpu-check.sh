#!/usr/bin/env bash
# kvvm's checks that need an NVIDIA GPU, in one run of under 8 minutes.
#
#   scripts/gpu-check.sh [RESULTS_DIR]        (default: target/gpu-check)
#
# Assumes only a CUDA driver (libcuda.so.1). Uses, when present:
#   - cargo (a Rust toolchain): builds target/release/kvvm and libkvvm.so, and runs the test
#     suite with KVVM_BACKEND=cuda, the #[ignore]d GPU tests included. Without cargo the script
#     uses a prebuilt target/release/kvvm (and target/release/libkvvm.so) if they exist, and
#     records the test steps as skipped.
#   - NVRTC (for the attention kernels): KVVM_NVRTC_PATH if set, else the nvidia-cuda-nvrtc
#     wheel that PyTorch installs, else the dynamic loader's search.
#   - python3 with torch (CUDA) and the kvvm Python package (python/kvvm) for the DLPack check.
#
# Every step runs under a timeout fitted to a global deadline, its output goes to
# RESULTS_DIR/<step>.log (benchmarks also to RESULTS_DIR/bench-<name>.json), and a failing step
# does not stop the next one. The summary table (RESULTS_DIR/summary.txt) is printed last. The
# exit status is 0 if every step that ran passed, 1 otherwise. GPU_CHECK_BUDGET_S (default 450)
# sets the deadline in seconds; PYTHON (default python3) the interpreter.

set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
OUT=${1:-target/gpu-check}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)

BUDGET_S=${GPU_CHECK_BUDGET_S:-450} # keeps the whole run under 8 minutes
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
PYTHON=${PYTHON:-python3}
KVVM="$ROOT/target/release/kvvm"
LIB="$ROOT/target/release/libkvvm.so"
export KVVM_BACKEND=cuda
export RUST_BACKTRACE=1

SUMMARY_ROWS=()
FAILED=0

have() { command -v "$1" >/dev/null 2>&1; }

# record NAME STATUS SECONDS NOTE
record() {
    SUMMARY_ROWS+=("$(printf '%-26s %-8s %6s  %s' "$1" "$2" "$3" "$4")")
    if [ "$2" = "FAIL" ] || [ "$2" = "TIMEOUT" ]; then
        FAILED=1
    fi
}

# skip NAME WHY
skip() {
    record "$1" "skip" "-" "$2"
    echo "== $1: skipped ($2)"
}

# step NAME MAX_SECONDS COMMAND... : runs COMMAND with a timeout of at most MAX_SECONDS (less if
# the deadline is nearer), output to $OUT/NAME.log; records the outcome.
step() {
    local name=$1 max=$2
    shift 2
    local now left limit rc t0 t1 status
    now=$(date +%s)
    left=$((DEADLINE - now))
    limit=$((max < left ? max : left))
    if [ "$limit" -lt 5 ]; then
        skip "$name" "out of time"
        return 0
    fi
    echo "== $name (timeout ${limit}s): $*"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    t1=$(date +%s)
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status=FAIL ;;
    esac
    record "$name" "$status" "$((t1 - t0))" "rc=$rc, $name.log"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
    return 0
}

# bench NAME ARGS... : kvvm bench NAME --backend cuda --json ARGS, JSON to bench-NAME.json.
# A benchmark without a --backend option (bench step drives the host backend only) runs without
# it, and the summary says so.
bench() {
    local name=$1 backend=(--backend cuda)
    shift
    if ! "$KVVM" bench "$name" --help 2>/dev/null | grep -q -- '--backend'; then
        backend=()
    fi
    step "bench-$name" 90 "$KVVM" bench "$name" "${backend[@]}" --json "$@"
    if [ ${#backend[@]} -eq 0 ]; then
        SUMMARY_ROWS[-1]+=" (no --backend option: its default backend)"
    fi
    # The JSON object is the last line of the log (warnings go before it).
    grep '^{' "$OUT/bench-$name.log" | tail -n 1 >"$OUT/bench-$name.json" || true
}

# ---------------------------------------------------------------------------------------------
echo "kvvm gpu-check: results in $OUT, budget ${BUDGET_S}s"
{
    date -u
    uname -a
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi unavailable"
    git -C "$ROOT" rev-parse HEAD 2>&1 || true
} >"$OUT/environment.txt"
cat "$OUT/environment.txt"

# NVRTC from PyTorch's wheel, unless the caller named one.
if [ -z "${KVVM_NVRTC_PATH:-}" ] && have "$PYTHON"; then
    nvrtc=$("$PYTHON" -c 'import os, nvidia.cuda_nvrtc as m; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null || true)
    if [ -n "$nvrtc" ] && [ -d "$nvrtc" ]; then
        export KVVM_NVRTC_PATH="$nvrtc"
        echo "KVVM_NVRTC_PATH=$KVVM_NVRTC_PATH (PyTorch's nvidia-cuda-nvrtc wheel)"
    fi
fi

# Build (or find) the binary and the shared library.
if have cargo; then
    step build 200 cargo build --release --bin kvvm --lib
else
    skip build "no cargo; using a prebuilt target/release/kvvm if present"
fi

if [ -x "$KVVM" ]; then
    step info 30 "$KVVM" info
    step info-json 30 "$KVVM" info --json --backend cuda
    bench map
    bench step
    bench swap
    bench attention
else
    for s in info info-json bench-map bench-step bench-swap bench-attention; do
        skip "$s" "no $KVVM"
    done
fi

# torch reads the cache's K/V views through DLPack and feeds them to SDPA unchanged.
if ! have "$PYTHON"; then
    skip torch-dlpack "no $PYTHON"
elif [ ! -f "$ROOT/python/kvvm/__init__.py" ]; then
    skip torch-dlpack "no python/kvvm package in this tree"
elif [ ! -f "$LIB" ]; then
    skip torch-dlpack "no $LIB"
else
    step torch-dlpack 90 env KVVM_LIBRARY="$LIB" PYTHONPATH="$ROOT/python" \
        "$PYTHON" "$ROOT/scripts/gpu/torch_dlpack_check.py" --backend cuda --json-out "$OUT/torch-dlpack.json"
fi

# The test suite on the CUDA backend: the #[ignore]d GPU tests first (they are what only this
# machine can run), then everything else.
if have cargo; then
    step tests-gpu-ignored 200 cargo test --workspace --no-fail-fast -- --ignored
    step tests-all 200 cargo test --workspace --no-fail-fast
else
    skip tests-gpu-ignored "no cargo"
    skip tests-all "no cargo"
fi

# ---------------------------------------------------------------------------------------------
{
    echo
    echo "kvvm gpu-check summary ($(($(date +%s) - START))s, results in $OUT)"
    printf '%-26s %-8s %6s  %s\n' "step" "status" "secs" "details"
    for row in "${SUMMARY_ROWS[@]}"; do
        echo "$row"
    done
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"
exit "$FAILED"

#!/usr/bin/env bash
# kvvm's checks on a GPU machine, in one run of at most 300 s, without a Rust toolchain:
#
#   scripts/gpu-check.sh [OUT_DIR] [COMMIT]
#
# OUT_DIR: where the results go (default: $OUT, else target/gpu-check). COMMIT: recorded in the
# results (default: the bundle's COMMIT file, else `git rev-parse HEAD`).
#
# Runs what scripts/gpu-prepare.sh bundled (GPU_BUNDLE, default gpu-bundle/ next to this
# script's folder); without a bundle, target/release/kvvm and libkvvm.so if they exist. In order:
#   1. the GPU tests (the bundled test executables, #[ignore]d GPU tests included);
#   2. `kvvm info`, then `kvvm bench map | step | swap | attention --backend cuda` at sizes that
#      fit in a few seconds each (a bench exits non-zero on wrong outputs);
#   3. the torch DLPack check (python3 with torch and CUDA; scripts/gpu/torch_dlpack_check.py).
# After every step it rewrites OUT_DIR/gpu-results.md: card, driver, CUDA / NVRTC / torch
# versions, the commit, and a table of the steps with their key figures. Besides it, at most 6
# files: gpu-tests.log, bench.log, bench.jsonl, info.json, torch-dlpack.log, torch-dlpack.json.
#
# Exit status: 0 if at least one GPU step ran and none failed; 1 if a step failed or timed out;
# 2 if no GPU step could run (no driver or device, no binaries): the results say why.
#
# Environment: GPU_CHECK_BUDGET_S (default 270) the deadline; PYTHON (default python3);
# KVVM_NVRTC_PATH (default: the NVRTC of PyTorch's NVIDIA wheels, nvidia/cu13/lib or
# nvidia/cuda_nvrtc/lib); KVVM_LIBCUDA to run against another driver library (tests use the
# fake driver of tests/fixtures/fakecuda.c: kernel steps are then skipped).

set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
OUT=${1:-${OUT:-target/gpu-check}}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
BUNDLE=${GPU_BUNDLE:-$ROOT/gpu-bundle}
BUDGET_S=${GPU_CHECK_BUDGET_S:-270}
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
PYTHON=${PYTHON:-python3}
RESULTS="$OUT/gpu-results.md"
export KVVM_BACKEND=cuda
export RUST_BACKTRACE=1

if [ -x "$BUNDLE/bin/kvvm" ]; then
    KVVM="$BUNDLE/bin/kvvm"
    LIB="$BUNDLE/lib/libkvvm.so"
    PYPKG="$BUNDLE/python"
    CHECKS="$BUNDLE/scripts/gpu"
else
    KVVM="$ROOT/target/release/kvvm"
    LIB="$ROOT/target/release/libkvvm.so"
    PYPKG="$ROOT/python"
    CHECKS="$ROOT/scripts/gpu"
fi
COMMIT=${2:-}
if [ -z "$COMMIT" ] && [ -f "$BUNDLE/COMMIT" ]; then COMMIT=$(head -n 1 "$BUNDLE/COMMIT"); fi
if [ -z "$COMMIT" ]; then COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown); fi

have() { command -v "$1" >/dev/null 2>&1; }
have_python() { have "$PYTHON"; }

ROWS=()
FAILED=0
GPU_STEPS=0
WHY_NONE=""
CARD="-" DRIVER="-" CUDA="-" NVRTC="-" TORCH="-" FAKE=0

write_results() {
    {
        echo "# kvvm GPU check"
        echo
        echo "| | |"
        echo "| --- | --- |"
        echo "| card | $CARD |"
        echo "| driver | $DRIVER |"
        echo "| CUDA (driver) | $CUDA |"
        echo "| NVRTC | $NVRTC |"
        echo "| torch | $TORCH |"
        echo "| commit | \`$COMMIT\` |"
        echo "| started | $(date -u -d "@$START" '+%Y-%m-%d %H:%M:%S UTC' 2>/dev/null || echo "$START") |"
        echo "| elapsed | $(($(date +%s) - START)) s of $BUDGET_S s |"
        echo
        echo "| step | status | s | key figures |"
        echo "| --- | --- | --- | --- |"
        for r in "${ROWS[@]}"; do echo "$r"; done
        echo
        if [ -n "$WHY_NONE" ]; then
            echo "**No GPU step ran: $WHY_NONE**"
        elif [ "$FAILED" -ne 0 ]; then
            echo "**Failed:** see the rows marked FAIL or TIMEOUT and their logs."
        fi
    } >"$RESULTS"
}

# record NAME STATUS SECONDS FIGURES
record() {
    ROWS+=("| $1 | $2 | $3 | $4 |")
    case $2 in
        FAIL | TIMEOUT) FAILED=1 ;;
    esac
    write_results
}

skip() {
    echo "== $1: skipped ($2)"
    record "$1" skip - "$2"
}

# run_step NAME MAX_S LOG COMMAND... : runs COMMAND with a timeout fitted to the deadline,
# appending its output to LOG; sets STEP_RC and STEP_S; returns 1 if there was no time left.
run_step() {
    local name=$1 max=$2 log=$3
    shift 3
    local left=$((DEADLINE - $(date +%s)))
    local limit=$((max < left ? max : left))
    if [ "$limit" -lt 5 ]; then
        skip "$name" "out of time"
        return 1
    fi
    echo "== $name (timeout ${limit}s): $*"
    echo "===== $name: $* (timeout ${limit}s)" >>"$log"
    local t0
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
    STEP_RC=$?
    STEP_S=$(($(date +%s) - t0))
    echo "===== $name: exit $STEP_RC after ${STEP_S}s" >>"$log"
    return 0
}

status_of() {
    case $1 in
        0) echo ok ;;
        124 | 137) echo TIMEOUT ;;
        *) echo FAIL ;;
    esac
}

# figures BENCH JSON_FILE : the key figures of one bench's JSON object, as a short phrase.
figures() {
    have_python || {
        echo "-"
        return
    }
    "$PYTHON" - "$1" "$2" <<'EOF' 2>/dev/null || echo "-"
import json, sys
name, path = sys.argv[1], sys.argv[2]
try:
    d = json.loads(open(path).read().strip().splitlines()[-1])
except Exception:
    print("-"); sys.exit(0)
def g(*keys):
    x = d
    for k in keys:
        if not isinstance(x, dict) or k not in x:
            return None
        x = x[k]
    return x
def f(v, scale=1.0, fmt="{:.1f}"):
    return "-" if not isinstance(v, (int, float)) else fmt.format(v * scale)
if name == "map":
    s = (f"kvvm {f(g('kvvm_run_ns_per_page'), 1e-3)} µs/page (map {f(g('kvvm_run_map_ns_per_page'), 1e-3)}, "
         f"unmap {f(g('kvvm_run_unmap_ns_per_page'), 1e-3)}), vAttention-style {f(g('vattention_ns_per_page'), 1e-3)} µs/page")
    if g("zero_page_cost_ns_per_page") is not None:
        s += f", zero page costs {f(g('zero_page_cost_ns_per_page'), 1e-3, '{:.2f}')} µs/page"
    c = g("cuda_calls_per_page")
    if isinstance(c, dict):
        for mode in ("zero_page", "no_zero_page"):
            m = c.get(mode) or {}
            calls = lambda d: "+".join(f"{(d or {}).get(k, 0):g}" for k in ("cuMemMap", "cuMemUnmap", "cuMemSetAccess"))
            s += f"; {mode} calls/page map {calls(m.get('map'))} unmap {calls(m.get('unmap'))} (cuMemMap+cuMemUnmap+cuMemSetAccess)"
elif name == "swap":
    s = (f"coarse out {f(g('coarse_out_gbps'))} / in {f(g('coarse_in_gbps'))} GB/s, per-block "
         f"{f(g('fine_out_gbps'))} / {f(g('fine_in_gbps'))} GB/s, plain copy {f(g('limit_gbps'))} GB/s")
    if g("verified_bytes") is not None:
        s += f", {g('verified_bytes')} bytes verified"
elif name == "step":
    s = "; ".join(
        f"{lay}: p99 {f(g(lay, 'async_p99_ns'), 1e-3)} µs with the mapper vs {f(g(lay, 'inline_p99_ns'), 1e-3)} µs inline"
        for lay in ("interleaved", "per-layer") if isinstance(g(lay), dict))
    for lay in ("interleaved", "per-layer"):
        if g(lay, "deferred_unmaps"):
            s += (f"; {lay}: {g(lay, 'deferred_unmaps')} deferred unmaps waited {f(g(lay, 'deferred_unmap_mean_ns'), 1e-3)} µs "
                  f"mean, {f(g(lay, 'deferred_unmap_max_ns'), 1e-3)} µs max for their fence")
else:
    nums = [(k, v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    s = ", ".join(f"{k} {v:.4g}" for k, v in nums[:6])
print(s or "-")
EOF
}

: >"$OUT/gpu-tests.log"
: >"$OUT/bench.log"
: >"$OUT/bench.jsonl"
write_results

# ---- preflight: binaries, driver and device ----------------------------------------------------
if [ ! -x "$KVVM" ]; then
    WHY_NONE="no kvvm binary ($BUNDLE/bin/kvvm or target/release/kvvm): run scripts/gpu-prepare.sh on a machine with Rust and bring gpu-bundle/ along"
    record preflight FAIL - "$WHY_NONE"
    echo "gpu-check: $WHY_NONE" >&2
    exit 2
fi
if "$KVVM" info --json --backend cuda >"$OUT/info.json" 2>&1; then
    :
else
    WHY_NONE="no usable CUDA device: $(tail -n 1 "$OUT/info.json")"
    record preflight FAIL - "$WHY_NONE"
    echo "gpu-check: $WHY_NONE" >&2
    exit 2
fi
info() {
    have_python || return 0
    "$PYTHON" -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]).get(sys.argv[2], ""))' "$OUT/info.json" "$1" 2>/dev/null
}
CARD=$(info device_name)
[ "$CARD" = "kvvm fakecuda device" ] && FAKE=1
if have nvidia-smi && [ "$FAKE" -eq 0 ]; then
    q=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
    [ -n "$q" ] && CARD=$(echo "$q" | cut -d, -f1,3 | sed 's/,/ ·/')
    [ -n "$q" ] && DRIVER=$(echo "$q" | cut -d, -f2 | tr -d ' ')
    c=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -n 1)
    [ -n "$c" ] && CUDA=$c
fi
[ "$FAKE" -eq 1 ] && DRIVER="fake driver ($KVVM_LIBCUDA)"
d=$(info driver_version)
[ -n "$d" ] && [ "$CUDA" = "-" ] && CUDA=$d

# NVRTC from PyTorch's NVIDIA wheels, unless the caller named one; torch's version.
if have_python; then
    if [ -z "${KVVM_NVRTC_PATH:-}" ]; then
        nv=$("$PYTHON" - <<'EOF' 2>/dev/null
import os
try:
    import nvidia
except ImportError:
    raise SystemExit
for root in nvidia.__path__:
    for sub in ("cu13/lib", "cuda_nvrtc/lib"):
        d = os.path.join(root, sub)
        if any(f.startswith("libnvrtc.so") for f in (os.listdir(d) if os.path.isdir(d) else [])):
            print(d); raise SystemExit
EOF
        )
        [ -n "$nv" ] && export KVVM_NVRTC_PATH="$nv"
    fi
    NVRTC=$("$PYTHON" - <<'EOF' 2>/dev/null
import ctypes, os
p = os.environ.get("KVVM_NVRTC_PATH", "")
names = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
cands = ([os.path.join(p, n) for n in names] if os.path.isdir(p) else [p] if p else []) + names
for c in cands:
    try:
        lib = ctypes.CDLL(c)
    except OSError:
        continue
    a, b = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(a), ctypes.byref(b))
    print(f"{a.value}.{b.value} ({c})"); break
else:
    print("not found")
EOF
    )
    [ -z "$NVRTC" ] && NVRTC="-"
    TORCH=$("$PYTHON" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, "available" if torch.cuda.is_available() else "no device")' 2>/dev/null || echo "not installed")
else
    TORCH="no $PYTHON"
fi
write_results

# ---- 1. GPU tests ---------------------------------------------------------------------------------
if [ -f "$BUNDLE/MANIFEST" ]; then
    while read -r exe args; do
        [ -z "$exe" ] && continue
        name="test $(basename "$exe")"
        if [ "$FAKE" -eq 1 ] && [[ $exe == *kernels-gpu* ]]; then
            skip "$name" "the fake driver runs no kernels"
            continue
        fi
        # shellcheck disable=SC2086 # the manifest's arguments are words
        run_step "$name" 120 "$OUT/gpu-tests.log" "$BUNDLE/$exe" $args || continue
        summary=$(grep -E '^test result:' "$OUT/gpu-tests.log" | tail -n 1 | sed 's/^test result: //')
        GPU_STEPS=$((GPU_STEPS + 1))
        record "$name" "$(status_of "$STEP_RC")" "$STEP_S" "${summary:--}"
    done <"$BUNDLE/MANIFEST"
else
    skip "tests" "no test executables (no $BUNDLE/MANIFEST: run scripts/gpu-prepare.sh)"
fi

# ---- 2. info and benches --------------------------------------------------------------------------
record info ok 0 "$(head -c 300 "$OUT/info.json" | tr '\n|' ' /')"

# bench NAME ARGS... : `kvvm bench NAME --backend cuda --json ARGS`; the JSON line goes to
# bench.jsonl, the key figures to the table.
bench() {
    local name=$1
    shift
    run_step "bench $name" 60 "$OUT/bench.log" "$KVVM" bench "$name" --backend cuda --json "$@" || return 0
    local json="$OUT/.bench-$name.json"
    grep '^{' "$OUT/bench.log" | tail -n 1 >"$json"
    if [ "$STEP_RC" -eq 0 ]; then
        printf '{"bench":"%s","result":%s}\n' "$name" "$(cat "$json")" >>"$OUT/bench.jsonl"
    fi
    GPU_STEPS=$((GPU_STEPS + 1))
    local figs="-"
    [ "$STEP_RC" -eq 0 ] && figs=$(figures "$name" "$json")
    [ "$STEP_RC" -ne 0 ] && figs="exit $STEP_RC: $(grep -v '^{' "$OUT/bench.log" | grep -v '^=====' | tail -n 1 | head -c 200 | tr '|' '/')"
    rm -f "$json"
    record "bench $name" "$(status_of "$STEP_RC")" "$STEP_S" "$figs"
}

if [ "$FAKE" -eq 1 ]; then
    # The fake driver copies with memcpy under one lock: small sizes, same code paths.
    bench map --pages 32 --rounds 3
    bench step --slots 4 --steps 40 --max-tokens 1024 --compute-us 200 --churn-every 8 --device-work-mib 1
    bench swap --requests 2 --tokens 128 --rounds 1
else
    bench map --pages 256 --rounds 7
    bench step --slots 64 --steps 300 --max-tokens 4096 --churn-every 16 --device-work-mib 256
    bench swap --requests 8 --tokens 1024 --rounds 3
fi
if [ "$FAKE" -eq 1 ]; then
    skip "bench attention" "the fake driver runs no kernels"
else
    bench attention --batch 16 --context 2048 --iters 5
fi

# ---- 3. torch ---------------------------------------------------------------------------------------
if [ "$FAKE" -eq 1 ]; then
    skip torch-dlpack "the fake driver runs no kernels"
elif ! have_python; then
    skip torch-dlpack "no $PYTHON"
elif [[ $TORCH == "not installed" ]]; then
    skip torch-dlpack "torch is not installed"
elif [ ! -f "$LIB" ] || [ ! -f "$PYPKG/kvvm/__init__.py" ]; then
    skip torch-dlpack "no libkvvm.so or Python package"
else
    : >"$OUT/torch-dlpack.log"
    if run_step torch-dlpack 90 "$OUT/torch-dlpack.log" env KVVM_LIBRARY="$LIB" PYTHONPATH="$PYPKG" \
        "$PYTHON" "$CHECKS/torch_dlpack_check.py" --backend cuda --json-out "$OUT/torch-dlpack.json"; then
        GPU_STEPS=$((GPU_STEPS + 1))
        figs=$(grep -E '^(interleaved|per-layer|stream-ordered)' "$OUT/torch-dlpack.log" | tr -s ' ' | tr '\n' ';' | head -c 300)
        record torch-dlpack "$(status_of "$STEP_RC")" "$STEP_S" "${figs:--}"
    fi
fi

# ---- summary ---------------------------------------------------------------------------------------
if [ "$GPU_STEPS" -eq 0 ]; then
    WHY_NONE="every step was skipped"
    write_results
    echo "gpu-check: no GPU step ran" >&2
    cat "$RESULTS"
    exit 2
fi
write_results
cat "$RESULTS"
exit "$FAILED"

#!/usr/bin/env bash
# Prepares, on a machine with a Rust toolchain, everything scripts/gpu-check.sh runs on a GPU
# machine that has none (driver, CUDA, Python and torch, no cargo, no network):
#
#   scripts/gpu-prepare.sh [BUNDLE_DIR]        (default: gpu-bundle, ignored by git)
#
# The bundle holds, stripped of debug information so that it stays under 64 MiB:
#   bin/kvvm                the CLI (info, bench ...), release build
#   lib/libkvvm.so          the C ABI library (for the Python package)
#   tests/<name>            test executables (`cargo test --release --no-run`) that need a GPU
#   MANIFEST                one line per test run: executable, then its arguments
#   python/kvvm/            the Python package; scripts/gpu/ the torch check
#   COMMIT                  the commit the bundle was built from (`-dirty` if the tree was)
#
# Then on the GPU machine (the bundle travels with the tree): scripts/gpu-check.sh OUT_DIR.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUNDLE=${1:-gpu-bundle}
LIMIT_BYTES=$((62 << 20))

# Package names: the CLI and the C ABI live in their own crates once the workspace has them.
pkg_exists() { [ -f "$1/Cargo.toml" ]; }
CLI_PKG=kvvm
CAPI_PKG=kvvm
if pkg_exists cli; then CLI_PKG=kvvm-cli; fi
if pkg_exists capi/clib; then CAPI_PKG=kvvm-clib; elif pkg_exists capi; then CAPI_PKG=kvvm-capi; fi

echo "== building release binaries ($CLI_PKG, $CAPI_PKG)"
cargo build --release -p "$CLI_PKG" --bin kvvm
cargo build --release -p "$CAPI_PKG" --lib

# The test executables with GPU tests, and how each is run (a test-name filter, then
# libtest's options). `--include-ignored`: the GPU tests are #[ignore]d elsewhere.
#   target kind:name  | run arguments
TESTS=(
    "kvvm-sys lib:kvvm_sys|--include-ignored --test-threads=1"
    "kvvm lib:kvvm|vmm::cuda --include-ignored --test-threads=1"
    "kvvm-kernels test:gpu|--include-ignored --test-threads=1"
    "kvvm-kernels test:nvrtc|--test-threads=1"
)
if [ -f tests/cuda_gpu.rs ]; then
    TESTS+=("kvvm test:cuda_gpu|--include-ignored --test-threads=1")
fi

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE"/bin "$BUNDLE"/lib "$BUNDLE"/tests "$BUNDLE"/python "$BUNDLE"/scripts/gpu
strip --strip-debug -o "$BUNDLE/bin/kvvm" target/release/kvvm
strip --strip-debug -o "$BUNDLE/lib/libkvvm.so" target/release/libkvvm.so

echo "== building test executables"
: >"$BUNDLE/MANIFEST"
for entry in "${TESTS[@]}"; do
    spec=${entry%%|*}
    args=${entry#*|}
    pkg=${spec%% *}
    target=${spec#* }
    kind=${target%%:*}
    name=${target#*:}
    sel=()
    if [ "$kind" = lib ]; then sel=(--lib); else sel=(--test "$name"); fi
    exe=$(cargo test --release -p "$pkg" "${sel[@]}" --no-run --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])
' | tail -n 1)
    if [ -z "$exe" ] || [ ! -x "$exe" ]; then
        echo "error: no test executable for $pkg $target" >&2
        exit 1
    fi
    out="$pkg-$name"
    strip --strip-debug -o "$BUNDLE/tests/$out" "$exe"
    echo "tests/$out $args" >>"$BUNDLE/MANIFEST"
    echo "   $out <- $exe"
done

cp -r python/kvvm "$BUNDLE/python/"
find "$BUNDLE/python" -name __pycache__ -prune -exec rm -rf {} +
cp scripts/gpu/*.py "$BUNDLE/scripts/gpu/"
{
    git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown
} | tr -d '\n' >"$BUNDLE/COMMIT"
if [ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ]; then
    echo -n "-dirty" >>"$BUNDLE/COMMIT"
fi
echo >>"$BUNDLE/COMMIT"

size=$(du -sb "$BUNDLE" | cut -f1)
echo "== $BUNDLE: $((size / 1024)) KiB, commit $(cat "$BUNDLE/COMMIT")"
if [ "$size" -gt "$LIMIT_BYTES" ]; then
    echo "error: the bundle is $size bytes, over the $LIMIT_BYTES that may travel" >&2
    exit 1
fi

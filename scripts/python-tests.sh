#!/usr/bin/env bash
# Builds libkvvm.so and runs the Python binding's tests (pytest, numpy) and example against it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import numpy, pytest' >/dev/null 2>&1; then
    echo "== pip install numpy pytest"
    "$PYTHON" -m pip install --quiet numpy pytest
fi

echo "== cargo build -p kvvm-clib"
cargo build -p kvvm-clib
target_dir=$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | head -n1 | cut -d'"' -f4)
export KVVM_LIBRARY="$target_dir/debug/libkvvm.so"
export KVVM_BACKEND=host

echo "== pytest python/tests (KVVM_LIBRARY=$KVVM_LIBRARY)"
"$PYTHON" -m pytest -q python/tests
echo "== examples/python/decode_loop.py"
PYTHONPATH=python "$PYTHON" examples/python/decode_loop.py
echo "python-tests: ok"

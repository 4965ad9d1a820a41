#!/usr/bin/env bash
# The Python package's checks: pytest of python/tests against a debug libkvvm.so (torch and
# transformers included: none of those tests may be skipped), the examples, and
# `pip install ./python` into a fresh virtual environment, where `import kvvm` must find the
# bundled library without KVVM_LIBRARY. Installs numpy, pytest, torch and transformers from PyPI
# when missing (torch's default wheel: a ~3 GB download, used on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# The Cargo package whose cdylib is libkvvm.so (python/setup.py names its manifest likewise).
CAPI_PACKAGE=kvvm-clib
if ! "$PYTHON" -c 'import numpy, pytest, torch, transformers' >/dev/null 2>&1; then
    echo "== pip install numpy pytest torch transformers"
    start=$(date +%s)
    "$PYTHON" -m pip install --quiet numpy pytest torch transformers
    echo "   took $(($(date +%s) - start)) s"
fi
"$PYTHON" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'

echo "== cargo build --lib -p $CAPI_PACKAGE"
cargo build --lib -p "$CAPI_PACKAGE"
target_dir=$(cargo metadata --format-version 1 --no-deps | grep -o '"target_directory":"[^"]*"' | head -n1 | cut -d'"' -f4)
export KVVM_LIBRARY="$target_dir/debug/libkvvm.so"
export KVVM_BACKEND=host

echo "== pytest python/tests (KVVM_LIBRARY=$KVVM_LIBRARY)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$PYTHON" -m pytest -q -rs python/tests 2>&1 | tee "$log"
if grep -qiE '[0-9]+ skipped' "$log"; then
    echo "python-tests: some tests were skipped (see above); they must run here" >&2
    exit 1
fi

echo "== examples/python/decode_loop.py"
PYTHONPATH=python "$PYTHON" examples/python/decode_loop.py
echo "== examples/python/hf_generate.py"
PYTHONPATH=python "$PYTHON" examples/python/hf_generate.py --batch 2 --new-tokens 12

echo "== pip install ./python into a fresh venv, import kvvm without KVVM_LIBRARY"
venv=$(mktemp -d)
trap 'rm -f "$log"; rm -rf "$venv"' EXIT
"$PYTHON" -m venv "$venv"
start=$(date +%s)
"$venv/bin/python" -m pip install --quiet ./python
echo "   pip install ./python took $(($(date +%s) - start)) s"
(
    cd "$venv"
    env -u KVVM_LIBRARY -u PYTHONPATH "$venv/bin/python" - <<'EOF'
import os, sys
import kvvm
here = os.path.realpath(sys.prefix)
assert os.path.realpath(kvvm.__file__).startswith(here), kvvm.__file__
lib = kvvm.library_path()
assert os.path.realpath(lib).startswith(os.path.dirname(os.path.realpath(kvvm.__file__))), lib
with kvvm.Cache(layers=2, kv_heads=2, head_dim=64, max_slots=2, max_tokens=64,
                budget_bytes=4 << 20, backend="host", dtype="f32") as cache:
    s = cache.alloc_slot()
    cache.ensure(s, 10)
    assert cache.tokens(s) == 10
print(f"installed kvvm {kvvm.__version__} works: {lib}")
EOF
)
echo "python-tests: ok"

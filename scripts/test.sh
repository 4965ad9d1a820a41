#!/usr/bin/env bash
# Runs every test suite of kvvm: Rust (unit, integration, property, fuzz-corpus replay, doctests),
# the NVRTC compile check of the CUDA kernels, the C ABI tests and the Python binding tests.
# Installs what is missing (Python packages, cbindgen); needs cargo, cargo-nextest, a C compiler,
# valgrind and python3 with pip. Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==== %s ====\n' "$*"; }

step "python packages (numpy, pytest, nvidia-cuda-nvrtc-cu12)"
python3 -c 'import numpy, pytest, nvidia.cuda_nvrtc' 2>/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check numpy pytest nvidia-cuda-nvrtc-cu12

if ! cargo nextest --version >/dev/null 2>&1; then
    step "installing cargo-nextest"
    cargo install cargo-nextest --locked
fi

step "Rust tests (cargo nextest, all features)"
NEXTEST_PROFILE=ci cargo nextest run --workspace --all-features

step "doctests"
cargo test --workspace --all-features --doc

step "CUDA kernels compile with NVRTC for compute_80 and compute_90"
KVVM_NVRTC_PATH="$(python3 -c 'import nvidia.cuda_nvrtc as m, os; print(os.path.join(list(m.__path__)[0], "lib"))')"
export KVVM_NVRTC_PATH
cargo run --quiet -p kvvm-kernels --example nvrtc_check

if [ -f scripts/c-tests.sh ]; then
    step "C ABI: header freshness, C example and error-path tests (valgrind)"
    bash scripts/c-tests.sh
fi

if [ -f scripts/python-tests.sh ]; then
    step "Python binding tests"
    bash scripts/python-tests.sh
fi

step "all test suites passed"

#!/usr/bin/env bash
# Runs every test suite of kvvm: Rust (unit, integration, property, fuzz-corpus replay, doctests),
# the NVRTC compile check of the CUDA kernels, the C ABI tests and the Python binding tests.
# Installs what is missing (Python packages, cbindgen); needs cargo, cargo-nextest, a C compiler,
# valgrind and python3 with pip. Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==== %s ====\n' "$*"; }

# The folder of NVRTC from NVIDIA's wheels: nvidia/cu13/lib (CUDA 13) or nvidia/cuda_nvrtc/lib (12).
nvrtc_dir() {
    python3 - <<'EOF' 2>/dev/null
import os, nvidia
for root in nvidia.__path__:
    for sub in ("cu13/lib", "cuda_nvrtc/lib"):
        d = os.path.join(root, sub)
        if os.path.isdir(d) and any(f.startswith("libnvrtc.so") for f in os.listdir(d)):
            print(d)
            raise SystemExit
raise SystemExit(1)
EOF
}

step "python packages (numpy, pytest, NVRTC)"
python3 -c 'import numpy, pytest' 2>/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check numpy pytest
nvrtc_dir >/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check nvidia-cuda-nvrtc-cu12

if ! cargo nextest --version >/dev/null 2>&1; then
    step "installing cargo-nextest"
    cargo install cargo-nextest --locked
fi

step "Rust tests (cargo nextest, all features)"
NEXTEST_PROFILE=ci cargo nextest run --workspace --all-features

step "doctests"
cargo test --workspace --all-features --doc

step "CUDA kernels compile with NVRTC for compute_80 and compute_90"
KVVM_NVRTC_PATH="$(nvrtc_dir)"
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

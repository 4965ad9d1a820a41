#!/usr/bin/env bash
# Builds the C ABI (cdylib and staticlib), checks that include/kvvm.h is what cbindgen generates
# from capi/src and that its version macros match Cargo.toml, then compiles the C example and the
# C tests with -Wall -Werror, runs them, and runs the error-path test under valgrind.
#
#   scripts/c-tests.sh                  # check and run
#   scripts/c-tests.sh --update-header  # regenerate include/kvvm.h first
set -euo pipefail
cd "$(dirname "$0")/.."

CBINDGEN_VERSION=0.29.0
CC=${CC:-cc}
update=0
[[ ${1:-} == --update-header ]] && update=1

if ! command -v cbindgen >/dev/null 2>&1 || [[ "$(cbindgen --version)" != "cbindgen $CBINDGEN_VERSION" ]]; then
    echo "== installing cbindgen $CBINDGEN_VERSION"
    cargo install cbindgen --version "$CBINDGEN_VERSION" --locked
fi

echo "== cargo build -p kvvm-clib (libkvvm.so, libkvvm.a)"
cargo build -p kvvm-clib
metadata=$(cargo metadata --format-version 1 --no-deps)
target_dir=$(printf '%s' "$metadata" | grep -o '"target_directory":"[^"]*"' | head -n1 | cut -d'"' -f4)
lib_dir="$target_dir/debug"
for f in libkvvm.so libkvvm.a; do
    [[ -f $lib_dir/$f ]] || { echo "missing $lib_dir/$f" >&2; exit 1; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== header freshness (cbindgen $CBINDGEN_VERSION)"
cbindgen --quiet --config capi/cbindgen.toml --output "$tmp/kvvm.h" capi/src/lib.rs
if [[ $update == 1 ]]; then
    cp "$tmp/kvvm.h" include/kvvm.h
fi
if ! diff -u include/kvvm.h "$tmp/kvvm.h"; then
    echo "include/kvvm.h is stale: run scripts/c-tests.sh --update-header and commit it" >&2
    exit 1
fi

echo "== version macros against Cargo.toml"
version=$(printf '%s' "$metadata" | grep -o '"name":"kvvm","version":"[^"]*"' | head -n1 | cut -d'"' -f8)
IFS=. read -r major minor patch <<<"${version%%-*}"
for part in "MAJOR $major" "MINOR $minor" "PATCH $patch"; do
    set -- $part
    if ! grep -qx "#define KVVM_VERSION_$1 $2" include/kvvm.h; then
        echo "include/kvvm.h: KVVM_VERSION_$1 does not match Cargo.toml version $version" >&2
        exit 1
    fi
done

cflags=(-std=c11 -Wall -Wextra -Werror -O1 -g -Iinclude)
echo "== compile (-Wall -Werror) against the cdylib and the staticlib"
"$CC" "${cflags[@]}" capi/examples/c/decode_loop.c -L"$lib_dir" -lkvvm -Wl,-rpath,"$lib_dir" -o "$tmp/decode_loop"
"$CC" "${cflags[@]}" capi/examples/c/decode_loop.c "$lib_dir/libkvvm.a" -lpthread -ldl -lm -o "$tmp/decode_loop_static"
"$CC" "${cflags[@]}" capi/tests/c/error_paths.c -L"$lib_dir" -lkvvm -Wl,-rpath,"$lib_dir" -o "$tmp/error_paths"
# C++ sees the same header (where a C++ compiler is installed).
if command -v "${CXX:-c++}" >/dev/null 2>&1; then
    "${CXX:-c++}" -std=c++17 -Wall -Wextra -Werror -Iinclude -x c++ -fsyntax-only - <<<'#include "kvvm.h"
int main() { kvvm_cache c{}; return kvvm_cache_quiesce(c) == KVVM_STATUS_INVALID_HANDLE ? 0 : 1; }'
fi

export KVVM_BACKEND=host
echo "== run capi/examples/c/decode_loop.c (shared)"
"$tmp/decode_loop"
echo "== run capi/examples/c/decode_loop.c (static)"
"$tmp/decode_loop_static"
echo "== run capi/tests/c/error_paths.c"
"$tmp/error_paths"
echo "== run capi/tests/c/error_paths.c under valgrind"
# "Possibly lost": the main thread's std::thread::Thread handle, kept in a thread-local by Rust's std
# (allocated when crossbeam first asks for the thread id) and never freed by design.
valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect \
    --show-possibly-lost=no \
    "$tmp/error_paths"
echo "c-tests: ok"

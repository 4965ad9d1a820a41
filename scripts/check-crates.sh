#!/usr/bin/env bash
# Checks the crate boundaries: the `kvvm` library stays lean (none of the tools' dependencies in
# its normal dependency tree) and the publishable crates (kvvm-sys, kvvm) package cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo tree -p kvvm -e normal: no tool dependencies"
tree=$(cargo tree -p kvvm -e normal --prefix none)
bad=0
for dep in clap indicatif plotters serde_json rayon kvvm-kernels kvvm-capi kvvm-replay half rand; do
    if grep -q "^$dep v" <<<"$tree"; then
        echo "kvvm depends on $dep (normal dependency): it belongs in a tool crate" >&2
        bad=1
    fi
done
[[ $bad == 0 ]]
count=$(sed 's/ (\*)//; s/ (proc-macro)//' <<<"$tree" | sort -u | wc -l)
echo "   kvvm and its normal dependencies: $count crates"

echo "== cargo package --list (kvvm-sys, kvvm)"
for crate in kvvm-sys kvvm; do
    files=$(cargo package --list --allow-dirty -p "$crate")
    n=$(wc -l <<<"$files")
    echo "   $crate: $n files"
    if grep -qE '^(capi|replay|cli|kernels|fuzz|python|traces|tests)/' <<<"$files"; then
        echo "$crate would publish another crate's files:" >&2
        grep -E '^(capi|replay|cli|kernels|fuzz|python|traces|tests)/' <<<"$files" >&2
        exit 1
    fi
done
echo "check-crates: ok"

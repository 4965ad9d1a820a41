//! Sizes that need more host memory than the process may use are refused before anything is
//! allocated (issue 16, item 2), and `kvvm info` says where kvvm's memory shows.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn mem_total() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

fn kvvm(args: &[&str]) -> (Output, Duration) {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_kvvm"))
        .args(args)
        .output()
        .unwrap();
    (out, t0.elapsed())
}

fn assert_refused(args: &[&str]) {
    let (out, took) = kvvm(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.contains("memory"), "{args:?}: {err}");
    assert!(
        took < Duration::from_secs(20),
        "{args:?} took {took:?} before refusing"
    );
}

#[test]
fn bench_map_larger_than_memory_is_refused() {
    let pages = (mem_total() / (2 << 20)).to_string();
    assert_refused(&[
        "bench",
        "map",
        "--backend",
        "host",
        "--pages",
        &pages,
        "--rounds",
        "1",
    ]);
}

#[test]
fn bench_swap_larger_than_memory_is_refused() {
    // 64 requests of 128k tokens of llama-3-8b: 1 TiB of KV.
    assert_refused(&[
        "bench",
        "swap",
        "--backend",
        "host",
        "--requests",
        "64",
        "--tokens",
        "131072",
        "--rounds",
        "1",
    ]);
}

#[test]
fn replay_budget_larger_than_memory_is_refused() {
    let budget = (4 * mem_total()).to_string();
    let trace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../traces/AzureLLMInferenceTrace_code.csv");
    assert_refused(&[
        "replay",
        "--trace",
        trace.to_str().unwrap(),
        "--limit",
        "4",
        "--budget",
        &budget,
        "--backend",
        "host",
        "--json",
    ]);
}

#[test]
fn info_says_where_the_memory_shows() {
    let (out, _) = kvvm(&["info", "--backend", "host", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["usable_memory"].as_u64().unwrap() > 0, "{v}");
    assert!(
        v["memory_accounting"]
            .as_str()
            .unwrap()
            .contains("kvvm-arena"),
        "{v}"
    );
}

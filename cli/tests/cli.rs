//! The `kvvm` binary end to end.

use std::path::{Path, PathBuf};

fn trace_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("traces")
        .join(name)
}

#[test]
fn cli_prints_one_json_object() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvvm"))
        .args(["replay", "--trace"])
        .arg(trace_path("AzureLLMInferenceTrace_code.csv"))
        .args([
            "--limit",
            "6",
            "--max-tokens",
            "2048",
            "--budget",
            "536870912",
            "--max-slots",
            "8",
            "--backend",
            "host",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["requests"], 6);
    assert_eq!(v["model"], "llama-3-8b");
    assert_eq!(v["budget_bytes"], 536_870_912u64);
    let names: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["allocator"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["kvvm-interleaved", "kvvm-per-layer", "paged-16", "static"]
    );
    for r in v["results"].as_array().unwrap() {
        assert_eq!(r["integrity_errors"], 0);
    }
}

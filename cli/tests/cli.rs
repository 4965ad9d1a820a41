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
        [
            "kvvm-interleaved",
            "kvvm-per-layer",
            "vllm-v1",
            "vllm-v1-offload",
            "vllm-v0-swap",
            "static"
        ]
    );
    assert_eq!(v["gpu"], "h100-pcie5");
    for r in v["results"].as_array().unwrap() {
        assert_eq!(r["integrity_errors"], 0);
        assert!(r["utilization"].as_f64().unwrap() > 0.0);
        for key in ["ttft", "tbt"] {
            for p in ["p50", "p90", "p99"] {
                assert!(r[key][p].as_f64().unwrap() > 0.0, "{key}.{p}");
            }
        }
        assert!(r["throughput_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
}

fn kvvm(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvvm"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_plot_path_is_checked_before_the_replay() {
    // The trace does not exist either: the plot's error comes first, so a replay of minutes
    // never ends in an unwritable plot.
    let (ok, _, err) = kvvm(&[
        "replay",
        "--trace",
        "/nonexistent/trace.csv",
        "--plot",
        "/nonexistent/dir/plot.svg",
    ]);
    assert!(!ok);
    assert!(err.contains("plot.svg") && err.contains("plot"), "{err}");
    assert!(!err.contains("trace.csv"), "{err}");
}

#[test]
fn bad_numbers_are_refused() {
    let trace = trace_path("AzureLLMInferenceTrace_code.csv");
    let trace = trace.to_str().unwrap();
    // A valid replay otherwise (one request, one model row): only the quantum is wrong.
    let (ok, _, err) = kvvm(&[
        "replay",
        "--trace",
        trace,
        "--limit",
        "1",
        "--allocators",
        "vllm-v1",
        "--fair-quantum=0.5",
    ]);
    assert!(ok, "{err}");
    for q in ["NaN", "-1", "inf"] {
        let arg = format!("--fair-quantum={q}");
        let (ok, _, err) = kvvm(&[
            "replay",
            "--trace",
            trace,
            "--limit",
            "1",
            "--allocators",
            "vllm-v1",
            &arg,
        ]);
        assert!(!ok, "--fair-quantum {q} accepted");
        assert!(err.contains("--fair-quantum"), "{q}: {err}");
    }
    let (ok, _, err) = kvvm(&["bench", "map", "--rounds", "0", "--pages", "4"]);
    assert!(!ok, "bench map --rounds 0 ran");
    assert!(err.contains("--rounds"), "{err}");
    let (ok, _, err) = kvvm(&["replay", "--gpu", "b100"]);
    assert!(!ok && err.contains("b100"), "{err}");
}

#[test]
fn a_trace_without_newlines_ends_with_an_error() {
    let (ok, _, err) = kvvm(&["replay", "--trace", "/dev/zero"]);
    assert!(!ok);
    assert!(err.contains("/dev/zero:1: line longer than"), "{err}");
}

#[test]
fn the_printed_profile_reads_back() {
    for gpu in ["h100-pcie5", "h200", "a100"] {
        let (ok, printed, err) = kvvm(&["replay", "--gpu", gpu, "--print-profile"]);
        assert!(ok, "{err}");
        assert!(printed.contains(&format!("name = \"{gpu}\"")), "{printed}");
        assert!(printed.contains("h2d_bytes_per_s = "), "{printed}");
        let file = std::env::temp_dir().join(format!("kvvm-profile-{}-{gpu}", std::process::id()));
        std::fs::write(&file, &printed).unwrap();
        // Applied on another profile, the file gives back the same profile.
        let (ok, again, err) = kvvm(&[
            "replay",
            "--gpu",
            "a100",
            "--profile",
            file.to_str().unwrap(),
            "--print-profile",
        ]);
        std::fs::remove_file(&file).unwrap();
        assert!(ok, "{err}");
        assert_eq!(again, printed);
    }
}

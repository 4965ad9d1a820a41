//! `scripts/gpu-check.sh`, the check run on a GPU machine, on this machine: without a GPU it
//! must exit non-zero and say why; against the fake CUDA driver (`KVVM_LIBCUDA`, built from
//! `tests/fixtures/fakecuda.c`) it must run its steps end to end, write `gpu-results.md` with a
//! row per step, keep to the number of files that come back from a GPU machine, and exit 0.
//!
//! The "bundle" given to the script holds only this build's `kvvm` binary (the script's test
//! executables and Python parts are skipped, and say so). Without bash, timeout or a C compiler
//! the tests print why they are skipped and pass.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../tests/support/fakecuda_build.rs"]
mod fakecuda_build;

/// The workspace root (this crate is `cli/`).
fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// A bundle folder with `bin/kvvm`, and an empty results folder, under `name`.
fn bundle(name: &str) -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let bin = dir.join("bundle/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_kvvm"), bin.join("kvvm")).unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    (dir.join("bundle"), out)
}

fn tools_present() -> bool {
    ["bash", "timeout"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn run(bundle: &Path, out: &Path, libcuda: Option<&Path>) -> Output {
    let mut c = Command::new("bash");
    c.arg(root().join("scripts/gpu-check.sh"))
        .arg(out)
        .arg("0123456789abcdef")
        .env("GPU_BUNDLE", bundle)
        .env("GPU_CHECK_BUDGET_S", "200")
        .env_remove("KVVM_BACKEND");
    match libcuda {
        Some(p) => c.env("KVVM_LIBCUDA", p),
        None => c.env("KVVM_LIBCUDA", "/nonexistent/kvvm-test/libcuda.so.1"),
    };
    c.output().expect("running scripts/gpu-check.sh")
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn without_a_gpu_the_check_exits_non_zero_and_says_why() {
    if !tools_present() {
        eprintln!("skipped: bash or timeout missing");
        return;
    }
    let (bundle, out) = bundle("gpu-check-no-gpu");
    // A driver library that does not exist stands for a machine without a GPU.
    let o = run(&bundle, &out, None);
    let all = text(&o);
    assert_eq!(o.status.code(), Some(2), "{all}");
    assert!(all.contains("no usable CUDA device"), "{all}");
    assert!(all.contains("could not load the CUDA driver"), "{all}");
    let md = std::fs::read_to_string(out.join("gpu-results.md")).unwrap();
    assert!(md.contains("No GPU step ran"), "{md}");
    assert!(
        md.contains("`0123456789abcdef`"),
        "the commit is recorded: {md}"
    );
}

#[test]
fn against_the_fake_driver_the_check_runs_end_to_end() {
    if !tools_present() {
        eprintln!("skipped: bash or timeout missing");
        return;
    }
    let lib = match fakecuda_build::build() {
        Ok(Some(p)) => p,
        Ok(None) => {
            eprintln!("skipped: no C compiler to build tests/fixtures/fakecuda.c");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let (bundle, out) = bundle("gpu-check-fake");
    let o = run(&bundle, &out, Some(&lib));
    let all = text(&o);
    let md = std::fs::read_to_string(out.join("gpu-results.md")).unwrap();
    assert_eq!(o.status.code(), Some(0), "{all}\n{md}");
    assert!(md.contains("| card | kvvm fakecuda device |"), "{md}");
    assert!(md.contains("`0123456789abcdef`"), "{md}");
    for step in ["info", "bench map", "bench step", "bench swap"] {
        assert!(
            md.contains(&format!("| {step} | ok |")),
            "{step} did not pass:\n{md}"
        );
    }
    for step in ["bench attention", "torch-dlpack"] {
        assert!(md.contains(&format!("| {step} | skip |")), "{step}:\n{md}");
    }
    // Key figures, not just a status.
    assert!(md.contains("µs/page"), "{md}");
    assert!(md.contains("GB/s"), "{md}");
    let jsonl = std::fs::read_to_string(out.join("bench.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), 3, "{jsonl}");
    for line in jsonl.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["result"].is_object(), "{line}");
    }
    // At most 8 files come back from a GPU machine.
    let files = std::fs::read_dir(&out).unwrap().count();
    assert!(files <= 8, "{files} files in {}", out.display());
}

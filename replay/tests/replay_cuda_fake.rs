//! `kvvm replay` on the CUDA backend without a GPU: the fake driver of
//! `tests/fixtures/fakecuda.c` (device memory is this process's memory) stands in for
//! `libcuda.so.1`. The stamps and the swaps then go through driver copies; the fake counts any
//! copy that touches an unmapped device range or pageable host memory. Without a C compiler the
//! test says why it is skipped and passes.

use std::ffi::{c_char, c_longlong, CString};
use std::path::{Path, PathBuf};
use std::process::Command;

use kvvm::vmm::{BackendChoice, BackendConfig};
use kvvm::{DType, Layout, ModelShape};
use kvvm_replay::{self, read_trace, AllocatorKind, ReplayConfig, SchedConfig};
use libloading::Library;

/// Builds the fake into `CARGO_TARGET_TMPDIR` under a name of its own. `None` without a C
/// compiler.
fn build_fake() -> Option<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fakecuda.c");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fakecuda-replay");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("libfakecuda-{}.so", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let mut words = cc.split_whitespace();
    let program = words.next().unwrap_or("cc").to_string();
    let status = Command::new(&program)
        .args(words)
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-lpthread")
        .status();
    match status {
        Ok(s) if s.success() => Some(out),
        Ok(s) => panic!("{program} failed to build {}: {s}", src.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("running {program}: {e}"),
    }
}

#[test]
fn replay_on_the_fake_cuda_driver_keeps_every_token() {
    let Some(path) = build_fake() else {
        eprintln!("skipped: no C compiler to build tests/fixtures/fakecuda.c");
        return;
    };
    // The only test of this binary: nothing has loaded the driver yet.
    std::env::set_var(kvvm_sys::LIBCUDA_ENV, &path);
    // SAFETY: the fake's initialiser only sets up its own state.
    let lib = unsafe { Library::new(&path) }.unwrap();
    // SAFETY: the fixture defines these symbols with these signatures.
    let live: libloading::Symbol<unsafe extern "C" fn(*const c_char) -> c_longlong> =
        unsafe { lib.get(b"fakecuda_live") }.unwrap();
    // SAFETY: as above.
    let set_granularity: libloading::Symbol<unsafe extern "C" fn(usize) -> i32> =
        unsafe { lib.get(b"fakecuda_set_granularity") }.unwrap();
    // SAFETY: called before any driver use; 64 KiB pages keep the test small.
    assert_eq!(unsafe { set_granularity(64 << 10) }, 0);
    let count = |what: &str| {
        let c = CString::new(what).unwrap();
        // SAFETY: a NUL-terminated name; the fake only reads it.
        unsafe { live(c.as_ptr()) }
    };

    let trace = read_trace(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../traces/AzureLLMInferenceTrace_conv.csv"),
        Some(24),
    )
    .unwrap();
    let model = ModelShape {
        name: "tiny",
        layers: 2,
        q_heads: 2,
        kv_heads: 2,
        head_dim: 64,
    };
    let config = ReplayConfig {
        model,
        dtype: DType::F16,
        // 1024 bytes per token: 4 MiB hold 4096 tokens, too few for 24 conversations at 50x.
        budget_bytes: 4 << 20,
        host_budget_bytes: 32 << 20,
        backend: BackendConfig {
            choice: BackendChoice::Cuda,
            ..BackendConfig::default()
        },
        page_size: None,
        lookahead_steps: 4,
        sched: SchedConfig {
            max_slots: 8,
            max_tokens: 2048,
            speed: 50.0,
            fair_interval: 10,
            fair_quantum_s: 0.2,
            ..SchedConfig::default()
        },
        allocators: vec![
            AllocatorKind::Kvvm(Layout::Interleaved),
            AllocatorKind::Kvvm(Layout::PerLayer),
        ],
    };
    let report = kvvm_replay::replay(&trace, &config, &mut |_, _| {}).unwrap();
    assert_eq!(report.backend, "cuda");
    for r in &report.results {
        assert_eq!(r.finished, 24, "{}", r.allocator);
        assert_eq!(r.integrity_errors, 0, "{}", r.allocator);
        assert!(r.preemptions > 0, "{}: swaps must run", r.allocator);
        assert!(r.swapped_bytes > 0, "{}", r.allocator);
        assert!(r.utilization > 0.0 && r.utilization <= 1.0);
    }
    assert_eq!(
        count("faults"),
        0,
        "a copy touched an unmapped device range"
    );
    assert_eq!(
        count("pageable_async"),
        0,
        "an async copy used pageable memory"
    );
    let _ = std::fs::remove_file(&path);
}

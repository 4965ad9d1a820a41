//! End-to-end replays of the bundled traces through every allocator, the trace readers' error
//! reporting, the kvvm adapter's swapping with KV reuse, and the CLI's JSON contract.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvvm::vmm::host::os_page_size;
use kvvm::vmm::{BackendChoice, BackendConfig};
use kvvm::{CacheConfig, DType, KvCache, Layout, ModelShape};
use kvvm_replay::Error;
use kvvm_replay::{
    read_trace, trace::read_trace_from, AllocatorKind, Job, KvAllocator, KvvmAllocator, Preempted,
    ReplayConfig, Report, SchedConfig, TraceFormat,
};

/// A small model: 2 layers, 2 KV heads of 16 f16 elements (256 bytes per token interleaved).
const TINY: ModelShape = ModelShape {
    name: "tiny",
    layers: 2,
    q_heads: 2,
    kv_heads: 2,
    head_dim: 16,
};

fn trace_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("traces")
        .join(name)
}

fn job(id: u64) -> Job {
    Job::new(id, 0.0, 1, 1)
}

fn host() -> BackendConfig {
    BackendConfig {
        choice: BackendChoice::Host,
        host_granularity: os_page_size(),
        ..BackendConfig::default()
    }
}

fn tiny_config(budget_bytes: u64, speed: f64) -> ReplayConfig {
    ReplayConfig {
        model: TINY,
        dtype: DType::F16,
        budget_bytes,
        host_budget_bytes: 64 << 20,
        backend: host(),
        page_size: None,
        lookahead_steps: 4,
        sched: SchedConfig {
            max_slots: 16,
            max_tokens: 2048,
            speed,
            fair_interval: 20,
            fair_quantum_s: 0.5,
            ..SchedConfig::default()
        },
        allocators: AllocatorKind::ALL.to_vec(),
    }
}

/// What must hold for any replay, by construction of the allocators.
fn check_report(report: &Report, config: &ReplayConfig) {
    let tb = report.token_bytes;
    assert_eq!(tb, TINY.token_bytes(DType::F16) as u64);
    assert_eq!(report.results.len(), AllocatorKind::ALL.len());
    for r in &report.results {
        let name = r.allocator.as_str();
        assert_eq!(
            r.finished, report.requests,
            "{name}: every request finishes"
        );
        assert_eq!(r.integrity_errors, 0, "{name}: no token's KV lost");
        assert_eq!(
            r.kind,
            if name.starts_with("kvvm") {
                "real"
            } else {
                "model"
            }
        );
        // Latency: every request has a first token; every later token a gap.
        assert_eq!(r.ttft.count, report.requests, "{name}");
        assert!(
            r.ttft.p50 <= r.ttft.p90 && r.ttft.p90 <= r.ttft.p99,
            "{name}"
        );
        assert!(r.tbt.p50 <= r.tbt.p90 && r.tbt.p90 <= r.tbt.p99, "{name}");
        assert!(r.tbt.p50 > 0.0 && r.throughput_tokens_per_s > 0.0, "{name}");
        if r.preemptions > 0 {
            assert!(r.preempt_stall_s > 0.0, "{name}: preemption stalls");
        }
        assert!(
            r.utilization > 0.0 && r.utilization <= 1.0,
            "{name}: utilization {}",
            r.utilization
        );
        assert!(r.peak_batch >= 1 && r.peak_batch <= config.sched.max_slots);
        assert!(r.mean_batch >= 1.0 && r.mean_batch <= r.peak_batch as f64);
        assert!(
            r.peak_held_bytes <= config.budget_bytes,
            "{name} over budget"
        );
        for s in &r.samples {
            assert!(
                s.held_bytes >= s.live_bytes,
                "{name}: live tokens without memory: {s:?}"
            );
            match name {
                "vllm-v0-swap" | "vllm-v1" | "vllm-v1-offload" => assert!(
                    s.held_bytes - s.live_bytes < 16 * tb * s.batch.max(1) as u64,
                    "{name} wastes less than a block per request: {s:?}"
                ),
                "static" => assert_eq!(
                    s.held_bytes,
                    s.batch as u64 * config.sched.max_tokens as u64 * tb,
                    "static holds max_tokens per running request"
                ),
                _ => {}
            }
        }
    }
    let by = |n: &str| {
        report
            .results
            .iter()
            .find(|r| r.allocator == n)
            .unwrap_or_else(|| panic!("no result for {n}"))
    };
    // Static reservation never runs out of memory: its only preemptions are for fairness, and
    // it has no swap space (they recompute).
    let st = by("static");
    assert_eq!(st.preemptions, st.fairness_preemptions);
    assert_eq!(st.preemptions, st.recomputes);
    assert_eq!(st.swapped_bytes, 0);
    // Every swapped preemption of kvvm copies bytes, none of them more than once per direction
    // beyond what the requests hold.
    let k = by("kvvm-interleaved");
    if k.preemptions > k.recomputes {
        assert!(k.swapped_bytes > 0);
    }
}

#[test]
fn azure_slice_replays_with_preemption_and_intact_kv() {
    let trace = read_trace(&trace_path("AzureLLMInferenceTrace_conv.csv"), Some(40)).unwrap();
    assert_eq!(trace.format, TraceFormat::AzureCsv);
    assert_eq!(trace.requests.len(), 40);
    // 1 MiB holds 4096 tokens of this model: far less than 40 conversations arriving at 50x.
    let config = tiny_config(1 << 20, 50.0);
    let report = kvvm_replay::replay(&trace, &config, &mut |_, _| {}).unwrap();
    check_report(&report, &config);
    for name in [
        "kvvm-interleaved",
        "kvvm-per-layer",
        "vllm-v1",
        "vllm-v1-offload",
        "vllm-v0-swap",
    ] {
        let r = report.results.iter().find(|r| r.allocator == name).unwrap();
        assert!(
            r.preemptions > 0,
            "{name}: the budget must force preemption"
        );
    }
    let json = report.json();
    for key in ["trace", "requests", "model", "budget_bytes", "results"] {
        assert!(json.get(key).is_some(), "missing {key}");
    }
    for r in json["results"].as_array().unwrap() {
        for key in [
            "allocator",
            "utilization",
            "peak_batch",
            "mean_batch",
            "preemptions",
            "swapped_bytes",
            "reuse_saved_bytes",
            "backend_calls",
            "wall_s",
            "integrity_errors",
            "throughput_tokens_per_s",
            "preempt_stall_s",
            "kind",
        ] {
            assert!(r.get(key).is_some(), "missing results[].{key}");
        }
        for key in ["ttft", "tbt", "e2e"] {
            for p in ["p50", "p90", "p99"] {
                assert!(r[key][p].is_f64(), "missing results[].{key}.{p}");
            }
        }
    }
}

/// Every bundled trace, kvvm rows only, with fairness preemption as by default: every token of
/// every request reads back as written.
#[test]
fn every_bundled_trace_keeps_kvvm_intact_under_fairness_preemption() {
    for (name, limit, speed) in [
        ("AzureLLMInferenceTrace_conv.csv", 40, 50.0),
        ("AzureLLMInferenceTrace_code.csv", 40, 50.0),
        ("mooncake_synthetic_trace.jsonl", 24, 20.0),
    ] {
        let trace = read_trace(&trace_path(name), Some(limit)).unwrap();
        let mut config = tiny_config(1 << 20, speed);
        config.allocators = vec![
            AllocatorKind::Kvvm(Layout::Interleaved),
            AllocatorKind::Kvvm(Layout::PerLayer),
        ];
        let report = kvvm_replay::replay(&trace, &config, &mut |_, _| {}).unwrap();
        for r in &report.results {
            assert_eq!(r.finished, report.requests, "{name} {}", r.allocator);
            assert!(r.preemptions > 0, "{name} {}: preemption", r.allocator);
            assert!(
                r.fairness_preemptions > 0,
                "{name} {}: fairness preemption",
                r.allocator
            );
            assert_eq!(r.integrity_errors, 0, "{name} {}", r.allocator);
        }
    }
}

#[test]
fn mooncake_slice_replays_with_intact_kv() {
    let trace = read_trace(&trace_path("mooncake_synthetic_trace.jsonl"), Some(24)).unwrap();
    assert_eq!(trace.format, TraceFormat::MooncakeJsonl);
    assert_eq!(trace.requests.len(), 24);
    assert!(trace.requests.iter().all(|r| !r.hash_ids.is_empty()));
    let config = tiny_config(1 << 20, 20.0);
    let report = kvvm_replay::replay(&trace, &config, &mut |_, _| {}).unwrap();
    check_report(&report, &config);
    // Mooncake prompts are far longer than 2048 tokens: they are cut, and say so.
    assert!(report.truncated > 0);
    // Shared prefixes are counted from the hash ids, never more than the prompts hold.
    assert!(report.shared_prefix_tokens <= report.prompt_tokens);
    let expect = kvvm_replay::shared_prefix_tokens(&trace.requests);
    assert_eq!(report.shared_prefix_tokens, expect);
}

#[test]
fn kvvm_swap_reuses_the_host_copy_and_keeps_every_token() {
    for layout in [Layout::Interleaved, Layout::PerLayer] {
        let cache = KvCache::new(
            CacheConfig::new(TINY.layers, TINY.kv_heads, TINY.head_dim)
                .with_dtype(DType::F16)
                .with_max_slots(4)
                .with_max_tokens(512)
                .with_layout(layout)
                .with_page_size(None)
                .with_budget_bytes(256 << 10)
                .with_backend(host())
                .with_lookahead_steps(0)
                .with_create_all_pages(false),
        )
        .unwrap();
        let bpt = cache.geometry().bytes_per_token() as u64;
        let mut a = KvvmAllocator::new(Arc::new(cache), 16 << 20).unwrap();
        assert!(a.admit(&job(7), 100).unwrap().is_some());
        assert!(a.admit(&job(8), 30).unwrap().is_some());
        assert!(a.grow(&[(7, 101), (8, 31)]).unwrap());
        let (how, out) = a.preempt(7).unwrap();
        assert_eq!(how, Preempted::Swapped);
        let t = out.transfers[0];
        assert_eq!(t.bytes, 101 * bpt);
        // Coarse, asynchronous, submitted off the step.
        assert!(!t.sync && !t.submit_on_step);
        assert_eq!(a.usage().live_bytes, 31 * bpt);
        // Resume, decode 20 more tokens, preempt again: only the 20 new tokens move.
        let back = a.resume(&job(7), 101).unwrap().unwrap();
        assert_eq!(back.cached_tokens, 101);
        assert_eq!(back.transfers[0].bytes, 101 * bpt);
        for t in 102..=121 {
            assert!(a.grow(&[(7, t)]).unwrap());
        }
        let (_, out) = a.preempt(7).unwrap();
        assert_eq!(
            out.transfers[0].bytes,
            20 * bpt,
            "{layout}: only new tokens copied"
        );
        let c = a.counters();
        assert_eq!(c.reuse_saved_bytes, 101 * bpt);
        assert_eq!(c.swapped_bytes, (101 + 101 + 20) * bpt);
        assert!(a.resume(&job(7), 121).unwrap().is_some());
        a.finish(7).unwrap();
        a.finish(8).unwrap();
        assert_eq!(a.counters().integrity_errors, 0, "{layout}");
        assert_eq!(a.usage().live_bytes, 0);
        // Unknown requests are errors, not panics.
        assert!(a.preempt(99).is_err());
        assert!(a.finish(7).is_err());
    }
}

#[test]
fn kvvm_stamps_detect_corruption() {
    let cache = Arc::new(
        KvCache::new(
            CacheConfig::new(TINY.layers, TINY.kv_heads, TINY.head_dim)
                .with_dtype(DType::F16)
                .with_max_slots(2)
                .with_max_tokens(256)
                .with_layout(Layout::Interleaved)
                .with_page_size(None)
                .with_budget_bytes(128 << 10)
                .with_backend(host())
                .with_lookahead_steps(0)
                .with_create_all_pages(false),
        )
        .unwrap(),
    );
    let mut a = KvvmAllocator::new(cache.clone(), 1 << 20).unwrap();
    assert!(a.admit(&job(1), 50).unwrap().is_some());
    // Overwrite token 10's K row of layer 0 behind the allocator's back.
    let slot = a.slot_of(1).unwrap();
    let row = cache.row(slot, 10, 0, kvvm::Kv::K).unwrap();
    // SAFETY: the row belongs to a mapped token of the only allocated slot, which no
    // other thread touches; it holds at least 8 bytes.
    unsafe { (row.addr as usize as *mut u64).write_unaligned(0xdead_beef) };
    a.finish(1).unwrap();
    assert_eq!(a.counters().integrity_errors, 1);
}

fn err_text(name: &str, text: &str) -> String {
    match read_trace_from(Path::new(name), text.as_bytes(), None) {
        Err(Error::Input(m)) => m,
        other => panic!("{name}: expected an input error, got {other:?}"),
    }
}

#[test]
fn malformed_lines_name_file_and_line() {
    let header = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
    let good = "2023-11-16 18:15:46.6805900,374,44\n";
    let m = err_text(
        "t.csv",
        &format!("{header}{good}{good}2023-11-16 18:15:47.0,abc,3\n"),
    );
    assert!(m.starts_with("t.csv:4:"), "{m}");
    assert!(m.contains("ContextTokens"), "{m}");
    let m = err_text("t.csv", &format!("{header}{good}2023-11-16 25:00:00,1,2\n"));
    assert!(m.starts_with("t.csv:3:") && m.contains("timestamp"), "{m}");
    let m = err_text("t.csv", &format!("{header}1,2\n"));
    assert!(m.starts_with("t.csv:2:"), "{m}");
    let m = err_text("t.csv", &format!("{header}{good}{good}{good},1,2,3\n"));
    assert!(m.starts_with("t.csv:5:"), "{m}");
    let m = err_text("no-header.csv", good);
    assert!(m.starts_with("no-header.csv:1:"), "{m}");

    let line = r#"{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}"#;
    let m = err_text(
        "t.jsonl",
        &format!("{line}\n{{\"timestamp\": 5, \"input_length\": \n"),
    );
    assert!(m.starts_with("t.jsonl:2:"), "{m}");
    let m = err_text("t.jsonl", &format!("{line}\n\n{{\"timestamp\": 5}}\n"));
    assert!(
        m.starts_with("t.jsonl:3:") && m.contains("input_length"),
        "{m}"
    );
    let m = err_text(
        "t.jsonl",
        r#"{"timestamp": -4, "input_length": 1, "output_length": 1}"#,
    );
    assert!(m.starts_with("t.jsonl:1:"), "{m}");

    // A missing file names the file.
    match read_trace(Path::new("/nonexistent/trace.csv"), None) {
        Err(Error::Input(m)) => assert!(m.contains("/nonexistent/trace.csv"), "{m}"),
        other => panic!("expected an input error, got {other:?}"),
    }
}

#[test]
fn shared_prefixes_count_leading_known_blocks() {
    let line = |ts: u64, len: usize, ids: &str| {
        format!(
            r#"{{"timestamp": {ts}, "input_length": {len}, "output_length": 1, "hash_ids": [{ids}]}}"#
        )
    };
    let text = [
        line(0, 1200, "1, 2, 3"),
        line(5, 1100, "1, 2, 9"), // two leading blocks known: 1024 tokens
        line(9, 300, "1"),        // one known block, capped at the prompt: 300
        line(12, 900, "7, 1"),    // the first block is new: nothing shared
    ]
    .join("\n");
    let t = read_trace_from(Path::new("p.jsonl"), text.as_bytes(), None).unwrap();
    assert_eq!(kvvm_replay::shared_prefix_tokens(&t.requests), 1024 + 300);
}

#[test]
fn format_is_detected_by_extension_then_content() {
    let line = r#"{"timestamp": 1500, "input_length": 10, "output_length": 2}"#;
    let t = read_trace_from(
        Path::new("trace.txt"),
        format!("{line}\n{line}\n").as_bytes(),
        None,
    )
    .unwrap();
    assert_eq!(t.format, TraceFormat::MooncakeJsonl);
    assert_eq!(t.requests[1].arrival_s, 0.0);
    assert!(t.requests[0].hash_ids.is_empty());
    let t = read_trace_from(Path::new("trace.csv"), line.as_bytes(), None);
    assert!(t.is_err(), "a .csv file is read as CSV");
}

#[test]
fn kvvm_adapter_failures_change_nothing_and_lose_no_token() {
    use kvvm::vmm::faulty::{CopyFault, FaultyBackend};
    use kvvm::vmm::host::{HostBackend, HostConfig};
    use kvvm::vmm::BackendOp;

    let host = Arc::new(
        HostBackend::new(HostConfig {
            granularity: os_page_size(),
            copy_threads: 2,
            ..HostConfig::default()
        })
        .unwrap(),
    );
    let faulty = Arc::new(FaultyBackend::new(host.clone()));
    let cache = KvCache::with_backend(
        CacheConfig::new(TINY.layers, TINY.kv_heads, TINY.head_dim)
            .with_dtype(DType::F16)
            .with_max_slots(4)
            .with_max_tokens(512)
            .with_layout(Layout::PerLayer)
            .with_page_size(None)
            .with_budget_bytes(256 << 10)
            .with_backend(BackendConfig::default())
            .with_lookahead_steps(0)
            .with_create_all_pages(false),
        faulty.clone(),
    )
    .unwrap();
    let cache = Arc::new(cache);
    let bpt = cache.geometry().bytes_per_token() as u64;
    let mut a = KvvmAllocator::new(cache.clone(), 16 << 20).unwrap();
    assert!(a.admit(&job(1), 100).unwrap().is_some());
    assert!(a.admit(&job(2), 50).unwrap().is_some());
    assert!(a.grow(&[(1, 101), (2, 51)]).unwrap());
    let before = a.usage();

    // A failed mapping: the admission fails, its slot goes back.
    faulty.fail_nth(BackendOp::Map, 1);
    assert!(a.admit(&job(3), 200).is_err());
    faulty.clear();
    assert_eq!(a.usage(), before);
    assert_eq!(cache.stats().allocated_slots, 2);

    // A swap-out whose copy fails (at submission, then at completion): the request keeps
    // running with its KV.
    for when in [CopyFault::AtSubmit, CopyFault::AtCompletion] {
        faulty.fail_nth_copy(1, when);
        assert!(a.preempt(1).is_err(), "{when:?}");
        faulty.clear();
        assert_eq!(a.usage(), before, "{when:?}");
        assert!(a.slot_of(1).is_some());
    }
    assert!(a.grow(&[(1, 102)]).unwrap());

    // A swap-in whose copy fails: the request stays preempted and resumes on the next try.
    let (how, _) = a.preempt(2).unwrap();
    assert_eq!(how, Preempted::Swapped);
    faulty.fail_nth_copy(1, CopyFault::AtCompletion);
    assert!(a.resume(&job(2), 51).is_err());
    faulty.clear();
    assert!(a.slot_of(2).is_none());
    assert_eq!(a.usage().live_bytes, 102 * bpt);
    assert!(a.resume(&job(2), 51).unwrap().is_some());

    a.finish(1).unwrap();
    a.finish(2).unwrap();
    assert_eq!(a.counters().integrity_errors, 0);
    assert_eq!(cache.stats().allocated_slots, 0);
    drop(a);
    drop(cache);
    assert_eq!(host.live_pages(), 0, "pages leaked");
}

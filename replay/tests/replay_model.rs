//! The time model and the baselines on hand-built traces: latency percentiles with known gaps,
//! the overlap of copies with compute, vLLM V1's prefix cache and recompute, its offloading's
//! per-block copies, vLLM v0's synchronous swap; and the trace reader's limits.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;

use kvvm_replay::alloc::{Counters, KvAllocator, Outcome, PagedModel, Preempted, Usage};
use kvvm_replay::sched::{nearest_rank, simulate, Job, Percentiles, SchedConfig};
use kvvm_replay::timing::{Dir, Submit, Transfer, VmmCounters};
use kvvm_replay::trace::read_trace_from;
use kvvm_replay::Error;
use kvvm_replay::Result;
use kvvm_replay::{GpuProfile, StepModel, VllmV1};

/// A step model where every step takes `weights_s` plus `token_s` per computed token (whichever
/// is larger), copies run at 1 GB/s with no per-call cost, and VMM calls are free.
fn flat_model(weights_s: f64, token_s: f64) -> StepModel {
    let gpu = GpuProfile {
        h2d_bytes_per_s: 1e9,
        d2h_bytes_per_s: 1e9,
        copy_call_s: 0.0,
        batch_descriptor_s: 0.0,
        copy_descriptor_s: 0.0,
        ..GpuProfile::h100_pcie5()
    };
    StepModel {
        gpu,
        weights_s,
        kv_token_s: 0.0,
        token_s,
    }
}

fn sched(step: StepModel) -> SchedConfig {
    SchedConfig {
        max_slots: 8,
        max_tokens: 4096,
        speed: 1.0,
        fair_interval: 0,
        fair_quantum_s: 0.0,
        watermark: 0.0,
        step,
        sample_s: 1.0,
    }
}

/// A scripted allocator: unlimited memory; the `fail_grow`-th growth call fails once (the
/// scheduler then preempts its victim); resuming is refused while `blocker` runs; a resume
/// copies `resume_bytes` asynchronously.
#[derive(Default)]
struct Scripted {
    running: HashMap<u64, usize>,
    grows: usize,
    fail_grow: usize,
    blocker: Option<u64>,
    resume_bytes: u64,
    /// Map calls each growth makes on the caller's thread and on a background thread.
    maps_per_grow: (u64, u64),
    vmm: VmmCounters,
}

impl KvAllocator for Scripted {
    fn name(&self) -> String {
        "scripted".into()
    }
    fn preemption(&self) -> &'static str {
        "scripted"
    }
    fn token_bytes(&self) -> u64 {
        1
    }
    fn bytes_for(&self, tokens: usize) -> u64 {
        tokens as u64
    }
    fn free_bytes(&self) -> u64 {
        1 << 40
    }
    fn admit(&mut self, job: &Job, tokens: usize) -> Result<Option<Outcome>> {
        self.running.insert(job.id, tokens);
        Ok(Some(Outcome::none()))
    }
    fn grow(&mut self, batch: &[(u64, usize)]) -> Result<bool> {
        self.grows += 1;
        if self.grows == self.fail_grow {
            return Ok(false);
        }
        for &(id, t) in batch {
            self.running.insert(id, t);
        }
        self.vmm.foreground.map += self.maps_per_grow.0;
        self.vmm.background.map += self.maps_per_grow.1;
        Ok(true)
    }
    fn vmm_calls(&self) -> VmmCounters {
        self.vmm
    }
    fn preempt(&mut self, id: u64) -> Result<(Preempted, Outcome)> {
        self.running.remove(&id);
        Ok((Preempted::Swapped, Outcome::none()))
    }
    fn resume(&mut self, job: &Job, tokens: usize) -> Result<Option<Outcome>> {
        if self.blocker.is_some_and(|b| self.running.contains_key(&b)) {
            return Ok(None);
        }
        self.running.insert(job.id, tokens);
        Ok(Some(Outcome {
            cached_tokens: tokens,
            transfers: vec![Transfer {
                dir: Dir::ToDevice,
                bytes: self.resume_bytes,
                descriptors: 1,
                submit: Submit::PerCall,
                sync: false,
                submit_on_step: false,
            }],
        }))
    }
    fn finish(&mut self, id: u64) -> Result<()> {
        self.running.remove(&id);
        Ok(())
    }
    fn usage(&self) -> Usage {
        let t = self.running.values().sum::<usize>() as u64;
        Usage {
            live_bytes: t,
            held_bytes: t,
        }
    }
    fn counters(&self) -> Counters {
        Counters::default()
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn nearest_rank_percentiles() {
    let v: Vec<f64> = (1..=100).map(f64::from).collect();
    assert_eq!(nearest_rank(&v, 0.5), 50.0);
    assert_eq!(nearest_rank(&v, 0.9), 90.0);
    assert_eq!(nearest_rank(&v, 0.99), 99.0);
    assert_eq!(nearest_rank(&v, 1.0), 100.0);
    assert_eq!(nearest_rank(&[7.0], 0.99), 7.0);
    assert_eq!(nearest_rank(&[], 0.5), 0.0);
    let p = Percentiles::of(&mut [3.0, 1.0, 2.0]);
    assert_eq!((p.p50, p.p90, p.max, p.mean), (2.0, 3.0, 3.0, 2.0));
}

#[test]
fn percentiles_of_a_hand_built_trace_with_known_gaps() {
    // Steps take 10 ms, or 1 ms per computed token when more. A (arrives 0, 100-token prompt,
    // 3 tokens): step 1 prefills it with its first token: 101 tokens, 0.101 s. B (arrives
    // 0.05 s, 50-token prompt, 2 tokens) is admitted in step 2: 2 + 50 tokens, ends 0.153.
    // Step 3 (10 ms) gives both their last token at 0.163.
    let jobs = [Job::new(0, 0.0, 100, 3), Job::new(1, 0.05, 50, 2)];
    let mut a = Scripted::default();
    let r = simulate(&mut a, &jobs, &sched(flat_model(0.01, 0.001)), &mut |_| {}).unwrap();
    assert_eq!(r.finished, 2);
    assert!(close(r.sim_s, 0.163), "{}", r.sim_s);
    // TTFT: A 0.101, B 0.153 - 0.05 = 0.103.
    assert_eq!(r.ttft.count, 2);
    assert!(
        close(r.ttft.p50, 0.101) && close(r.ttft.p99, 0.103),
        "{:?}",
        r.ttft
    );
    // TBT: A 0.052 then 0.010, B 0.010.
    assert_eq!(r.tbt.count, 3);
    assert!(close(r.tbt.p50, 0.010), "{:?}", r.tbt);
    assert!(
        close(r.tbt.p90, 0.052) && close(r.tbt.p99, 0.052),
        "{:?}",
        r.tbt
    );
    assert!(close(r.tbt.mean, 0.072 / 3.0), "{:?}", r.tbt);
    // End to end: A 0.163, B 0.113.
    assert!(
        close(r.e2e.p50, 0.113) && close(r.e2e.max, 0.163),
        "{:?}",
        r.e2e
    );
    assert!(close(r.throughput_tokens_per_s, 5.0 / 0.163));
    assert_eq!(r.preempt_stall_s, 0.0);
    let json = serde_json::to_value(&r).unwrap();
    for key in ["ttft", "tbt", "e2e"] {
        for p in ["p50", "p90", "p99"] {
            assert!(json[key][p].is_f64(), "{key}.{p}");
        }
    }
    assert!(json["throughput_tokens_per_s"].is_f64());
    assert!(json["preempt_stall_s"].is_f64());
}

/// Runs the overlap scenario with a resume copy of `copy_s` seconds; returns (the resumed
/// request's first token after its resume, the time the resume was issued, the end of the
/// step the copy overlapped).
fn overlap_run(copy_s: f64) -> (f64, f64, f64) {
    // A: 3 tokens, C: 50, B: 5; 10 ms steps. Growth fails once in step 2, preempting B (the
    // lowest priority, latest arrival). B resumes when A has finished, while C keeps running:
    // its copy runs during C's next step.
    let jobs = [
        Job::new(0, 0.0, 4, 3),
        Job::new(1, 0.0, 4, 50),
        Job::new(2, 0.0, 4, 5),
    ];
    let mut a = Scripted {
        fail_grow: 2,
        blocker: Some(0),
        resume_bytes: (copy_s * 1e9).round() as u64,
        ..Scripted::default()
    };
    let r = simulate(&mut a, &jobs, &sched(flat_model(0.01, 0.0)), &mut |_| {}).unwrap();
    assert_eq!(r.preemptions, 1);
    let a_done = *r.token_times[0].last().unwrap();
    let b = &r.token_times[2];
    assert_eq!(b.len(), 5);
    // B's first token came before its preemption; the second is the first after its resume.
    let resumed = b[1];
    let overlapped = r.token_times[1]
        .iter()
        .copied()
        .find(|&t| t > a_done + 1e-12)
        .unwrap();
    (resumed, a_done, overlapped)
}

#[test]
fn a_swap_in_that_ends_before_the_step_adds_no_stall_and_a_late_one_adds_the_difference() {
    let (t_tiny, issued, step_end) = overlap_run(1e-6);
    assert!(close(issued, 0.03), "{issued}");
    assert!(close(step_end, 0.04), "{step_end}");
    // The copy is issued at the resume, overlaps C's step, and B joins the next step.
    assert!(close(t_tiny, 0.05), "{t_tiny}");
    // A copy that still ends within C's step: no stall at all.
    let (t_fits, _, _) = overlap_run(0.009);
    assert!(close(t_fits, t_tiny), "{t_fits} vs {t_tiny}");
    // A copy that ends 15 ms after the step B could join: exactly 15 ms later.
    let copy = 0.025;
    let (t_late, _, _) = overlap_run(copy);
    let expect = copy - (step_end - issued);
    assert!(
        close(t_late - t_tiny, expect),
        "stall {} expected {expect}",
        t_late - t_tiny
    );
}

#[test]
fn a_synchronous_swap_is_charged_to_the_step_in_full() {
    // vLLM v0: 2 layers, 16-token blocks of 16 bytes; 5 blocks of budget. Two requests of 32
    // tokens fill 4 blocks; growing both to 33 needs 2 more: one is swapped out (2 blocks,
    // 2 x 2 x 2 = 8 per-block calls) synchronously.
    let mut p = PagedModel::new(5 * 16, 16, 1, 2, 1 << 20).unwrap();
    let j = |id| Job::new(id, 0.0, 32, 2);
    assert!(p.admit(&j(0), 32).unwrap().is_some());
    assert!(p.admit(&j(1), 32).unwrap().is_some());
    assert!(!p.grow(&[(0, 33), (1, 33)]).unwrap());
    let (how, out) = p.preempt(1).unwrap();
    assert_eq!(how, Preempted::Swapped);
    assert_eq!(out.transfers.len(), 1);
    let t = out.transfers[0];
    assert_eq!((t.dir, t.bytes, t.descriptors), (Dir::ToHost, 32, 8));
    assert!(t.sync && t.submit == Submit::PerCall);
    // Charged: with 1 us per call and 8 calls, the step waits 8 us (bytes take 32 ns).
    let mut m = flat_model(0.01, 0.0);
    m.gpu.copy_call_s = 1e-6;
    assert!(close(t.engine_s(&m), 8e-6));
    // The swap-in is the same, the other way.
    let out = p.resume(&j(1), 32).unwrap().unwrap();
    assert_eq!(out.cached_tokens, 32);
    let t = out.transfers[0];
    assert_eq!(
        (t.dir, t.bytes, t.descriptors, t.sync),
        (Dir::ToDevice, 32, 8, true)
    );
    assert_eq!(p.counters().copy_calls, 16);
}

fn vllm_job(id: u64, context: usize, hash_ids: &[u64]) -> Job {
    Job {
        hash_ids: Arc::from(hash_ids),
        ..Job::new(id, 0.0, context, 8)
    }
}

#[test]
fn vllm_v1_hits_the_prefix_cache_on_a_repeated_prompt() {
    // 1 byte per token, 16-token blocks, 400 blocks.
    let mut v = VllmV1::new(400 * 16, 16, 1, 2, None).unwrap();
    let a = vllm_job(1, 1024, &[11, 12]);
    let out = v.admit(&a, 1024).unwrap().unwrap();
    assert_eq!(out.cached_tokens, 0);
    v.finish(1).unwrap();
    // The same two 512-token prefix blocks: every 16-token block hits but the last (at least
    // one token is computed).
    let b = vllm_job(2, 1024, &[11, 12]);
    let out = v.admit(&b, 1024).unwrap().unwrap();
    assert_eq!(out.cached_tokens, 1024 - 16);
    assert!(out.transfers.is_empty());
    // A request sharing only the first prefix block hits 32 blocks, even while B holds them.
    let c = vllm_job(3, 1024, &[11, 99]);
    assert_eq!(v.admit(&c, 1024).unwrap().unwrap().cached_tokens, 512);
    // A different first block: chained hashes match nothing after it.
    let d = vllm_job(4, 1024, &[98, 12]);
    assert_eq!(v.admit(&d, 1024).unwrap().unwrap().cached_tokens, 0);
    // Without hash ids (Azure), prompts are private.
    let e = vllm_job(5, 600, &[]);
    let f = vllm_job(6, 600, &[]);
    v.admit(&e, 600).unwrap().unwrap();
    assert_eq!(v.admit(&f, 600).unwrap().unwrap().cached_tokens, 0);
    assert_eq!(v.vllm_counters().gpu_hit_tokens, 1008 + 512);

    // Through the scheduler: the second request's prefill skips the cached tokens.
    let jobs = [
        Job {
            arrival_s: 0.0,
            ..vllm_job(0, 1024, &[11, 12])
        },
        Job {
            arrival_s: 10.0,
            ..vllm_job(1, 1024, &[11, 12])
        },
    ];
    let mut v = VllmV1::new(200 * 16, 16, 1, 2, None).unwrap();
    let r = simulate(&mut v, &jobs, &sched(flat_model(0.01, 0.001)), &mut |_| {}).unwrap();
    assert_eq!(r.cached_prompt_tokens, 1008);
    // TTFT: 1 + 1024 tokens for the first, 1 + 16 (10 ms floor) for the second.
    assert!(close(r.ttft.max, 1.025), "{:?}", r.ttft);
    assert!(close(r.ttft.p50, 0.017), "{:?}", r.ttft);
}

#[test]
fn vllm_v1_recompute_charges_the_re_prefill() {
    // 6 blocks of 16 tokens. A and B (32-token prompts) run; at 49 tokens they need 8 blocks:
    // B (latest arrival) is preempted at 48 tokens and its blocks go to the free queue, tail
    // first. A takes B's last two blocks as it grows to 72 tokens, evicting their hashes;
    // B's first block stays cached. When A finishes, B resumes: 16 tokens cached, 32 prefilled
    // again.
    let jobs = [Job::new(0, 0.0, 32, 40), Job::new(1, 0.0, 32, 40)];
    let mut v = VllmV1::new(6 * 16, 16, 1, 2, None).unwrap();
    let r = simulate(&mut v, &jobs, &sched(flat_model(0.01, 0.001)), &mut |_| {}).unwrap();
    assert_eq!(r.finished, 2);
    assert_eq!((r.preemptions, r.recomputes), (1, 1));
    assert_eq!(r.recomputed_tokens, 32);
    assert_eq!(v.vllm_counters().gpu_hit_tokens, 16);
    // The resume step (right after A's last token) computes 1 + 32 tokens: 33 ms, not 10.
    let b = &r.token_times[1];
    let a_done = *r.token_times[0].last().unwrap();
    let first_after = b.iter().copied().find(|&t| t > a_done).unwrap();
    assert!(
        close(first_after - a_done, 0.033),
        "{}",
        first_after - a_done
    );
    // The same with a cold cache (the first block evicted too) recomputes all 48.
    let mut v = VllmV1::new(6 * 16, 16, 1, 2, None).unwrap();
    let x = Job::new(9, 0.0, 48, 1);
    v.admit(&x, 48).unwrap().unwrap();
    v.preempt(9).unwrap();
    let filler = Job::new(10, 0.0, 96, 1);
    v.admit(&filler, 96).unwrap().unwrap();
    v.finish(10).unwrap();
    assert_eq!(v.resume(&x, 48).unwrap().unwrap().cached_tokens, 0);
}

#[test]
fn vllm_v1_offload_copies_one_descriptor_per_block_per_layer() {
    // 4 layers: every block is 2 x 4 = 8 descriptors. 16-byte blocks, 8 on the GPU, 64 on the
    // CPU.
    let mut v = VllmV1::new(8 * 16, 16, 1, 4, Some(64 * 16)).unwrap();
    let a = Job::new(1, 0.0, 40, 20);
    let out = v.admit(&a, 40).unwrap().unwrap();
    assert!(out.transfers.is_empty(), "nothing on the CPU yet");
    // The prefill filled 2 blocks: stored after the step, in one batched submission.
    let stores = v.after_step();
    assert_eq!(stores.len(), 1);
    let s = stores[0];
    assert_eq!((s.dir, s.bytes, s.descriptors), (Dir::ToHost, 32, 16));
    assert_eq!(s.submit, Submit::Batched);
    assert!(!s.sync && s.submit_on_step);
    assert!(v.after_step().is_empty(), "nothing new");
    // Growing to 48 fills the third block.
    assert!(v.grow(&[(1, 48)]).unwrap());
    let stores = v.after_step();
    assert_eq!((stores[0].bytes, stores[0].descriptors), (16, 8));
    // Preempt, let another request evict A's GPU blocks, resume: the GPU has nothing, the CPU
    // has all three full blocks but the one holding the last token is computed.
    v.preempt(1).unwrap();
    let b = Job::new(2, 0.0, 128, 1);
    v.admit(&b, 128).unwrap().unwrap();
    v.finish(2).unwrap();
    v.after_step();
    let out = v.resume(&a, 48).unwrap().unwrap();
    assert_eq!(out.cached_tokens, 32);
    assert_eq!(out.transfers.len(), 1);
    let l = out.transfers[0];
    assert_eq!((l.dir, l.bytes, l.descriptors), (Dir::ToDevice, 32, 16));
    assert!(!l.sync);
    let c = v.vllm_counters();
    assert_eq!(c.cpu_hit_tokens, 32);
    assert_eq!(c.loaded_blocks, 2);
    // Merging adjacent blocks (not what vLLM's CUDA path does) needs fewer descriptors.
    let mut w = VllmV1::new(8 * 16, 16, 1, 4, Some(64 * 16)).unwrap();
    w.set_coalesce(true);
    w.admit(&Job::new(1, 0.0, 64, 1), 64).unwrap().unwrap();
    assert_eq!(
        w.after_step()[0].descriptors,
        8,
        "4 adjacent blocks, one run"
    );
}

#[test]
fn vllm_v1_frees_blocks_and_refuses_what_does_not_fit() {
    let mut v = VllmV1::new(4 * 16, 16, 1, 1, None).unwrap();
    assert!(v.admit(&Job::new(1, 0.0, 64, 1), 64).unwrap().is_some());
    assert_eq!(v.free_blocks(), 0);
    assert!(v.admit(&Job::new(2, 0.0, 1, 1), 1).unwrap().is_none());
    assert!(!v.grow(&[(1, 65)]).unwrap());
    assert!(v.grow(&[(7, 3)]).is_err(), "unknown request");
    v.finish(1).unwrap();
    assert_eq!(v.free_blocks(), 4);
    assert_eq!(v.usage(), Usage::default());
    assert!(v.finish(1).is_err());
}

fn trace_err(name: &str, bytes: &[u8]) -> String {
    match read_trace_from(Path::new(name), bytes, None) {
        Err(Error::Input(m)) => m,
        other => panic!("{name}: expected an input error, got {other:?}"),
    }
}

#[test]
fn a_line_without_end_ends_with_an_error() {
    // What /dev/zero gives: NUL bytes without a newline, without end.
    let zeros = std::io::repeat(0).take(64 << 20);
    let e = match read_trace_from(Path::new("/dev/zero"), zeros, None) {
        Err(Error::Input(m)) => m,
        other => panic!("expected an input error, got {other:?}"),
    };
    assert!(e.starts_with("/dev/zero:1: line longer than"), "{e}");
}

#[test]
fn an_endless_stream_of_blank_lines_ends_with_an_error() {
    let blank = std::io::repeat(b'\n');
    let e = match read_trace_from(Path::new("blank.csv"), blank, None) {
        Err(Error::Input(m)) => m,
        other => panic!("expected an input error, got {other:?}"),
    };
    assert!(e.contains("blank lines in a row"), "{e}");
    assert!(e.starts_with("blank.csv:"), "{e}");
}

#[test]
fn a_byte_order_mark_before_the_csv_header_is_accepted() {
    let csv =
        "\u{feff}TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n";
    let t = read_trace_from(Path::new("bom.csv"), csv.as_bytes(), None).unwrap();
    assert_eq!(t.requests.len(), 1);
    assert_eq!(t.requests[0].context_tokens, 374);
}

#[test]
fn errors_quote_at_most_a_bounded_piece_of_the_input() {
    let long = "9".repeat(100_000);
    let csv = format!("TIMESTAMP,ContextTokens,GeneratedTokens\n{long}\n");
    let e = trace_err("long.csv", csv.as_bytes());
    assert!(e.starts_with("long.csv:2:"), "{e}");
    assert!(e.len() < 300, "{} bytes: {}", e.len(), &e[..200]);
    let csv = format!("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,{long},1\n");
    let e = trace_err("long.csv", csv.as_bytes());
    assert!(e.len() < 300, "{} bytes", e.len());
    let csv = format!("TIMESTAMP,ContextTokens,GeneratedTokens\n{long}-01-01 00:00:00,1,1\n");
    let e = trace_err("long.csv", csv.as_bytes());
    assert!(e.len() < 300, "{} bytes", e.len());
}

#[test]
fn scheduler_settings_are_checked() {
    let mut c = sched(flat_model(0.01, 0.0));
    for q in [f64::NAN, -1.0, f64::INFINITY] {
        c.fair_quantum_s = q;
        assert!(matches!(c.validate(), Err(Error::InvalidConfig(_))), "{q}");
    }
    c.fair_quantum_s = 0.0;
    assert!(c.validate().is_ok());
    c.max_slots = 0;
    assert!(c.validate().is_err());
    let mut a = Scripted::default();
    assert!(simulate(&mut a, &[Job::new(0, 0.0, 1, 1)], &c, &mut |_| {}).is_err());
}

#[test]
fn vmm_calls_cost_the_step_inline_and_only_when_behind_in_the_background() {
    // 10 ms steps; a map call costs cuMemMap + cuMemSetAccess = 37.45 us (h100-pcie5).
    let m = flat_model(0.01, 0.0);
    let map = m.gpu.map_s + m.gpu.set_access_s;
    let run = |maps: (u64, u64)| {
        let mut a = Scripted {
            maps_per_grow: maps,
            ..Scripted::default()
        };
        simulate(
            &mut a,
            &[Job::new(0, 0.0, 4, 3)],
            &sched(m.clone()),
            &mut |_| {},
        )
        .unwrap()
    };
    // Inline mapping: every step starts after its 10 calls.
    let r = run((10, 0));
    assert!(close(r.vmm_step_s, 3.0 * 10.0 * map), "{}", r.vmm_step_s);
    assert!(close(r.sim_s, 3.0 * (0.01 + 10.0 * map)), "{}", r.sim_s);
    // The same calls on the background mapper, which keeps up: free for the steps.
    let r = run((0, 10));
    assert_eq!(r.vmm_step_s, 0.0);
    assert!(close(r.vmm_background_s, 3.0 * 10.0 * map));
    assert!(close(r.sim_s, 0.03), "{}", r.sim_s);
    // 400 calls per step (15 ms) behind 10 ms steps: each later step waits for the backlog.
    let r = run((0, 400));
    let behind = 400.0 * map - 0.01;
    assert!(close(r.vmm_step_s, 2.0 * behind), "{}", r.vmm_step_s);
    assert!(close(r.sim_s, 0.03 + 2.0 * behind), "{}", r.sim_s);
}

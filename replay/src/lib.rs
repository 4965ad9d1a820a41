//! Trace replay: the main job of `kvvm replay`.
//!
//! A serving trace ([`trace`]) is replayed through a continuous-batching scheduler
//! ([`sched::simulate`]) on a simulated clock calibrated by a GPU profile ([`profile`]), once per
//! allocator, all behind the [`alloc::KvAllocator`] trait:
//!
//! - `kvvm-interleaved` and `kvvm-per-layer`: a real `KvCache` (host backend unless told
//!   otherwise) with real pages mapped; preemption swaps whole requests to host buffers in
//!   coarse copies that overlap compute and reuses host copies ([`adapter::KvvmAllocator`]); every
//!   token's KV carries a stamp checked when its request resumes and when it finishes;
//! - `vllm-v1`: vLLM V1's block pool with automatic prefix caching, recomputing preempted
//!   requests ([`vllm::VllmV1`], a bookkeeping model);
//! - `vllm-v1-offload`: the same with the CPU offloading connector (per-block copies);
//! - `vllm-v0-swap`: vLLM v0's paged allocator swapping synchronously, one copy per block per
//!   layer ([`alloc::PagedModel`]);
//! - `static`: a reservation of `max_tokens` per request ([`alloc::StaticModel`]).
//!
//! The time model ([`timing`], [`sched`]) charges copies where they land: on the copy engines
//! concurrently with compute, on the step when it is synchronous or needs the data. [`replay`]
//! runs every allocator and returns a [`Report`] with latency percentiles; `docs/replay.md`
//! in the repository describes the model, the profiles and their sources.

pub mod adapter;
pub mod alloc;
mod error;
pub mod profile;
pub mod sched;
pub mod timing;
pub mod trace;
pub mod vllm;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use kvvm::vmm::BackendConfig;
use kvvm::{CacheConfig, DType, KvCache, Layout, ModelShape};

pub use adapter::KvvmAllocator;
pub use alloc::{Counters, KvAllocator, Outcome, PagedModel, Preempted, StaticModel, Usage};
pub use error::{Error, Result};
pub use profile::{GpuProfile, StepModel};
pub use sched::{simulate, Job, Percentiles, RunResult, Sample, SchedConfig};
pub use trace::{read_trace, Request, Trace, TraceFormat};
pub use vllm::VllmV1;

/// One of the allocators a replay compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AllocatorKind {
    /// kvvm with a layout.
    Kvvm(Layout),
    /// vLLM V1: 16-token blocks, prefix caching, recompute on preemption.
    VllmV1,
    /// vLLM V1 with CPU offloading.
    VllmV1Offload,
    /// vLLM v0: 16-token blocks, synchronous per-block swap.
    VllmV0Swap,
    /// Static reservation of `max_tokens` per request.
    Static,
}

impl AllocatorKind {
    /// The name in reports.
    pub fn name(self) -> String {
        match self {
            AllocatorKind::Kvvm(l) => format!("kvvm-{l}"),
            AllocatorKind::VllmV1 => "vllm-v1".into(),
            AllocatorKind::VllmV1Offload => "vllm-v1-offload".into(),
            AllocatorKind::VllmV0Swap => "vllm-v0-swap".into(),
            AllocatorKind::Static => "static".into(),
        }
    }

    /// Parses a name of [`AllocatorKind::name`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown name.
    pub fn parse(s: &str) -> Result<AllocatorKind> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown allocator {} (known: {})",
                    quote(s),
                    Self::ALL.map(|k| k.name()).join(", ")
                ))
            })
    }

    /// The allocators of the report, in report order.
    pub const ALL: [AllocatorKind; 6] = [
        AllocatorKind::Kvvm(Layout::Interleaved),
        AllocatorKind::Kvvm(Layout::PerLayer),
        AllocatorKind::VllmV1,
        AllocatorKind::VllmV1Offload,
        AllocatorKind::VllmV0Swap,
        AllocatorKind::Static,
    ];
}

/// Everything a replay needs besides the trace.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayConfig {
    /// Model shapes.
    pub model: ModelShape,
    /// Element type.
    pub dtype: DType,
    /// Device memory budget for KV, bytes (the same for every allocator).
    pub budget_bytes: u64,
    /// Host memory for swapped-out KV, bytes.
    pub host_budget_bytes: u64,
    /// Backend of the kvvm caches.
    pub backend: BackendConfig,
    /// Page size of the kvvm caches (`None`: the backend's granularity).
    pub page_size: Option<usize>,
    /// Decode steps the kvvm background mapper maps ahead.
    pub lookahead_steps: usize,
    /// Scheduler settings (`max_slots` and `max_tokens` also size the caches).
    pub sched: SchedConfig,
    /// Allocators to compare, in report order.
    pub allocators: Vec<AllocatorKind>,
}

/// The result of a replay, one [`RunResult`] per allocator.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Report {
    /// The trace file.
    pub trace: String,
    /// Its format.
    pub format: TraceFormat,
    /// Requests replayed.
    pub requests: usize,
    /// Requests longer than `max_tokens` (cut to fit).
    pub truncated: usize,
    /// Prompt tokens in leading blocks whose hash an earlier request of the trace already had
    /// (Mooncake `hash_ids`, 512-token blocks; 0 for traces without them): what prefix sharing
    /// could save. Not used by the replay.
    pub shared_prefix_tokens: u64,
    /// Prompt tokens of all requests.
    pub prompt_tokens: u64,
    /// Model preset.
    pub model: String,
    /// KV bytes per token.
    pub token_bytes: u64,
    /// Device budget.
    pub budget_bytes: u64,
    /// Host budget.
    pub host_budget_bytes: u64,
    /// Backend of the kvvm caches.
    pub backend: String,
    /// GPU profile of the step model.
    pub gpu: String,
    /// Scheduler settings (with the step model and its profile).
    pub sched: SchedConfig,
    /// One entry per allocator.
    pub results: Vec<RunResult>,
}

/// `s` in double quotes, cut to 64 characters: error messages never echo unbounded input.
pub fn quote(s: &str) -> String {
    const MAX: usize = 64;
    let mut cut: String = s.chars().take(MAX).collect();
    if s.chars().nth(MAX).is_some() {
        cut.push_str("...");
    }
    format!("{cut:?}")
}

/// Builds the allocator `kind` for `config`.
///
/// # Errors
/// Configuration and backend errors.
pub fn make_allocator(kind: AllocatorKind, config: &ReplayConfig) -> Result<Box<dyn KvAllocator>> {
    let m = &config.model;
    let token_bytes = m.token_bytes(config.dtype) as u64;
    Ok(match kind {
        AllocatorKind::Kvvm(layout) => {
            let cache = KvCache::new(
                CacheConfig::new(m.layers, m.kv_heads, m.head_dim)
                    .with_dtype(config.dtype)
                    .with_max_slots(config.sched.max_slots)
                    .with_max_tokens(config.sched.max_tokens)
                    .with_layout(layout)
                    .with_page_size(config.page_size)
                    .with_budget_bytes(config.budget_bytes)
                    .with_backend(config.backend.clone())
                    .with_lookahead_steps(config.lookahead_steps)
                    .with_create_all_pages(false),
            )?;
            Box::new(KvvmAllocator::new(
                Arc::new(cache),
                config.host_budget_bytes,
            )?)
        }
        AllocatorKind::VllmV1 | AllocatorKind::VllmV1Offload => Box::new(VllmV1::new(
            config.budget_bytes,
            16,
            token_bytes,
            m.layers,
            (kind == AllocatorKind::VllmV1Offload).then_some(config.host_budget_bytes),
        )?),
        AllocatorKind::VllmV0Swap => Box::new(PagedModel::new(
            config.budget_bytes,
            16,
            token_bytes,
            m.layers,
            config.host_budget_bytes,
        )?),
        AllocatorKind::Static => Box::new(StaticModel::new(
            config.budget_bytes,
            config.sched.max_tokens,
            token_bytes,
        )?),
    })
}

/// Replays `trace` through every allocator of `config`. `progress(allocator index, finished
/// requests)` is called as requests finish.
///
/// # Errors
/// Configuration, backend and allocator errors; [`Error::InvalidConfig`] when a request cannot
/// run even alone under the budget.
pub fn replay(
    trace: &Trace,
    config: &ReplayConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Report> {
    if config.allocators.is_empty() {
        return Err(Error::InvalidConfig("no allocator to replay".into()));
    }
    config.sched.validate()?;
    let jobs = sched::prepare(&trace.requests, config.sched.max_tokens, config.sched.speed)?;
    let mut results = Vec::with_capacity(config.allocators.len());
    for (k, &kind) in config.allocators.iter().enumerate() {
        let started = std::time::Instant::now();
        let mut alloc = make_allocator(kind, config)?;
        let mut r = simulate(alloc.as_mut(), &jobs, &config.sched, &mut |d| {
            progress(k, d)
        })?;
        drop(alloc);
        r.wall_s = started.elapsed().as_secs_f64();
        results.push(r);
    }
    Ok(Report {
        trace: trace.path.display().to_string(),
        format: trace.format,
        requests: jobs.len(),
        truncated: jobs.iter().filter(|j| j.truncated).count(),
        shared_prefix_tokens: shared_prefix_tokens(&trace.requests),
        prompt_tokens: trace.requests.iter().map(|r| r.context_tokens as u64).sum(),
        model: config.model.name.to_string(),
        token_bytes: config.model.token_bytes(config.dtype) as u64,
        budget_bytes: config.budget_bytes,
        host_budget_bytes: config.host_budget_bytes,
        backend: format!("{:?}", config.backend.choice).to_lowercase(),
        gpu: config.sched.step.gpu.name.clone(),
        sched: config.sched.clone(),
        results,
    })
}

/// Tokens of [`Report::shared_prefix_tokens`].
pub fn shared_prefix_tokens(requests: &[Request]) -> u64 {
    const BLOCK: u64 = 512;
    let mut seen = std::collections::HashSet::new();
    let mut shared = 0;
    for r in requests {
        let lead = r.hash_ids.iter().take_while(|h| seen.contains(*h)).count() as u64;
        shared += (lead * BLOCK).min(r.context_tokens as u64);
        seen.extend(r.hash_ids.iter().copied());
    }
    shared
}

fn gib(b: u64) -> String {
    format!("{:.2}", b as f64 / (1u64 << 30) as f64)
}

/// Seconds with a unit that keeps three significant digits (`ms` below one second).
fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1}ms", s * 1e3)
    } else {
        format!("{s:.2}s")
    }
}

impl Report {
    /// The report as tables (what `kvvm replay` prints): latency, then memory and copies.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "trace {} ({}), {} requests ({} cut to {} tokens), model {} ({} KiB/token), \
             budget {} GiB, host {} GiB, speed {}x, max {} running, GPU profile {}",
            self.trace,
            self.format.name(),
            self.requests,
            self.truncated,
            self.sched.max_tokens,
            self.model,
            self.token_bytes / 1024,
            gib(self.budget_bytes),
            gib(self.host_budget_bytes),
            self.sched.speed,
            self.sched.max_slots,
            self.gpu,
        );
        if self.shared_prefix_tokens > 0 {
            let _ = writeln!(
                s,
                "{:.1}% of prompt tokens lie in prefixes an earlier request shared (hash_ids)",
                100.0 * self.shared_prefix_tokens as f64 / self.prompt_tokens.max(1) as f64
            );
        }
        let _ = writeln!(
            s,
            "{:<17} {:<5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>6} {:>7} {:>5}",
            "allocator",
            "kind",
            "TTFT p50",
            "p90",
            "p99",
            "TBT p50",
            "p90",
            "p99",
            "tok/s",
            "stall s",
            "util",
            "preempt",
            "integ"
        );
        for r in &self.results {
            let _ = writeln!(
                s,
                "{:<17} {:<5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7.0} {:>8.1} {:>6.3} {:>7} {:>5}",
                r.allocator,
                r.kind,
                secs(r.ttft.p50),
                secs(r.ttft.p90),
                secs(r.ttft.p99),
                secs(r.tbt.p50),
                secs(r.tbt.p90),
                secs(r.tbt.p99),
                r.throughput_tokens_per_s,
                r.preempt_stall_s,
                r.utilization,
                r.preemptions,
                if r.kind == "model" {
                    "-".to_string()
                } else {
                    r.integrity_errors.to_string()
                },
            );
        }
        let _ = writeln!(
            s,
            "\n{:<17} {:>5} {:>6} {:>8} {:>8} {:>9} {:>10} {:>10} {:>10} {:>8} {:>8} {:>7} {:>7}",
            "allocator",
            "peak",
            "mean",
            "swap GiB",
            "reuse MiB",
            "copy calls",
            "cached tok",
            "recomputed",
            "copy wait",
            "vmm step",
            "vmm bg",
            "sim s",
            "wall s"
        );
        for r in &self.results {
            let _ = writeln!(
                s,
                "{:<17} {:>5} {:>6.1} {:>8} {:>9} {:>10} {:>10} {:>10} {:>9.2}s {:>7.2}s {:>7.2}s {:>7.1} {:>7.2}",
                r.allocator,
                r.peak_batch,
                r.mean_batch,
                gib(r.swapped_bytes),
                r.reuse_saved_bytes >> 20,
                r.copy_calls,
                r.cached_prompt_tokens,
                r.recomputed_tokens,
                r.copy_wait_s,
                r.vmm_step_s,
                r.vmm_background_s,
                r.sim_s,
                r.wall_s,
            );
        }
        let _ = writeln!(
            s,
            "kind: real = kvvm's cache and swap engine on real memory; model = bookkeeping model. \
             integ: tokens whose KV read back wrong (models hold no bytes)."
        );
        s
    }

    /// The report as one JSON object (the contract of `kvvm replay --json`).
    pub fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }

    /// Writes an SVG plot: memory held (solid) and live (thin) over simulated time, and the
    /// cumulative distributions of TTFT and TBT, one color per allocator.
    ///
    /// # Errors
    /// [`Error::Input`] if the file cannot be written.
    pub fn plot(&self, path: &Path) -> Result<()> {
        use plotters::prelude::*;
        let err = |e: &dyn std::fmt::Display| {
            Error::Input(format!("{}: {e}", quote(&path.display().to_string())))
        };
        let root = SVGBackend::new(path, (1500, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (left, right) = root.split_horizontally(700);
        let (mid, rightmost) = right.split_horizontally(400);
        let colors = [
            RED,
            BLUE,
            GREEN,
            MAGENTA,
            CYAN,
            BLACK,
            RGBColor(255, 140, 0),
        ];
        let t_max = self
            .results
            .iter()
            .flat_map(|r| r.samples.last().map(|s| s.t))
            .fold(1.0f64, f64::max);
        let y_max = (self.budget_bytes as f64 / (1u64 << 30) as f64) * 1.05;
        let mut chart = ChartBuilder::on(&left)
            .caption(
                format!(
                    "KV memory: {} ({} requests, {})",
                    short(&self.trace),
                    self.requests,
                    self.gpu
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("simulated time (s)")
            .y_desc("GiB (solid: held, thin: live tokens)")
            .draw()
            .map_err(|e| err(&e))?;
        for (k, r) in self.results.iter().enumerate() {
            let c = colors[k % colors.len()];
            let every = (r.samples.len() / 1500).max(1);
            let pts = |f: fn(&Sample) -> u64| {
                r.samples
                    .iter()
                    .step_by(every)
                    .map(move |s| (s.t, f(s) as f64 / (1u64 << 30) as f64))
            };
            chart
                .draw_series(LineSeries::new(pts(|s| s.held_bytes), c.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(format!("{} (util {:.3})", r.allocator, r.utilization))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            chart
                .draw_series(LineSeries::new(
                    pts(|s| s.live_bytes),
                    c.mix(0.5).stroke_width(1),
                ))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| err(&e))?;
        for (area, title, pick) in [
            (
                &mid,
                "TTFT (CDF)",
                (|r: &RunResult| &r.ttft_samples) as fn(&RunResult) -> &Vec<f64>,
            ),
            (&rightmost, "TBT, stalls included (CDF)", |r: &RunResult| {
                &r.tbt_samples
            }),
        ] {
            let all = self.results.iter().flat_map(|r| pick(r).iter().copied());
            let lo = all
                .clone()
                .filter(|&v| v > 0.0)
                .fold(f64::INFINITY, f64::min)
                .clamp(1e-6, 1e-3);
            let hi = all.fold(lo * 10.0, f64::max) * 1.2;
            let mut cdf = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(45)
                .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)
                .map_err(|e| err(&e))?;
            cdf.configure_mesh()
                .x_desc("seconds (log)")
                .y_desc("fraction")
                .draw()
                .map_err(|e| err(&e))?;
            for (k, r) in self.results.iter().enumerate() {
                let c = colors[k % colors.len()];
                let v = pick(r);
                let n = v.len();
                // The CDF at 300 evenly spaced ranks, and 100 more in the top percent (the tail
                // is what the plot is for).
                let ranks = (0..=300)
                    .map(|k| k as f64 / 300.0)
                    .chain((1..=100).map(|k| 0.99 + 0.01 * k as f64 / 100.0))
                    .map(|q| ((q * n as f64).ceil() as usize).clamp(1, n.max(1)));
                let mut last = 0;
                let pts: Vec<(f64, f64)> = ranks
                    .filter(|&k| {
                        let keep = n > 0 && k > last;
                        last = last.max(k);
                        keep
                    })
                    .map(|k| (v[k - 1].max(lo), k as f64 / n as f64))
                    .collect();
                cdf.draw_series(LineSeries::new(pts, c.stroke_width(2)))
                    .map_err(|e| err(&e))?;
            }
        }
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}

fn short(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Reads `path` (at most `limit` requests) and replays it: [`read_trace`] then [`replay`].
///
/// # Errors
/// As [`read_trace`] and [`replay`].
pub fn replay_file(
    path: &Path,
    limit: Option<usize>,
    config: &ReplayConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Report> {
    let trace = read_trace(path, limit)?;
    replay(&trace, config, progress)
}

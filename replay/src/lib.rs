//! Trace replay: the main job of `kvvm replay`.
//!
//! A serving trace ([`trace`]) is replayed through a continuous-batching scheduler
//! ([`sched::simulate`]) on a simulated clock, once per allocator, all behind the
//! [`alloc::KvAllocator`] trait:
//!
//! - `kvvm-interleaved` and `kvvm-per-layer`: a real [`kvvm::KvCache`] (host
//!   backend unless told otherwise) with real pages mapped; preemption swaps whole requests to
//!   host buffers in coarse copies and reuses host copies ([`adapter::KvvmAllocator`]); every
//!   token's KV carries a stamp checked when its request resumes and when it finishes;
//! - `paged-16`: vLLM-style 16-token blocks, a bookkeeping model with the same byte budget,
//!   preempting by swap with one copy per block per layer ([`alloc::PagedModel`]);
//! - `static`: a reservation of `max_tokens` per request ([`alloc::StaticModel`]).
//!
//! [`replay`] runs them all and returns a [`Report`]; `docs/replay.md` in the repository
//! describes the model and every column.

pub mod adapter;
pub mod alloc;
mod error;
pub mod sched;
pub mod trace;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use kvvm::vmm::BackendConfig;
use kvvm::{CacheConfig, DType, KvCache, Layout, ModelShape};

pub use adapter::KvvmAllocator;
pub use alloc::{Counters, KvAllocator, PagedModel, Preempted, StaticModel, Usage};
pub use error::{Error, Result};
pub use sched::{simulate, Job, RunResult, Sample, SchedConfig, StepModel};
pub use trace::{read_trace, Request, Trace, TraceFormat};

/// One of the allocators a replay compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AllocatorKind {
    /// kvvm with a layout.
    Kvvm(Layout),
    /// The paged bookkeeping model with blocks of this many tokens.
    Paged(usize),
    /// Static reservation of `max_tokens` per request.
    Static,
}

impl AllocatorKind {
    /// The name in reports.
    pub fn name(self) -> String {
        match self {
            AllocatorKind::Kvvm(l) => format!("kvvm-{l}"),
            AllocatorKind::Paged(b) => format!("paged-{b}"),
            AllocatorKind::Static => "static".into(),
        }
    }

    /// The four allocators of the report, in report order.
    pub const ALL: [AllocatorKind; 4] = [
        AllocatorKind::Kvvm(Layout::Interleaved),
        AllocatorKind::Kvvm(Layout::PerLayer),
        AllocatorKind::Paged(16),
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
    /// Scheduler settings.
    pub sched: SchedConfig,
    /// One entry per allocator.
    pub results: Vec<RunResult>,
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
        AllocatorKind::Paged(block) => Box::new(PagedModel::new(
            config.budget_bytes,
            block,
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
    if config.sched.max_slots == 0 {
        return Err(Error::InvalidConfig("max_slots must be positive".into()));
    }
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
        sched: config.sched,
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

impl Report {
    /// The report as a table (what `kvvm replay` prints).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "trace {} ({}), {} requests ({} cut to {} tokens), model {} ({} KiB/token), \
             budget {} GiB, host {} GiB, speed {}x, max {} running",
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
        );
        if self.shared_prefix_tokens > 0 {
            let _ = writeln!(
                s,
                "{:.1}% of prompt tokens lie in prefixes an earlier request shared (hash_ids; not reused by this replay)",
                100.0 * self.shared_prefix_tokens as f64 / self.prompt_tokens.max(1) as f64
            );
        }
        let _ = writeln!(
            s,
            "{:<17} {:>6} {:>5} {:>6} {:>8} {:>9} {:>9} {:>9} {:>7} {:>9} {:>8} {:>6}",
            "allocator",
            "util",
            "peak",
            "mean",
            "preempt",
            "swap GiB",
            "reuse MiB",
            "calls",
            "wall s",
            "sim s",
            "lat s",
            "integ"
        );
        for r in &self.results {
            let _ = writeln!(
                s,
                "{:<17} {:>6.3} {:>5} {:>6.1} {:>8} {:>9} {:>9} {:>9} {:>7.2} {:>9.1} {:>8.2} {:>6}",
                r.allocator,
                r.utilization,
                r.peak_batch,
                r.mean_batch,
                r.preemptions,
                gib(r.swapped_bytes),
                r.reuse_saved_bytes >> 20,
                r.backend_calls,
                r.wall_s,
                r.sim_s,
                r.mean_latency_s,
                r.integrity_errors
            );
        }
        s
    }

    /// The report as one JSON object (the contract of `kvvm replay --json`).
    pub fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }

    /// Writes an SVG plot of memory held (solid) and live (thin) over simulated time, one color
    /// per allocator.
    ///
    /// # Errors
    /// [`Error::Input`] if the file cannot be written.
    pub fn plot(&self, path: &Path) -> Result<()> {
        use plotters::prelude::*;
        let err = |e: &dyn std::fmt::Display| Error::Input(format!("{}: {e}", path.display()));
        let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let t_max = self
            .results
            .iter()
            .flat_map(|r| r.samples.last().map(|s| s.t))
            .fold(1.0f64, f64::max);
        let y_max = (self.budget_bytes as f64 / (1u64 << 30) as f64) * 1.05;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "KV memory over time: {} ({} requests)",
                    short(&self.trace),
                    self.requests
                ),
                ("sans-serif", 20),
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
        let colors = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
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

//! `kvvm replay`: replay a serving trace through kvvm and the baseline allocators.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kvvm::{DType, Layout, ModelShape};
use kvvm_replay::{
    self as replay, AllocatorKind, Error, ReplayConfig, Result, SchedConfig, StepModel,
};

use crate::BackendArgs;

/// Options.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// Trace file: Azure CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`) or Mooncake JSONL.
    #[arg(long, default_value = "traces/AzureLLMInferenceTrace_conv.csv")]
    trace: PathBuf,
    /// Model preset (`kvvm info` lists shapes; `@tpN` divides the heads).
    #[arg(long, default_value = "llama-3-8b")]
    model: String,
    /// KV element type.
    #[arg(long, default_value = "f16")]
    dtype: DType,
    /// Device memory budget for KV in bytes (the same for every allocator).
    #[arg(long, default_value_t = 2 << 30)]
    budget: u64,
    /// Host memory for swapped-out KV in bytes.
    #[arg(long, default_value_t = 2 << 30)]
    host_budget: u64,
    /// Replay kvvm with this layout only (default: both layouts).
    #[arg(long)]
    layout: Option<Layout>,
    /// Most requests running at once (the cache's slots).
    #[arg(long, default_value_t = 64)]
    max_slots: usize,
    /// Most tokens per request (longer requests have their prompt cut).
    #[arg(long, default_value_t = 8192)]
    max_tokens: usize,
    /// Replay the first N requests of the trace.
    #[arg(long, default_value_t = 600)]
    limit: usize,
    /// Arrival times are divided by this.
    #[arg(long, default_value_t = 2.0)]
    speed: f64,
    /// Steps between fairness checks (0: none).
    #[arg(long, default_value_t = 50)]
    fair_interval: usize,
    /// Waiting advantage (seconds) at which a waiting request replaces a running one.
    #[arg(long, default_value_t = 10.0)]
    fair_quantum: f64,
    /// Decode steps the kvvm background mapper maps ahead.
    #[arg(long, default_value_t = 8)]
    lookahead: usize,
    /// kvvm page size in bytes (default: the backend's granularity).
    #[arg(long)]
    page_size: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Write an SVG plot of memory use over time per allocator.
    #[arg(long)]
    plot: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
}

pub fn run(args: ReplayArgs) -> Result<()> {
    if args.limit == 0 {
        return Err(Error::InvalidArgument("--limit must be positive".into()));
    }
    let trace = replay::read_trace(&args.trace, Some(args.limit))?;
    if trace.requests.is_empty() {
        return Err(Error::Input(format!(
            "{}: no requests",
            args.trace.display()
        )));
    }
    let allocators = match args.layout {
        Some(l) => vec![
            AllocatorKind::Kvvm(l),
            AllocatorKind::Paged(16),
            AllocatorKind::Static,
        ],
        None => AllocatorKind::ALL.to_vec(),
    };
    let config = ReplayConfig {
        model: ModelShape::preset(&args.model)?,
        dtype: args.dtype,
        budget_bytes: args.budget,
        host_budget_bytes: args.host_budget,
        backend: args.backend.config(),
        page_size: args.page_size,
        lookahead_steps: args.lookahead,
        sched: SchedConfig {
            max_slots: args.max_slots,
            max_tokens: args.max_tokens,
            speed: args.speed,
            fair_interval: args.fair_interval,
            fair_quantum_s: args.fair_quantum,
            step: StepModel::default(),
            ..SchedConfig::default()
        },
        allocators: allocators.clone(),
    };
    let n = trace.requests.len() as u64;
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(
            Some(n * allocators.len() as u64),
            ProgressDrawTarget::stderr(),
        )
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>17} [{bar:40}] {pos}/{len} requests {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let names: Vec<String> = allocators.iter().map(|a| a.name()).collect();
    let report = replay::replay(&trace, &config, &mut |k, done| {
        bar.set_prefix(names[k].clone());
        bar.set_position(k as u64 * n + done as u64);
    })?;
    bar.finish_and_clear();
    if let Some(p) = &args.plot {
        report.plot(p)?;
    }
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
        if let Some(p) = &args.plot {
            println!("plot written to {}", p.display());
        }
    }
    Ok(())
}

//! `kvvm replay`: replay a serving trace through kvvm and the baseline allocators.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kvvm::{DType, Layout, ModelShape};
use kvvm_replay::{
    self as replay, AllocatorKind, Error, GpuProfile, ReplayConfig, Result, SchedConfig, StepModel,
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
    /// Write an SVG plot: memory over time, TTFT and TBT distributions, per allocator.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// GPU profile of the step-time model: h100-pcie5, h200 or a100 (docs/replay.md gives
    /// every constant's source).
    #[arg(long, default_value = "h100-pcie5")]
    gpu: String,
    /// A profile file (`key = value` lines, as --print-profile prints) whose keys replace the
    /// --gpu profile's: measured constants.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Print the GPU profile and the step model derived for --model, then exit.
    #[arg(long)]
    print_profile: bool,
    /// Replay only these allocators (comma-separated names, in this order).
    #[arg(long, value_delimiter = ',')]
    allocators: Vec<String>,
    #[command(flatten)]
    backend: BackendArgs,
}

/// The GPU profile of `--gpu`, with `--profile`'s keys applied.
fn gpu_profile(args: &ReplayArgs) -> Result<GpuProfile> {
    let mut gpu = GpuProfile::named(&args.gpu)?;
    if let Some(path) = &args.profile {
        let name = path.display().to_string();
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::Input(format!("{}: cannot read: {e}", replay::quote(&name))))?;
        if meta.len() > 1 << 20 {
            return Err(Error::Input(format!(
                "{}: larger than 1 MiB, not a profile",
                replay::quote(&name)
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Input(format!("{}: cannot read: {e}", replay::quote(&name))))?;
        gpu.apply_text(&name, &text)?;
    }
    Ok(gpu)
}

pub fn run(args: ReplayArgs) -> Result<()> {
    if args.limit == 0 {
        return Err(Error::InvalidArgument("--limit must be positive".into()));
    }
    if !(args.fair_quantum.is_finite() && args.fair_quantum >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "--fair-quantum must be a finite number of seconds >= 0, got {}",
            args.fair_quantum
        )));
    }
    if !(args.speed.is_finite() && args.speed > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "--speed must be a positive finite number, got {}",
            args.speed
        )));
    }
    let model = ModelShape::preset(&args.model)?;
    let gpu = gpu_profile(&args)?;
    let step = StepModel::new(&gpu, &model, args.dtype)?;
    if args.print_profile {
        print!("{}{}", gpu.to_text(), step.to_text());
        return Ok(());
    }
    let mut allocators = match args.layout {
        Some(l) => AllocatorKind::ALL
            .into_iter()
            .filter(|k| !matches!(k, AllocatorKind::Kvvm(x) if *x != l))
            .collect(),
        None => AllocatorKind::ALL.to_vec(),
    };
    if !args.allocators.is_empty() {
        allocators = args
            .allocators
            .iter()
            .map(|s| AllocatorKind::parse(s.trim()))
            .collect::<Result<Vec<_>>>()?;
    }
    // The plot's file is checked before the replay (which may take minutes): created now,
    // written at the end.
    if let Some(p) = &args.plot {
        std::fs::File::create(p).map_err(|e| {
            Error::Input(format!(
                "{}: cannot write the plot: {e}",
                replay::quote(&p.display().to_string())
            ))
        })?;
    }
    let result = run_with(&args, model, step, allocators);
    if result.is_err() {
        if let Some(p) = &args.plot {
            // The replay failed: no empty plot is left behind.
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

fn run_with(
    args: &ReplayArgs,
    model: ModelShape,
    step: StepModel,
    allocators: Vec<AllocatorKind>,
) -> Result<()> {
    let trace = replay::read_trace(&args.trace, Some(args.limit))?;
    if trace.requests.is_empty() {
        return Err(Error::Input(format!(
            "{}: no requests",
            args.trace.display()
        )));
    }
    let config = ReplayConfig {
        model,
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
            step,
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

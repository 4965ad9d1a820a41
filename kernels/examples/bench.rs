//! Runs the CPU decode attention benchmark and prints the report as JSON.
//!
//! ```text
//! cargo run --release -p kvvm-kernels --example bench -- [batch] [context] [dtype] [layers] [iters]
//! ```
//! Defaults: Llama-3-8B shapes (32 q heads, 8 KV heads, head_dim 128), batch 32, context 2048, f16,
//! 32 layers.

use std::process::ExitCode;

use kvvm_kernels::{bench_attention, BenchConfig};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = BenchConfig::default();
    let parse = |i: usize, what: &str| -> Result<Option<usize>, String> {
        args.get(i)
            .map(|s| s.parse().map_err(|_| format!("bad {what}: {s:?}")))
            .transpose()
    };
    let mut run = || -> Result<(), String> {
        if let Some(b) = parse(0, "batch")? {
            cfg.batch = b;
        }
        if let Some(c) = parse(1, "context")? {
            cfg.context = c;
        }
        if let Some(d) = args.get(2) {
            cfg.dtype = d.parse().map_err(|e| format!("{e}"))?;
        }
        if let Some(l) = parse(3, "layers")? {
            cfg.layers = l;
        }
        if let Some(n) = parse(4, "iters")? {
            cfg.iters = n;
        }
        let report = bench_attention(&cfg).map_err(|e| e.to_string())?;
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

//! `kvvm`: inspect the backend, replay serving traces, and run the benchmarks.

mod bench;
mod bench_attention;
mod bench_swap;
mod replay;

use clap::{Args, Parser, Subcommand};
use kvvm::vmm::{self, BackendChoice, BackendConfig};

#[derive(Parser, Debug)]
#[command(
    name = "kvvm",
    version,
    about = "KV-cache virtual memory for LLM serving"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the backend kvvm would use, its device, granularity and limits.
    Info(InfoArgs),
    /// Replay a serving trace through kvvm and the baseline allocators (the main job).
    Replay(replay::ReplayArgs),
    /// Run a benchmark against its baseline in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Backend options shared by the subcommands.
#[derive(Args, Debug, Clone)]
pub struct BackendArgs {
    /// Backend: auto (CUDA if usable, else host), host or cuda. `KVVM_BACKEND` overrides auto.
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    /// Host backend mapping unit in bytes (a multiple of the OS page size).
    #[arg(long, default_value_t = vmm::host::DEFAULT_GRANULARITY)]
    host_granularity: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: i32,
}

impl BackendArgs {
    fn config(&self) -> BackendConfig {
        BackendConfig {
            choice: self.backend,
            host_granularity: self.host_granularity,
            device: self.device,
            ..BackendConfig::default()
        }
    }
}

#[derive(Args, Debug)]
struct InfoArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// Page budget to report (bytes); defaults to 90% of the device memory.
    #[arg(long)]
    budget: Option<u64>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn info(args: InfoArgs) -> kvvm::Result<()> {
    let backend = vmm::open(&args.backend.config())?;
    let info = backend.info();
    let budget = args.budget.unwrap_or(info.total_memory / 10 * 9);
    let cuda_status = match vmm::cuda::CudaBackend::new(args.backend.device) {
        Ok(_) => "available".to_string(),
        Err(e) => format!("unavailable: {e}"),
    };
    if args.json {
        let v = serde_json::json!({
            "backend": info.kind,
            "device_name": info.device_name,
            "device_ordinal": info.device_ordinal,
            "granularity": info.granularity,
            "total_memory": info.total_memory,
            "budget_bytes": budget,
            "max_map_count": info.max_map_count,
            "map_headroom": info.map_headroom,
            "usable_memory": info.usable_memory,
            "memory_accounting": memory_note(info.kind),
            "cuda": cuda_status,
            "version": env!("CARGO_PKG_VERSION"),
        });
        println!("{v}");
    } else {
        println!("kvvm {}", env!("CARGO_PKG_VERSION"));
        println!("backend          {}", info.kind);
        println!(
            "device           {} (ordinal {})",
            info.device_name, info.device_ordinal
        );
        println!("granularity      {} bytes", info.granularity);
        println!("device memory    {} bytes", info.total_memory);
        println!("budget           {budget} bytes");
        match (info.max_map_count, info.map_headroom) {
            (Some(max), Some(h)) => println!("vm.max_map_count {max} (headroom {h} mappings)"),
            _ => println!("vm.max_map_count not applicable"),
        }
        if let Some(u) = info.usable_memory {
            println!("usable memory    {u} bytes (MemAvailable, memory cgroup limit)");
        }
        println!("cuda             {cuda_status}");
        println!("memory           {}", memory_note(info.kind));
    }
    Ok(())
}

/// Where kvvm's memory shows in the usual accounting.
fn memory_note(kind: vmm::BackendKind) -> &'static str {
    match kind {
        vmm::BackendKind::Host => {
            "host pages live in a memfd named kvvm-arena: they count in the memory cgroup \
             (memory.current) and in Shmem of /proc/meminfo, but in the process's RSS only where \
             mapped and touched; see them with `ls -l /proc/PID/fd | grep kvvm-arena` and \
             `grep kvvm-arena /proc/PID/smaps` (docs/ffi.md, Memory)"
        }
        vmm::BackendKind::Cuda => {
            "device pages count in the GPU's memory (nvidia-smi); pinned host copies of the swap \
             engine in the process's RSS"
        }
    }
}

/// Refuses, before a benchmark starts, a run whose sizes need more host memory than this
/// process may use (`MemAvailable` and the memory cgroup limit): `bytes` is `None` when the
/// sizes overflow.
pub fn check_host_memory(what: &str, bytes: Option<u64>) -> kvvm::Result<()> {
    let usable = vmm::host::HostMemory::read().usable();
    match bytes {
        Some(b) if b <= usable => Ok(()),
        Some(b) => Err(kvvm::Error::InvalidArgument(format!(
            "{what} needs {b} bytes of host memory, more than this process may use ({usable} \
             bytes: MemAvailable and the memory cgroup limit)"
        ))),
        None => Err(kvvm::Error::InvalidArgument(format!(
            "{what}: the sizes overflow"
        ))),
    }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(a) => info(a).map_err(|e| e.to_string()),
        Command::Replay(a) => replay::run(a).map_err(|e| e.to_string()),
        Command::Bench(b) => bench::run(b).map_err(|e| e.to_string()),
    };
    if let Err(e) = result {
        eprintln!("kvvm: {e}");
        std::process::exit(1);
    }
}

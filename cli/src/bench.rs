//! `kvvm bench ...`: each benchmark measures kvvm and its baseline in the same run.

use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use kvvm::vmm::host::{HostBackend, HostConfig};
use kvvm::vmm::{self, Backend, BackendKind, BackendOp};
use kvvm::{CacheConfig, KvCache, Layout, SlotId};
use kvvm::{Error, Result};
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};

use crate::BackendArgs;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Map and unmap pages through the backend and through raw system calls.
    Map(MapArgs),
    /// A decode loop growing every slot one token per step, with the background mapper and with
    /// mapping inline.
    Step(StepArgs),
    /// Swap whole requests out to host memory and back in: coarse transfers against the
    /// fine-grained (16-token block per layer) baseline and a plain copy of the same bytes.
    Swap(crate::bench_swap::SwapArgs),
    /// Decode attention over contiguous (both layouts) and paged KV, same data.
    Attention(crate::bench_attention::AttentionArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Map(a) => bench_map(a),
        BenchCommand::Step(a) => bench_step(a),
        BenchCommand::Swap(a) => crate::bench_swap::run(a),
        BenchCommand::Attention(a) => crate::bench_attention::run(a),
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------------------------------------
// bench map

#[derive(Args, Debug)]
pub struct MapArgs {
    /// Pages to map and unmap per round.
    #[arg(long, default_value_t = 512)]
    pages: usize,
    /// Page size in bytes.
    #[arg(long, default_value_t = 2 << 20)]
    page_size: usize,
    /// Rounds (the median round is reported).
    #[arg(long, default_value_t = 31)]
    rounds: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    backend: BackendArgs,
}

fn sys(what: &str, e: nix::errno::Errno) -> Error {
    Error::Backend {
        backend: kvvm::vmm::BackendKind::Host,
        op: BackendOp::Map,
        code: e as i64,
        message: format!("{what}: {e}"),
    }
}

/// The baseline: the same map/unmap pattern with plain system calls on a memfd.
fn raw_map_round(pages: usize, page: usize, rounds: usize) -> Result<Vec<f64>> {
    let fd = nix::sys::memfd::memfd_create(
        c"kvvm-bench-raw",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .map_err(|e| sys("memfd_create", e))?;
    let total = pages * page;
    nix::unistd::ftruncate(&fd, total as i64).map_err(|e| sys("ftruncate", e))?;
    nix::fcntl::fallocate(
        fd.as_raw_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        total as i64,
    )
    .map_err(|e| sys("fallocate", e))?;
    let len = NonZeroUsize::new(total).ok_or_else(|| Error::InvalidArgument("no pages".into()))?;
    // SAFETY: a fresh inaccessible reservation at a kernel-chosen address.
    let base = unsafe {
        mmap_anonymous(
            None,
            len,
            ProtFlags::PROT_NONE,
            MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
        )
    }
    .map_err(|e| sys("mmap reserve", e))?;
    let base_addr = base.as_ptr() as usize;
    let plen = NonZeroUsize::new(page).ok_or_else(|| Error::InvalidArgument("zero page".into()))?;
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        for i in 0..pages {
            // Map in reverse arena order so that neighbouring mappings cannot merge, as in the
            // backend run below.
            let off = ((pages - 1 - i) * page) as i64;
            let at = NonZeroUsize::new(base_addr + i * page);
            // SAFETY: the target lies inside the reservation made above, which nothing else uses.
            unsafe {
                mmap(
                    at,
                    plen,
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_SHARED | MapFlags::MAP_FIXED,
                    &fd,
                    off,
                )
            }
            .map_err(|e| sys("mmap", e))?;
        }
        for i in 0..pages {
            let at = NonZeroUsize::new(base_addr + i * page);
            // SAFETY: as above; the page is ours and no reference into it exists.
            unsafe {
                mmap_anonymous(
                    at,
                    plen,
                    ProtFlags::PROT_NONE,
                    MapFlags::MAP_PRIVATE | MapFlags::MAP_FIXED | MapFlags::MAP_NORESERVE,
                )
            }
            .map_err(|e| sys("mmap PROT_NONE", e))?;
        }
        out.push(t.elapsed().as_nanos() as f64 / pages as f64);
    }
    if let Some(p) = NonNull::new(base_addr as *mut libc::c_void) {
        // SAFETY: the reservation made above, unused from here on.
        let _ = unsafe { munmap(p, total) };
    }
    Ok(out)
}

fn backend_map_round(
    b: &dyn Backend,
    pages: usize,
    page: usize,
    rounds: usize,
) -> Result<Vec<f64>> {
    let r = b.reserve(pages * page)?;
    let mut handles = Vec::with_capacity(pages);
    for _ in 0..pages {
        handles.push(b.create_page(page)?);
    }
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        for i in 0..pages {
            b.map(r.addr + (i * page) as u64, &[&handles[pages - 1 - i]])?;
        }
        for i in 0..pages {
            b.unmap(r.addr + (i * page) as u64, page)?;
        }
        out.push(t.elapsed().as_nanos() as f64 / pages as f64);
    }
    for h in handles {
        b.release_page(h).map_err(|(_, e)| e)?;
    }
    b.free_reservation(r)?;
    Ok(out)
}

/// Map and unmap time per page (ns) of one round over `pages` pages in address order, either
/// as vAttention calls the driver — one map call per page, i.e. on CUDA one `cuMemMap` plus one
/// `cuMemSetAccess` per page per buffer, and one unmap per page — or as kvvm's cache does — one
/// map call per run (CUDA: a `cuMemMap` per page, then one `cuMemSetAccess` over the run) and one
/// unmap over the run.
fn pattern_round(
    b: &dyn Backend,
    r: &kvvm::vmm::VaRange,
    handles: &[kvvm::vmm::PageHandle],
    page: usize,
    per_page: bool,
) -> Result<(f64, f64)> {
    let n = handles.len().max(1) as f64;
    let t = Instant::now();
    if per_page {
        for (i, h) in handles.iter().enumerate() {
            b.map(r.addr + (i * page) as u64, &[h])?;
        }
    } else {
        let refs: Vec<&kvvm::vmm::PageHandle> = handles.iter().collect();
        b.map(r.addr, &refs)?;
    }
    let map_ns = t.elapsed().as_nanos() as f64 / n;
    let t = Instant::now();
    if per_page {
        for i in 0..handles.len() {
            b.unmap(r.addr + (i * page) as u64, page)?;
        }
    } else {
        b.unmap(r.addr, handles.len() * page)?;
    }
    Ok((map_ns, t.elapsed().as_nanos() as f64 / n))
}

/// Medians over `rounds` of [`pattern_round`] for both patterns, interleaved:
/// ((vAttention map, unmap), (kvvm run map, unmap)) in ns per page.
#[allow(clippy::type_complexity)]
fn pattern_rounds(
    b: &dyn Backend,
    pages: usize,
    page: usize,
    rounds: usize,
) -> Result<((f64, f64), (f64, f64))> {
    let r = b.reserve(pages * page)?;
    let mut handles = Vec::with_capacity(pages);
    let mut outcome = Ok(());
    for _ in 0..pages {
        match b.create_page(page) {
            Ok(h) => handles.push(h),
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    let mut per_page = (Vec::new(), Vec::new());
    let mut run = (Vec::new(), Vec::new());
    if outcome.is_ok() {
        for _ in 0..rounds.max(1) {
            match pattern_round(b, &r, &handles, page, true)
                .and_then(|v| Ok((v, pattern_round(b, &r, &handles, page, false)?)))
            {
                Ok(((vm, vu), (km, ku))) => {
                    per_page.0.push(vm);
                    per_page.1.push(vu);
                    run.0.push(km);
                    run.1.push(ku);
                }
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
    }
    for h in handles {
        if let Err((_, e)) = b.release_page(h) {
            outcome = outcome.and(Err(e));
        }
    }
    if let Err(e) = b.free_reservation(r) {
        outcome = outcome.and(Err(e));
    }
    outcome?;
    Ok((
        (median(per_page.0), median(per_page.1)),
        (median(run.0), median(run.1)),
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Driver calls per page of one map and one unmap of `pages` single-page calls, through a CUDA
/// backend with or without the zero page: `(map, unmap)` as `{cuMemMap, cuMemUnmap,
/// cuMemSetAccess}` counts.
fn cuda_calls_per_page(
    b: &kvvm::vmm::cuda::CudaBackend,
    pages: usize,
    page: usize,
) -> Result<(serde_json::Value, serde_json::Value)> {
    let r = b.reserve(pages * page)?;
    let handles: Vec<_> = (0..pages)
        .map(|_| b.create_page(page))
        .collect::<Result<_>>()?;
    let c0 = b.driver_calls();
    for (i, h) in handles.iter().enumerate() {
        b.map(r.addr + (i * page) as u64, &[h])?;
    }
    let c1 = b.driver_calls();
    for i in 0..pages {
        b.unmap(r.addr + (i * page) as u64, page)?;
    }
    let c2 = b.driver_calls();
    for h in handles {
        b.release_page(h).map_err(|(_, e)| e)?;
    }
    b.free_reservation(r)?;
    let per = |a: kvvm::vmm::cuda::DriverCalls, b: kvvm::vmm::cuda::DriverCalls| {
        let n = pages.max(1) as f64;
        serde_json::json!({
            "cuMemMap": (b.mem_map - a.mem_map) as f64 / n,
            "cuMemUnmap": (b.mem_unmap - a.mem_unmap) as f64 / n,
            "cuMemSetAccess": (b.mem_set_access - a.mem_set_access) as f64 / n,
        })
    };
    Ok((per(c0, c1), per(c1, c2)))
}

fn bench_map(a: MapArgs) -> Result<()> {
    let config = kvvm::vmm::BackendConfig {
        host_granularity: a
            .page_size
            .min(a.backend.host_granularity)
            .max(kvvm::vmm::host::os_page_size()),
        ..a.backend.config()
    };
    let backend = kvvm::vmm::open(&config)?;
    // The same backend without the zero page behind unmapped ranges: its cost per map + unmap.
    let plain = kvvm::vmm::open(&kvvm::vmm::BackendConfig {
        choice: match backend.kind() {
            kvvm::vmm::BackendKind::Host => kvvm::vmm::BackendChoice::Host,
            kvvm::vmm::BackendKind::Cuda => kvvm::vmm::BackendChoice::Cuda,
        },
        zero_page: false,
        ..config.clone()
    })?;
    let page = a.page_size;
    if a.pages == 0 || a.rounds == 0 {
        return Err(Error::InvalidArgument(
            "--pages and --rounds must be positive".into(),
        ));
    }
    if backend.kind() == kvvm::vmm::BackendKind::Host {
        // The kvvm pages and the baseline's memfd exist at the same time.
        crate::check_host_memory(
            "bench map",
            (a.pages as u64)
                .checked_mul(page as u64)
                .and_then(|b| b.checked_mul(2)),
        )?;
    }
    // Interleave them so that drift in the machine's state affects all alike.
    let mut kv = Vec::new();
    let mut kv_plain = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..a.rounds {
        kv.extend(backend_map_round(&*backend, a.pages, page, 1)?);
        kv_plain.extend(backend_map_round(&*plain, a.pages, page, 1)?);
        if backend.kind() == kvvm::vmm::BackendKind::Host {
            raw.extend(raw_map_round(a.pages, page, 1)?);
        }
    }
    drop(plain);
    let kvvm_plain_ns = median(kv_plain);
    let cuda_calls = if backend.kind() == kvvm::vmm::BackendKind::Cuda {
        let mut by_mode = serde_json::Map::new();
        for zero in [true, false] {
            let b = kvvm::vmm::cuda::CudaBackend::with_zero_page(config.device, zero)?;
            let (map, unmap) = cuda_calls_per_page(&b, a.pages.min(64), page)?;
            by_mode.insert(
                if zero { "zero_page" } else { "no_zero_page" }.into(),
                serde_json::json!({ "map": map, "unmap": unmap }),
            );
        }
        Some(serde_json::Value::Object(by_mode))
    } else {
        None
    };
    let ((va_map, va_unmap), (run_map, run_unmap)) =
        pattern_rounds(&*backend, a.pages, page, a.rounds)?;
    let va_ns = va_map + va_unmap;
    let run_ns = run_map + run_unmap;
    let kvvm_ns = median(kv);
    let raw_ns = median(raw);
    let ratio = if raw_ns > 0.0 {
        kvvm_ns / raw_ns
    } else {
        f64::NAN
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "backend": backend.kind(),
                "pages": a.pages,
                "page_size": page,
                "rounds": a.rounds,
                "kvvm_ns_per_page": kvvm_ns,
                "raw_ns_per_page": raw_ns,
                "ratio": ratio,
                "vattention_ns_per_page": va_ns,
                "vattention_map_ns_per_page": va_map,
                "vattention_unmap_ns_per_page": va_unmap,
                "kvvm_run_ns_per_page": run_ns,
                "kvvm_run_map_ns_per_page": run_map,
                "kvvm_run_unmap_ns_per_page": run_unmap,
                "vattention_over_kvvm_run": va_ns / run_ns,
                "zero_page": config.zero_page,
                "kvvm_no_zero_page_ns_per_page": kvvm_plain_ns,
                "zero_page_cost_ns_per_page": kvvm_ns - kvvm_plain_ns,
                "cuda_calls_per_page": cuda_calls,
            })
        );
    } else {
        println!("bench map: {} pages of {} bytes, map + unmap one page per call, median of {} rounds ({} backend)", a.pages, page, a.rounds, backend.kind());
        println!("  kvvm backend   {kvvm_ns:>10.0} ns/page (zero page behind unmapped ranges)");
        println!(
            "  without it     {kvvm_plain_ns:>10.0} ns/page (zero page costs {:.0} ns/page)",
            kvvm_ns - kvvm_plain_ns
        );
        if let Some(c) = &cuda_calls {
            println!("  CUDA driver calls per page (map, unmap): {c}");
        }
        println!("  raw syscalls   {raw_ns:>10.0} ns/page");
        println!("  ratio          {ratio:>10.3}  (target <= 1.25)");
        println!(
            "  call patterns over {} pages in address order (map + unmap, ns/page):",
            a.pages
        );
        println!(
            "    vAttention: map + access per page   {va_ns:>10.0}  (map {va_map:.0}, unmap {va_unmap:.0})"
        );
        println!(
            "    kvvm: one map call per run          {run_ns:>10.0}  (map {run_map:.0}, unmap {run_unmap:.0})"
        );
        println!(
            "    vAttention / kvvm                   {:>10.3}",
            va_ns / run_ns
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bench step

#[derive(Args, Debug)]
pub struct StepArgs {
    /// Model preset.
    #[arg(long, default_value = "llama-3-8b")]
    model: String,
    /// Slots in the batch.
    #[arg(long, default_value_t = 256)]
    slots: usize,
    /// Decode steps.
    #[arg(long, default_value_t = 2048)]
    steps: usize,
    /// Tokens per slot at most (slots stop growing there).
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// Simulated compute between steps, in microseconds, spent busy-waiting like a host thread
    /// waiting for the GPU (a real decode step of this batch takes tens of milliseconds).
    #[arg(long, default_value_t = 1000)]
    compute_us: u64,
    /// Background mapper lookahead in steps.
    #[arg(long, default_value_t = 8)]
    lookahead: usize,
    /// Every this many steps the longest request finishes and a new one starts in its slot
    /// (`shrink` to 0 tokens: its pages are unmapped once the compute stream's work queued so
    /// far has run); 0: requests never finish.
    #[arg(long, default_value_t = 0)]
    churn_every: usize,
    /// CUDA: device work per step on the cache's compute stream, a device-to-device copy of this
    /// many MiB (the GPU stays busy like a decode step's kernels, so fences are pending when
    /// pages are unmapped); 0: none.
    #[arg(long, default_value_t = 64)]
    device_work_mib: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    backend: BackendArgs,
}

/// Simulated device work on a compute stream of its own (CUDA): a copy between two device
/// buffers per step. Freed (after the stream is synchronized) when dropped.
struct DeviceWork {
    stream: kvvm_sys::CUstream,
    bufs: [u64; 2],
    bytes: usize,
}

impl DeviceWork {
    /// `None` on the host backend or for 0 bytes. The device's context must be current (the
    /// CUDA backend makes it current on the thread that opened it).
    fn new(kind: BackendKind, mib: usize) -> Result<Option<Self>> {
        if kind != BackendKind::Cuda || mib == 0 {
            return Ok(None);
        }
        let bytes = mib << 20;
        let drv = |e| kvvm::vmm::cuda::driver_error(BackendOp::Copy, e);
        let stream =
            kvvm_sys::result::stream::create(kvvm_sys::CU_STREAM_NON_BLOCKING).map_err(drv)?;
        let mut w = DeviceWork {
            stream,
            bufs: [0, 0],
            bytes,
        };
        for b in &mut w.bufs {
            *b = kvvm_sys::result::mem::alloc(bytes).map_err(drv)?;
        }
        Ok(Some(w))
    }

    fn stream(&self) -> u64 {
        self.stream.expose_provenance() as u64
    }

    /// Enqueues one step's work.
    fn step(&self) -> Result<()> {
        // SAFETY: both buffers are this value's allocations of `bytes` bytes, alive until it is
        // dropped after synchronizing the stream, which is its own.
        unsafe {
            kvvm_sys::result::mem::memcpy_dtod_async(
                self.bufs[1],
                self.bufs[0],
                self.bytes,
                self.stream,
            )
        }
        .map_err(|e| kvvm::vmm::cuda::driver_error(BackendOp::Copy, e))
    }
}

impl Drop for DeviceWork {
    fn drop(&mut self) {
        // SAFETY: the stream and buffers are this value's; the stream is synchronized before
        // the buffers it uses are freed, and each is released once.
        unsafe {
            let _ = kvvm_sys::result::stream::synchronize(self.stream);
            for b in self.bufs {
                if b != 0 {
                    let _ = kvvm_sys::result::mem::free(b);
                }
            }
            let _ = kvvm_sys::result::stream::destroy(self.stream);
        }
    }
}

#[derive(Debug, Default, serde::Serialize)]
struct StepRun {
    p50_ns: u64,
    p90_ns: u64,
    p99_ns: u64,
    p999_ns: u64,
    mapper_batches: u64,
    mapper_notified: u64,
    max_ns: u64,
    pages_mapped: usize,
    backend_calls: u64,
    foreground_calls: u64,
    deferred_unmaps: u64,
    deferred_unmap_mean_ns: u64,
    deferred_unmap_max_ns: u64,
    fence_waits: u64,
}

fn step_run(a: &StepArgs, layout: Layout, lookahead: usize) -> Result<StepRun> {
    let opened = vmm::open(&a.backend.config())?;
    let backend: Arc<dyn Backend> = if opened.kind() == BackendKind::Host {
        // On the host the benchmark measures mapping, not memory: pages are never touched, so
        // they need no memory behind them.
        drop(opened);
        Arc::new(HostBackend::new(HostConfig {
            granularity: a.backend.host_granularity,
            populate: false,
            ..HostConfig::default()
        })?)
    } else {
        opened
    };
    let mut cfg = CacheConfig::for_model(&a.model, a.slots, a.max_tokens, u64::MAX / 4)?;
    cfg.layout = layout;
    cfg.lookahead_steps = lookahead;
    let g = kvvm::Geometry::new(&cfg, backend.granularity())?;
    cfg.budget_bytes = (g.pages_per_slot * g.buffers * a.slots * g.page_size) as u64;
    let kind = backend.kind();
    let cache = KvCache::with_backend(cfg, backend)?;
    let work = DeviceWork::new(kind, a.device_work_mib)?;
    if let Some(w) = &work {
        cache.set_compute_stream(Some(w.stream()));
    }
    let per_page = g.tokens_in(1).max(1);
    // Stagger the requests so that they cross page boundaries at different steps, as in a real
    // batch of requests with different prompt lengths.
    let mut tokens: Vec<(SlotId, usize)> = Vec::with_capacity(a.slots);
    for i in 0..a.slots {
        let s = cache.alloc_slot()?;
        let t = (i * per_page / a.slots.max(1)) % per_page + 1;
        cache.ensure(s, t)?;
        tokens.push((s, t));
    }
    cache.quiesce();
    let calls0 = cache.backend().total_calls();
    let fg0 = cache.backend().foreground_calls();
    let mut lat = Vec::with_capacity(a.steps);
    // A finished request's slot, idle until the next churn point, where a new request starts
    // in it (so the step after the shrink does not wait for the slot's deferred unmap).
    let mut idle: Option<(SlotId, usize)> = None;
    for n in 0..a.steps {
        if a.churn_every > 0 && n > 0 && n % a.churn_every == 0 {
            if let Some((s, _)) = idle.take() {
                tokens.push((s, 0));
            }
            // The longest request finishes: its pages go once the work queued so far has run.
            if let Some(k) = (0..tokens.len()).max_by_key(|&k| tokens[k].1) {
                let t = tokens.swap_remove(k);
                cache.shrink(t.0, 0)?;
                idle = Some(t);
            }
        }
        for t in tokens.iter_mut() {
            t.1 = (t.1 + 1).min(a.max_tokens);
        }
        let start = Instant::now();
        cache.step(&tokens)?;
        lat.push(start.elapsed().as_nanos() as u64);
        if let Some(w) = &work {
            w.step()?;
        }
        if a.compute_us > 0 {
            // Busy-wait, as a serving engine's host thread does while it waits for the GPU
            // (CUDA's default synchronization spins); sleeping would measure wake-up latency.
            let until = Instant::now() + Duration::from_micros(a.compute_us);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
    }
    cache.quiesce();
    drop(work);
    lat.sort_unstable();
    let stats = cache.stats();
    Ok(StepRun {
        p50_ns: percentile(&lat, 0.50),
        p99_ns: percentile(&lat, 0.99),
        p90_ns: percentile(&lat, 0.90),
        p999_ns: percentile(&lat, 0.999),
        mapper_batches: stats.mapper_batches,
        mapper_notified: stats.mapper_notified,
        max_ns: lat.last().copied().unwrap_or(0),
        pages_mapped: stats.pool.in_use,
        backend_calls: cache.backend().total_calls() - calls0,
        foreground_calls: cache.backend().foreground_calls() - fg0,
        deferred_unmaps: stats.deferred_unmaps,
        deferred_unmap_mean_ns: stats
            .deferred_unmap_wait_ns
            .checked_div(stats.deferred_unmaps)
            .unwrap_or(0),
        deferred_unmap_max_ns: stats.deferred_unmap_max_wait_ns,
        fence_waits: stats.fence_waits,
    })
}

fn bench_step(a: StepArgs) -> Result<()> {
    let mut results = serde_json::Map::new();
    if !a.json {
        println!(
            "bench step: {} slots of {} shapes, {} steps, {} us simulated compute per step, lookahead {} ({} backend)",
            a.slots, a.model, a.steps, a.compute_us, a.lookahead, format!("{:?}", a.backend.backend).to_lowercase()
        );
        println!(
            "  {:<12} {:>8} {:>12} {:>12} {:>12} {:>10} {:>14} {:>12}",
            "layout", "mode", "p50 ns", "p99 ns", "max ns", "pages", "backend calls", "on caller"
        );
    }
    for layout in [Layout::Interleaved, Layout::PerLayer] {
        let inline = step_run(&a, layout, 0)?;
        let asy = step_run(&a, layout, a.lookahead.max(1))?;
        if !a.json {
            for (mode, r) in [("inline", &inline), ("async", &asy)] {
                println!(
                    "  {:<12} {:>8} {:>12} {:>12} {:>12} {:>10} {:>14} {:>12}",
                    layout.name(),
                    mode,
                    r.p50_ns,
                    r.p99_ns,
                    r.max_ns,
                    r.pages_mapped,
                    r.backend_calls,
                    r.foreground_calls
                );
            }
            println!(
                "  {:<12} async p90 {} ns, p99.9 {} ns; mapper batches {}, of which the caller notified {}",
                layout.name(),
                asy.p90_ns,
                asy.p999_ns,
                asy.mapper_batches,
                asy.mapper_notified
            );
            if a.churn_every > 0 {
                println!(
                    "  {:<12} deferred unmaps {} (mean wait for their fence {} ns, max {} ns), host waits for a fence {}",
                    layout.name(),
                    asy.deferred_unmaps,
                    asy.deferred_unmap_mean_ns,
                    asy.deferred_unmap_max_ns,
                    asy.fence_waits
                );
            }
            println!(
                "  {:<12} async p99 / inline p99 = {:.3} (target <= 0.1)",
                layout.name(),
                asy.p99_ns as f64 / inline.p99_ns.max(1) as f64
            );
        }
        results.insert(
            layout.name().to_string(),
            serde_json::json!({
                "inline_p50_ns": inline.p50_ns,
                "inline_p99_ns": inline.p99_ns,
                "async_p50_ns": asy.p50_ns,
                "async_p99_ns": asy.p99_ns,
                "inline_max_ns": inline.max_ns,
                "async_max_ns": asy.max_ns,
                "pages_mapped": asy.pages_mapped,
                "backend_calls": asy.backend_calls,
                "inline_backend_calls": inline.backend_calls,
                "async_foreground_calls": asy.foreground_calls,
                "inline_p90_ns": inline.p90_ns,
                "inline_p999_ns": inline.p999_ns,
                "async_p90_ns": asy.p90_ns,
                "async_p999_ns": asy.p999_ns,
                "mapper_batches": asy.mapper_batches,
                "mapper_notified": asy.mapper_notified,
                "inline_foreground_calls": inline.foreground_calls,
                "p99_ratio": asy.p99_ns as f64 / inline.p99_ns.max(1) as f64,
                "deferred_unmaps": asy.deferred_unmaps,
                "deferred_unmap_mean_ns": asy.deferred_unmap_mean_ns,
                "deferred_unmap_max_ns": asy.deferred_unmap_max_ns,
                "fence_waits": asy.fence_waits,
            }),
        );
    }
    if a.json {
        let mut top = serde_json::Map::new();
        top.insert("model".into(), a.model.clone().into());
        top.insert("slots".into(), a.slots.into());
        top.insert("steps".into(), a.steps.into());
        top.insert("compute_us".into(), a.compute_us.into());
        top.insert("lookahead".into(), a.lookahead.into());
        top.insert("churn_every".into(), a.churn_every.into());
        top.extend(results);
        println!("{}", serde_json::Value::Object(top));
    }
    Ok(())
}

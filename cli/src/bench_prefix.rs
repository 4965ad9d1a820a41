//! `kvvm bench prefix`: admitting a request whose first N tokens are cached, by mapping the cached
//! pages behind its slot (prefix sharing), against what a cache without sharing must do for the
//! same request: map a fresh slot's pages and write the N tokens' KV into them (a
//! device-to-device copy of the cached KV, not counting the prefill compute sharing also saves).
//! For each layout and N it reports the admission time (median of `--rounds`), the backend calls
//! each admission makes, and the bytes of pages held when k requests share the prefix, each with a
//! private tail, against one copy of the prefix plus the tails and against no sharing.
//!
//! The bytes-held figures count the pool's pages (what a GPU would hold); they are measured on a
//! cache whose host pages are not populated until touched, so that 64 requests' worth of pages
//! fits this machine's memory. The timings use populated pages, created before timing.

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use kvvm::vmm::host::{HostBackend, HostConfig};
use kvvm::vmm::{self, Backend, BackendKind, CopyKind, CopyRegion};
use kvvm::{CacheConfig, KvCache, Layout};
use kvvm::{Error, Result};

use crate::BackendArgs;

/// Options.
#[derive(Args, Debug)]
pub struct PrefixArgs {
    /// Model preset (shapes).
    #[arg(long, default_value = "llama-3-8b")]
    model: String,
    /// Override the model's layer count (smaller runs on small machines).
    #[arg(long)]
    layers: Option<usize>,
    /// Cached prefix lengths in tokens.
    #[arg(long, value_delimiter = ',', default_values_t = [1024usize, 4096, 16384])]
    tokens: Vec<usize>,
    /// Numbers of requests sharing the prefix, for the bytes-held figures.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 64])]
    sharers: Vec<usize>,
    /// Private tokens each sharer adds after the prefix.
    #[arg(long, default_value_t = 256)]
    tail: usize,
    /// Layouts: interleaved, per-layer.
    #[arg(long, value_delimiter = ',', default_values_t = [Layout::Interleaved, Layout::PerLayer])]
    layouts: Vec<Layout>,
    /// Rounds per timing; the median is reported.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    #[command(flatten)]
    backend: BackendArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Admission {
    layout: String,
    prefix_tokens: usize,
    /// Tokens reused by the shared admission.
    hit_tokens: usize,
    prefix_bytes: u64,
    shared_us: f64,
    shared_calls: u64,
    /// Admission into a free slot that still maps the chain (the next turn of a conversation).
    readmit_us: f64,
    readmit_calls: u64,
    copy_us: f64,
    copy_calls: u64,
    speedup: f64,
}

#[derive(Debug, serde::Serialize)]
struct Held {
    layout: String,
    prefix_tokens: usize,
    sharers: usize,
    tail_tokens: usize,
    /// Bytes of pages the pool holds with sharing.
    shared_bytes: u64,
    /// One copy of the prefix plus every sharer's private pages.
    one_copy_plus_tails_bytes: u64,
    /// Every request holding its own copy (no sharing).
    unshared_bytes: u64,
    ratio_to_one_copy: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn config(
    args: &PrefixArgs,
    layout: Layout,
    slots: usize,
    max_tokens: usize,
    budget: u64,
) -> Result<CacheConfig> {
    let mut c = CacheConfig::for_model(&args.model, slots, max_tokens, budget)?;
    if let Some(l) = args.layers {
        c.layers = l;
    }
    c.layout = layout;
    c.backend = args.backend.config();
    c.lookahead_steps = 0;
    Ok(c)
}

fn ids(n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect()
}

/// Writes the bytes of `tokens` tokens of `slot` (so that the pages are touched).
fn fill(cache: &KvCache, slot: kvvm::SlotId, tokens: usize) -> Result<()> {
    if cache.backend().kind() != BackendKind::Host {
        return Ok(());
    }
    for r in cache.slot_ranges(slot, tokens)? {
        // SAFETY: host backend: the slot's first `tokens` tokens are mapped read/write (ensure
        // was called and nothing is shared yet), and nothing else touches them.
        unsafe { std::ptr::write_bytes(r.addr as usize as *mut u8, 0x5a, r.len) };
    }
    Ok(())
}

fn admission(args: &PrefixArgs, layout: Layout, n: usize) -> Result<Admission> {
    // Slots: the publisher, the copy target, the sharer.
    let probe = KvCache::new(config(args, layout, 1, n, u64::MAX >> 2)?)?;
    let g = *probe.geometry();
    drop(probe);
    let pages = g.pages_for(n) * g.buffers;
    let budget = (3 * pages + 2 * g.buffers) as u64 * g.page_size as u64;
    let cache = KvCache::new(config(args, layout, 3, n, budget)?)?;
    let prompt = ids(n);
    let a = cache.alloc_slot()?;
    cache.ensure(a, n)?;
    fill(&cache, a, n)?;
    let hit_pages = cache.publish(a, &prompt, 0)?;
    let calls = |c: &KvCache| c.stats().total_backend_calls();
    let mut shared = Vec::new();
    let mut readmit = Vec::new();
    let mut copy = Vec::new();
    let (mut shared_calls, mut readmit_calls, mut copy_calls) = (0, 0, 0);
    let mut hit_tokens = 0;
    for _ in 0..args.rounds.max(1) {
        // Shared: into a slot that maps nothing.
        cache.reclaim_free_slots()?;
        let c0 = calls(&cache);
        let t = Instant::now();
        let hit = cache.alloc_slot_with_prefix(&prompt, 0)?;
        shared.push(t.elapsed().as_secs_f64() * 1e6);
        shared_calls = calls(&cache) - c0;
        hit_tokens = hit.tokens;
        cache.free_slot(hit.slot)?;
        // Re-admission: the free slot still maps the chain.
        let c0 = calls(&cache);
        let t = Instant::now();
        let again = cache.alloc_slot_with_prefix(&prompt, 0)?;
        readmit.push(t.elapsed().as_secs_f64() * 1e6);
        readmit_calls = calls(&cache) - c0;
        cache.free_slot(again.slot)?;
        cache.reclaim_free_slots()?;
        // Copy: a fresh slot, its pages mapped, the prefix's KV written into them.
        let c0 = calls(&cache);
        let t = Instant::now();
        let b = cache.alloc_slot_for(n)?;
        cache.ensure(b, n)?;
        let regions: Vec<CopyRegion> = cache
            .slot_ranges(a, n)?
            .into_iter()
            .zip(cache.slot_ranges(b, n)?)
            .map(|(src, dst)| CopyRegion {
                dst: dst.addr,
                src: src.addr,
                len: src.len,
            })
            .collect();
        // SAFETY: both slots hold `n` mapped tokens that nothing else touches during the copy;
        // the destination is `b`'s own read/write pages, the source `a`'s (readable).
        let done = unsafe {
            cache
                .backend()
                .copy_async(CopyKind::DeviceToDevice, &regions)
        }?;
        done.wait()?;
        copy.push(t.elapsed().as_secs_f64() * 1e6);
        copy_calls = calls(&cache) - c0;
        cache.free_slot(b)?;
    }
    let (s, r, c) = (median(shared), median(readmit), median(copy));
    Ok(Admission {
        layout: layout.to_string(),
        prefix_tokens: n,
        hit_tokens,
        prefix_bytes: (hit_pages * g.buffers * g.page_size) as u64,
        shared_us: s,
        shared_calls,
        readmit_us: r,
        readmit_calls,
        copy_us: c,
        copy_calls,
        speedup: c / s.max(1e-9),
    })
}

fn held(args: &PrefixArgs, layout: Layout, n: usize, k: usize) -> Result<Held> {
    let max_tokens = n + args.tail;
    let cfg = |budget| config(args, layout, k + 1, max_tokens, budget);
    let probe = KvCache::new(cfg(u64::MAX >> 2)?)?;
    let g = *probe.geometry();
    drop(probe);
    let per_request = g.pages_for(max_tokens) * g.buffers;
    let budget = ((k + 1) * per_request) as u64 * g.page_size as u64;
    // Pages are counted, not touched: unpopulated host pages keep 64 requests within memory.
    let backend: Arc<dyn Backend> = match vmm::resolve_choice(args.backend.config().choice)? {
        vmm::BackendChoice::Cuda => vmm::open(&args.backend.config())?,
        _ => Arc::new(HostBackend::new(HostConfig {
            granularity: args.backend.config().host_granularity,
            populate: false,
            ..HostConfig::default()
        })?),
    };
    let cache = KvCache::with_backend(cfg(budget)?, backend)?;
    let prompt = ids(n);
    let a = cache.alloc_slot()?;
    cache.ensure(a, n)?;
    let published = cache.publish(a, &prompt, 0)?;
    cache.free_slot(a)?;
    cache.reclaim_free_slots()?;
    let mut full = prompt.clone();
    full.extend(ids(args.tail).iter().map(|x| x ^ 0x8000_0000));
    let mut private = 0;
    for _ in 0..k {
        let hit = cache.alloc_slot_with_prefix(&full, 0)?;
        cache.ensure(hit.slot, max_tokens)?;
        private += g.pages_for(max_tokens) - hit.tokens / cache.tokens_per_page()?;
    }
    let page = g.page_size as u64;
    let shared_bytes = cache.stats().pool.in_use as u64 * page;
    let one = ((published + private) * g.buffers) as u64 * page;
    Ok(Held {
        layout: layout.to_string(),
        prefix_tokens: n,
        sharers: k,
        tail_tokens: args.tail,
        shared_bytes,
        one_copy_plus_tails_bytes: one,
        unshared_bytes: (k * per_request) as u64 * page,
        ratio_to_one_copy: shared_bytes as f64 / one.max(1) as f64,
    })
}

pub fn run(args: PrefixArgs) -> Result<()> {
    if args.tokens.is_empty() || args.layouts.is_empty() {
        return Err(Error::InvalidArgument("nothing to measure".into()));
    }
    let mut adm = Vec::new();
    let mut hold = Vec::new();
    for &layout in &args.layouts {
        for &n in &args.tokens {
            adm.push(admission(&args, layout, n)?);
            for &k in &args.sharers {
                hold.push(held(&args, layout, n, k)?);
            }
        }
    }
    if args.json {
        let v = serde_json::json!({ "admission": adm, "held": hold });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| Error::Internal(e.to_string()))?
        );
        return Ok(());
    }
    println!(
        "admission of a request whose first N tokens are cached (median of {} rounds)",
        args.rounds
    );
    println!(
        "{:<12} {:>7} {:>8} {:>11} {:>11} {:>6} {:>11} {:>6} {:>11} {:>6} {:>8}",
        "layout",
        "N",
        "hit",
        "prefix MiB",
        "shared µs",
        "calls",
        "readmit µs",
        "calls",
        "copy µs",
        "calls",
        "speedup"
    );
    for a in &adm {
        println!(
            "{:<12} {:>7} {:>8} {:>11.1} {:>11.1} {:>6} {:>11.1} {:>6} {:>11.1} {:>6} {:>7.1}x",
            a.layout,
            a.prefix_tokens,
            a.hit_tokens,
            a.prefix_bytes as f64 / (1 << 20) as f64,
            a.shared_us,
            a.shared_calls,
            a.readmit_us,
            a.readmit_calls,
            a.copy_us,
            a.copy_calls,
            a.speedup
        );
    }
    println!();
    println!(
        "bytes of pages held by k requests sharing the prefix, each with {} private tokens",
        args.tail
    );
    println!(
        "{:<12} {:>7} {:>4} {:>12} {:>16} {:>13} {:>9}",
        "layout", "N", "k", "shared MiB", "1 copy+tails MiB", "unshared MiB", "ratio"
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for h in &hold {
        println!(
            "{:<12} {:>7} {:>4} {:>12.1} {:>16.1} {:>13.1} {:>9.3}",
            h.layout,
            h.prefix_tokens,
            h.sharers,
            mib(h.shared_bytes),
            mib(h.one_copy_plus_tails_bytes),
            mib(h.unshared_bytes),
            h.ratio_to_one_copy
        );
    }
    Ok(())
}

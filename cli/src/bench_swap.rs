//! `kvvm bench swap`: swap whole requests out to host memory and back in through the
//! [`SwapEngine`] (coarse transfers), against the fine-grained baseline (vLLM's pattern: one copy
//! per 16-token block per layer per K/V) and a plain copy of the same bytes between the same
//! kinds of memory (`memcpy` with the backend's copy-thread count on the host backend; one
//! pinned `copy_async` per request on CUDA) as the physical limit.
//!
//! Every page is touched before timing (the cache's pages by filling them, the host arena by a
//! warm-up round, the baselines' host buffers by a memset), and each figure is the best of
//! `--rounds` rounds.

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use kvvm::vmm::{Backend, BackendKind, CopyKind, CopyRegion, HostBuffer};
use kvvm::{ByteRange, CacheConfig, Kv, KvCache, Layout, SlotId};
use kvvm::{Error, Result};
use kvvm::{SwapConfig, SwapEngine, SwapStats, SwapTicket};

use crate::BackendArgs;

/// Tokens of one block in the fine-grained baseline (vLLM's default block size).
const BLOCK_TOKENS: usize = 16;
/// Host buffers the baselines rotate through (request i uses buffer i mod this).
const STAGING_BUFFERS: usize = 8;

/// Options.
#[derive(Args, Debug)]
pub struct SwapArgs {
    /// Model preset (shapes).
    #[arg(long, default_value = "llama-3-8b")]
    model: String,
    /// Requests swapped out and back in.
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Tokens per request.
    #[arg(long, default_value_t = 1024)]
    tokens: usize,
    /// Cache layout: interleaved or per-layer.
    #[arg(long, default_value = "interleaved")]
    layout: Layout,
    /// Transfer chunk size in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    chunk_bytes: usize,
    /// Swap-outs keep the slots' pages mapped (`SwapConfig::keep_pages`): swap-ins into those
    /// slots then map and populate nothing. Without it, pages are unmapped while the copies run.
    #[arg(long)]
    keep_pages: bool,
    /// Rounds per measurement; the best is reported (the figures are noisy on a shared machine).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[command(flatten)]
    backend: BackendArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Bandwidth in GB/s (10^9 bytes per second).
fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9) / 1e9
}

/// Host copies with `threads` threads, each taking an equal share of every region.
fn parallel_memcpy(regions: &[CopyRegion], threads: usize) {
    let threads = threads.max(1);
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for r in regions {
                    let share = r.len.div_ceil(threads);
                    let start = (t * share).min(r.len);
                    let end = ((t + 1) * share).min(r.len);
                    if start < end {
                        // SAFETY: the caller passes regions whose sources and destinations are
                        // mapped, readable/writable memory of this process that nothing else
                        // accesses meanwhile; threads copy disjoint shares.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                (r.src + start as u64) as usize as *const u8,
                                (r.dst + start as u64) as usize as *mut u8,
                                end - start,
                            )
                        };
                    }
                }
            });
        }
    });
}

struct Bench {
    cache: Arc<KvCache>,
    backend: Arc<dyn Backend>,
    slots: Vec<SlotId>,
    tokens: usize,
    /// The baselines' host buffers, one request's bytes each, used in turn: several, so that
    /// the baselines do not keep hitting one buffer in a large last-level cache while the
    /// engine writes fresh memory.
    staging: Vec<HostBuffer>,
    copy_threads: usize,
}

impl Bench {
    fn request_bytes(&self) -> u64 {
        (self.tokens * self.cache.geometry().bytes_per_token()) as u64
    }

    fn total_bytes(&self) -> u64 {
        self.request_bytes() * self.slots.len() as u64
    }

    /// The contiguous regions between `slot`'s ranges and its staging buffer (packed buffer
    /// after buffer), in direction `kind`.
    fn whole_regions(&self, slot: SlotId, kind: CopyKind) -> Result<Vec<CopyRegion>> {
        let mut off = 0u64;
        let mut out = Vec::new();
        let k = self.slots.iter().position(|&s| s == slot).unwrap_or(0);
        let staging = &self.staging[k % self.staging.len()];
        for r in self.cache.slot_ranges(slot, self.tokens)? {
            let host = staging.addr() + off;
            out.push(match kind {
                CopyKind::DeviceToHost => CopyRegion {
                    dst: host,
                    src: r.addr,
                    len: r.len,
                },
                _ => CopyRegion {
                    dst: r.addr,
                    src: host,
                    len: r.len,
                },
            });
            off += r.len as u64;
        }
        Ok(out)
    }

    /// vLLM's pattern: one region per 16-token block per layer per K/V. In the per-layer layout
    /// these are exactly the (contiguous) blocks of each K or V buffer; in the interleaved
    /// layout a block's rows of one layer are strided, so the baseline copies pieces of the same
    /// size and count from the slot's contiguous range instead.
    fn block_regions(&self, slot: SlotId, kind: CopyKind) -> Result<Vec<CopyRegion>> {
        let g = self.cache.geometry();
        let block = BLOCK_TOKENS * g.row_bytes();
        let mut out = Vec::new();
        for whole in self.whole_regions(slot, kind)? {
            let mut done = 0;
            while done < whole.len {
                let n = (whole.len - done).min(block);
                out.push(CopyRegion {
                    dst: whole.dst + done as u64,
                    src: whole.src + done as u64,
                    len: n,
                });
                done += n;
            }
        }
        Ok(out)
    }

    /// The limit: a plain copy of every request's bytes, request after request, through the
    /// staging buffer.
    fn limit(&self, kind: CopyKind) -> Result<f64> {
        let mut plans = Vec::new();
        for &s in &self.slots {
            plans.push(self.whole_regions(s, kind)?);
        }
        let t0 = Instant::now();
        for regions in &plans {
            if self.backend.kind() == BackendKind::Host {
                parallel_memcpy(regions, self.copy_threads);
            } else {
                // SAFETY: the slot's pages are mapped (its tokens are live and nobody else
                // uses the cache during the benchmark) and the staging buffer is this backend's
                // host buffer; one request at a time, so destinations are not shared.
                unsafe { self.backend.copy_async(kind, regions) }?.wait()?;
            }
        }
        Ok(gbps(self.total_bytes(), t0.elapsed().as_secs_f64()))
    }

    /// The fine-grained baseline: one `copy_async` per block, request after request (the
    /// staging buffer is reused, so a request's copies complete before the next one starts).
    fn fine(&self, kind: CopyKind) -> Result<f64> {
        let mut plans = Vec::new();
        for &s in &self.slots {
            plans.push(self.block_regions(s, kind)?);
        }
        let t0 = Instant::now();
        for regions in &plans {
            // As vLLM swaps: one copy call per block (the CUDA backend issues one
            // cuMemcpyAsync per region) and one event for the whole transfer.
            // SAFETY: as in `limit`; the blocks of one request are disjoint.
            unsafe { self.backend.copy_async(kind, regions) }?.wait()?;
        }
        Ok(gbps(self.total_bytes(), t0.elapsed().as_secs_f64()))
    }

    /// The engine's transfer shape without its page management: each request's ranges cut into
    /// `chunk` byte regions and submitted as one copy, request after request (no map, unmap or
    /// page-table population). Shown in the table to separate the two costs.
    fn chunked(&self, kind: CopyKind, chunk: usize) -> Result<f64> {
        let mut plans = Vec::new();
        for &s in &self.slots {
            let mut regions = Vec::new();
            for w in self.whole_regions(s, kind)? {
                let mut done = 0;
                while done < w.len {
                    let n = (w.len - done).min(chunk);
                    regions.push(CopyRegion {
                        dst: w.dst + done as u64,
                        src: w.src + done as u64,
                        len: n,
                    });
                    done += n;
                }
            }
            plans.push(regions);
        }
        let t0 = Instant::now();
        for regions in &plans {
            // SAFETY: as in `limit`.
            unsafe { self.backend.copy_async(kind, regions) }?.wait()?;
        }
        Ok(gbps(self.total_bytes(), t0.elapsed().as_secs_f64()))
    }

    /// Swaps every request out and back in through the engine; returns (out, in) GB/s and the
    /// time each phase took in each direction.
    fn coarse(&mut self, swap: &SwapEngine) -> Result<(f64, f64, Phases, Phases)> {
        let before = swap.stats();
        let t0 = Instant::now();
        let tickets: Vec<SwapTicket> = self
            .slots
            .iter()
            .map(|&s| swap.swap_out(s))
            .collect::<Result<_>>()?;
        for t in &tickets {
            t.wait()?;
        }
        let out_wall = t0.elapsed();
        let out = gbps(self.total_bytes(), out_wall.as_secs_f64());
        let mid = swap.stats();
        let copies: Vec<_> = tickets.iter().map(SwapTicket::copy).collect();
        let mut slots = Vec::with_capacity(copies.len());
        for _ in &copies {
            slots.push(self.cache.alloc_slot_for(self.tokens)?);
        }
        let t0 = Instant::now();
        let tickets: Vec<SwapTicket> = copies
            .iter()
            .zip(&slots)
            .map(|(&c, &s)| swap.swap_in(c, s))
            .collect::<Result<_>>()?;
        for t in &tickets {
            t.wait()?;
        }
        let in_wall = t0.elapsed();
        let inn = gbps(self.total_bytes(), in_wall.as_secs_f64());
        let after = swap.stats();
        for c in copies {
            swap.release(c)?;
        }
        self.slots = slots;
        Ok((
            out,
            inn,
            Phases::between(&before, &mid, out_wall),
            Phases::between(&mid, &after, in_wall),
        ))
    }
}

/// Where one direction of a coarse round spent its time, in milliseconds: the engine's per-phase
/// timers ([`SwapStats`]) over the round. `map`, `populate` and `unmap` are the time threads
/// spent in them; `copy` is summed over transfers from submission to completion (transfers
/// overlap, so it may exceed `wall`).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct Phases {
    wall_ms: f64,
    map_ms: f64,
    populate_ms: f64,
    copy_ms: f64,
    unmap_ms: f64,
}

impl Phases {
    fn between(a: &SwapStats, b: &SwapStats, wall: std::time::Duration) -> Phases {
        let ms = |x: u64, y: u64| y.saturating_sub(x) as f64 / 1e6;
        Phases {
            wall_ms: wall.as_secs_f64() * 1e3,
            map_ms: ms(a.map_ns, b.map_ns),
            populate_ms: ms(a.populate_ns, b.populate_ns),
            copy_ms: ms(a.copy_ns, b.copy_ns),
            unmap_ms: ms(a.unmap_ns, b.unmap_ns),
        }
    }
}

/// The verification pattern of byte `j` of range `k` of request `i`.
fn pattern(i: usize, k: usize, j: usize) -> u8 {
    ((i * 131 + k * 17 + j / 4096) as u8) ^ (j as u8)
}

/// Writes (`write`) or checks the verification pattern of request `i` in `ranges`; returns the
/// number of bytes checked. CUDA ranges are written and read back with synchronous copies.
fn pattern_io(kind: BackendKind, i: usize, ranges: &[ByteRange], write: bool) -> Result<u64> {
    let drv = |e| kvvm::vmm::cuda::driver_error(kvvm::vmm::BackendOp::Copy, e);
    let mut checked = 0u64;
    for (k, r) in ranges.iter().enumerate() {
        let want: Vec<u8> = (0..r.len).map(|j| pattern(i, k, j)).collect();
        if write {
            if kind == BackendKind::Host {
                // SAFETY: the range holds live tokens of a resident slot (mapped read/write),
                // which nobody else uses during the benchmark.
                unsafe {
                    std::ptr::copy_nonoverlapping(want.as_ptr(), r.addr as usize as *mut u8, r.len)
                };
            } else {
                // SAFETY: as above, device memory; `want` is readable for `r.len` bytes.
                unsafe { kvvm_sys::result::mem::memcpy_htod(r.addr, want.as_ptr().cast(), r.len) }
                    .map_err(drv)?;
            }
            continue;
        }
        let mut got = vec![0u8; r.len];
        if kind == BackendKind::Host {
            // SAFETY: as above, for reading.
            unsafe {
                std::ptr::copy_nonoverlapping(r.addr as usize as *const u8, got.as_mut_ptr(), r.len)
            };
        } else {
            // SAFETY: as above; `got` is writable for `r.len` bytes.
            unsafe { kvvm_sys::result::mem::memcpy_dtoh(got.as_mut_ptr().cast(), r.addr, r.len) }
                .map_err(drv)?;
        }
        if let Some(j) = (0..r.len).find(|&j| got[j] != want[j]) {
            return Err(Error::InvalidArgument(format!(
                "wrong output: request {i}, range {k}, byte {j}: read {:#x}, wrote {:#x} before the swap round trip",
                got[j], want[j]
            )));
        }
        checked += r.len as u64;
    }
    Ok(checked)
}

/// Writes a byte pattern into every token of `range` (host backend), populating its pages.
fn touch(range: &ByteRange) {
    // SAFETY: the range holds live tokens of an allocated slot, so its pages are mapped
    // read/write; nobody else accesses it during the setup.
    unsafe { std::ptr::write_bytes(range.addr as usize as *mut u8, 0x5a, range.len) };
}

pub fn run(args: SwapArgs) -> Result<()> {
    if args.requests == 0 || args.tokens == 0 || args.rounds == 0 {
        return Err(Error::InvalidArgument(
            "--requests, --tokens and --rounds must be positive".into(),
        ));
    }
    let backend_config = args.backend.config();
    let backend = kvvm::vmm::open(&backend_config)?;
    let mut config = CacheConfig::for_model(&args.model, args.requests, args.tokens, 1 << 40)?;
    config.layout = args.layout;
    config.lookahead_steps = 0;
    let g = kvvm::Geometry::new(&config, backend.granularity())?;
    config.budget_bytes = (g.pages_for(args.tokens) as u64)
        .checked_mul(g.buffers as u64)
        .and_then(|v| v.checked_mul(g.page_size as u64))
        .and_then(|v| v.checked_mul(args.requests as u64))
        .and_then(|v| v.checked_add((g.buffers * g.page_size) as u64))
        .ok_or_else(|| Error::InvalidArgument("bench swap: the sizes overflow".into()))?;
    let request_bytes = (args.tokens as u64).checked_mul(g.bytes_per_token() as u64);
    // Host copies, staging buffers and, on the host backend, the device pages are host memory.
    let host_bytes = request_bytes.and_then(|r| {
        let copies = r.checked_mul(args.requests as u64)?.checked_add(64 << 20)?;
        let staging = r.checked_mul(args.requests.min(STAGING_BUFFERS) as u64)?;
        let device = if backend.kind() == BackendKind::Host {
            config.budget_bytes
        } else {
            0
        };
        copies.checked_add(staging)?.checked_add(device)
    });
    crate::check_host_memory("bench swap", host_bytes)?;
    let request_bytes = request_bytes.unwrap_or(u64::MAX);
    let cache = Arc::new(KvCache::with_backend(config, backend.clone())?);
    let swap = SwapEngine::new(
        cache.clone(),
        SwapConfig {
            host_budget_bytes: request_bytes * args.requests as u64 + (64 << 20),
            chunk_bytes: args.chunk_bytes,
            max_in_flight: args.requests,
            keep_pages: args.keep_pages,
        },
    )?;
    let host = backend.kind() == BackendKind::Host;
    let mut slots = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        let s = cache.alloc_slot_for(args.tokens)?;
        cache.ensure(s, args.tokens)?;
        if host {
            for r in cache.slot_ranges(s, args.tokens)? {
                touch(&r);
            }
        }
        slots.push(s);
    }
    let mut staging = Vec::new();
    for _ in 0..args.requests.min(STAGING_BUFFERS) {
        let b = backend.alloc_host(request_bytes as usize)?;
        if host {
            touch(&ByteRange {
                addr: b.addr(),
                len: b.len(),
            });
        }
        staging.push(b);
    }
    let mut bench = Bench {
        cache: cache.clone(),
        backend: backend.clone(),
        slots,
        tokens: args.tokens,
        staging,
        copy_threads: backend_config.copy_threads,
    };
    // Sanity: the first row of layer 0 is what we wrote, after a full round trip.
    let probe = |b: &Bench| -> Result<Option<u8>> {
        if !host {
            return Ok(None);
        }
        let r = b.cache.row(b.slots[0], 0, 0, Kv::K)?;
        // SAFETY: the row lies in mapped pages of a resident slot.
        Ok(Some(unsafe { *(r.addr as usize as *const u8) }))
    };
    // Warm-up: touches the host arena and the transfer paths.
    bench.coarse(&swap)?;
    let mut best = [0f64; 8];
    // The phases of the rounds with the best coarse figures.
    let (mut phases_out, mut phases_in) = (Phases::default(), Phases::default());
    for _ in 0..args.rounds {
        let (o, i, po, pi) = bench.coarse(&swap)?;
        if o > best[0] {
            phases_out = po;
        }
        if i > best[1] {
            phases_in = pi;
        }
        let figures = [
            o,
            i,
            bench.fine(CopyKind::DeviceToHost)?,
            bench.fine(CopyKind::HostToDevice)?,
            bench.limit(CopyKind::DeviceToHost)?,
            bench.limit(CopyKind::HostToDevice)?,
            bench.chunked(CopyKind::DeviceToHost, args.chunk_bytes)?,
            bench.chunked(CopyKind::HostToDevice, args.chunk_bytes)?,
        ];
        for (b, f) in best.iter_mut().zip(figures) {
            *b = b.max(f);
        }
    }
    if let Some(byte) = probe(&bench)? {
        if byte != 0x5a {
            return Err(Error::InvalidArgument(format!(
                "data changed during the benchmark: read {byte:#x}"
            )));
        }
    }
    // Verification: a distinct pattern per request, one more swap-out and swap-in through the
    // engine, every byte read back (from the device on CUDA) and compared.
    let kind = backend.kind();
    for (i, &s) in bench.slots.iter().enumerate() {
        pattern_io(kind, i, &cache.slot_ranges(s, args.tokens)?, true)?;
    }
    bench.coarse(&swap)?;
    let mut verified = 0u64;
    for (i, &s) in bench.slots.iter().enumerate() {
        verified += pattern_io(kind, i, &cache.slot_ranges(s, args.tokens)?, false)?;
    }
    let [coarse_out, coarse_in, fine_out, fine_in, limit_out, limit_in, chunked_out, chunked_in] =
        best;
    // The limit is the faster direction of the plain copy; the coarse figure compared with it
    // is the slower direction of the engine, so the ratio holds for both directions.
    let limit = limit_out.max(limit_in);
    let coarse_vs_limit = coarse_out.min(coarse_in) / limit;
    let coarse_vs_fine = (coarse_out + coarse_in) / (fine_out + fine_in);
    let stats = swap.stats();
    drop(swap);
    for b in bench.staging {
        if let Err((_, e)) = backend.free_host(b) {
            tracing::warn!("freeing a staging buffer failed: {e}");
        }
    }
    if args.json {
        let v = serde_json::json!({
            "coarse_out_gbps": coarse_out,
            "coarse_in_gbps": coarse_in,
            "fine_out_gbps": fine_out,
            "fine_in_gbps": fine_in,
            "limit_gbps": limit,
            "coarse_vs_limit": coarse_vs_limit,
            "coarse_vs_fine": coarse_vs_fine,
            "chunked_out_gbps": chunked_out,
            "chunked_in_gbps": chunked_in,
            "limit_out_gbps": limit_out,
            "limit_in_gbps": limit_in,
            "phases_out": phases_out,
            "phases_in": phases_in,
            "verified_bytes": verified,
            "keep_pages": args.keep_pages,
        });
        println!("{v}");
    } else {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        println!(
            "swap: {} × {} tokens of {} ({} layout, {} backend), {:.2} GiB each way, chunk {} KiB, {}, best of {}",
            args.requests,
            args.tokens,
            args.model,
            args.layout,
            backend.kind(),
            gib(request_bytes * args.requests as u64),
            args.chunk_bytes >> 10,
            if args.keep_pages {
                "pages kept mapped"
            } else {
                "pages released"
            },
            args.rounds
        );
        println!("{:<34} {:>10} {:>10}", "", "out GB/s", "in GB/s");
        println!(
            "{:<34} {:>10.2} {:>10.2}",
            "coarse (SwapEngine)", coarse_out, coarse_in
        );
        println!(
            "{:<34} {:>10.2} {:>10.2}",
            "  its copies alone (no map/unmap)", chunked_out, chunked_in
        );
        println!(
            "{:<34} {:>10.2} {:>10.2}",
            "fine (16-token block/layer/KV)", fine_out, fine_in
        );
        println!(
            "{:<34} {:>10.2} {:>10.2}",
            "limit (plain copy, same bytes)", limit_out, limit_in
        );
        println!(
            "coarse / limit {coarse_vs_limit:.3} (slower coarse direction over the faster limit: out {:.3}, in {:.3})",
            coarse_out / limit_out,
            coarse_in / limit_in
        );
        println!("coarse / fine  {coarse_vs_fine:.2}");
        for (dir, p) in [("out", phases_out), ("in", phases_in)] {
            println!(
                "coarse {dir:<3} phases (ms): wall {:.1}, map {:.1}, populate {:.1}, copy {:.1} (summed over transfers), unmap {:.1}",
                p.wall_ms, p.map_ms, p.populate_ms, p.copy_ms, p.unmap_ms
            );
        }
        println!(
            "transfers {}, reused {} bytes, host arena used {} bytes",
            stats.transfers, stats.reuse_saved_bytes, stats.host_bytes_used
        );
    }
    Ok(())
}

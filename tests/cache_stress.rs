//! Concurrency stress test of `KvCache`: a caller thread decodes a batch of 16 slots while the
//! background mapper maps ahead, two worker threads concurrently ensure / shrink / free / allocate
//! their own slots and take pages back, and a reader thread samples statistics and views. Every
//! live token's K and V bytes are checked periodically and at the end, in both layouts, with an
//! ample and a tight budget; at the end every page is accounted for and none leaks.
//!
//! Each thread only touches the slots it allocated, as a serving engine's scheduler would; what
//! they share is the cache itself (its lock, its pool, its mapper and its reclamation).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use kvvm::testing::{stamp_tokens, verify_tokens};
use kvvm::vmm::host::{os_page_size, HostBackend, HostConfig};
use kvvm::vmm::{Backend, BackendConfig};
use kvvm::Error;
use kvvm::{CacheConfig, DType, Kv, KvCache, Layout, SlotId};

const MAX_SLOTS: usize = 24;
const MAX_TOKENS: usize = 384;
const BATCH: usize = 16;
const STEPS: usize = 1500;
const WORKERS: usize = 2;
const WORKER_SLOTS: usize = 3;
const WORKER_OPS: usize = 1000;

/// A small xorshift generator: each thread gets its own fixed seed, so a failure replays.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// One request a thread holds: its slot, its tokens, the generation its bytes are stamped with.
#[derive(Clone, Copy, Debug)]
struct Req {
    slot: SlotId,
    tokens: usize,
    generation: u32,
    /// Tokens at which the request finishes (decode loop only).
    end: usize,
}

/// Per-thread bookkeeping shared by the decode loop and the workers.
struct Owner<'a> {
    cache: &'a KvCache,
    reqs: Vec<Req>,
    next_generation: u32,
    /// Tight budget: growth may legitimately fail for lack of pages.
    tight: bool,
    budget_failures: u64,
}

impl<'a> Owner<'a> {
    fn new(cache: &'a KvCache, thread: u32, tight: bool) -> Self {
        Owner {
            cache,
            reqs: Vec::new(),
            next_generation: thread << 20,
            tight,
            budget_failures: 0,
        }
    }

    fn alloc(&mut self, hint: usize, end: usize) -> Result<Option<usize>, String> {
        match self.cache.alloc_slot_for(hint) {
            Ok(slot) => {
                if self.reqs.iter().any(|r| r.slot == slot) {
                    return Err(format!("alloc returned slot {slot}, already held"));
                }
                self.next_generation += 1;
                self.reqs.push(Req {
                    slot,
                    tokens: 0,
                    generation: self.next_generation,
                    end,
                });
                Ok(Some(self.reqs.len() - 1))
            }
            Err(Error::SlotsExhausted { .. }) => Ok(None),
            Err(e) => Err(format!("alloc: {e}")),
        }
    }

    fn free(&mut self, k: usize) -> Result<(), String> {
        let r = self.reqs.swap_remove(k);
        self.cache
            .free_slot(r.slot)
            .map_err(|e| format!("free {}: {e}", r.slot))
    }

    /// Grows the requests `ks` to `targets` in one step, stamping the new tokens. Returns
    /// whether the step succeeded (a tight budget may refuse it).
    fn grow(&mut self, items: &[(usize, usize)]) -> Result<bool, String> {
        let batch: Vec<(SlotId, usize)> =
            items.iter().map(|&(k, t)| (self.reqs[k].slot, t)).collect();
        match self.cache.step(&batch) {
            Ok(()) => {
                for &(k, t) in items {
                    let r = &mut self.reqs[k];
                    if t > r.tokens {
                        // SAFETY: this thread owns the slot (no one else shrinks, frees or
                        // writes it) and the step just committed `t` tokens to it.
                        unsafe { stamp_tokens(self.cache, r.slot, r.generation, r.tokens, t)? };
                        r.tokens = t;
                    }
                }
                for &(k, _) in items {
                    self.fits(self.reqs[k].slot)?;
                }
                Ok(true)
            }
            Err(Error::Grow { source, .. })
                if self.tight && matches!(*source, Error::BudgetExhausted { .. }) =>
            {
                self.budget_failures += 1;
                // All or nothing: every slot of the batch still holds its old tokens.
                for &(k, _) in items {
                    let r = self.reqs[k];
                    let t = self.cache.tokens(r.slot).map_err(|e| e.to_string())?;
                    if t != r.tokens {
                        return Err(format!(
                            "failed step changed slot {} from {} to {t} tokens",
                            r.slot, r.tokens
                        ));
                    }
                }
                Ok(false)
            }
            Err(e) => Err(format!("step {batch:?}: {e}")),
        }
    }

    fn shrink(&mut self, k: usize, tokens: usize) -> Result<(), String> {
        let r = &mut self.reqs[k];
        self.cache
            .shrink(r.slot, tokens)
            .map_err(|e| format!("shrink {} to {tokens}: {e}", r.slot))?;
        r.tokens = r.tokens.min(tokens);
        let slot = r.slot;
        self.fits(slot)
    }

    /// `tokens <= capacity` for one of this thread's slots (others change only its mapped-ahead
    /// pages: the mapper adds, reclamation never goes below the tokens).
    fn fits(&self, slot: SlotId) -> Result<(), String> {
        let t = self.cache.tokens(slot).map_err(|e| e.to_string())?;
        let c = self.cache.capacity(slot).map_err(|e| e.to_string())?;
        if t > c {
            return Err(format!(
                "slot {slot} holds {t} tokens but its pages hold {c}"
            ));
        }
        Ok(())
    }

    fn verify(&self) -> Result<(), String> {
        for r in &self.reqs {
            let t = self
                .cache
                .tokens(r.slot)
                .map_err(|e| format!("tokens({}): {e}", r.slot))?;
            if t != r.tokens {
                return Err(format!(
                    "slot {} holds {t} tokens, expected {}",
                    r.slot, r.tokens
                ));
            }
            self.fits(r.slot)?;
            // SAFETY: this thread owns the slot and it holds `r.tokens` tokens.
            unsafe { verify_tokens(self.cache, r.slot, r.generation, r.tokens)? };
        }
        Ok(())
    }
}

/// The caller: decodes a batch of `BATCH` requests one token per step; finished requests are
/// replaced by new ones with a prefill; under a tight budget a refused step preempts the
/// longest request.
fn decode_loop<'a>(cache: &'a KvCache, tight: bool, start: &Barrier) -> Result<Owner<'a>, String> {
    start.wait();
    let mut o = Owner::new(cache, 1, tight);
    let mut rng = Rng::new(1);
    let admit = |o: &mut Owner, rng: &mut Rng| -> Result<(), String> {
        let end = rng.range(16, MAX_TOKENS);
        let prompt = rng.range(1, end);
        if let Some(k) = o.alloc(end, end)? {
            if !o.grow(&[(k, prompt)])? {
                o.free(k)?;
            }
        }
        Ok(())
    };
    for _ in 0..BATCH {
        admit(&mut o, &mut rng)?;
    }
    let mut refused_in_a_row = 0;
    for step in 0..STEPS {
        let items: Vec<(usize, usize)> = o
            .reqs
            .iter()
            .enumerate()
            .map(|(k, r)| (k, (r.tokens + 1).min(MAX_TOKENS)))
            .collect();
        if o.grow(&items)? {
            refused_in_a_row = 0;
        } else {
            refused_in_a_row += 1;
            if refused_in_a_row > 50 {
                return Err("50 steps in a row refused after preemption".into());
            }
            // Preempt the longest request.
            if let Some((k, _)) = o.reqs.iter().enumerate().max_by_key(|(_, r)| r.tokens) {
                o.free(k)?;
            }
        }
        // Finished requests leave; new ones come in.
        let mut k = 0;
        while k < o.reqs.len() {
            if o.reqs[k].tokens >= o.reqs[k].end {
                o.free(k)?;
            } else {
                k += 1;
            }
        }
        while o.reqs.len() < BATCH {
            let before = o.reqs.len();
            admit(&mut o, &mut rng)?;
            if o.reqs.len() == before {
                break;
            }
        }
        if step % 100 == 99 {
            o.verify().map_err(|e| format!("decode step {step}: {e}"))?;
        }
    }
    o.verify()?;
    Ok(o)
}

/// A worker: random operations on its own few slots.
fn worker<'a>(
    cache: &'a KvCache,
    id: u32,
    tight: bool,
    start: &Barrier,
) -> Result<Owner<'a>, String> {
    let mut o = Owner::new(cache, 2 + id, tight);
    let mut rng = Rng::new(100 + u64::from(id));
    start.wait();
    for i in 0..WORKER_OPS {
        let n = o.reqs.len();
        match rng.range(0, 9) {
            0 | 1 if n < WORKER_SLOTS => {
                o.alloc(rng.range(0, MAX_TOKENS), 0)?;
            }
            2 if n > 0 => o.free(rng.range(0, n - 1))?,
            3..=5 if n > 0 => {
                let k = rng.range(0, n - 1);
                let t = rng.range(0, MAX_TOKENS);
                o.grow(&[(k, t)])?;
            }
            6 if n > 1 => {
                let items = [
                    (0, rng.range(0, MAX_TOKENS)),
                    (n - 1, rng.range(0, MAX_TOKENS)),
                ];
                o.grow(&items)?;
            }
            7 if n > 0 => {
                let k = rng.range(0, n - 1);
                let t = rng.range(0, o.reqs[k].tokens + 8);
                o.shrink(k, t)?;
            }
            8 => {
                cache
                    .reclaim_free_slots()
                    .map_err(|e| format!("reclaim: {e}"))?;
            }
            _ => {}
        }
        if i % 25 == 24 {
            o.verify().map_err(|e| format!("worker {id} op {i}: {e}"))?;
        }
    }
    o.verify()?;
    Ok(o)
}

/// Samples what may be read at any time and checks what holds at any time.
fn reader(cache: &KvCache, stop: &AtomicBool, samples: &AtomicU64) -> Result<(), String> {
    let budget = cache.stats().pool.budget_pages;
    while !stop.load(Ordering::Acquire) {
        let s = cache.stats();
        if s.pool.live > budget {
            return Err(format!("pool over budget: {:?}", s.pool));
        }
        if s.pool.in_use > s.pool.live {
            return Err(format!("more pages in use than exist: {:?}", s.pool));
        }
        if s.allocated_slots > MAX_SLOTS {
            return Err(format!("{} slots allocated", s.allocated_slots));
        }
        let v = cache
            .layer_view(1, Kv::V)
            .map_err(|e| format!("layer_view: {e}"))?;
        if v.shape != [MAX_SLOTS, MAX_TOKENS, 2, 8] {
            return Err(format!("view shape {:?}", v.shape));
        }
        for slot in (0..MAX_SLOTS as u32).map(SlotId::new) {
            cache.capacity(slot).map_err(|e| e.to_string())?;
        }
        samples.fetch_add(1, Ordering::Relaxed);
        std::thread::yield_now();
    }
    Ok(())
}

fn stress(layout: Layout, tight: bool) {
    let page = os_page_size();
    let host = Arc::new(
        HostBackend::new(HostConfig {
            granularity: page,
            copy_threads: 1,
            ..HostConfig::default()
        })
        .expect("host backend"),
    );
    let config = CacheConfig::new(2, 2, 8)
        .with_dtype(DType::F32)
        .with_max_slots(MAX_SLOTS)
        .with_max_tokens(MAX_TOKENS)
        .with_layout(layout)
        .with_page_size(None)
        .with_budget_bytes(0)
        .with_backend(BackendConfig::default())
        .with_lookahead_steps(8)
        .with_create_all_pages(false);
    let probe =
        kvvm::Geometry::new(&config.clone().with_budget_bytes(u64::MAX), page).expect("geometry");
    let full = probe.pages_per_slot * probe.buffers * MAX_SLOTS;
    // Tight: about 40% of what every slot at full length would need, so the batch regularly
    // runs short and pages are reclaimed from free slots and from slots' mapped-ahead tails.
    let budget_pages = if tight { full * 2 / 5 } else { full };
    let cache = KvCache::with_backend(
        config.with_budget_bytes((budget_pages * page) as u64),
        host.clone() as Arc<dyn Backend>,
    )
    .expect("cache");

    let start = Barrier::new(1 + WORKERS);
    let stop = AtomicBool::new(false);
    let samples = AtomicU64::new(0);
    let (decoder, workers, read) = std::thread::scope(|s| {
        let r = s.spawn(|| reader(&cache, &stop, &samples));
        let ws: Vec<_> = (0..WORKERS as u32)
            .map(|id| {
                let (cache, start) = (&cache, &start);
                s.spawn(move || worker(cache, id, tight, start))
            })
            .collect();
        let d = decode_loop(&cache, tight, &start);
        let ws: Vec<_> = ws.into_iter().map(|h| h.join().expect("worker")).collect();
        stop.store(true, Ordering::Release);
        (d, ws, r.join().expect("reader"))
    });
    let decoder = decoder.unwrap_or_else(|e| panic!("{layout:?} decode loop: {e}"));
    let workers: Vec<Owner> = workers
        .into_iter()
        .enumerate()
        .map(|(i, w)| w.unwrap_or_else(|e| panic!("{layout:?} worker {i}: {e}")))
        .collect();
    read.unwrap_or_else(|e| panic!("{layout:?} reader: {e}"));
    assert!(samples.load(Ordering::Relaxed) > 0, "the reader never ran");

    // Quiet now: check everything once more, and the books.
    cache.quiesce();
    let owners: Vec<&Owner> = std::iter::once(&decoder).chain(workers.iter()).collect();
    for o in &owners {
        o.verify()
            .unwrap_or_else(|e| panic!("{layout:?} final check: {e}"));
    }
    let g = *cache.geometry();
    let stats = cache.stats();
    let live: usize = owners.iter().map(|o| o.reqs.len()).sum();
    assert_eq!(stats.allocated_slots, live, "allocated slots");
    let live_bytes: usize = owners
        .iter()
        .flat_map(|o| o.reqs.iter())
        .map(|r| r.tokens * g.bytes_per_token())
        .sum();
    assert_eq!(stats.live_bytes, live_bytes as u64, "live bytes");
    assert_eq!(
        stats.pool.in_use as u64,
        stats.mapped_bytes / g.page_size as u64,
        "pages in use vs mapped: {:?}",
        stats.pool
    );
    assert_eq!(
        stats.pool.in_use + stats.pool.free,
        stats.pool.live,
        "{:?}",
        stats.pool
    );
    assert!(stats.pool.live <= budget_pages, "{:?}", stats.pool);
    let refused: u64 = owners.iter().map(|o| o.budget_failures).sum();
    eprintln!(
        "{layout:?} tight={tight}: {refused} steps refused, {} mapper batches, {} pages reclaimed, {} reader samples, pool {:?}",
        stats.mapper_batches,
        stats.reclaimed_pages,
        samples.load(Ordering::Relaxed),
        stats.pool
    );
    if tight {
        assert!(
            refused > 0 || stats.reclaimed_pages > 0,
            "the tight budget never came into play: {stats:?}"
        );
    } else {
        assert_eq!(refused, 0, "ample budget refused a step");
        // With room to spare the mapper maps ahead (under a tight budget the pool may never
        // have pages to spare for it).
        assert!(stats.mapper_batches > 0, "the background mapper never ran");
    }

    // Free everything, take every page back: the pool holds them all again.
    for o in &owners {
        for r in &o.reqs {
            cache.free_slot(r.slot).expect("free");
        }
    }
    cache.reclaim_free_slots().expect("reclaim");
    cache.quiesce();
    let stats = cache.stats();
    assert_eq!(stats.mapped_bytes, 0, "pages still mapped: {stats:?}");
    assert_eq!(stats.pool.in_use, 0, "{:?}", stats.pool);
    assert_eq!(stats.pool.free, stats.pool.live, "{:?}", stats.pool);
    assert_eq!(
        stats.pool.created - stats.pool.released,
        stats.pool.live as u64,
        "{:?}",
        stats.pool
    );
    drop(cache);
    assert_eq!(
        host.live_pages(),
        0,
        "pages leaked after the cache was dropped"
    );
}

#[test]
fn interleaved_ample_budget() {
    stress(Layout::Interleaved, false);
}

#[test]
fn interleaved_tight_budget() {
    stress(Layout::Interleaved, true);
}

#[test]
fn per_layer_ample_budget() {
    stress(Layout::PerLayer, false);
}

#[test]
fn per_layer_tight_budget() {
    stress(Layout::PerLayer, true);
}

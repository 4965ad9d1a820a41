//! The long-running stress mode (issue 16): several threads drive one cache and its swap engine
//! with ensure / step / shrink / free / swap-out / swap-in, byte patterns and injected backend
//! faults, and check after **every** operation that every live token of every request they own
//! reads back as written and that no slot holds more tokens than its mapped pages can hold.
//! Two threads also share one slot (one steps it, one shrinks it), the interleaving of issue 16
//! item 1, checking `tokens <= capacity` and the bytes of the prefix both keep live.
//!
//! Memory is capped: the cache's page budget and the swap engine's host budget are small (a few
//! MiB), so a run uses the same memory for an hour as for a minute.
//!
//! Not part of the default run (it is `#[ignore]`d). Run it with
//!
//! ```text
//! KVVM_STRESS_SECS=600 cargo nextest run -p kvvm --test stress_long --run-ignored only
//! ```
//!
//! `KVVM_STRESS_SECS` (default 30) is the duration, `KVVM_STRESS_SEED` (default 1) the seed,
//! `KVVM_STRESS_THREADS` (default 4) the number of worker threads. See docs/fuzzing.md.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvvm::testing::{stamp_tokens, verify_tokens};
use kvvm::vmm::faulty::{CopyFault, FaultyBackend};
use kvvm::vmm::host::{os_page_size, HostBackend, HostConfig};
use kvvm::vmm::{Backend, BackendOp};
use kvvm::Error;
use kvvm::{CacheConfig, DType, HostCopyId, KvCache, Layout, SlotId, SwapConfig, SwapEngine};

const MAX_TOKENS: usize = 300;
const MAX_SLOTS: usize = 24;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// Whether an error is one the stress may legitimately see: injected somewhere in its chain, or
/// a resource running short (the budgets are small on purpose).
fn acceptable(e: &Error) -> bool {
    match e {
        Error::Injected { .. } => true,
        Error::Grow { source, .. } => acceptable(source),
        e => e.is_exhaustion(),
    }
}

#[derive(Clone, Copy, Debug)]
enum Where {
    Slot(SlotId),
    Host(HostCopyId),
}

#[derive(Clone, Copy, Debug)]
struct Req {
    at: Where,
    tokens: usize,
    generation: u32,
    /// A host copy that also holds (a prefix of) the request after a swap-in.
    cached: Option<HostCopyId>,
}

struct Worker<'a> {
    cache: &'a KvCache,
    swap: &'a SwapEngine,
    reqs: Vec<Req>,
    next_generation: u32,
    ops: u64,
}

impl Worker<'_> {
    fn slot_of(&self, k: usize) -> Option<SlotId> {
        match self.reqs[k].at {
            Where::Slot(s) => Some(s),
            Where::Host(_) => None,
        }
    }

    /// Every owned request: its tokens as the model says, within capacity, every byte intact.
    fn check(&self, what: &str) -> Result<(), String> {
        for r in &self.reqs {
            let Where::Slot(s) = r.at else { continue };
            let t = self.cache.tokens(s).map_err(|e| format!("{what}: {e}"))?;
            let cap = self.cache.capacity(s).map_err(|e| format!("{what}: {e}"))?;
            if t != r.tokens {
                return Err(format!(
                    "{what}: slot {s} holds {t} tokens, expected {}",
                    r.tokens
                ));
            }
            if t > cap {
                return Err(format!(
                    "{what}: slot {s} holds {t} tokens, its pages hold {cap}"
                ));
            }
            // SAFETY: this thread owns the slot; it holds `t` tokens in mapped pages (checked).
            unsafe { verify_tokens(self.cache, s, r.generation, t) }
                .map_err(|e| format!("{what}: {e}"))?;
        }
        Ok(())
    }

    fn grow(&mut self, items: &[(usize, usize)]) -> Result<(), String> {
        let batch: Vec<(SlotId, usize)> = items
            .iter()
            .filter_map(|&(k, t)| self.slot_of(k).map(|s| (s, t)))
            .collect();
        match self.cache.step(&batch) {
            Ok(()) => {
                for &(k, t) in items {
                    let Some(s) = self.slot_of(k) else { continue };
                    let r = &mut self.reqs[k];
                    if t > r.tokens {
                        // SAFETY: this thread owns the slot and the step committed `t` tokens.
                        unsafe { stamp_tokens(self.cache, s, r.generation, r.tokens, t)? };
                        r.tokens = t;
                    }
                }
                Ok(())
            }
            Err(e) if acceptable(&e) => Ok(()),
            Err(e) => Err(format!("step {batch:?}: {e}")),
        }
    }

    fn one(&mut self, rng: &mut Rng) -> Result<(), String> {
        let n = self.reqs.len();
        let k = if n > 0 { rng.range(0, n - 1) } else { 0 };
        match rng.range(0, 11) {
            0 | 1 if n < 4 => match self.cache.alloc_slot_for(rng.range(0, MAX_TOKENS)) {
                Ok(s) => {
                    self.next_generation += 1;
                    self.reqs.push(Req {
                        at: Where::Slot(s),
                        tokens: 0,
                        generation: self.next_generation,
                        cached: None,
                    });
                }
                Err(Error::SlotsExhausted { .. }) => {}
                Err(e) => return Err(format!("alloc: {e}")),
            },
            2 if n > 0 => {
                let r = self.reqs.swap_remove(k);
                match r.at {
                    Where::Slot(s) => self.cache.free_slot(s).map_err(|e| format!("free: {e}"))?,
                    Where::Host(c) => self.swap.release(c).map_err(|e| format!("release: {e}"))?,
                }
                if let Some(c) = r.cached {
                    // A cached copy may have been evicted meanwhile.
                    let _ = self.swap.release(c);
                }
            }
            3..=5 if n > 0 => {
                let t = rng.range(0, MAX_TOKENS);
                self.grow(&[(k, t)])?;
            }
            6 if n > 0 => {
                let items: Vec<(usize, usize)> = (0..n)
                    .map(|j| (j, (self.reqs[j].tokens + rng.range(1, 8)).min(MAX_TOKENS)))
                    .collect();
                self.grow(&items)?;
            }
            7 if n > 0 => {
                if let Some(s) = self.slot_of(k) {
                    let t = rng.range(0, self.reqs[k].tokens + 8);
                    let r = self.cache.shrink(s, t);
                    self.reqs[k].tokens = self.reqs[k].tokens.min(t);
                    if let Err(e) = r {
                        if !acceptable(&e) {
                            return Err(format!("shrink: {e}"));
                        }
                    }
                }
            }
            8 if n > 0 => {
                if let Some(s) = self.slot_of(k) {
                    let out = self.swap.swap_out(s).and_then(|t| {
                        let id = t.copy();
                        t.wait().map(|()| id)
                    });
                    match out {
                        Ok(id) => {
                            let r = &mut self.reqs[k];
                            if r.cached.is_some_and(|c| c != id) {
                                let _ = self.swap.release(r.cached.take().unwrap_or(id));
                            }
                            r.cached = None;
                            r.at = Where::Host(id);
                        }
                        Err(e) if acceptable(&e) => {}
                        Err(e) => return Err(format!("swap out: {e}")),
                    }
                }
            }
            9 if n > 0 => {
                if let Where::Host(id) = self.reqs[k].at {
                    let s = match self.cache.alloc_slot_for(self.reqs[k].tokens) {
                        Ok(s) => s,
                        Err(Error::SlotsExhausted { .. }) => return Ok(()),
                        Err(e) => return Err(format!("alloc: {e}")),
                    };
                    match self.swap.swap_in(id, s).and_then(|t| t.wait()) {
                        Ok(()) => {
                            let r = &mut self.reqs[k];
                            r.at = Where::Slot(s);
                            r.cached = Some(id);
                        }
                        Err(e) if acceptable(&e) => {
                            self.cache.free_slot(s).map_err(|e| format!("free: {e}"))?;
                        }
                        Err(e) => return Err(format!("swap in: {e}")),
                    }
                }
            }
            10 => {
                if let Err(e) = self.cache.reclaim_free_slots() {
                    if !acceptable(&e) {
                        return Err(format!("reclaim: {e}"));
                    }
                }
            }
            _ => {}
        }
        self.ops += 1;
        Ok(())
    }
}

/// One thread steps the shared slot together with one of its own slots that needs pages; the
/// other shrinks the shared slot, never below the stamped prefix.
const PREFIX: usize = 20;

fn shared_stepper(cache: &KvCache, x: SlotId, stop: &AtomicBool, seed: u64) -> Result<u64, String> {
    let mut rng = Rng::new(seed);
    let mut ops = 0;
    while !stop.load(Ordering::Acquire) {
        let y = match cache.alloc_slot() {
            Ok(y) => y,
            Err(Error::SlotsExhausted { .. }) => {
                std::thread::yield_now();
                continue;
            }
            Err(e) => return Err(format!("alloc: {e}")),
        };
        let tx = rng.range(PREFIX, MAX_TOKENS);
        let ty = rng.range(1, MAX_TOKENS);
        match cache.step(&[(x, tx), (y, ty)]) {
            Ok(()) => {}
            Err(e) if acceptable(&e) => {}
            Err(e) => return Err(format!("shared step: {e}")),
        }
        let (t, cap) = fits(cache, x);
        if t > cap {
            return Err(format!(
                "shared slot {x} holds {t} tokens, its pages hold {cap}"
            ));
        }
        // SAFETY: no thread shrinks the shared slot below PREFIX, and none writes it.
        unsafe { verify_tokens(cache, x, 7, PREFIX) }.map_err(|e| format!("shared: {e}"))?;
        cache.free_slot(y).map_err(|e| format!("free: {e}"))?;
        ops += 1;
    }
    Ok(ops)
}

fn shared_shrinker(
    cache: &KvCache,
    x: SlotId,
    stop: &AtomicBool,
    seed: u64,
) -> Result<u64, String> {
    let mut rng = Rng::new(seed);
    let mut ops = 0;
    while !stop.load(Ordering::Acquire) {
        let to = rng.range(PREFIX, MAX_TOKENS);
        match cache.shrink(x, to) {
            Ok(()) => {}
            Err(e) if acceptable(&e) => {}
            Err(e) => return Err(format!("shared shrink: {e}")),
        }
        let (t, cap) = fits(cache, x);
        if t > cap {
            return Err(format!(
                "shared slot {x} holds {t} tokens after shrink, its pages hold {cap}"
            ));
        }
        ops += 1;
        std::thread::yield_now();
    }
    Ok(ops)
}

/// (tokens, capacity) of a slot other threads change: the capacity is read before and after the
/// tokens and the larger kept, so that a concurrent shrink (lowering both) or step (raising the
/// capacity first) never shows a violation that did not happen.
fn fits(cache: &KvCache, x: SlotId) -> (usize, usize) {
    let c1 = cache.capacity(x).unwrap();
    let t = cache.tokens(x).unwrap();
    (t, c1.max(cache.capacity(x).unwrap()))
}

/// Arms a random fault every few milliseconds.
fn fault_injector(faulty: &FaultyBackend, stop: &AtomicBool, seed: u64, armed: &AtomicU64) {
    let mut rng = Rng::new(seed);
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(rng.range(1, 5) as u64));
        let nth = rng.range(1, 20) as u64;
        match rng.range(0, 4) {
            0 => faulty.fail_nth(BackendOp::Map, nth),
            1 => faulty.fail_nth(BackendOp::Unmap, nth),
            2 => faulty.fail_nth(BackendOp::CreatePage, nth),
            3 => faulty.fail_nth_copy(nth, CopyFault::AtSubmit),
            _ => faulty.fail_nth_copy(nth, CopyFault::AtCompletion),
        }
        armed.fetch_add(1, Ordering::Relaxed);
    }
}

fn run(layout: Layout, secs: u64, seed: u64, threads: usize) {
    let page = os_page_size();
    let host = Arc::new(
        HostBackend::new(HostConfig {
            granularity: page,
            copy_threads: 2,
            ..HostConfig::default()
        })
        .expect("host backend"),
    );
    let faulty = Arc::new(FaultyBackend::new(host.clone()));
    // 2 layers × 2 heads × 8 × f32: 256 bytes per token; a full slot is 19 pages per layout.
    let budget_pages = 160;
    let cache = Arc::new(
        KvCache::with_backend(
            CacheConfig::new(2, 2, 8)
                .with_dtype(DType::F32)
                .with_max_slots(MAX_SLOTS)
                .with_max_tokens(MAX_TOKENS)
                .with_layout(layout)
                .with_budget_bytes((budget_pages * page) as u64)
                .with_lookahead_steps(4),
            faulty.clone() as Arc<dyn Backend>,
        )
        .expect("cache"),
    );
    let swap = SwapEngine::new(
        cache.clone(),
        SwapConfig {
            host_budget_bytes: 4 << 20,
            chunk_bytes: 16 << 10,
            max_in_flight: 4,
            keep_pages: false,
        },
    )
    .expect("swap engine");

    // The shared slot with its stamped prefix.
    let x = cache.alloc_slot().expect("alloc shared");
    cache.ensure(x, PREFIX).expect("ensure shared");
    // SAFETY: no other thread runs yet.
    unsafe { stamp_tokens(&cache, x, 7, 0, PREFIX).expect("stamp shared") };

    let stop = AtomicBool::new(false);
    let armed = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (results, shared) = std::thread::scope(|s| {
        let (c, sw, st) = (&*cache, &swap, &stop);
        let workers: Vec<_> = (0..threads)
            .map(|id| {
                s.spawn(move || -> Result<u64, String> {
                    let mut w = Worker {
                        cache: c,
                        swap: sw,
                        reqs: Vec::new(),
                        next_generation: (id as u32 + 1) << 24,
                        ops: 0,
                    };
                    let mut rng = Rng::new(seed * 1000 + id as u64);
                    let r = (|| {
                        while Instant::now() < deadline && !st.load(Ordering::Acquire) {
                            w.one(&mut rng)?;
                            w.check(&format!("worker {id} op {}", w.ops))?;
                        }
                        Ok::<(), String>(())
                    })();
                    if r.is_err() {
                        st.store(true, Ordering::Release);
                    }
                    // Leave nothing behind: free every slot, release every copy.
                    for r in std::mem::take(&mut w.reqs) {
                        match r.at {
                            Where::Slot(s) => c.free_slot(s).map_err(|e| e.to_string())?,
                            Where::Host(h) => sw.release(h).map_err(|e| e.to_string())?,
                        }
                        if let Some(h) = r.cached {
                            let _ = sw.release(h);
                        }
                    }
                    r.map(|()| w.ops)
                })
            })
            .collect();
        let stepper = s.spawn(move || shared_stepper(c, x, st, seed + 17));
        let shrinker = s.spawn(move || shared_shrinker(c, x, st, seed + 29));
        let injector = s.spawn(|| fault_injector(&faulty, &stop, seed + 41, &armed));
        let results: Vec<_> = workers
            .into_iter()
            .map(|h| h.join().expect("worker panicked"))
            .collect();
        stop.store(true, Ordering::Release);
        let shared = (
            stepper.join().expect("stepper panicked"),
            shrinker.join().expect("shrinker panicked"),
        );
        injector.join().expect("injector panicked");
        (results, shared)
    });
    faulty.clear();
    let mut total = 0;
    for (i, r) in results.into_iter().enumerate() {
        total += r.unwrap_or_else(|e| panic!("{layout:?} seed {seed}: worker {i}: {e}"));
    }
    let steps = shared
        .0
        .unwrap_or_else(|e| panic!("{layout:?} seed {seed}: {e}"));
    let shrinks = shared
        .1
        .unwrap_or_else(|e| panic!("{layout:?} seed {seed}: {e}"));
    eprintln!(
        "{layout:?}: {total} worker ops, {steps} shared steps, {shrinks} shared shrinks, {} faults armed, swap {:?}",
        armed.load(Ordering::Relaxed),
        swap.stats()
    );
    // SAFETY: every other thread has finished.
    unsafe { verify_tokens(&cache, x, 7, PREFIX) }.expect("shared prefix at the end");
    cache.free_slot(x).expect("free shared");
    drop(swap);
    cache.quiesce();
    let st = cache.stats();
    assert_eq!(st.allocated_slots, 0, "{st:?}");
    assert!(st.pool.live <= budget_pages, "{:?}", st.pool);
    assert_eq!(
        st.pool.in_use as u64,
        st.mapped_bytes / page as u64,
        "{:?}",
        st.pool
    );
    drop(cache);
    assert_eq!(host.live_pages(), 0, "pages leaked");
}

#[test]
#[ignore = "long-running stress mode: KVVM_STRESS_SECS=600 cargo nextest run -p kvvm --test stress_long --run-ignored only"]
fn stress_long() {
    let secs = env("KVVM_STRESS_SECS", 30);
    let seed = env("KVVM_STRESS_SEED", 1);
    let threads = env("KVVM_STRESS_THREADS", 4) as usize;
    for layout in [Layout::Interleaved, Layout::PerLayer] {
        run(layout, secs.div_ceil(2), seed, threads.max(1));
    }
}

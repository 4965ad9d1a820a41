//! `step` racing `shrink` on the same slot (issue 16, item 1).
//!
//! A batch `step([(X, 70), (Y, 2048)])` where X already has the pages for 70 tokens makes backend
//! calls only for Y, outside the cache's lock. A `shrink(X, n)` with `tokens(X) <= n < 70` that
//! runs meanwhile must not take away the pages the step promised X: after both return, X must
//! hold its tokens in mapped pages (`tokens <= capacity`), and its live bytes must be intact.
//!
//! A backend wrapper holds `map` until the test lets it go, so the window is as wide as needed and
//! the interleaving is exact, not a matter of luck.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvvm::testing::{stamp_tokens, verify_tokens};
use kvvm::vmm::host::{os_page_size, HostBackend, HostConfig};
use kvvm::vmm::{
    Backend, BackendInfo, BackendKind, Completion, CopyKind, CopyRegion, HostBuffer, PageHandle,
    VaRange,
};
use kvvm::{CacheConfig, DType, KvCache, Layout, SlotId};

/// Holds every `map` call while armed, until [`GateBackend::open`] (or a timeout).
#[derive(Debug)]
struct GateBackend {
    inner: Arc<dyn Backend>,
    armed: AtomicBool,
    /// `map` calls that reached the gate while it was armed.
    held: AtomicU64,
    open: Mutex<bool>,
    cv: Condvar,
    /// Sleep in every `map` (stress mode), in microseconds.
    delay_us: AtomicU64,
}

impl GateBackend {
    fn new(inner: Arc<dyn Backend>) -> Self {
        GateBackend {
            inner,
            armed: AtomicBool::new(false),
            held: AtomicU64::new(0),
            open: Mutex::new(false),
            cv: Condvar::new(),
            delay_us: AtomicU64::new(0),
        }
    }
    fn arm(&self) {
        *self.open.lock().unwrap() = false;
        self.held.store(0, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }
    fn open(&self) {
        self.armed.store(false, Ordering::SeqCst);
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
    /// Waits until a `map` call is held at the gate.
    fn wait_held(&self) {
        let t0 = std::time::Instant::now();
        while self.held.load(Ordering::SeqCst) == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no map call reached the gate"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Backend for GateBackend {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }
    fn granularity(&self) -> usize {
        self.inner.granularity()
    }
    fn reserve(&self, len: usize) -> kvvm::Result<VaRange> {
        self.inner.reserve(len)
    }
    fn free_reservation(&self, range: VaRange) -> kvvm::Result<()> {
        self.inner.free_reservation(range)
    }
    fn create_page(&self, size: usize) -> kvvm::Result<PageHandle> {
        self.inner.create_page(size)
    }
    fn release_page(&self, page: PageHandle) -> Result<(), (PageHandle, kvvm::Error)> {
        self.inner.release_page(page)
    }
    fn map(&self, va: u64, pages: &[&PageHandle]) -> kvvm::Result<()> {
        if self.armed.load(Ordering::SeqCst) {
            self.held.fetch_add(1, Ordering::SeqCst);
            let g = self.open.lock().unwrap();
            let _ = self
                .cv
                .wait_timeout_while(g, Duration::from_secs(10), |open| !*open)
                .unwrap();
        }
        let d = self.delay_us.load(Ordering::Relaxed);
        if d > 0 {
            std::thread::sleep(Duration::from_micros(d));
        }
        self.inner.map(va, pages)
    }
    fn unmap(&self, va: u64, len: usize) -> kvvm::Result<()> {
        self.inner.unmap(va, len)
    }
    fn alloc_host(&self, len: usize) -> kvvm::Result<HostBuffer> {
        self.inner.alloc_host(len)
    }
    fn free_host(&self, buf: HostBuffer) -> Result<(), (HostBuffer, kvvm::Error)> {
        self.inner.free_host(buf)
    }
    unsafe fn copy_async(
        &self,
        kind: CopyKind,
        regions: &[CopyRegion],
    ) -> kvvm::Result<Box<dyn Completion>> {
        // SAFETY: the caller upholds `copy_async`'s contract; this wrapper passes it on unchanged.
        unsafe { self.inner.copy_async(kind, regions) }
    }
    fn synchronize(&self) -> kvvm::Result<()> {
        self.inner.synchronize()
    }
    fn map_headroom(&self) -> Option<usize> {
        self.inner.map_headroom()
    }
}

const MAX_TOKENS: usize = 2048;

/// A cache of 32 tokens per OS page (interleaved, one layer, 16 f32 per row): 70 tokens need 3
/// pages, 10 tokens 1.
fn cache(layout: Layout, lookahead: usize) -> (KvCache, Arc<GateBackend>) {
    let page = os_page_size();
    let host = Arc::new(
        HostBackend::new(HostConfig {
            granularity: page,
            copy_threads: 1,
            ..HostConfig::default()
        })
        .expect("host backend"),
    );
    let gate = Arc::new(GateBackend::new(host));
    let config = CacheConfig::new(1, 1, 16 * page / 4096)
        .with_dtype(DType::F32)
        .with_max_slots(8)
        .with_max_tokens(MAX_TOKENS)
        .with_layout(layout)
        .with_budget_bytes(64 << 20)
        .with_lookahead_steps(lookahead);
    let cache =
        KvCache::with_backend(config, gate.clone() as Arc<dyn Backend>).expect("create cache");
    (cache, gate)
}

/// `tokens <= capacity` for `slot`. Each is read under the lock but not both at once: with a
/// concurrent shrink (which lowers both) or step (which raises the capacity before the tokens),
/// reading the capacity before and after the tokens and taking the larger never reports a
/// violation that did not happen, and a slot left above its capacity fails every read.
fn assert_fits(cache: &KvCache, slot: SlotId, what: &str) {
    let c1 = cache.capacity(slot).expect("capacity");
    let t = cache.tokens(slot).expect("tokens");
    let c = c1.max(cache.capacity(slot).expect("capacity"));
    assert!(
        t <= c,
        "{what}: slot {slot} holds {t} live tokens but its mapped pages hold only {c}"
    );
}

/// Slot X with pages for 70 tokens and `live` live tokens stamped with `generation`.
fn prepare_x(cache: &KvCache, live: usize, generation: u32) -> SlotId {
    let x = cache.alloc_slot().expect("alloc");
    cache.ensure(x, 70).expect("ensure 70");
    cache.free_slot(x).expect("free");
    // The slot with the most pages is handed out again: its pages stay, its tokens are 0.
    let x2 = cache.alloc_slot_for(70).expect("realloc");
    assert_eq!(x, x2);
    assert!(cache.capacity(x).unwrap() >= 70);
    cache.ensure(x, live).expect("ensure live");
    // SAFETY: this test owns the slot, which holds `live` tokens.
    unsafe { stamp_tokens(cache, x, generation, 0, live).expect("stamp") };
    x
}

fn race_once(layout: Layout, live: usize, shrink_to: usize) {
    let (cache, gate) = cache(layout, 0);
    let x = prepare_x(&cache, live, 7);
    let y = cache.alloc_slot().expect("alloc y");
    gate.arm();
    std::thread::scope(|s| {
        let stepper = s.spawn(|| cache.step(&[(x, 70), (y, MAX_TOKENS)]));
        // The step holds Y's pages at the gate, X has everything it needs.
        gate.wait_held();
        cache.shrink(x, shrink_to).expect("shrink");
        gate.open();
        stepper.join().expect("stepper").expect("step");
    });
    assert_fits(&cache, x, "after step || shrink");
    assert_fits(&cache, y, "after step || shrink");
    // Either order is a valid outcome: the step committed 70 tokens after the shrink, or the
    // shrink cut them afterwards. Both keep the live tokens' bytes.
    let t = cache.tokens(x).unwrap();
    assert!(
        t == 70 || t == shrink_to.min(live),
        "slot X holds {t} tokens"
    );
    // SAFETY: the slot holds at least `live.min(shrink_to)` tokens, in mapped pages (checked).
    unsafe { verify_tokens(&cache, x, 7, live.min(shrink_to)).expect("live bytes of X") };
}

#[test]
fn step_racing_shrink_keeps_promised_pages_interleaved() {
    race_once(Layout::Interleaved, 0, 10);
    race_once(Layout::Interleaved, 5, 10);
    race_once(Layout::Interleaved, 5, 40);
}

#[test]
fn step_racing_shrink_keeps_promised_pages_per_layer() {
    race_once(Layout::PerLayer, 0, 10);
    race_once(Layout::PerLayer, 5, 10);
}

/// A shrink below the live tokens during the step: the shrink is ordered after the step (the
/// step's tokens are cut), and the remaining live tokens keep their pages and bytes.
#[test]
fn step_racing_shrink_below_live_tokens() {
    let (cache, gate) = cache(Layout::Interleaved, 0);
    let x = prepare_x(&cache, 30, 9);
    let y = cache.alloc_slot().expect("alloc y");
    gate.arm();
    std::thread::scope(|s| {
        let stepper = s.spawn(|| cache.step(&[(x, 70), (y, MAX_TOKENS)]));
        gate.wait_held();
        cache.shrink(x, 20).expect("shrink");
        gate.open();
        stepper.join().expect("stepper").expect("step");
    });
    assert_fits(&cache, x, "after step || shrink");
    let t = cache.tokens(x).unwrap();
    assert!(t == 20 || t == 70, "slot X holds {t} tokens");
    // SAFETY: the slot holds at least 20 tokens in mapped pages (checked above).
    unsafe { verify_tokens(&cache, x, 9, 20).expect("live bytes of X") };
}

/// Many rounds of the same interleaving left to the scheduler, with a slow `map` and the
/// background mapper on: one thread steps X with a slot that needs pages, another shrinks X;
/// `tokens <= capacity` is checked after every call of both.
#[test]
fn step_shrink_race_stress() {
    for layout in [Layout::Interleaved, Layout::PerLayer] {
        let (cache, gate) = cache(layout, 4);
        gate.delay_us.store(200, Ordering::Relaxed);
        let x = prepare_x(&cache, 0, 1);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let shrinker = s.spawn(|| {
                let mut n = 0u64;
                let mut rounds = 0;
                while !stop.load(Ordering::Acquire) {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let to = (n >> 33) as usize % 70;
                    cache.shrink(x, to).expect("shrink");
                    assert_fits(&cache, x, "after shrink");
                    rounds += 1;
                    std::thread::yield_now();
                }
                rounds
            });
            // Stop the shrinker even when a check fails, so that the failure is reported.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                for round in 0..300 {
                    let y = cache.alloc_slot().expect("alloc y");
                    let tx = 40 + round % 30;
                    cache.step(&[(x, tx), (y, 64 + round % 512)]).expect("step");
                    assert_fits(&cache, x, "after step");
                    assert_fits(&cache, y, "after step");
                    cache.free_slot(y).expect("free y");
                    cache.reclaim_free_slots().expect("reclaim");
                    assert_fits(&cache, x, "after reclaim");
                }
            }));
            stop.store(true, Ordering::Release);
            if let Err(p) = stepped {
                std::panic::resume_unwind(p);
            }
            assert!(shrinker.join().expect("shrinker") > 0);
        });
    }
}

//! Tests of the SwapEngine on the host backend with small pages: integrity of every live token
//! across interleavings of swap-out / swap-in / step / free (property test, both layouts), KV
//! reuse counters, host budget exhaustion and eviction, injected backend failures, and teardown
//! without leaks.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::Config;

use kvvm::{CacheConfig, DType, KvCache, Layout, SlotId};
use kvvm::{HostCopyId, SwapConfig, SwapEngine, SwapTicket};

/// Stamps tokens `from..to` of `slot` with the pattern of `generation`.
fn write_pattern(
    cache: &KvCache,
    slot: SlotId,
    generation: u32,
    from: usize,
    to: usize,
) -> Result<(), String> {
    // SAFETY: every cache in these tests is on the host backend; the test thread is the only one
    // that touches this slot's rows, and the slot holds at least `to` tokens during the call.
    unsafe { kvvm::testing::stamp_tokens(cache, slot, generation, from, to) }
}

/// Checks tokens `0..tokens` of `slot` against the pattern of `generation`.
fn verify_pattern(
    cache: &KvCache,
    slot: SlotId,
    generation: u32,
    tokens: usize,
) -> Result<(), String> {
    // SAFETY: as in `write_pattern`: host backend, the slot holds `tokens` tokens and nothing
    // else writes its rows during the call.
    unsafe { kvvm::testing::verify_tokens(cache, slot, generation, tokens) }
}
use kvvm::vmm::faulty::{CopyFault, FaultyBackend};
use kvvm::vmm::host::{os_page_size, HostBackend, HostConfig};
use kvvm::vmm::{Backend, BackendConfig, BackendOp};
use kvvm::Error;

const MAX_TOKENS: usize = 200;

struct Rig {
    host: Arc<HostBackend>,
    faulty: Arc<FaultyBackend>,
    cache: Arc<KvCache>,
    swap: Option<SwapEngine>,
}

impl Rig {
    /// 2 layers, 2 KV heads, head_dim 8, f32 (256 bytes a token), OS-page pages, `slots` slots
    /// of 200 tokens, a page budget of `budget_pages` and a host budget of `host_budget` bytes.
    fn new(layout: Layout, slots: usize, budget_pages: usize, host_budget: u64) -> Rig {
        Self::with(layout, slots, budget_pages, host_budget, 0, 1 << 20)
    }

    fn with(
        layout: Layout,
        slots: usize,
        budget_pages: usize,
        host_budget: u64,
        lookahead: usize,
        chunk_bytes: usize,
    ) -> Rig {
        let page = os_page_size();
        let host = Arc::new(
            HostBackend::new(HostConfig {
                granularity: page,
                copy_threads: 2,
                ..HostConfig::default()
            })
            .unwrap(),
        );
        let faulty = Arc::new(FaultyBackend::new(host.clone()));
        let cache = Arc::new(
            KvCache::with_backend(
                CacheConfig::new(2, 2, 8)
                    .with_dtype(DType::F32)
                    .with_max_slots(slots)
                    .with_max_tokens(MAX_TOKENS)
                    .with_layout(layout)
                    .with_page_size(None)
                    .with_budget_bytes((budget_pages * page) as u64)
                    .with_backend(BackendConfig::default())
                    .with_lookahead_steps(lookahead)
                    .with_create_all_pages(false),
                faulty.clone() as Arc<dyn Backend>,
            )
            .unwrap(),
        );
        let swap = SwapEngine::new(
            cache.clone(),
            SwapConfig {
                host_budget_bytes: host_budget,
                chunk_bytes,
                max_in_flight: 3,
                keep_pages: false,
            },
        )
        .unwrap();
        Rig {
            host,
            faulty,
            cache,
            swap: Some(swap),
        }
    }

    fn swap(&self) -> &SwapEngine {
        self.swap.as_ref().unwrap()
    }

    fn bpt(&self) -> u64 {
        self.cache.geometry().bytes_per_token() as u64
    }

    /// A new request of `tokens` stamped tokens.
    fn request(&self, tokens: usize, generation: u32) -> SlotId {
        let slot = self.cache.alloc_slot_for(tokens).unwrap();
        self.cache.ensure(slot, tokens).unwrap();
        write_pattern(&self.cache, slot, generation, 0, tokens).unwrap();
        slot
    }

    fn grow(&self, slot: SlotId, generation: u32, to: usize) {
        let from = self.cache.tokens(slot).unwrap();
        self.cache.ensure(slot, to).unwrap();
        write_pattern(&self.cache, slot, generation, from, to).unwrap();
    }

    fn check(&self, slot: SlotId, generation: u32, tokens: usize) {
        assert_eq!(self.cache.tokens(slot).unwrap(), tokens);
        verify_pattern(&self.cache, slot, generation, tokens).unwrap();
    }

    /// Swaps `copy` into a fresh slot and checks it holds `tokens` tokens of `generation`.
    fn resume(&self, copy: HostCopyId, generation: u32, tokens: usize) -> SlotId {
        let slot = self.cache.alloc_slot_for(tokens).unwrap();
        self.swap().swap_in(copy, slot).unwrap().wait().unwrap();
        self.check(slot, generation, tokens);
        slot
    }

    /// Drops engine and cache; checks that no page and no host buffer is left behind.
    fn finish(mut self) {
        self.faulty.clear();
        let swap = self.swap.take().unwrap();
        let stats = swap.stats();
        assert_eq!(stats.in_flight, 0);
        drop(swap);
        let cs = self.cache.stats();
        assert_eq!(
            cs.pool.in_use as u64 * cs.pool.page_size as u64,
            cs.mapped_bytes
        );
        drop(self.cache);
        assert_eq!(self.host.live_pages(), 0, "device pages leaked");
        assert_eq!(
            self.faulty.calls(BackendOp::AllocHost) - self.faulty.injected(BackendOp::AllocHost),
            self.faulty.calls(BackendOp::FreeHost),
            "host arena blocks leaked"
        );
    }
}

const LAYOUTS: [Layout; 2] = [Layout::Interleaved, Layout::PerLayer];

#[test]
fn swap_out_and_in_round_trip() {
    for layout in LAYOUTS {
        let rig = Rig::new(layout, 4, 64, 1 << 20);
        let a = rig.request(150, 1);
        let b = rig.request(30, 2);
        let t = rig.swap().swap_out(a).unwrap();
        assert_eq!(t.bytes(), 150 * rig.bpt());
        // Other slots keep working while the transfer is in flight.
        rig.grow(b, 2, 40);
        while !t.poll().unwrap() {
            std::thread::yield_now();
        }
        assert!(!rig.cache.is_allocated(a));
        assert_eq!(rig.cache.capacity(a).unwrap(), 0, "pages not unmapped");
        let copy = t.copy();
        assert_eq!(rig.swap().host_tokens(copy).unwrap(), 150);
        let s = rig.swap().stats();
        assert_eq!(
            (s.bytes_out, s.transfers, s.copies_live),
            (150 * rig.bpt(), 1, 1)
        );
        let a2 = rig.resume(copy, 1, 150);
        rig.check(b, 2, 40);
        assert_eq!(rig.swap().stats().bytes_in, 150 * rig.bpt());
        // The resumed request decodes on.
        rig.grow(a2, 1, 160);
        rig.check(a2, 1, 160);
        rig.finish();
    }
}

#[test]
fn small_chunks_and_empty_slots() {
    for layout in LAYOUTS {
        let rig = Rig::with(layout, 3, 64, 1 << 20, 2, 512);
        let a = rig.request(0, 1);
        let t = rig.swap().swap_out(a).unwrap();
        assert_eq!(t.bytes(), 0);
        t.wait().unwrap();
        let empty = t.copy();
        assert_eq!(rig.swap().host_tokens(empty).unwrap(), 0);
        let b = rig.request(77, 2);
        let t = rig.swap().swap_out(b).unwrap();
        t.wait().unwrap();
        let c = rig.resume(t.copy(), 2, 77);
        let e = rig.resume(empty, 0, 0);
        rig.grow(e, 9, 5);
        rig.check(c, 2, 77);
        rig.finish();
    }
}

#[test]
fn kv_reuse_moves_only_new_tokens() {
    for layout in LAYOUTS {
        let rig = Rig::new(layout, 4, 64, 1 << 20);
        let bpt = rig.bpt();
        let a = rig.request(100, 7);
        let t = rig.swap().swap_out(a).unwrap();
        t.wait().unwrap();
        let copy = t.copy();
        let a = rig.resume(copy, 7, 100);
        // Append k tokens and swap out again: exactly k tokens' bytes move.
        for (k, total) in [(9usize, 109usize), (0, 109), (71, 180)] {
            rig.grow(a, 7, total);
            let before = rig.swap().stats();
            let t = rig.swap().swap_out(a).unwrap();
            assert_eq!(t.copy(), copy, "the host copy is reused");
            assert_eq!(t.bytes(), k as u64 * bpt);
            t.wait().unwrap();
            let after = rig.swap().stats();
            assert_eq!(after.bytes_out - before.bytes_out, k as u64 * bpt);
            assert_eq!(
                after.reuse_saved_bytes - before.reuse_saved_bytes,
                (total - k) as u64 * bpt
            );
            assert_eq!(after.copies_live, 1);
            assert_eq!(rig.swap().host_tokens(copy).unwrap(), total);
            let b = rig.resume(copy, 7, total);
            assert_eq!(b, a, "the freed slot is reused");
        }
        rig.swap().release(copy).unwrap();
        assert!(rig.swap().host_tokens(copy).is_err());
        assert_eq!(rig.swap().stats().host_bytes_used, 0);
        rig.finish();
    }
}

#[test]
fn reuse_is_dropped_when_the_slot_changes_hands_or_shrinks() {
    for layout in LAYOUTS {
        let rig = Rig::new(layout, 2, 64, 1 << 20);
        let a = rig.request(60, 1);
        let t = rig.swap().swap_out(a).unwrap();
        t.wait().unwrap();
        let c1 = t.copy();
        let a = rig.resume(c1, 1, 60);
        // The request ends; another one gets the same slot.
        rig.cache.free_slot(a).unwrap();
        let b = rig.request(80, 2);
        assert_eq!(b, a);
        let t = rig.swap().swap_out(b).unwrap();
        assert_ne!(t.copy(), c1);
        assert_eq!(t.bytes(), 80 * rig.bpt());
        t.wait().unwrap();
        let c2 = t.copy();
        // The first copy still holds the first request.
        let a = rig.resume(c1, 1, 60);
        // Shrinking (rewriting the tail) also ends the reuse.
        rig.cache.shrink(a, 30).unwrap();
        rig.grow(a, 3, 50);
        let t = rig.swap().swap_out(a).unwrap();
        assert_ne!(t.copy(), c1);
        assert_eq!(t.bytes(), 50 * rig.bpt());
        t.wait().unwrap();
        let c3 = t.copy();
        let x = rig.resume(c2, 2, 80);
        rig.cache.free_slot(x).unwrap();
        let y = rig.cache.alloc_slot_for(50).unwrap();
        rig.swap().swap_in(c3, y).unwrap().wait().unwrap();
        verify_pattern(&rig.cache, y, 1, 30).unwrap();
        rig.finish();
    }
}

#[test]
fn host_budget_exhaustion_and_eviction() {
    for layout in LAYOUTS {
        // Room for one copy of 100 tokens (125 tokens of capacity) but not two.
        let rig = Rig::new(layout, 4, 96, 40 << 10);
        let bpt = rig.bpt();
        let a = rig.request(100, 1);
        let b = rig.request(100, 2);
        let t = rig.swap().swap_out(a).unwrap();
        t.wait().unwrap();
        let ca = t.copy();
        let before = rig.swap().stats();
        match rig.swap().swap_out(b) {
            Err(Error::HostBudgetExhausted { needed, .. }) => assert!(needed >= 100 * bpt),
            other => panic!("expected HostBudgetExhausted, got {other:?}"),
        }
        // Nothing changed: b is resident and intact, the sole copy of a was not evicted.
        rig.check(b, 2, 100);
        assert_eq!(rig.swap().stats(), before);
        assert_eq!(rig.swap().host_tokens(ca).unwrap(), 100);
        // Once a is resident again its copy is only a cache: pinned it stays...
        let a = rig.resume(ca, 1, 100);
        rig.swap().pin(ca, true).unwrap();
        assert!(matches!(
            rig.swap().swap_out(b),
            Err(Error::HostBudgetExhausted { .. })
        ));
        rig.check(b, 2, 100);
        // ...unpinned it is evicted to make room.
        rig.swap().pin(ca, false).unwrap();
        let t = rig.swap().swap_out(b).unwrap();
        t.wait().unwrap();
        let cb = t.copy();
        assert_eq!(rig.swap().stats().evictions, 1);
        assert!(rig.swap().host_tokens(ca).is_err(), "evicted");
        // a's next swap-out cannot reuse the evicted copy, and b's sole copy blocks it.
        assert!(matches!(
            rig.swap().swap_out(a),
            Err(Error::HostBudgetExhausted { .. })
        ));
        rig.check(a, 1, 100);
        let b = rig.resume(cb, 2, 100);
        rig.check(b, 2, 100);
        rig.finish();
    }
}

#[test]
fn eviction_follows_priority_then_lru() {
    let layout = Layout::Interleaved;
    // Room for three copies of 40 tokens (capacity 64: 16 KiB each).
    let rig = Rig::new(layout, 4, 128, 48 << 10);
    let mut copies = Vec::new();
    let mut slots = Vec::new();
    for g in 1..=3u32 {
        let s = rig.request(40, g);
        let t = rig.swap().swap_out(s).unwrap();
        t.wait().unwrap();
        copies.push(t.copy());
    }
    for (g, &c) in (1..=3u32).zip(&copies) {
        slots.push(rig.resume(c, g, 40));
    }
    // All three are cached now; the oldest (copy 0) has the highest priority.
    rig.swap().set_priority(copies[0], 5).unwrap();
    let d = rig.request(40, 4);
    rig.swap().swap_out(d).unwrap().wait().unwrap();
    assert!(
        rig.swap().host_tokens(copies[0]).is_ok(),
        "high priority kept"
    );
    assert!(
        rig.swap().host_tokens(copies[1]).is_err(),
        "LRU at priority 0 evicted"
    );
    assert!(rig.swap().host_tokens(copies[2]).is_ok());
    // Unknown ids are errors, not panics.
    let bogus = HostCopyId::from_raw(u64::MAX);
    assert!(matches!(
        rig.swap().host_tokens(bogus),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        rig.swap().release(bogus),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        rig.swap().pin(bogus, true),
        Err(Error::InvalidArgument(_))
    ));
    let e = rig.cache.alloc_slot().unwrap();
    assert!(matches!(
        rig.swap().swap_in(bogus, e),
        Err(Error::InvalidArgument(_))
    ));
    rig.finish();
}

#[test]
fn injected_copy_failures_lose_nothing() {
    for layout in LAYOUTS {
        let rig = Rig::new(layout, 4, 96, 1 << 20);
        let bpt = rig.bpt();
        let a = rig.request(90, 1);
        // Host memory cannot be allocated.
        rig.faulty.fail_nth(BackendOp::AllocHost, 1);
        assert!(matches!(
            rig.swap().swap_out(a),
            Err(Error::Injected { .. })
        ));
        rig.check(a, 1, 90);
        // The copy fails at submission.
        rig.faulty.fail_nth_copy(1, CopyFault::AtSubmit);
        assert!(matches!(
            rig.swap().swap_out(a),
            Err(Error::Injected { .. })
        ));
        rig.check(a, 1, 90);
        let s = rig.swap().stats();
        assert_eq!((s.copies_live, s.host_bytes_used, s.in_flight), (0, 0, 0));
        // The copy fails at completion: the error reaches the ticket, the slot keeps its KV.
        rig.faulty.fail_nth_copy(1, CopyFault::AtCompletion);
        let t = rig.swap().swap_out(a).unwrap();
        assert!(matches!(t.wait(), Err(Error::Injected { .. })));
        assert!(matches!(t.poll(), Err(Error::Injected { .. })));
        rig.check(a, 1, 90);
        assert_eq!(rig.swap().stats().copies_live, 0);
        // Now it works, and a failed reuse append keeps the host copy as it was.
        let t = rig.swap().swap_out(a).unwrap();
        t.wait().unwrap();
        let copy = t.copy();
        let a = rig.resume(copy, 1, 90);
        rig.grow(a, 1, 130); // past the copy's capacity: relocation
        for when in [CopyFault::AtSubmit, CopyFault::AtCompletion] {
            rig.faulty.fail_nth_copy(1, when);
            let r = rig.swap().swap_out(a).and_then(|t| t.wait());
            assert!(matches!(r, Err(Error::Injected { .. })));
            rig.check(a, 1, 130);
            assert_eq!(rig.swap().host_tokens(copy).unwrap(), 90);
        }
        let t = rig.swap().swap_out(a).unwrap();
        assert_eq!(t.copy(), copy);
        assert_eq!(t.bytes(), 40 * bpt);
        t.wait().unwrap();
        // Swap-in failures: mapping, copy at submission, copy at completion.
        let slot = rig.cache.alloc_slot_for(130).unwrap();
        rig.faulty.fail_nth(BackendOp::Map, 1);
        match rig.swap().swap_in(copy, slot) {
            Err(Error::Grow { source, .. }) => {
                assert!(matches!(*source, Error::Injected { .. }))
            }
            other => panic!("expected Grow, got {other:?}"),
        }
        assert_eq!(rig.cache.tokens(slot).unwrap(), 0);
        // (On the host backend swap-in chunks are submitted by the staging thread, so a
        // submission failure reaches the ticket.)
        rig.faulty.fail_nth_copy(1, CopyFault::AtSubmit);
        assert!(matches!(
            rig.swap().swap_in(copy, slot).and_then(|t| t.wait()),
            Err(Error::Injected { .. })
        ));
        assert_eq!(rig.cache.tokens(slot).unwrap(), 0);
        rig.faulty.fail_nth_copy(1, CopyFault::AtCompletion);
        let t = rig.swap().swap_in(copy, slot).unwrap();
        assert!(matches!(t.wait(), Err(Error::Injected { .. })));
        assert_eq!(rig.cache.tokens(slot).unwrap(), 0);
        assert_eq!(rig.swap().host_tokens(copy).unwrap(), 130);
        rig.swap().swap_in(copy, slot).unwrap().wait().unwrap();
        rig.check(slot, 1, 130);
        rig.finish();
    }
}

#[test]
fn unpolled_tickets_finish_and_drop_leaks_nothing() {
    for layout in LAYOUTS {
        let rig = Rig::new(layout, 4, 96, 1 << 20);
        let slots: Vec<SlotId> = (0..4).map(|g| rig.request(50 + 30 * g, g as u32)).collect();
        let copies: Vec<HostCopyId> = slots
            .iter()
            .map(|&s| rig.swap().swap_out(s).unwrap().copy())
            .collect();
        // Nobody polls: the engine finishes the transfers itself.
        rig.swap().quiesce();
        assert!(slots.iter().all(|&s| !rig.cache.is_allocated(s)));
        assert_eq!(rig.cache.stats().mapped_bytes, 0);
        // Swap-ins whose tickets are dropped, then the engine is dropped with them in flight.
        let mut resumed = Vec::new();
        for (g, &c) in copies.iter().enumerate() {
            let s = rig.cache.alloc_slot().unwrap();
            drop(rig.swap().swap_in(c, s).unwrap());
            resumed.push(s);
            if g == 0 {
                rig.swap().release(c).unwrap(); // released while in flight
            }
        }
        let Rig {
            host,
            faulty,
            cache,
            mut swap,
        } = rig;
        drop(swap.take());
        for (g, &s) in resumed.iter().enumerate() {
            assert_eq!(cache.tokens(s).unwrap(), 50 + 30 * g);
            verify_pattern(&cache, s, g as u32, 50 + 30 * g).unwrap();
        }
        Rig {
            host,
            faulty,
            cache,
            swap: None,
        }
        .finish_without_engine();
    }
}

impl Rig {
    fn finish_without_engine(self) {
        drop(self.cache);
        assert_eq!(self.host.live_pages(), 0);
        assert_eq!(
            self.faulty.calls(BackendOp::AllocHost) - self.faulty.injected(BackendOp::AllocHost),
            self.faulty.calls(BackendOp::FreeHost)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Property test: interleavings of swap-out / swap-in / step / free on several slots.

#[derive(Clone, Debug)]
enum Op {
    /// Admit a request with this many tokens.
    Admit(u8),
    /// Grow resident request `k` by `by` tokens.
    Step(u8, u8),
    /// Swap resident request `k` out; wait for the ticket now or later.
    SwapOut(u8, bool),
    /// Swap swapped-out request `k` in (possibly while its swap-out is in flight).
    SwapIn(u8),
    /// Finish resident request `k`.
    Free(u8),
    /// Drop swapped-out request `k` (release its copy, possibly in flight).
    Drop(u8),
    /// Poll every pending ticket.
    Poll,
    /// Make the n-th next call of a kind fail: 0 copy at submit, 1 copy at completion, 2 map.
    Fault(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..=150).prop_map(Op::Admit),
        4 => (any::<u8>(), 1u8..40).prop_map(|(k, b)| Op::Step(k, b)),
        6 => (any::<u8>(), any::<bool>()).prop_map(|(k, w)| Op::SwapOut(k, w)),
        6 => any::<u8>().prop_map(Op::SwapIn),
        1 => any::<u8>().prop_map(Op::Free),
        1 => any::<u8>().prop_map(Op::Drop),
        2 => Just(Op::Poll),
        1 => (0u8..3, 1u8..6).prop_map(|(k, n)| Op::Fault(k, n)),
    ]
}

struct Resident {
    slot: SlotId,
    tokens: usize,
    generation: u32,
    /// The swap-in that fills the slot, until it is known to have succeeded.
    pending: Option<SwapTicket>,
    /// The copy it was swapped in from (to release when the request ends).
    from: Option<(HostCopyId, usize)>,
}

struct Swapped {
    copy: HostCopyId,
    tokens: usize,
    generation: u32,
    pending: Option<SwapTicket>,
    /// The copy the request was swapped in from before this swap-out (released once the
    /// swap-out succeeded into another copy; kept if it fails).
    prev: Option<(HostCopyId, usize)>,
}

struct Model {
    rig: Rig,
    resident: Vec<Resident>,
    swapped: Vec<Swapped>,
    next_generation: u32,
    /// A fault was armed: a swap-out in flight may fail, so settle it before swapping in.
    faults_seen: bool,
}

fn legit(e: &Error) -> bool {
    match e {
        Error::Injected { .. } => true,
        Error::Grow { source, .. } => legit(source),
        other => other.is_exhaustion(),
    }
}

impl Model {
    /// Settles a resident's pending swap-in; returns false if it failed (the request then
    /// goes back to the swapped list and its slot is freed).
    fn settle(&mut self, k: usize) -> Result<bool, String> {
        let Some(t) = self.resident[k].pending.take() else {
            return Ok(true);
        };
        match t.wait() {
            Ok(()) => Ok(true),
            Err(e) if legit(&e) => {
                let r = self.resident.remove(k);
                self.rig
                    .cache
                    .free_slot(r.slot)
                    .map_err(|e| e.to_string())?;
                let (copy, _) = r.from.ok_or("a swapped-in request without its copy")?;
                self.swapped.push(Swapped {
                    copy,
                    tokens: r.tokens,
                    generation: r.generation,
                    pending: None,
                    prev: None,
                });
                Ok(false)
            }
            Err(e) => Err(format!("swap-in failed: {e}")),
        }
    }

    /// Settles a swapped request's pending swap-out; on failure it is resident again.
    fn settle_out(&mut self, k: usize) -> Result<bool, String> {
        let Some(t) = self.swapped[k].pending.take() else {
            return Ok(true);
        };
        let slot = t.slot();
        match t.wait() {
            Ok(()) => {
                if let Some((c, _)) = self.swapped[k].prev.take() {
                    if c != self.swapped[k].copy {
                        let _ = self.rig.swap().release(c); // may have been evicted
                    }
                }
                Ok(true)
            }
            Err(e) if legit(&e) => {
                let s = self.swapped.remove(k);
                self.resident.push(Resident {
                    slot,
                    tokens: s.tokens,
                    generation: s.generation,
                    pending: None,
                    from: s.prev,
                });
                Ok(false)
            }
            Err(e) => Err(format!("swap-out failed: {e}")),
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        let rig = &self.rig;
        match *op {
            Op::Admit(t) => {
                let t = t as usize;
                let Ok(slot) = rig.cache.alloc_slot_for(t) else {
                    return Ok(());
                };
                match rig.cache.ensure(slot, t) {
                    Ok(()) => {}
                    Err(e) if legit(&e) => {
                        rig.cache.free_slot(slot).map_err(|e| e.to_string())?;
                        return Ok(());
                    }
                    Err(e) => return Err(format!("ensure: {e}")),
                }
                let g = self.next_generation;
                self.next_generation += 1;
                write_pattern(&rig.cache, slot, g, 0, t)?;
                self.resident.push(Resident {
                    slot,
                    tokens: t,
                    generation: g,
                    pending: None,
                    from: None,
                });
            }
            Op::Step(k, by) => {
                if self.resident.is_empty() {
                    return Ok(());
                }
                let k = k as usize % self.resident.len();
                if !self.settle(k)? {
                    return Ok(());
                }
                let r = &mut self.resident[k];
                let to = (r.tokens + by as usize).min(MAX_TOKENS);
                match self.rig.cache.step(&[(r.slot, to)]) {
                    Ok(()) => {
                        write_pattern(&self.rig.cache, r.slot, r.generation, r.tokens, to)?;
                        r.tokens = to;
                    }
                    Err(e) if legit(&e) => {}
                    Err(e) => return Err(format!("step: {e}")),
                }
            }
            Op::SwapOut(k, wait) => {
                if self.resident.is_empty() {
                    return Ok(());
                }
                let k = k as usize % self.resident.len();
                if !self.settle(k)? {
                    return Ok(());
                }
                let r = &self.resident[k];
                match self.rig.swap().swap_out(r.slot) {
                    Ok(t) => {
                        if t.bytes()
                            > (r.tokens * self.rig.cache.geometry().bytes_per_token()) as u64
                        {
                            return Err("swap-out moves more than the slot holds".into());
                        }
                        let r = self.resident.remove(k);
                        self.swapped.push(Swapped {
                            copy: t.copy(),
                            tokens: r.tokens,
                            generation: r.generation,
                            pending: Some(t),
                            prev: r.from,
                        });
                        if wait {
                            let n = self.swapped.len() - 1;
                            self.settle_out(n)?;
                        }
                    }
                    Err(e) if legit(&e) => {}
                    Err(e) => return Err(format!("swap-out: {e}")),
                }
            }
            Op::SwapIn(k) => {
                if self.swapped.is_empty() {
                    return Ok(());
                }
                let k = k as usize % self.swapped.len();
                // Its swap-out may still be in flight: swap_in waits for it. Once faults are
                // armed it may fail (the request is then resident again): settle it first.
                if self.faults_seen && !self.settle_out(k)? {
                    return Ok(());
                }
                let s = &self.swapped[k];
                let Ok(slot) = self.rig.cache.alloc_slot_for(s.tokens) else {
                    return Ok(());
                };
                match self.rig.swap().swap_in(s.copy, slot) {
                    Ok(t) => {
                        let mut s = self.swapped.remove(k);
                        if let Some(out) = s.pending.take() {
                            out.wait()
                                .map_err(|e| format!("swap-out before swap-in: {e}"))?;
                        }
                        if let Some((c, _)) = s.prev.take() {
                            if c != s.copy {
                                let _ = self.rig.swap().release(c);
                            }
                        }
                        self.resident.push(Resident {
                            slot,
                            tokens: s.tokens,
                            generation: s.generation,
                            pending: Some(t),
                            from: Some((s.copy, s.tokens)),
                        });
                    }
                    Err(e) if legit(&e) => {
                        self.rig.cache.free_slot(slot).map_err(|e| e.to_string())?;
                    }
                    Err(e) => return Err(format!("swap-in: {e}")),
                }
            }
            Op::Free(k) => {
                if self.resident.is_empty() {
                    return Ok(());
                }
                let k = k as usize % self.resident.len();
                if !self.settle(k)? {
                    return Ok(());
                }
                let r = self.resident.remove(k);
                self.rig
                    .cache
                    .free_slot(r.slot)
                    .map_err(|e| e.to_string())?;
                if let Some((c, _)) = r.from {
                    let _ = self.rig.swap().release(c); // may have been evicted
                }
            }
            Op::Drop(k) => {
                if self.swapped.is_empty() {
                    return Ok(());
                }
                let k = k as usize % self.swapped.len();
                let s = self.swapped.remove(k);
                if let Some((c, _)) = s.prev {
                    if c != s.copy {
                        let _ = self.rig.swap().release(c);
                    }
                }
                match self.rig.swap().release(s.copy) {
                    Ok(()) => {}
                    Err(e) => {
                        // Only a swap-out that failed may have removed it already.
                        let failed = s.pending.as_ref().is_some_and(|t| t.wait().is_err());
                        if !failed {
                            return Err(format!("release of a live copy: {e}"));
                        }
                    }
                }
                // A failed swap-out leaves the request resident; it ends here too.
                if let Some(t) = s.pending {
                    if t.wait().is_err() {
                        self.rig
                            .cache
                            .free_slot(t.slot())
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
            Op::Poll => {
                for r in &self.resident {
                    if let Some(t) = &r.pending {
                        let _ = t.poll();
                    }
                }
                for s in &self.swapped {
                    if let Some(t) = &s.pending {
                        let _ = t.poll();
                    }
                }
            }
            Op::Fault(kind, n) => {
                self.faults_seen = true;
                match kind {
                    0 => self.rig.faulty.fail_nth_copy(n as u64, CopyFault::AtSubmit),
                    1 => self
                        .rig
                        .faulty
                        .fail_nth_copy(n as u64, CopyFault::AtCompletion),
                    _ => self.rig.faulty.fail_nth(BackendOp::Map, n as u64),
                }
            }
        }
        self.check()
    }

    /// Every settled resident request reads back exactly as written; swapped ones hold their
    /// token counts.
    fn check(&self) -> Result<(), String> {
        for r in self.resident.iter().filter(|r| r.pending.is_none()) {
            let t = self.rig.cache.tokens(r.slot).map_err(|e| e.to_string())?;
            if t != r.tokens {
                return Err(format!(
                    "slot {} holds {t} tokens, model {}",
                    r.slot, r.tokens
                ));
            }
            verify_pattern(&self.rig.cache, r.slot, r.generation, r.tokens)?;
        }
        for s in self.swapped.iter().filter(|s| s.pending.is_none()) {
            let t = self
                .rig
                .swap()
                .host_tokens(s.copy)
                .map_err(|e| format!("copy: {e}"))?;
            if t != s.tokens {
                return Err(format!("copy holds {t} tokens, model {}", s.tokens));
            }
        }
        Ok(())
    }

    /// Settles everything, swaps every request back in, checks it, and tears down.
    fn finish(mut self) -> Result<(), String> {
        self.rig.faulty.clear();
        while let Some(k) = self.resident.iter().position(|r| r.pending.is_some()) {
            self.settle(k)?;
        }
        while let Some(k) = self.swapped.iter().position(|s| s.pending.is_some()) {
            self.settle_out(k)?;
        }
        self.check()?;
        for r in std::mem::take(&mut self.resident) {
            self.rig
                .cache
                .free_slot(r.slot)
                .map_err(|e| e.to_string())?;
            if let Some((c, _)) = r.from {
                let _ = self.rig.swap().release(c);
            }
        }
        for s in std::mem::take(&mut self.swapped) {
            let slot = self
                .rig
                .cache
                .alloc_slot_for(s.tokens)
                .map_err(|e| e.to_string())?;
            self.rig
                .swap()
                .swap_in(s.copy, slot)
                .and_then(|t| t.wait())
                .map_err(|e| format!("final swap-in: {e}"))?;
            verify_pattern(&self.rig.cache, slot, s.generation, s.tokens)?;
            self.rig.swap().release(s.copy).map_err(|e| e.to_string())?;
            self.rig.cache.free_slot(slot).map_err(|e| e.to_string())?;
        }
        let st = self.rig.swap().stats();
        if st.copies_live != 0 || st.host_bytes_used != 0 || st.in_flight != 0 {
            return Err(format!("host copies left behind: {st:?}"));
        }
        self.rig.finish();
        Ok(())
    }
}

fn run_model(layout: Layout, lookahead: usize, ops: &[Op]) -> Result<(), String> {
    // 4 slots; pages for about 2 full slots; host room for about 2 full copies.
    let bpt = 256;
    let mut m = Model {
        rig: Rig::with(
            layout,
            4,
            32,
            (2 * MAX_TOKENS * bpt) as u64,
            lookahead,
            4096,
        ),
        resident: Vec::new(),
        swapped: Vec::new(),
        next_generation: 1,
        faults_seen: false,
    };
    for (i, op) in ops.iter().enumerate() {
        m.apply(op).map_err(|e| format!("op {i} {op:?}: {e}"))?;
    }
    m.finish()
}

proptest! {
    #![proptest_config(Config { cases: 96, failure_persistence: None, ..Config::default() })]

    #[test]
    fn interleavings_keep_every_token_interleaved(
        lookahead in 0usize..3,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        run_model(Layout::Interleaved, lookahead, &ops).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn interleavings_keep_every_token_per_layer(
        lookahead in 0usize..3,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        run_model(Layout::PerLayer, lookahead, &ops).map_err(TestCaseError::fail)?;
    }
}

/// Several threads swap their own requests out and in, grow them and free them while another
/// thread decodes resident requests: every token reads back as written throughout.
#[test]
fn concurrent_swaps_and_steps_keep_every_token() {
    for layout in LAYOUTS {
        let owned = Rig::with(layout, 8, 96, 1 << 20, 2, 2048);
        let rig = &owned;
        std::thread::scope(|scope| {
            for worker in 0..3u32 {
                scope.spawn(move || {
                    let generation = 100 + worker;
                    let mut tokens = 20 + 10 * worker as usize;
                    let mut slot = rig.request(tokens, generation);
                    for round in 0..12 {
                        let t = rig.swap().swap_out(slot).unwrap();
                        let copy = t.copy();
                        if round % 2 == 0 {
                            t.wait().unwrap();
                        }
                        // Swap-in waits for the swap-out of the same copy if still in flight.
                        let next = loop {
                            match rig.cache.alloc_slot_for(tokens) {
                                Ok(s) => break s,
                                Err(_) => std::thread::yield_now(),
                            }
                        };
                        let t = rig.swap().swap_in(copy, next).unwrap();
                        t.wait().unwrap();
                        slot = next;
                        verify_pattern(&rig.cache, slot, generation, tokens).unwrap();
                        let to = (tokens + 7).min(MAX_TOKENS);
                        rig.grow(slot, generation, to);
                        tokens = to;
                    }
                    rig.check(slot, generation, tokens);
                    let t = rig.swap().swap_out(slot).unwrap();
                    t.wait().unwrap();
                    rig.swap().release(t.copy()).unwrap();
                });
            }
            scope.spawn(move || {
                let mut live: Vec<(SlotId, usize)> =
                    (0..2).map(|g| (rig.request(5, 200 + g), 5)).collect();
                for _ in 0..60 {
                    let batch: Vec<(SlotId, usize)> = live
                        .iter()
                        .map(|&(s, t)| (s, (t + 3).min(MAX_TOKENS)))
                        .collect();
                    rig.cache.step(&batch).unwrap();
                    for (g, ((s, t), &(_, to))) in live.iter_mut().zip(&batch).enumerate() {
                        write_pattern(&rig.cache, *s, 200 + g as u32, *t, to).unwrap();
                        *t = to;
                        verify_pattern(&rig.cache, *s, 200 + g as u32, *t).unwrap();
                    }
                }
                for (s, _) in live {
                    rig.cache.free_slot(s).unwrap();
                }
            });
        });
        let s = rig.swap().stats();
        assert_eq!((s.in_flight, s.copies_live), (0, 0));
        assert!(
            s.reuse_saved_bytes > 0,
            "grown requests reuse their host copies"
        );
        owned.finish();
    }
}

/// A completion that does not complete until the test opens its gate (see [`Watch`]).
#[derive(Debug)]
struct GatedCompletion {
    inner: Box<dyn kvvm::vmm::Completion>,
    gate: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl kvvm::vmm::Completion for GatedCompletion {
    fn poll(&self) -> kvvm::Result<bool> {
        if !*self.gate.0.lock().unwrap() {
            return Ok(false);
        }
        self.inner.poll()
    }
    fn wait(&self) -> kvvm::Result<()> {
        let mut open = self.gate.0.lock().unwrap();
        while !*open {
            open = self.gate.1.wait(open).unwrap();
        }
        drop(open);
        self.inner.wait()
    }
}

/// While a swap-out's copy is in flight the slot keeps its pages and stays allocated, other slots
/// step (and map pages) freely, and the ticket reports "not yet"; the slot is freed only after
/// the copy completed. The same for a swap-in: the slot gets its tokens only at completion.
#[test]
fn pages_stay_until_the_copy_completes_and_other_slots_step_meanwhile() {
    for layout in LAYOUTS {
        let host: Arc<dyn Backend> = Arc::new(
            HostBackend::new(HostConfig {
                granularity: os_page_size(),
                copy_threads: 2,
                ..HostConfig::default()
            })
            .unwrap(),
        );
        let watch = Arc::new(Watch::new(host));
        watch.hold_all.store(true, Ordering::Relaxed);
        watch.set_gate(false);
        let cache = Arc::new(
            KvCache::with_backend(
                CacheConfig::new(2, 2, 8)
                    .with_dtype(DType::F32)
                    .with_max_slots(3)
                    .with_max_tokens(MAX_TOKENS)
                    .with_layout(layout)
                    .with_page_size(None)
                    .with_budget_bytes((64 * os_page_size()) as u64)
                    .with_backend(BackendConfig::default())
                    .with_lookahead_steps(0)
                    .with_create_all_pages(false),
                watch.clone(),
            )
            .unwrap(),
        );
        let swap = SwapEngine::new(cache.clone(), SwapConfig::default()).unwrap();
        let set_gate = |open: bool| watch.set_gate(open);
        let a = cache.alloc_slot().unwrap();
        cache.ensure(a, 120).unwrap();
        write_pattern(&cache, a, 1, 0, 120).unwrap();
        let b = cache.alloc_slot().unwrap();
        cache.ensure(b, 10).unwrap();
        write_pattern(&cache, b, 2, 0, 10).unwrap();

        let t = swap.swap_out(a).unwrap();
        assert!(!t.poll().unwrap());
        assert_eq!(swap.stats().in_flight, 1);
        // Other slots grow (mapping new pages) while the copy is held.
        for to in [40, 90, 150] {
            let from = cache.tokens(b).unwrap();
            cache.step(&[(b, to)]).unwrap();
            write_pattern(&cache, b, 2, from, to).unwrap();
        }
        // The swapped slot still has its pages and its KV.
        assert!(cache.is_allocated(a));
        assert!(cache.capacity(a).unwrap() >= 120);
        verify_pattern(&cache, a, 1, 120).unwrap();
        assert!(!t.poll().unwrap());
        set_gate(true);
        t.wait().unwrap();
        assert!(!cache.is_allocated(a));
        assert_eq!(cache.capacity(a).unwrap(), 0);

        // Swap-in: the slot holds no tokens until the copy completed.
        set_gate(false);
        let c = cache.alloc_slot_for(120).unwrap();
        let t = swap.swap_in(t.copy(), c).unwrap();
        assert!(!t.poll().unwrap());
        assert_eq!(cache.tokens(c).unwrap(), 0);
        cache.step(&[(b, 160)]).unwrap();
        write_pattern(&cache, b, 2, 150, 160).unwrap();
        set_gate(true);
        t.wait().unwrap();
        assert_eq!(cache.tokens(c).unwrap(), 120);
        verify_pattern(&cache, c, 1, 120).unwrap();
        verify_pattern(&cache, b, 2, 160).unwrap();
        drop(swap);
    }
}

/// A swap-in cut into many chunks (one backend call each on the host backend) whose third
/// submission or completion fails: the copies already submitted finish before the error is
/// reported, the slot stays empty and the host copy intact.
#[test]
fn failure_in_the_middle_of_a_chunked_swap_in() {
    for layout in LAYOUTS {
        let rig = Rig::with(layout, 3, 96, 1 << 20, 0, 4096);
        let a = rig.request(130, 5);
        let t = rig.swap().swap_out(a).unwrap();
        t.wait().unwrap();
        let copy = t.copy();
        let slot = rig.cache.alloc_slot_for(130).unwrap();
        for when in [CopyFault::AtSubmit, CopyFault::AtCompletion] {
            rig.faulty.clear();
            rig.faulty.fail_nth_copy(3, when);
            let r = rig.swap().swap_in(copy, slot).and_then(|t| t.wait());
            assert!(matches!(r, Err(Error::Injected { .. })), "{when:?}: {r:?}");
            assert_eq!(rig.cache.tokens(slot).unwrap(), 0);
            assert_eq!(rig.swap().host_tokens(copy).unwrap(), 130);
            assert_eq!(rig.swap().stats().in_flight, 0);
        }
        rig.faulty.clear();
        rig.swap().swap_in(copy, slot).unwrap().wait().unwrap();
        rig.check(slot, 5, 130);
        rig.finish();
    }
}

/// A backend that tracks which pages are mapped, checks that every copy reads and writes mapped
/// pages only, and can hold the completion of the copy that reads a chosen address.
#[derive(Debug)]
struct Watch {
    inner: Arc<dyn Backend>,
    page: usize,
    /// Addresses of the mapped pages.
    mapped: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// Every unmap, (address, length), in call order.
    unmaps: std::sync::Mutex<Vec<(u64, usize)>>,
    /// Copies that touched an unmapped page.
    violations: std::sync::Mutex<Vec<String>>,
    /// Per host-to-device copy: (its first destination, pages mapped when it was submitted).
    h2d: std::sync::Mutex<Vec<(u64, usize)>>,
    /// The copy whose regions include this source address completes only once the gate opens.
    hold_src: std::sync::Mutex<Option<u64>>,
    /// Every copy completes only once the gate opens.
    hold_all: std::sync::atomic::AtomicBool,
    /// When set, the fence every `record_fence` returns, and copies do not wait for the fence
    /// they are ordered after (they start at once): what kvvm itself must then hold back is seen.
    fence: std::sync::Mutex<Option<Arc<GateFence>>>,
    gate: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl Watch {
    fn new(inner: Arc<dyn Backend>) -> Watch {
        Watch {
            page: inner.granularity(),
            inner,
            mapped: Default::default(),
            unmaps: Default::default(),
            violations: Default::default(),
            h2d: Default::default(),
            hold_src: Default::default(),
            hold_all: Default::default(),
            fence: Default::default(),
            gate: Arc::new((std::sync::Mutex::new(true), std::sync::Condvar::new())),
        }
    }
    fn pages_of(&self, addr: u64, len: usize) -> impl Iterator<Item = u64> {
        let p = self.page as u64;
        let first = addr / p * p;
        let end = addr + len as u64;
        (first..end).step_by(self.page)
    }
    fn is_mapped(&self, addr: u64, len: usize) -> bool {
        let m = self.mapped.lock().unwrap();
        self.pages_of(addr, len).all(|pg| m.contains(&pg))
    }
    fn any_mapped(&self, addr: u64, len: usize) -> bool {
        let m = self.mapped.lock().unwrap();
        self.pages_of(addr, len).any(|pg| m.contains(&pg))
    }
    fn set_gate(&self, open: bool) {
        *self.gate.0.lock().unwrap() = open;
        self.gate.1.notify_all();
    }
}

impl Backend for Watch {
    fn info(&self) -> kvvm::vmm::BackendInfo {
        self.inner.info()
    }
    fn kind(&self) -> kvvm::vmm::BackendKind {
        self.inner.kind()
    }
    fn granularity(&self) -> usize {
        self.inner.granularity()
    }
    fn reserve(&self, len: usize) -> kvvm::Result<kvvm::vmm::VaRange> {
        self.inner.reserve(len)
    }
    fn free_reservation(&self, range: kvvm::vmm::VaRange) -> kvvm::Result<()> {
        self.inner.free_reservation(range)
    }
    fn create_page(&self, size: usize) -> kvvm::Result<kvvm::vmm::PageHandle> {
        self.inner.create_page(size)
    }
    fn release_page(
        &self,
        page: kvvm::vmm::PageHandle,
    ) -> Result<(), (kvvm::vmm::PageHandle, Error)> {
        self.inner.release_page(page)
    }
    fn map(&self, va: u64, pages: &[&kvvm::vmm::PageHandle]) -> kvvm::Result<()> {
        self.inner.map(va, pages)?;
        let len: usize = pages.iter().map(|p| p.size()).sum();
        let all: Vec<u64> = self.pages_of(va, len).collect();
        self.mapped.lock().unwrap().extend(all);
        Ok(())
    }
    fn unmap(&self, va: u64, len: usize) -> kvvm::Result<()> {
        // Recorded before the call, so that a copy racing the unmap is seen.
        let mut m = self.mapped.lock().unwrap();
        for pg in self.pages_of(va, len) {
            m.remove(&pg);
        }
        drop(m);
        self.unmaps.lock().unwrap().push((va, len));
        let r = self.inner.unmap(va, len);
        if r.is_err() {
            // A failed unmap leaves the range mapped.
            let all: Vec<u64> = self.pages_of(va, len).collect();
            self.mapped.lock().unwrap().extend(all);
        }
        r
    }
    fn alloc_host(&self, len: usize) -> kvvm::Result<kvvm::vmm::HostBuffer> {
        self.inner.alloc_host(len)
    }
    fn free_host(&self, buf: kvvm::vmm::HostBuffer) -> Result<(), (kvvm::vmm::HostBuffer, Error)> {
        self.inner.free_host(buf)
    }
    unsafe fn copy_async(
        &self,
        kind: kvvm::vmm::CopyKind,
        regions: &[kvvm::vmm::CopyRegion],
    ) -> kvvm::Result<Box<dyn kvvm::vmm::Completion>> {
        for r in regions {
            let device = match kind {
                kvvm::vmm::CopyKind::HostToDevice => r.dst,
                _ => r.src,
            };
            if !self.is_mapped(device, r.len) {
                let what = format!(
                    "{kind:?} copy of {} bytes at {device:#x} touches an unmapped page",
                    r.len
                );
                self.violations.lock().unwrap().push(what.clone());
                // Not forwarded: a copy into an unmapped page would fault the process.
                return Err(Error::InvalidArgument(what));
            }
        }
        if kind == kvvm::vmm::CopyKind::HostToDevice {
            let n = self.mapped.lock().unwrap().len();
            self.h2d.lock().unwrap().push((regions[0].dst, n));
        }
        let held = self.hold_all.load(Ordering::Relaxed)
            || self
                .hold_src
                .lock()
                .unwrap()
                .is_some_and(|a| regions.iter().any(|r| r.src == a));
        // SAFETY: forwarded unchanged; the caller upholds `copy_async`'s contract until the
        // returned completion (which completes no earlier than the inner one) reports done.
        let inner = unsafe { self.inner.copy_async(kind, regions) }?;
        if held {
            return Ok(Box::new(GatedCompletion {
                inner,
                gate: self.gate.clone(),
            }));
        }
        Ok(inner)
    }
    fn synchronize(&self) -> kvvm::Result<()> {
        self.inner.synchronize()
    }
    fn record_fence(&self, stream: u64) -> kvvm::Result<Option<Arc<dyn kvvm::vmm::Fence>>> {
        match &*self.fence.lock().unwrap() {
            Some(f) => Ok(Some(f.clone())),
            None => self.inner.record_fence(stream),
        }
    }
    unsafe fn copy_async_after(
        &self,
        kind: kvvm::vmm::CopyKind,
        regions: &[kvvm::vmm::CopyRegion],
        after: Option<&dyn kvvm::vmm::Fence>,
    ) -> kvvm::Result<Box<dyn kvvm::vmm::Completion>> {
        if self.fence.lock().unwrap().is_some() {
            // SAFETY: forwarded from this function's contract. Not waiting for `after` only lets
            // the copy run before the fence: on this host backend nothing of a caller's runs
            // behind it, and the copy reads mapped pages (checked by `copy_async`).
            return unsafe { self.copy_async(kind, regions) };
        }
        if let Some(f) = after {
            f.wait()?;
        }
        // SAFETY: forwarded from this function's contract, after the fence (as the provided
        // method does), through this backend's checks.
        unsafe { self.copy_async(kind, regions) }
    }
}

/// A fence that completes once the test opens it.
#[derive(Debug, Default)]
struct GateFence {
    open: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl GateFence {
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl kvvm::vmm::Fence for GateFence {
    fn poll(&self) -> kvvm::Result<bool> {
        Ok(*self.open.lock().unwrap())
    }
    fn wait(&self) -> kvvm::Result<()> {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
        Ok(())
    }
    fn event(&self) -> u64 {
        0
    }
}

/// Opens a [`Watch`]'s gate, and its fence if it has one, when dropped.
struct OpenOnDrop(Arc<Watch>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.set_gate(true);
        if let Some(f) = &*self.0.fence.lock().unwrap() {
            f.open();
        }
    }
}

/// A cache of 3 slots of 200 tokens (256 bytes a token, OS pages) on a [`Watch`] backend, and a
/// swap engine with `chunk` byte chunks.
fn watched(layout: Layout, chunk: usize) -> (Arc<Watch>, Arc<KvCache>, SwapEngine) {
    watched_with(layout, chunk, 64)
}

/// [`watched`] with a budget of `budget_pages` OS pages.
fn watched_with(
    layout: Layout,
    chunk: usize,
    budget_pages: usize,
) -> (Arc<Watch>, Arc<KvCache>, SwapEngine) {
    let host: Arc<dyn Backend> = Arc::new(
        HostBackend::new(HostConfig {
            granularity: os_page_size(),
            copy_threads: 2,
            ..HostConfig::default()
        })
        .unwrap(),
    );
    let watch = Arc::new(Watch::new(host));
    let cache = Arc::new(
        KvCache::with_backend(
            CacheConfig::new(2, 2, 8)
                .with_dtype(DType::F32)
                .with_max_slots(3)
                .with_max_tokens(MAX_TOKENS)
                .with_layout(layout)
                .with_page_size(None)
                .with_budget_bytes((budget_pages * os_page_size()) as u64)
                .with_backend(BackendConfig::default())
                .with_lookahead_steps(0)
                .with_create_all_pages(false),
            watch.clone() as Arc<dyn Backend>,
        )
        .unwrap(),
    );
    let swap = SwapEngine::new(
        cache.clone(),
        SwapConfig {
            chunk_bytes: chunk,
            ..SwapConfig::default()
        },
    )
    .unwrap();
    (watch, cache, swap)
}

/// Swap-out releases pages chunk by chunk, never early: with the copy of one chunk held (a
/// chunk that starts inside a page, so the page is shared with the chunk before), the pages
/// wholly under the earlier chunks are unmapped while the transfer is still in flight, and no
/// page under the held chunk is (its bytes still read back intact); once the copy completes the
/// whole KV comes back.
#[test]
fn swap_out_releases_each_chunk_after_its_copy_and_not_before() {
    let page = os_page_size();
    // One and a half pages: every second chunk starts in the middle of a page.
    let chunk = page + page / 2;
    for layout in LAYOUTS {
        let (watch, cache, swap) = watched(layout, chunk);
        // Should an assertion fail with the copy held, the engine's drop must not wait forever.
        let _open = OpenOnDrop(watch.clone());
        let tokens = 190;
        let a = cache.alloc_slot().unwrap();
        cache.ensure(a, tokens).unwrap();
        write_pattern(&cache, a, 7, 0, tokens).unwrap();
        // The slot's first range (buffer 0), cut as the engine cuts it.
        let r0 = cache.slot_ranges(a, tokens).unwrap()[0];
        let chunks: Vec<(u64, usize)> = (0..r0.len)
            .step_by(chunk)
            .map(|off| (r0.addr + off as u64, (r0.len - off).min(chunk)))
            .collect();
        assert!(chunks.len() >= 2, "{layout:?}: {} chunks", chunks.len());
        // The last chunk of buffer 0 that starts inside a page.
        let (held_at, held_len) = *chunks
            .iter()
            .rev()
            .find(|(addr, _)| addr % page as u64 != 0)
            .unwrap();
        *watch.hold_src.lock().unwrap() = Some(held_at);
        watch.set_gate(false);
        let t = swap.swap_out(a).unwrap();
        // The pages wholly below the held chunk get unmapped while it is held.
        let below = (held_at - r0.addr) as usize / page * page;
        assert!(below > 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while watch.any_mapped(r0.addr, below) {
            assert!(
                std::time::Instant::now() < deadline,
                "{layout:?}: pages of completed chunks were not released while a later chunk copied"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!t.poll().unwrap(), "{layout:?}: finished with a copy held");
        // Nothing under the held chunk (nor after it) is unmapped, and its bytes are intact.
        let held_end = held_at + held_len as u64;
        let unmaps = watch.unmaps.lock().unwrap().clone();
        for (va, len) in unmaps {
            assert!(
                va + len as u64 <= held_at / page as u64 * page as u64 || va >= held_end,
                "{layout:?}: [{va:#x}, +{len:#x}) unmapped while the copy of [{held_at:#x}, {held_end:#x}) was in flight"
            );
        }
        assert!(watch.is_mapped(held_at, held_len), "{layout:?}");
        // SAFETY: the held chunk's pages are mapped (checked just above) and nothing writes them.
        let held = unsafe { std::slice::from_raw_parts(held_at as usize as *const u8, held_len) };
        assert!(
            held.iter().any(|&b| b != 0),
            "{layout:?}: held chunk reads zeros"
        );
        assert!(cache.is_allocated(a));
        watch.set_gate(true);
        t.wait().unwrap();
        assert!(!cache.is_allocated(a));
        assert!(!watch.is_mapped(r0.addr, r0.len));
        let violations = watch.violations.lock().unwrap().clone();
        assert!(violations.is_empty(), "{layout:?}: {violations:?}");
        // Everything reached the host.
        let c = cache.alloc_slot_for(tokens).unwrap();
        swap.swap_in(t.copy(), c).unwrap().wait().unwrap();
        verify_pattern(&cache, c, 7, tokens).unwrap();
        drop(swap);
    }
}

/// A swap-out's pages are released only once its fence (the caller's work that may still read
/// the slot) has passed, even when its copies complete before: here the backend does not order
/// the copies after the fence, so only the engine's own check holds the unmaps back.
#[test]
fn swap_out_releases_no_page_before_its_fence() {
    let page = os_page_size();
    for layout in LAYOUTS {
        let (watch, cache, swap) = watched(layout, page);
        let fence = Arc::new(GateFence::default());
        *watch.fence.lock().unwrap() = Some(fence.clone());
        // Should an assertion fail with the fence closed, the engine's drop must not hang.
        let _open = OpenOnDrop(watch.clone());
        let tokens = 190;
        let a = cache.alloc_slot().unwrap();
        cache.ensure(a, tokens).unwrap();
        write_pattern(&cache, a, 9, 0, tokens).unwrap();
        let ranges = cache.slot_ranges(a, tokens).unwrap();
        let t = swap.swap_out(a).unwrap();
        // Every copy completes (they do not wait for the fence): the ticket finishes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !t.poll().unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "{layout:?}: copies never completed"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Give the completion thread and the unmapper time to act on the completed copies.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let unmaps = watch.unmaps.lock().unwrap().clone();
        assert!(
            unmaps.is_empty(),
            "{layout:?}: unmapped before the swap-out's fence passed: {unmaps:?}"
        );
        for r in &ranges {
            assert!(watch.is_mapped(r.addr, r.len), "{layout:?}");
        }
        assert!(
            cache.is_allocated(a),
            "{layout:?}: slot freed before its fence"
        );
        fence.open();
        while cache.is_allocated(a) {
            assert!(
                std::time::Instant::now() < deadline,
                "{layout:?}: slot never freed"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for r in &ranges {
            assert!(!watch.any_mapped(r.addr, r.len), "{layout:?}");
        }
        let violations = watch.violations.lock().unwrap().clone();
        assert!(violations.is_empty(), "{layout:?}: {violations:?}");
        *watch.fence.lock().unwrap() = None;
        let c = cache.alloc_slot_for(tokens).unwrap();
        swap.swap_in(t.copy(), c).unwrap().wait().unwrap();
        verify_pattern(&cache, c, 9, tokens).unwrap();
        drop(swap);
    }
}

/// The pages a swap-out keeps ([`SwapConfig::keep_pages`]) stay with the freed slot behind the
/// swap-out's fence: reclamation takes them for another slot only once the fence passed.
#[test]
fn kept_pages_are_reclaimed_only_after_the_swap_outs_fence() {
    for layout in LAYOUTS {
        // Room for one request of 180 tokens (12 pages interleaved, 8 per-layer), not two.
        let (watch, cache, swap) = watched_with(layout, os_page_size(), 14);
        swap.set_keep_pages(true);
        let tokens = 180;
        let a = cache.alloc_slot().unwrap();
        let c = cache.alloc_slot().unwrap();
        cache.ensure(a, tokens).unwrap();
        write_pattern(&cache, a, 9, 0, tokens).unwrap();
        let ranges = cache.slot_ranges(a, tokens).unwrap();
        let fence = Arc::new(GateFence::default());
        *watch.fence.lock().unwrap() = Some(fence.clone());
        // Should an assertion fail with the fence closed, nothing may wait for it forever.
        let _open = OpenOnDrop(watch.clone());
        let t = swap.swap_out(a).unwrap();
        t.wait().unwrap();
        assert!(!cache.is_allocated(a), "{layout:?}");
        let fence_waits = cache.stats().fence_waits;
        // Another request needs the kept pages: it waits for the fence.
        let grow = {
            let cache = cache.clone();
            std::thread::spawn(move || cache.ensure(c, tokens))
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            !grow.is_finished(),
            "{layout:?}: grew before the fence passed"
        );
        for r in &ranges {
            assert!(
                watch.is_mapped(r.addr, r.len),
                "{layout:?}: kept pages unmapped before the fence passed"
            );
        }
        fence.open();
        grow.join().unwrap().unwrap();
        assert!(cache.stats().fence_waits > fence_waits, "{layout:?}");
        assert!(
            cache.capacity(a).unwrap() < tokens,
            "{layout:?}: not reclaimed"
        );
        write_pattern(&cache, c, 10, 0, tokens).unwrap();
        verify_pattern(&cache, c, 10, tokens).unwrap();
        cache.free_slot(c).unwrap();
        *watch.fence.lock().unwrap() = None;
        let d = cache.alloc_slot_for(tokens).unwrap();
        swap.swap_in(t.copy(), d).unwrap().wait().unwrap();
        verify_pattern(&cache, d, 9, tokens).unwrap();
        let violations = watch.violations.lock().unwrap().clone();
        assert!(violations.is_empty(), "{layout:?}: {violations:?}");
        drop(swap);
    }
}

/// Swap-in maps each chunk's pages before that chunk's copy is submitted, and maps them
/// progressively (pipelined with the copies), not all up front.
#[test]
fn swap_in_maps_each_chunk_before_its_copy() {
    let page = os_page_size();
    let chunk = page + page / 2;
    for layout in LAYOUTS {
        let (watch, cache, swap) = watched(layout, chunk);
        let tokens = 190;
        let a = cache.alloc_slot().unwrap();
        cache.ensure(a, tokens).unwrap();
        write_pattern(&cache, a, 9, 0, tokens).unwrap();
        let t = swap.swap_out(a).unwrap();
        t.wait().unwrap();
        assert_eq!(watch.mapped.lock().unwrap().len(), 0, "{layout:?}");
        let c = cache.alloc_slot_for(tokens).unwrap();
        let mapped_before = watch.mapped.lock().unwrap().len();
        swap.swap_in(t.copy(), c).unwrap().wait().unwrap();
        verify_pattern(&cache, c, 9, tokens).unwrap();
        let violations = watch.violations.lock().unwrap().clone();
        assert!(violations.is_empty(), "{layout:?}: {violations:?}");
        let h2d = watch.h2d.lock().unwrap().clone();
        let total = watch.mapped.lock().unwrap().len();
        assert!(h2d.len() >= 2, "{layout:?}: {} copies", h2d.len());
        assert!(
            h2d[0].1 < total && h2d[0].1 > mapped_before,
            "{layout:?}: {} of {total} pages were mapped when the first chunk was submitted (expected some, not all)",
            h2d[0].1
        );
        drop(swap);
    }
}

/// A swap-out cut into chunks whose third copy fails at completion, after the pages under the
/// first chunks were released: they are mapped back and the slot keeps every token.
#[test]
fn failure_after_early_release_restores_the_slot() {
    for layout in LAYOUTS {
        let rig = Rig::with(layout, 3, 96, 1 << 20, 0, 4096);
        let a = rig.request(180, 4);
        let unmaps = rig.faulty.calls(BackendOp::Unmap);
        rig.faulty.fail_nth_copy(3, CopyFault::AtCompletion);
        let r = rig.swap().swap_out(a).unwrap().wait();
        assert!(
            matches!(r, Err(Error::Injected { .. })),
            "{layout:?}: {r:?}"
        );
        assert!(
            rig.faulty.calls(BackendOp::Unmap) > unmaps,
            "{layout:?}: nothing was released before the failure"
        );
        rig.check(a, 4, 180);
        // The same, with the first attempt at mapping the released pages back failing too.
        rig.faulty.fail_nth_copy(3, CopyFault::AtCompletion);
        rig.faulty.fail_nth(BackendOp::Map, 1);
        let r = rig.swap().swap_out(a).unwrap().wait();
        assert!(
            matches!(r, Err(Error::Injected { .. })),
            "{layout:?}: {r:?}"
        );
        rig.check(a, 4, 180);
        rig.faulty.clear();
        let t = rig.swap().swap_out(a).unwrap();
        t.wait().unwrap();
        rig.resume(t.copy(), 4, 180);
        rig.finish();
    }
}

#[test]
fn host_memory_reserved_up_front_is_used_by_later_swaps() {
    // `reserve_host` allocates the host arena before any swap (outside the engine's lock), so
    // the swaps themselves allocate no host memory; it stays within the host budget.
    for layout in LAYOUTS {
        let rig = Rig::new(layout, 4, 64, 1 << 20);
        let budget = rig.swap().config().host_budget_bytes;
        let held = rig.swap().reserve_host(u64::MAX).unwrap();
        assert!(held <= budget && held > 0, "{held} of {budget}");
        let allocs = rig.cache.backend().op(BackendOp::AllocHost).calls;
        let a = rig.request(40, 3);
        let t = rig.swap().swap_out(a).unwrap();
        t.wait().unwrap();
        let b = rig.resume(t.copy(), 3, 40);
        rig.check(b, 3, 40);
        assert_eq!(
            rig.cache.backend().op(BackendOp::AllocHost).calls,
            allocs,
            "a swap allocated host memory"
        );
        assert_eq!(rig.swap().reserve_host(u64::MAX).unwrap(), held);
        rig.finish();
    }
}

/// A [`Watch`] over a [`FaultyBackend`] over the host backend, a cache of 3 slots of 200 tokens
/// (256 bytes a token, OS pages) and a swap engine with `chunk` byte chunks.
fn watched_faulty(
    layout: Layout,
    chunk: usize,
) -> (
    Arc<Watch>,
    Arc<FaultyBackend>,
    Arc<HostBackend>,
    Arc<KvCache>,
    SwapEngine,
) {
    let host = Arc::new(
        HostBackend::new(HostConfig {
            granularity: os_page_size(),
            copy_threads: 2,
            ..HostConfig::default()
        })
        .unwrap(),
    );
    let faulty = Arc::new(FaultyBackend::new(host.clone()));
    let watch = Arc::new(Watch::new(faulty.clone()));
    let cache = Arc::new(
        KvCache::with_backend(
            CacheConfig::new(2, 2, 8)
                .with_dtype(DType::F32)
                .with_max_slots(3)
                .with_max_tokens(MAX_TOKENS)
                .with_layout(layout)
                .with_page_size(None)
                .with_budget_bytes((64 * os_page_size()) as u64)
                .with_backend(BackendConfig::default())
                .with_lookahead_steps(0)
                .with_create_all_pages(false),
            watch.clone() as Arc<dyn Backend>,
        )
        .unwrap(),
    );
    let swap = SwapEngine::new(
        cache.clone(),
        SwapConfig {
            chunk_bytes: chunk,
            ..SwapConfig::default()
        },
    )
    .unwrap();
    (watch, faulty, host, cache, swap)
}

/// Waits up to 20 s for `cond`.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A swap-out whose first chunks' pages were released early, and then neither the unmap of the
/// rest nor mapping the released pages back works: the swap-out still succeeds, but the slot
/// (whose buffers are half unmapped) is not handed out again until the pages are released in
/// the background; once the faults stop, they are, and the KV comes back intact. (Freeing the
/// slot at once handed its half-unmapped pages to the next swap-in, which copied into an
/// unmapped page: SIGSEGV in the copy thread.)
#[test]
fn a_swap_out_whose_final_unmap_and_remap_fail_keeps_the_slot_until_released() {
    let page = os_page_size();
    let chunk = page + page / 2;
    for layout in LAYOUTS {
        let (watch, faulty, host, cache, swap) = watched_faulty(layout, chunk);
        let _open = OpenOnDrop(watch.clone());
        let tokens = 190;
        let a = cache.alloc_slot().unwrap();
        cache.ensure(a, tokens).unwrap();
        write_pattern(&cache, a, 5, 0, tokens).unwrap();
        let r0 = cache.slot_ranges(a, tokens).unwrap()[0];
        // Hold the last chunk of the first range; the pages below it go while it is held.
        let last = r0.addr + ((r0.len - 1) / chunk * chunk) as u64;
        assert!(last > r0.addr + page as u64, "{layout:?}");
        *watch.hold_src.lock().unwrap() = Some(last);
        watch.set_gate(false);
        let t = swap.swap_out(a).unwrap();
        eventually("no page was released early", || {
            !watch.any_mapped(r0.addr, page)
        });
        // From now on every unmap and every map fails.
        faulty.fail_from(BackendOp::Unmap, 1);
        faulty.fail_from(BackendOp::Map, 1);
        watch.set_gate(true);
        t.wait().unwrap();
        assert!(
            cache.is_allocated(a),
            "{layout:?}: the slot was freed with half of its pages unmapped"
        );
        // The next allocation gets another slot.
        let b = cache.alloc_slot().unwrap();
        assert_ne!(a, b, "{layout:?}");
        cache.free_slot(b).unwrap();
        faulty.clear();
        eventually("the pages were never released", || !cache.is_allocated(a));
        assert!(!watch.any_mapped(r0.addr, r0.len), "{layout:?}");
        let c = cache.alloc_slot_for(tokens).unwrap();
        swap.swap_in(t.copy(), c).unwrap().wait().unwrap();
        verify_pattern(&cache, c, 5, tokens).unwrap();
        let violations = watch.violations.lock().unwrap().clone();
        assert!(violations.is_empty(), "{layout:?}: {violations:?}");
        drop(swap);
        drop(cache);
        assert_eq!(host.live_pages(), 0, "{layout:?}: pages leaked");
    }
}

/// A swap-out whose later chunk fails after the first chunks' pages were released, when those
/// cannot be mapped back (every map fails): the failed chunks are copied again from their
/// still-mapped pages and the swap-out succeeds with every token on the host. (Giving up left
/// the slot with unmapped pages under live tokens: they read as zeros.)
#[test]
fn a_failed_swap_out_that_cannot_map_back_completes_by_copying_again() {
    for layout in LAYOUTS {
        let rig = Rig::with(layout, 3, 96, 1 << 20, 0, 4096);
        let a = rig.request(180, 6);
        let unmaps = rig.faulty.calls(BackendOp::Unmap);
        rig.faulty.fail_nth_copy(3, CopyFault::AtCompletion);
        rig.faulty.fail_from(BackendOp::Map, 1);
        let t = rig.swap().swap_out(a).unwrap();
        let r = t.wait();
        assert!(
            rig.faulty.calls(BackendOp::Unmap) > unmaps,
            "{layout:?}: nothing was released before the failure"
        );
        assert!(r.is_ok(), "{layout:?}: {r:?}");
        assert!(!rig.cache.is_allocated(a), "{layout:?}");
        rig.faulty.clear();
        rig.resume(t.copy(), 6, 180);
        rig.finish();
    }
}

/// With `keep_pages`, a swap-out frees the slot but leaves its pages mapped (no unmap), a
/// swap-in into that slot maps and populates nothing, and when another request needs the pages
/// reclamation takes them back; every token survives each path. Switched at run time.
#[test]
fn kept_pages_make_the_swap_in_a_copy_alone_and_stay_reclaimable() {
    for layout in LAYOUTS {
        // Room for about one request of 180 tokens at a time (12 pages interleaved, 12 per-layer).
        let rig = Rig::with(layout, 3, 14, 1 << 20, 0, 4096);
        rig.swap().set_keep_pages(true);
        assert!(rig.swap().keep_pages());
        let a = rig.request(180, 8);
        let (maps, unmaps) = (
            rig.faulty.calls(BackendOp::Map),
            rig.faulty.calls(BackendOp::Unmap),
        );
        let t = rig.swap().swap_out(a).unwrap();
        t.wait().unwrap();
        assert!(!rig.cache.is_allocated(a), "{layout:?}");
        assert_eq!(
            rig.faulty.calls(BackendOp::Unmap),
            unmaps,
            "{layout:?}: unmapped"
        );
        assert!(rig.cache.capacity(a).unwrap() >= 180, "{layout:?}");
        // Back into the slot that kept its pages: no map, no page-table population.
        let populate = rig.swap().stats().populate_ns;
        let b = rig.cache.alloc_slot_for(180).unwrap();
        assert_eq!(a, b, "{layout:?}");
        rig.swap().swap_in(t.copy(), b).unwrap().wait().unwrap();
        rig.check(b, 8, 180);
        assert_eq!(rig.faulty.calls(BackendOp::Map), maps, "{layout:?}: mapped");
        assert_eq!(rig.swap().stats().populate_ns, populate, "{layout:?}");
        rig.swap().release(t.copy()).unwrap();
        // Out again, then another request takes the kept pages (the budget holds one).
        let c = rig.cache.alloc_slot().unwrap();
        let t = rig.swap().swap_out(b).unwrap();
        t.wait().unwrap();
        rig.cache.ensure(c, 180).unwrap();
        write_pattern(&rig.cache, c, 9, 0, 180).unwrap();
        assert!(
            rig.cache.capacity(b).unwrap() < 180,
            "{layout:?}: not reclaimed"
        );
        rig.cache.free_slot(c).unwrap();
        // Released mode again: the swap-out unmaps.
        rig.swap().set_keep_pages(false);
        let d = rig.resume(t.copy(), 8, 180);
        rig.swap().release(t.copy()).unwrap();
        let unmaps = rig.faulty.calls(BackendOp::Unmap);
        let t = rig.swap().swap_out(d).unwrap();
        t.wait().unwrap();
        assert!(rig.faulty.calls(BackendOp::Unmap) > unmaps, "{layout:?}");
        assert_eq!(rig.cache.capacity(d).unwrap(), 0, "{layout:?}");
        rig.resume(t.copy(), 8, 180);
        rig.finish();
    }
}

//! Ordering with the caller's streams (`docs/ordering.md`) on the fake CUDA driver, whose
//! per-stream worker threads run copies and fake kernels asynchronously, in stream order, with
//! random delays, and which reports
//! - a copy that runs before a kernel submitted earlier wrote its source ("stale_reads"),
//! - an unmap over a range that queued or running work still uses ("unmap_busy"),
//! - a kernel that touches an unmapped address (a sticky `CUDA_ERROR_ILLEGAL_ADDRESS`,
//!   "kernel_faults").
//!
//! Each race test runs twice per layout: with the caller's compute stream registered (kvvm's
//! fences then cover the caller's kernels: none of the three may happen, under random delays),
//! and without (kvvm then orders after the legacy default stream, which in the fake does not
//! wait for the caller's non-blocking stream, as for PyTorch's side streams on a GPU: the fake
//! must report the race, which shows that the test catches a missing fence). Swap-out,
//! reclamation after `free_slot`, `shrink` and the cache's drop are covered; then a swap-in
//! consumed in stream order through `SwapTicket::stream_wait`, and the zero page.

use std::sync::Arc;

#[path = "support/fakecuda_build.rs"]
mod fakecuda_build;
#[macro_use]
#[path = "support/fake.rs"]
mod fake;
use fake::*;

use kvvm::vmm::cuda::CudaBackend;
use kvvm::vmm::Backend;
use kvvm::{ByteRange, CacheConfig, DType, KvCache, Layout, SlotId, SwapConfig, SwapEngine};
use kvvm_sys::{result, CUstream, CU_STREAM_NON_BLOCKING};

/// How long the caller's fake kernels run: long enough that kvvm's calls, made right after the
/// launch, happen while they run.
const KERNEL_US: u32 = 30_000;

fn cache_on(b: &Arc<CudaBackend>, layout: Layout, budget_pages: usize) -> Arc<KvCache> {
    let config = CacheConfig::new(2, 2, 64)
        .with_dtype(DType::F16)
        .with_max_slots(4)
        .with_max_tokens(512)
        .with_layout(layout)
        .with_budget_bytes((budget_pages * G) as u64)
        .with_lookahead_steps(0);
    Arc::new(KvCache::with_backend(config, b.clone() as Arc<dyn Backend>).unwrap())
}

/// The counters of the fake's race detectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Races {
    stale: i64,
    busy: i64,
    faults: i64,
}

fn races(s: &Session) -> Races {
    Races {
        stale: s.live("stale_reads"),
        busy: s.live("unmap_busy"),
        faults: s.live("kernel_faults"),
    }
}

/// Launches, on `stream`, one fake kernel per range that reads it (an attention kernel), or
/// that sets it to `write` after its delay (a kernel writing KV).
fn launch_on(s: &Session, stream: CUstream, ranges: &[ByteRange], write: Option<u8>) {
    for r in ranges {
        let k = match write {
            Some(b) => FakeKernel::writes(r.addr, r.len, b, KERNEL_US),
            None => FakeKernel::reads(r.addr, r.len, KERNEL_US),
        };
        // SAFETY: `stream` is live; the kernel names no host memory; its device range is
        // checked by the fake when it runs.
        unsafe { s.launch(stream, &k) };
    }
}

fn set(ranges: &[ByteRange], byte: u8) {
    for r in ranges {
        // SAFETY: the ranges are a slot's mapped tokens (device memory of the fake is memory
        // of this process) and no queued work uses them.
        unsafe { std::ptr::write_bytes(r.addr as usize as *mut u8, byte, r.len) };
    }
}

fn all(ranges: &[ByteRange], byte: u8) -> bool {
    ranges.iter().all(|r| {
        // SAFETY: as in `set`, for reading.
        unsafe { std::slice::from_raw_parts(r.addr as usize as *const u8, r.len) }
            .iter()
            .all(|&x| x == byte)
    })
}

/// Runs `case` for both layouts, fenced and not, under random delays; checks the fake's
/// detectors: nothing with the fence, `expect(delta)` without it.
fn both_ways(name: &str, case: impl Fn(&Session, Layout, Option<CUstream>, CUstream) -> bool) {
    let s = session!();
    // Initializes the driver and makes the device's context current on this thread.
    let anchor = CudaBackend::with_zero_page(0, false).unwrap();
    s.set_async(true);
    for (round, layout) in [Layout::Interleaved, Layout::PerLayer]
        .into_iter()
        .enumerate()
    {
        for fenced in [true, false] {
            s.set_delays(100, 3000, 17 + round as u32 * 2 + u32::from(fenced));
            let caller = result::stream::create(CU_STREAM_NON_BLOCKING).unwrap();
            let before = races(&s);
            let ok = case(&s, layout, fenced.then_some(caller), caller);
            // SAFETY: `caller` is live; synchronizing lets every kernel finish (it may report
            // the kernel's illegal access, which the detectors count).
            let synced = unsafe { result::stream::synchronize(caller) };
            let after = races(&s);
            if fenced {
                assert_eq!(
                    after, before,
                    "{name}, {layout:?}, fenced: the fake saw a race"
                );
                synced.unwrap();
                assert!(ok, "{name}, {layout:?}, fenced: wrong bytes");
            } else {
                assert!(
                    after.busy > before.busy || after.stale > before.stale,
                    "{name}, {layout:?}, without the fence: the fake saw no race ({before:?} -> {after:?})"
                );
            }
            // SAFETY: idle (synchronized) and not used again.
            unsafe { result::stream::destroy(caller) }.unwrap();
        }
    }
    drop(anchor);
    // Without the fence the fake saw races on purpose: compare the rest against now.
    let now = races(&s);
    let s = Session {
        faults: s.live("faults"),
        stale: now.stale,
        busy: now.busy,
        ..s
    };
    s.finish();
}

#[test]
fn swap_out_copies_what_the_callers_kernels_wrote_and_unmaps_after_them() {
    both_ways("swap-out", |s, layout, stream, caller| {
        let b = Arc::new(CudaBackend::with_zero_page(0, false).unwrap());
        let cache = cache_on(&b, layout, 64);
        cache.set_compute_stream(stream.map(|p| p.expose_provenance() as u64));
        let swap = SwapEngine::new(cache.clone(), SwapConfig::default()).unwrap();
        let tokens = 300;
        let slot = cache.alloc_slot_for(tokens).unwrap();
        cache.ensure(slot, tokens).unwrap();
        let ranges = cache.slot_ranges(slot, tokens).unwrap();
        set(&ranges, 0x11);
        // The step's kernels write the slot's KV; the engine preempts the request right after
        // enqueueing them, without synchronizing.
        launch_on(s, caller, &ranges, Some(0x22));
        let out = swap.swap_out(slot).unwrap();
        let copied = out.wait();
        let ok = if stream.is_some() {
            copied.unwrap();
            let back = cache.alloc_slot_for(tokens).unwrap();
            swap.swap_in(out.copy(), back).unwrap().wait().unwrap();
            let ok = all(&cache.slot_ranges(back, tokens).unwrap(), 0x22);
            cache.free_slot(back).unwrap();
            ok
        } else {
            true
        };
        // SAFETY: `caller` is live; wait for the kernels before the cache goes.
        let _ = unsafe { result::stream::synchronize(caller) };
        swap.release(out.copy()).unwrap();
        drop(swap);
        drop(cache);
        ok
    });
}

#[test]
fn reclaiming_a_freed_slot_waits_for_the_callers_kernels() {
    both_ways("reclaim after free", |s, layout, stream, caller| {
        let b = Arc::new(CudaBackend::with_zero_page(0, false).unwrap());
        // Room for one slot's pages only: the second slot's growth reclaims the first's.
        let per_slot = 8;
        let cache = cache_on(&b, layout, per_slot);
        cache.set_compute_stream(stream.map(|p| p.expose_provenance() as u64));
        let a = cache.alloc_slot().unwrap();
        let other = cache.alloc_slot().unwrap();
        let tokens = cache
            .geometry()
            .tokens_in(per_slot / cache.geometry().buffers);
        cache.ensure(a, tokens).unwrap();
        let ranges = cache.slot_ranges(a, tokens).unwrap();
        set(&ranges, 0x33);
        // The last step's attention still reads slot `a` when the request finishes.
        launch_on(s, caller, &ranges, None);
        cache.free_slot(a).unwrap();
        cache.ensure(other, tokens).unwrap();
        let ok = stream.is_none() || cache.stats().reclaimed_pages > 0;
        // SAFETY: `caller` is live.
        let _ = unsafe { result::stream::synchronize(caller) };
        cache.free_slot(other).unwrap();
        drop(cache);
        ok
    });
}

#[test]
fn shrink_unmaps_after_the_callers_kernels() {
    both_ways("shrink", |s, layout, stream, caller| {
        let b = Arc::new(CudaBackend::with_zero_page(0, false).unwrap());
        let cache = cache_on(&b, layout, 64);
        cache.set_compute_stream(stream.map(|p| p.expose_provenance() as u64));
        let slot = cache.alloc_slot().unwrap();
        cache.ensure(slot, 500).unwrap();
        let ranges = cache.slot_ranges(slot, 500).unwrap();
        launch_on(s, caller, &ranges, None);
        let t0 = std::time::Instant::now();
        cache.shrink(slot, 10).unwrap();
        // The call does not wait for the kernels.
        let quick = t0.elapsed() < std::time::Duration::from_micros(u64::from(KERNEL_US) / 2);
        // The pages go once the kernels are done: `quiesce` waits for the unmap.
        cache.quiesce();
        let keep = cache.geometry().pages_for(10);
        let ok = cache.capacity(slot).unwrap() == cache.geometry().tokens_in(keep)
            && (stream.is_none() || cache.stats().deferred_unmaps > 0);
        if stream.is_some() && !quick {
            eprintln!("note: shrink took {:?} (a loaded machine?)", t0.elapsed());
        }
        cache.free_slot(slot).unwrap();
        drop(cache);
        ok
    });
}

#[test]
fn dropping_the_cache_waits_for_the_callers_kernels() {
    both_ways("drop", |s, layout, stream, caller| {
        let b = Arc::new(CudaBackend::with_zero_page(0, false).unwrap());
        let cache = cache_on(&b, layout, 64);
        cache.set_compute_stream(stream.map(|p| p.expose_provenance() as u64));
        let slot = cache.alloc_slot().unwrap();
        cache.ensure(slot, 200).unwrap();
        let ranges = cache.slot_ranges(slot, 200).unwrap();
        launch_on(s, caller, &ranges, None);
        drop(cache);
        true
    });
}

#[test]
fn a_swap_in_is_consumed_in_stream_order() {
    // The caller's stream waits on the ticket (no host wait) and its kernel reads the slot: it
    // sees every swapped-in byte, in both layouts, under random delays.
    let s = session!();
    s.set_async(true);
    for (k, layout) in [Layout::Interleaved, Layout::PerLayer]
        .into_iter()
        .enumerate()
    {
        s.set_delays(100, 2000, 5 + k as u32);
        let b = Arc::new(CudaBackend::new(0).unwrap());
        let cache = cache_on(&b, layout, 64);
        let caller = result::stream::create(CU_STREAM_NON_BLOCKING).unwrap();
        cache.set_compute_stream(Some(caller.expose_provenance() as u64));
        let swap = SwapEngine::new(
            cache.clone(),
            SwapConfig {
                chunk_bytes: 16 << 10,
                ..SwapConfig::default()
            },
        )
        .unwrap();
        let tokens = 260;
        let slot = cache.alloc_slot_for(tokens).unwrap();
        cache.ensure(slot, tokens).unwrap();
        set(&cache.slot_ranges(slot, tokens).unwrap(), 0x44);
        let out = swap.swap_out(slot).unwrap();
        out.wait().unwrap();
        for _ in 0..3 {
            // The slot the copy lands in holds other bytes first (the pool's pages still hold
            // the swapped-out ones).
            let back: SlotId = cache.alloc_slot_for(tokens).unwrap();
            cache.ensure(back, tokens).unwrap();
            set(&cache.slot_ranges(back, tokens).unwrap(), 0);
            cache.free_slot(back).unwrap();
            let back = cache.alloc_slot_for(tokens).unwrap();
            s.hold(true);
            let t = swap.swap_in(out.copy(), back).unwrap();
            t.stream_wait(caller.expose_provenance() as u64).unwrap();
            let ranges = cache.slot_ranges(back, tokens).unwrap();
            let mut seen: Vec<Vec<u8>> = ranges.iter().map(|r| vec![0u8; r.len]).collect();
            for (r, buf) in ranges.iter().zip(seen.iter_mut()) {
                let mut k = FakeKernel::reads(r.addr, r.len, 0);
                k.read_out = buf.as_mut_ptr();
                // SAFETY: `caller` is live; `buf` outlives the synchronization below.
                unsafe { s.launch(caller, &k) };
            }
            s.hold(false);
            // SAFETY: `caller` is live.
            unsafe { result::stream::synchronize(caller) }.unwrap();
            assert!(
                seen.iter().all(|v| v.iter().all(|&x| x == 0x44)),
                "{layout:?}: the kernel ran before the swap-in's copies"
            );
            t.wait().unwrap();
            cache.free_slot(back).unwrap();
        }
        swap.release(out.copy()).unwrap();
        drop(swap);
        drop(cache);
        // SAFETY: idle and not used again.
        unsafe { result::stream::destroy(caller) }.unwrap();
    }
    s.finish();
}

#[test]
fn unmapped_ranges_read_zeros_on_the_fake_and_cost_driver_calls() {
    let s = session!();
    let zero = CudaBackend::new(0).unwrap();
    assert!(zero.zero_page());
    let r = zero.reserve(4 * G).unwrap();
    let calls = zero.driver_calls();
    // Reserved, never mapped: zeros, readable by a copy (and by this process, for the fake).
    let h = zero.alloc_host(G).unwrap();
    // SAFETY: `h` is a pinned buffer of `G` bytes; the source is reserved and reads as zeros.
    unsafe {
        std::ptr::write_bytes(h.addr() as usize as *mut u8, 0x5a, G);
        result::mem::memcpy_dtoh(
            std::ptr::with_exposed_provenance_mut(h.addr() as usize),
            r.addr + G as u64,
            G,
        )
        .unwrap();
    }
    // SAFETY: as above.
    let got = unsafe { std::slice::from_raw_parts(h.addr() as usize as *const u8, G) };
    assert!(got.iter().all(|&x| x == 0), "an unmapped range reads zeros");
    // Writes to it are refused (a kernel writing there faults).
    // SAFETY: `h` is readable; the destination is read-only: the fake refuses the copy.
    assert!(unsafe { result::mem::memcpy_htod(r.addr, h.addr() as usize as *const _, G) }.is_err());
    let pages: Vec<_> = (0..2).map(|_| zero.create_page(G).unwrap()).collect();
    zero.map(r.addr, &[&pages[0], &pages[1]]).unwrap();
    let after_map = zero.driver_calls();
    // Mapping 2 pages: 1 cuMemUnmap of the zero page, 2 cuMemMap, 1 cuMemSetAccess.
    assert_eq!(
        (
            after_map.mem_unmap - calls.mem_unmap,
            after_map.mem_map - calls.mem_map,
            after_map.mem_set_access - calls.mem_set_access
        ),
        (1, 2, 1)
    );
    // Mapping over mapped pages is refused before the zero page's unmap could remove them.
    fill(r.addr, G, 9);
    assert!(matches!(
        zero.map(r.addr, &[&pages[1]]),
        Err(kvvm::Error::InvalidArgument(_))
    ));
    assert!(holds(r.addr, G, 9), "a refused map changed a mapped page");
    let calls_after_refusal = zero.driver_calls();
    assert_eq!(
        calls_after_refusal, after_map,
        "the refusal made driver calls"
    );
    zero.unmap(r.addr, 2 * G).unwrap();
    let after_unmap = zero.driver_calls();
    // Unmapping them: 1 cuMemUnmap, then the zero page again: 2 cuMemMap, 1 cuMemSetAccess.
    assert_eq!(
        (
            after_unmap.mem_unmap - after_map.mem_unmap,
            after_unmap.mem_map - after_map.mem_map,
            after_unmap.mem_set_access - after_map.mem_set_access
        ),
        (1, 2, 1)
    );
    // A kernel reading the unmapped range reads zeros; one writing it faults.
    s.set_async(true);
    let stream = result::stream::create(CU_STREAM_NON_BLOCKING).unwrap();
    let mut buf = vec![7u8; G];
    let mut k = FakeKernel::reads(r.addr, G, 0);
    k.read_out = buf.as_mut_ptr();
    let faults = s.live("kernel_faults");
    // SAFETY: `stream` is live and `buf` outlives the synchronization.
    unsafe {
        s.launch(stream, &k);
        result::stream::synchronize(stream).unwrap();
    }
    assert!(buf.iter().all(|&x| x == 0));
    // SAFETY: as above.
    unsafe { s.launch(stream, &FakeKernel::writes(r.addr, G, 1, 0)) };
    // SAFETY: `stream` is live.
    assert!(unsafe { result::stream::synchronize(stream) }.is_err());
    assert_eq!(s.live("kernel_faults"), faults + 1);
    // SAFETY: idle, not used again.
    unsafe { result::stream::destroy(stream) }.unwrap();
    for p in pages {
        zero.release_page(p).map_err(|(_, e)| e).unwrap();
    }
    zero.free_host(h).map_err(|(_, e)| e).unwrap();
    zero.free_reservation(r).unwrap();
    drop(zero);
    let s = Session {
        faults: s.faults + 1,
        ..s
    };
    s.finish();
}

#[test]
fn kvvm_threads_use_the_relaxed_capture_mode() {
    let s = session!();
    let before = s.live("relaxed_threads");
    let b = Arc::new(CudaBackend::new(0).unwrap());
    let config = CacheConfig::new(2, 2, 64)
        .with_max_slots(2)
        .with_max_tokens(256)
        .with_budget_bytes((16 * G) as u64)
        .with_lookahead_steps(2);
    let cache = Arc::new(KvCache::with_backend(config, b.clone() as Arc<dyn Backend>).unwrap());
    let swap = SwapEngine::new(cache.clone(), SwapConfig::default()).unwrap();
    // The mapper, the unmapper and the swap completion thread.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.live("relaxed_threads") < before + 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(s.live("relaxed_threads") >= before + 3);
    drop(swap);
    drop(cache);
    drop(b);
    s.finish();
}

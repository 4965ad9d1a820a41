//! The CUDA backend without a GPU: `tests/fixtures/fakecuda.c` is built at test time into a
//! stand-in for `libcuda.so.1` (device memory is this process's memory: memfd allocations mapped
//! into `PROT_NONE` reservations) and loaded through `KVVM_LIBCUDA`. The tests drive
//! [`CudaBackend`] through the [`Backend`] trait, check the driver calls it makes with the fake's
//! call counters, inject driver failures, check that nothing leaks with the fake's live object
//! counters, and run `KvCache` and `SwapEngine` on it: a swap round trip, the background mapper,
//! concurrent swaps while the fake's device thread completes copies at unpredictable times, and
//! the cache model test (`kvvm::testing::Harness`) with injected faults.
//!
//! The fake checks, when a queued copy runs, that its device range is still mapped: every test
//! ends by asserting that no copy found it unmapped (pages given back before their transfer
//! finished) and that every asynchronous copy used page-locked host memory.
//!
//! The fake's state is process-wide, so the tests of this file take a lock and run one at a time
//! (under cargo-nextest each runs in its own process anyway). Without a C compiler every test
//! prints why it is skipped and passes.

use std::sync::Arc;

#[path = "support/fakecuda_build.rs"]
mod fakecuda_build;
#[macro_use]
#[path = "support/fake.rs"]
mod fake;
use fake::*;

use proptest::prelude::*;
use proptest::test_runner::Config;

use kvvm::testing::{Harness, HarnessConfig, Op};
use kvvm::vmm::cuda::{CudaBackend, COPY_STREAMS};
use kvvm::vmm::{
    Backend, BackendChoice, BackendConfig, BackendKind, BackendOp, CopyKind, CopyRegion,
    HostBuffer, PageHandle, VaRange,
};
use kvvm::Error;
use kvvm::{CacheConfig, DType, KvCache, Layout, SlotId};
use kvvm::{SwapConfig, SwapEngine};
use kvvm_sys::result;
use kvvm_sys::{
    CUevent, CUDA_ERROR_ILLEGAL_ADDRESS, CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_OUT_OF_MEMORY,
    CUDA_ERROR_UNKNOWN, CU_STREAM_NON_BLOCKING,
};

/// The backend without the zero page: the tests of its driver calls count them one by one
/// (`zero_page_reads_zeros_and_costs_calls` covers the zero page).
fn backend() -> CudaBackend {
    CudaBackend::with_zero_page(0, false).expect("the CUDA backend opens the fake device")
}

/// Asserts that `e` is the CUDA backend's error for `op`, carrying `code`, the entry point and
/// the driver's name for the code.
#[track_caller]
fn assert_driver_error(e: &Error, op: BackendOp, code: u32, function: &str, name: &str) {
    match e {
        Error::Backend {
            backend,
            op: got_op,
            code: got_code,
            message,
        } => {
            assert_eq!(*backend, BackendKind::Cuda, "{e}");
            assert_eq!(*got_op, op, "{e}");
            assert_eq!(*got_code, i64::from(code), "{e}");
            assert!(message.contains(function), "{message}");
            assert!(message.contains(name), "{message}");
        }
        other => panic!("expected a CUDA backend error, got {other:?}"),
    }
}

/// The permissions of the process mapping containing `addr`, from /proc/self/maps.
fn prot_at(addr: u64) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let (a, b) = it.next()?.split_once('-')?;
        let perms = it.next()?;
        let (a, b) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        (a <= addr && addr < b).then(|| perms.to_string())
    })
}

fn release_all(b: &CudaBackend, pages: Vec<PageHandle>) {
    for p in pages {
        b.release_page(p).map_err(|(_, e)| e).unwrap();
    }
}

fn free_hosts(b: &CudaBackend, bufs: Vec<HostBuffer>) {
    for h in bufs {
        b.free_host(h).map_err(|(_, e)| e).unwrap();
    }
}

#[test]
fn backend_opens_the_fake_device() {
    let s = session!();
    let (init, retain) = (s.calls("cuInit"), s.calls("cuDevicePrimaryCtxRetain"));
    let b = backend();
    assert!(s.calls("cuInit") > init);
    assert_eq!(s.calls("cuDevicePrimaryCtxRetain"), retain + 1);
    let info = b.info();
    assert_eq!(info.kind, BackendKind::Cuda);
    assert_eq!(info.device_name, "kvvm fakecuda device");
    assert_eq!(info.device_ordinal, 0);
    assert_eq!((info.granularity, b.granularity()), (G, G));
    assert_eq!(info.total_memory, TOTAL_MEM as u64);
    assert_eq!((info.max_map_count, info.map_headroom), (None, None));
    assert_eq!(s.live("contexts"), 1);
    // The copy streams and the stream fences made from a caller's event are recorded on.
    assert_eq!(s.live("streams"), COPY_STREAMS as i64 + 1);

    // A device that does not exist is a configuration error and retains nothing.
    assert!(matches!(CudaBackend::new(1), Err(Error::InvalidConfig(_))));
    assert!(matches!(CudaBackend::new(-1), Err(Error::InvalidConfig(_))));
    assert_eq!(s.live("contexts"), 1);

    // Selection: asking for CUDA gets it.
    let chosen = kvvm::vmm::open(&BackendConfig {
        choice: BackendChoice::Cuda,
        ..BackendConfig::default()
    })
    .unwrap();
    assert_eq!(chosen.kind(), BackendKind::Cuda);
    assert_eq!(s.live("contexts"), 2);
    drop(chosen);
    drop(b);
    assert_eq!(s.live("contexts"), 0);
    assert_eq!(s.live("streams"), 0);

    // A device without virtual memory management is refused; `auto` then falls back to host.
    s.set_vmm_supported(false);
    match CudaBackend::new(0) {
        Err(Error::Unsupported(m)) => assert!(m.contains("VIRTUAL_MEMORY_MANAGEMENT"), "{m}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    if std::env::var_os(kvvm::vmm::BACKEND_ENV).is_none() {
        let auto = kvvm::vmm::open(&BackendConfig {
            host_granularity: G,
            ..BackendConfig::default()
        })
        .unwrap();
        assert_eq!(auto.kind(), BackendKind::Host);
    }
    s.finish();
}

#[test]
fn map_sets_access_once_per_run_and_pages_alias() {
    let s = session!();
    let b = backend();
    let r = b.reserve(4 * G).unwrap();
    let r2 = b.reserve(G).unwrap();
    assert_eq!(r.addr % G as u64, 0);
    assert_eq!(s.live("reservations"), 2);
    let pages: Vec<PageHandle> = (0..3).map(|_| b.create_page(G).unwrap()).collect();
    assert_eq!(s.live("handles"), 3);

    let (maps, access) = (s.calls("cuMemMap"), s.calls("cuMemSetAccess"));
    b.map(r.addr, &[&pages[0], &pages[1], &pages[2]]).unwrap();
    assert_eq!(s.calls("cuMemMap") - maps, 3, "one cuMemMap per page");
    assert_eq!(
        s.calls("cuMemSetAccess") - access,
        1,
        "one cuMemSetAccess per run"
    );
    // The first page again, at a second address.
    b.map(r2.addr, &[&pages[0]]).unwrap();
    assert_eq!(s.calls("cuMemMap") - maps, 4);
    assert_eq!(s.calls("cuMemSetAccess") - access, 2);
    assert_eq!(s.live("mappings"), 4);
    assert_eq!(prot_at(r.addr).as_deref(), Some("rw-s"));
    assert_eq!(
        prot_at(r.addr + 3 * G as u64).as_deref(),
        Some("---p"),
        "the unmapped tail"
    );

    // New pages hold garbage (the fake's poison byte), not zeros.
    assert!(holds(r.addr + 2 * G as u64, 1, 0xa5));
    for (k, seed) in [1u8, 2, 3].into_iter().enumerate() {
        fill(r.addr + (k * G) as u64, G, seed);
    }
    assert!(holds(r2.addr, G, 1), "the alias shows other bytes");
    // The same through the driver's own copies.
    let mut buf = vec![0u8; G];
    // SAFETY: `r2` is mapped read/write and `buf` is writable for `G` bytes; the backend made
    // the primary context current on this thread.
    unsafe { result::mem::memcpy_dtoh(buf.as_mut_ptr().cast(), r2.addr, G) }.unwrap();
    assert!(holds(buf.as_ptr() as u64, G, 1));

    // The driver's rules, which the fake enforces: no unmapping part of one mapping ...
    for len in [G / 2, G + G / 2] {
        // SAFETY: the call is refused before anything is unmapped.
        let e = unsafe { result::mem::unmap(r.addr, len) }.unwrap_err();
        assert_eq!(e.code(), Some(CUDA_ERROR_INVALID_VALUE), "{e}");
    }
    // ... and no mapping over a mapping, which the backend reports with the driver's name.
    let e = b.map(r.addr, &[&pages[1]]).unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::Map,
        CUDA_ERROR_INVALID_VALUE,
        "cuMemMap",
        "CUDA_ERROR_INVALID_VALUE",
    );
    assert_eq!(s.live("mappings"), 4);
    assert!(holds(r.addr + G as u64, G, 2));

    // Whole pages of one run may be unmapped on their own; the range loses its access.
    b.unmap(r.addr + G as u64, G).unwrap();
    assert_eq!(prot_at(r.addr + G as u64).as_deref(), Some("---p"));
    assert_eq!(s.live("mappings"), 3);
    // Contents survive unmapping: page 1 again, at the end of the reservation.
    b.map(r.addr + 3 * G as u64, &[&pages[1]]).unwrap();
    assert!(holds(r.addr + 3 * G as u64, G, 2));

    // A reservation with something mapped in it cannot be freed, and stays usable.
    let e = b.free_reservation(r2).unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::FreeReservation,
        CUDA_ERROR_INVALID_VALUE,
        "cuMemAddressFree",
        "CUDA_ERROR_INVALID_VALUE",
    );
    assert_eq!(s.live("reservations"), 2);

    // Releasing a mapped page is deferred until its last mapping goes.
    let mut pages = pages.into_iter();
    let p0 = pages.next().unwrap();
    b.release_page(p0).map_err(|(_, e)| e).unwrap();
    assert_eq!((s.live("handles"), s.live("allocations")), (2, 3));
    assert!(
        holds(r2.addr, G, 1),
        "a released page still mapped keeps its bytes"
    );
    b.unmap(r2.addr, G).unwrap();
    assert_eq!(s.live("allocations"), 3);
    b.unmap(r.addr, G).unwrap();
    assert_eq!(s.live("allocations"), 2);

    b.unmap(r.addr + 2 * G as u64, 2 * G).unwrap();
    assert_eq!(s.live("mappings"), 0);
    release_all(&b, pages.collect());
    b.free_reservation(r).unwrap();
    b.free_reservation(r2).unwrap();
    assert!(matches!(
        b.free_reservation(r2),
        Err(Error::InvalidArgument(_))
    ));
    b.synchronize().unwrap();
    drop(b);
    s.finish();
}

/// Maps `n` fresh pages at a fresh reservation.
fn mapped(b: &CudaBackend, n: usize) -> (VaRange, Vec<PageHandle>) {
    let r = b.reserve(n * G).unwrap();
    let pages: Vec<PageHandle> = (0..n).map(|_| b.create_page(G).unwrap()).collect();
    let refs: Vec<&PageHandle> = pages.iter().collect();
    b.map(r.addr, &refs).unwrap();
    (r, pages)
}

fn unmapped(b: &CudaBackend, r: VaRange, pages: Vec<PageHandle>) {
    b.unmap(r.addr, r.len).unwrap();
    release_all(b, pages);
    b.free_reservation(r).unwrap();
}

fn chunks(dst: u64, src: u64, len: usize, chunk: usize) -> Vec<CopyRegion> {
    (0..len / chunk)
        .map(|k| CopyRegion {
            dst: dst + (k * chunk) as u64,
            src: src + (k * chunk) as u64,
            len: chunk,
        })
        .collect()
}

#[test]
fn pinned_buffers_and_async_copies() {
    let s = session!();
    let b = backend();
    let len = 2 * G;
    let (r, pages) = mapped(&b, 2);
    let a = b.alloc_host(len).unwrap();
    let c = b.alloc_host(len).unwrap();
    assert_eq!(s.live("host"), 2);
    fill(a.addr(), len, 9);

    // Host to device in chunks, as the swap engine issues them: one copy call per region on
    // one stream, then one event.
    let (h2d, rec) = (s.calls("cuMemcpyHtoDAsync_v2"), s.calls("cuEventRecord"));
    let up = chunks(r.addr, a.addr(), len, G / 2);
    // SAFETY: `r` is mapped read/write and `a` is a pinned buffer of `len` bytes; neither is
    // touched until the completion is waited on.
    let done = unsafe { b.copy_async(CopyKind::HostToDevice, &up) }.unwrap();
    assert_eq!(s.calls("cuMemcpyHtoDAsync_v2") - h2d, 4);
    assert_eq!(s.calls("cuEventRecord") - rec, 1);
    assert!(done.event().is_some());
    done.wait().unwrap();
    assert!(done.poll().unwrap());
    assert!(holds(r.addr, len, 9));

    // Device to device: page 0 onto page 1.
    let dd = [CopyRegion {
        dst: r.addr + G as u64,
        src: r.addr,
        len: G,
    }];
    // SAFETY: both pages are mapped read/write and not otherwise used until the wait.
    let done_dd = unsafe { b.copy_async(CopyKind::DeviceToDevice, &dd) }.unwrap();
    done_dd.wait().unwrap();
    assert!(holds(r.addr + G as u64, G, 9));

    // Device to host while the "device" is busy: nothing is copied, the completion and its
    // event are pending, and a stream waiting on the event waits too.
    fill(r.addr, len, 33);
    fill(c.addr(), len, 0);
    s.hold(true);
    let down = [CopyRegion {
        dst: c.addr(),
        src: r.addr,
        len,
    }];
    // SAFETY: as above, with `c` pinned and untouched until the completion reports done.
    let done2 = unsafe { b.copy_async(CopyKind::DeviceToHost, &down) }.unwrap();
    assert!(!done2.poll().unwrap());
    assert!(s.live("pending") > 0);
    let event = done2.event().expect("a CUDA completion has an event") as usize as CUevent;
    // SAFETY: the event lives as long as `done2`.
    assert!(!unsafe { result::event::query(event) }.unwrap());
    let stream = result::stream::create(CU_STREAM_NON_BLOCKING).unwrap();
    // SAFETY: `stream` was just created and `event` is live.
    unsafe { result::stream::wait_event(stream, event, 0) }.unwrap();
    // SAFETY: `stream` is live.
    assert!(!unsafe { result::stream::query(stream) }.unwrap());
    assert!(
        holds(c.addr(), len, 0),
        "copied before the device got to it"
    );
    s.hold(false);
    assert!(done2.poll().unwrap());
    // SAFETY: `stream` is live and owned here; it is not used after being destroyed.
    unsafe {
        assert!(result::stream::query(stream).unwrap());
        result::stream::destroy(stream).unwrap();
    }
    assert!(holds(c.addr(), len, 33));

    // A completion outlives the backend (it keeps the context).
    drop(done);
    drop(done_dd);
    unmapped(&b, r, pages);
    free_hosts(&b, vec![a, c]);
    drop(b);
    assert_eq!(s.live("contexts"), 1, "the completion holds the context");
    done2.wait().unwrap();
    drop(done2);

    // The fake tells pinned from pageable memory: the check in `finish` can fail.
    let b = backend();
    let (r, pages) = mapped(&b, 1);
    let before = s.live("pageable_async");
    let v = vec![7u8; G];
    // SAFETY: `v` is readable for `G` bytes and `r` is mapped read/write; the fake runs the copy
    // before returning (nothing is held), and the stream is synchronized before `v` goes.
    unsafe {
        result::mem::memcpy_htod_async(r.addr, v.as_ptr().cast(), G, std::ptr::null_mut()).unwrap();
        result::stream::synchronize(std::ptr::null_mut()).unwrap();
    }
    assert_eq!(s.live("pageable_async"), before + 1);
    drop(v);
    unmapped(&b, r, pages);
    drop(b);
    // Compare against the count after the deliberate pageable copy.
    let s = Session {
        pageable: before + 1,
        ..s
    };
    s.finish();
}

#[test]
fn injected_driver_failures_are_typed_and_leak_nothing() {
    let s = session!();
    let b = backend();

    // cuMemCreate: an injected and a real out-of-memory.
    s.fail_nth("cuMemCreate", 1, CUDA_ERROR_OUT_OF_MEMORY);
    let e = b.create_page(G).unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::CreatePage,
        CUDA_ERROR_OUT_OF_MEMORY,
        "cuMemCreate",
        "CUDA_ERROR_OUT_OF_MEMORY",
    );
    assert!(e.is_exhaustion());
    assert_eq!(s.live("handles"), 0);
    s.set_total_mem(3 * G);
    let (r, pages) = mapped(&b, 3);
    let e = b.create_page(G).unwrap_err();
    assert!(e.is_exhaustion(), "{e}");
    s.set_total_mem(TOTAL_MEM);
    assert_eq!(s.live("handles"), 3);
    b.unmap(r.addr, r.len).unwrap();
    let refs: Vec<&PageHandle> = pages.iter().collect();

    // cuMemMap failing on the second page: the first is unmapped again, nothing stays mapped.
    let unmaps = s.calls("cuMemUnmap");
    s.fail_nth("cuMemMap", 2, CUDA_ERROR_OUT_OF_MEMORY);
    let e = b.map(r.addr, &refs).unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::Map,
        CUDA_ERROR_OUT_OF_MEMORY,
        "cuMemMap",
        "CUDA_ERROR_OUT_OF_MEMORY",
    );
    assert_eq!(s.calls("cuMemUnmap") - unmaps, 1, "the rollback");
    assert_eq!(s.live("mappings"), 0);

    // cuMemSetAccess failing: the whole run is unmapped again.
    s.fail_nth("cuMemSetAccess", 1, CUDA_ERROR_UNKNOWN);
    let e = b.map(r.addr, &refs).unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::Map,
        CUDA_ERROR_UNKNOWN,
        "cuMemSetAccess",
        "CUDA_ERROR_UNKNOWN",
    );
    assert_eq!(s.live("mappings"), 0);
    assert_eq!(prot_at(r.addr).as_deref(), Some("---p"));

    // After both failures the range maps normally.
    b.map(r.addr, &refs).unwrap();
    fill(r.addr, r.len, 5);

    // cuMemUnmap failing leaves the mappings (and the bytes) in place.
    s.fail_nth("cuMemUnmap", 1, CUDA_ERROR_UNKNOWN);
    let e = b.unmap(r.addr, r.len).unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::Unmap,
        CUDA_ERROR_UNKNOWN,
        "cuMemUnmap",
        "CUDA_ERROR_UNKNOWN",
    );
    assert_eq!(s.live("mappings"), 3);
    assert!(holds(r.addr, r.len, 5));

    // Copies: a failure at submission (third region) waits for what was enqueued and creates
    // no event.
    let h = b.alloc_host(r.len).unwrap();
    let down = chunks(h.addr(), r.addr, r.len, G);
    let events = s.live("events");
    s.fail_nth("cuMemcpyDtoHAsync_v2", 3, CUDA_ERROR_INVALID_VALUE);
    // SAFETY: `r` is mapped and `h` is a pinned buffer of the same size; neither is touched
    // until the copy is complete (or has failed).
    let e = unsafe { b.copy_async(CopyKind::DeviceToHost, &down) }.unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::Copy,
        CUDA_ERROR_INVALID_VALUE,
        "cuMemcpyDtoHAsync_v2",
        "CUDA_ERROR_INVALID_VALUE",
    );
    assert_eq!(s.live("events"), events);
    for (function, n) in [("cuEventCreate", 1), ("cuEventRecord", 1)] {
        s.fail_nth(function, n, CUDA_ERROR_OUT_OF_MEMORY);
        // SAFETY: as above.
        let e = unsafe { b.copy_async(CopyKind::DeviceToHost, &down) }.unwrap_err();
        assert_driver_error(
            &e,
            BackendOp::Copy,
            CUDA_ERROR_OUT_OF_MEMORY,
            function,
            "CUDA_ERROR_OUT_OF_MEMORY",
        );
        assert_eq!(s.live("events"), events, "{function}: event leaked");
    }
    // A failure reported at completion, by wait and by poll.
    fill(h.addr(), h.len(), 0);
    // SAFETY: as above.
    let done = unsafe { b.copy_async(CopyKind::DeviceToHost, &down) }.unwrap();
    s.fail_nth("cuEventSynchronize", 1, CUDA_ERROR_ILLEGAL_ADDRESS);
    let e = done.wait().unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::Copy,
        CUDA_ERROR_ILLEGAL_ADDRESS,
        "cuEventSynchronize",
        "CUDA_ERROR_ILLEGAL_ADDRESS",
    );
    s.fail_nth("cuEventQuery", 1, CUDA_ERROR_ILLEGAL_ADDRESS);
    assert!(done.poll().is_err());
    assert!(done.poll().unwrap());
    assert!(holds(h.addr(), h.len(), 5));
    drop(done);
    assert_eq!(s.live("events"), events);

    // Host buffers.
    s.fail_nth("cuMemHostAlloc", 1, CUDA_ERROR_OUT_OF_MEMORY);
    let e = b.alloc_host(G).unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::AllocHost,
        CUDA_ERROR_OUT_OF_MEMORY,
        "cuMemHostAlloc",
        "CUDA_ERROR_OUT_OF_MEMORY",
    );
    assert_eq!(s.live("host"), 1);
    s.fail_nth("cuMemFreeHost", 1, CUDA_ERROR_UNKNOWN);
    let (h, e) = b.free_host(h).unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::FreeHost,
        CUDA_ERROR_UNKNOWN,
        "cuMemFreeHost",
        "CUDA_ERROR_UNKNOWN",
    );
    assert_eq!(s.live("host"), 1);
    b.free_host(h).map_err(|(_, e)| e).unwrap();

    // Releasing: a failure hands the page back, still valid; the retry releases it.
    b.unmap(r.addr, r.len).unwrap();
    let mut pages = pages.into_iter();
    let p = pages.next().unwrap();
    let raw = p.raw();
    s.fail_nth("cuMemRelease", 1, CUDA_ERROR_UNKNOWN);
    let (p, e) = b.release_page(p).unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::ReleasePage,
        CUDA_ERROR_UNKNOWN,
        "cuMemRelease",
        "CUDA_ERROR_UNKNOWN",
    );
    assert_eq!(p.raw(), raw);
    assert_eq!(s.live("handles"), 3);
    b.map(r.addr, &[&p]).unwrap();
    assert!(holds(r.addr, G, 5), "the page kept its bytes");
    b.unmap(r.addr, G).unwrap();
    b.release_page(p).map_err(|(_, e)| e).unwrap();
    release_all(&b, pages.collect());

    // Reservations.
    s.fail_nth("cuMemAddressReserve", 1, CUDA_ERROR_OUT_OF_MEMORY);
    let e = b.reserve(G).unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::Reserve,
        CUDA_ERROR_OUT_OF_MEMORY,
        "cuMemAddressReserve",
        "CUDA_ERROR_OUT_OF_MEMORY",
    );
    assert_eq!(s.live("reservations"), 1);
    s.fail_nth("cuMemAddressFree", 1, CUDA_ERROR_UNKNOWN);
    let e = b.free_reservation(r).unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::FreeReservation,
        CUDA_ERROR_UNKNOWN,
        "cuMemAddressFree",
        "CUDA_ERROR_UNKNOWN",
    );
    // The backend still knows the reservation: mapping into it and freeing it work.
    let p = b.create_page(G).unwrap();
    b.map(r.addr, &[&p]).unwrap();
    b.unmap(r.addr, G).unwrap();
    release_all(&b, vec![p]);
    b.free_reservation(r).unwrap();

    // Binding the context fails: the call fails cleanly.
    s.fail_nth("cuCtxGetCurrent", 1, CUDA_ERROR_UNKNOWN);
    let e = b.reserve(G).unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::Reserve,
        CUDA_ERROR_UNKNOWN,
        "cuCtxGetCurrent",
        "CUDA_ERROR_UNKNOWN",
    );
    assert_eq!(s.live("reservations"), 0);

    // The constructor failing after some streams exist destroys them and releases the context.
    let (streams, contexts) = (s.live("streams"), s.live("contexts"));
    s.fail_nth("cuStreamCreate", 3, CUDA_ERROR_OUT_OF_MEMORY);
    match CudaBackend::new(0) {
        Err(Error::Driver(e)) => assert_eq!(e.code(), Some(CUDA_ERROR_OUT_OF_MEMORY), "{e}"),
        other => panic!("expected the driver error of cuStreamCreate, got {other:?}"),
    }
    assert_eq!((s.live("streams"), s.live("contexts")), (streams, contexts));
    drop(b);
    s.finish();
}

#[test]
fn a_queued_copy_whose_source_went_away_faults() {
    // The fake's check behind `Session::finish`: work still queued when its device range is
    // unmapped is not performed and fails like an illegal access on a GPU.
    let s = session!();
    let b = backend();
    let (r, pages) = mapped(&b, 1);
    let h = b.alloc_host(G).unwrap();
    fill(r.addr, G, 3);
    fill(h.addr(), G, 0);
    let faults = s.live("faults");
    s.hold(true);
    let down = [CopyRegion {
        dst: h.addr(),
        src: r.addr,
        len: G,
    }];
    // SAFETY: `r` is mapped and `h` pinned. The source is unmapped below while the copy is
    // queued, which breaks `copy_async`'s contract on purpose: the fake checks the range again
    // before copying, finds it unmapped and copies nothing, so no memory is touched.
    let done = unsafe { b.copy_async(CopyKind::DeviceToHost, &down) }.unwrap();
    b.unmap(r.addr, G).unwrap();
    s.hold(false);
    let e = done.wait().unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::Copy,
        CUDA_ERROR_ILLEGAL_ADDRESS,
        "cuEventSynchronize",
        "CUDA_ERROR_ILLEGAL_ADDRESS",
    );
    assert_eq!(s.live("faults"), faults + 1);
    assert!(holds(h.addr(), G, 0), "nothing was copied");
    drop(done);
    release_all(&b, pages);
    b.free_reservation(r).unwrap();
    free_hosts(&b, vec![h]);
    drop(b);
    // The unmap under the queued copy was reported too.
    assert_eq!(s.live("unmap_busy"), s.busy + 1);
    let s = Session {
        faults: faults + 1,
        busy: s.busy + 1,
        ..s
    };
    s.finish();
}

#[test]
fn the_fake_kernel_runs_in_stream_order_and_catches_races() {
    // The fixture's own test: a kernel moves its bytes when it runs on its stream, not when it
    // is launched; a copy on another stream that does not wait for it is reported as a stale
    // read, one that waits is not; unmapping under a running kernel is reported and makes the
    // kernel fault, stickily, on its stream only.
    let s = session!();
    let b = backend();
    let (r, pages) = mapped(&b, 1);
    let h = b.alloc_host(G).unwrap();
    let caller = result::stream::create(CU_STREAM_NON_BLOCKING).unwrap();
    let copier = result::stream::create(CU_STREAM_NON_BLOCKING).unwrap();
    let event = result::event::create(kvvm_sys::CU_EVENT_DISABLE_TIMING).unwrap();
    s.set_async(true);
    s.set_delays(50, 0, 7);
    let (stale, busy, faults, kernels) = (
        s.live("stale_reads"),
        s.live("unmap_busy"),
        s.live("kernel_faults"),
        s.live("kernels"),
    );
    let down = |stream| {
        // SAFETY: `r` is mapped and `h` pinned; both outlive the synchronization below.
        unsafe {
            result::mem::memcpy_dtoh_async(
                std::ptr::with_exposed_provenance_mut(h.addr() as usize),
                r.addr,
                G,
                stream,
            )
            .unwrap()
        }
    };

    // 1. No fence: the copy runs while the kernel (20 ms) has not written yet.
    fill(r.addr, G, 1);
    // SAFETY: `caller` is live; the kernel names no host memory.
    unsafe { s.launch(caller, &FakeKernel::writes(r.addr, G, 0x5a, 20_000)) };
    down(copier);
    // SAFETY: both streams are live.
    unsafe {
        result::stream::synchronize(copier).unwrap();
        result::stream::synchronize(caller).unwrap();
    }
    assert_eq!(
        s.live("stale_reads"),
        stale + 1,
        "the stale copy was not reported"
    );
    assert!(
        holds(h.addr(), G, 1),
        "the copy saw bytes the kernel had not written yet"
    );
    // SAFETY: `r` is mapped; no work is queued.
    let dev = unsafe { std::slice::from_raw_parts(r.addr as usize as *const u8, G) };
    assert!(dev.iter().all(|&x| x == 0x5a), "the kernel did not write");

    // 2. Fenced: the copy stream waits on an event recorded after the kernel.
    // SAFETY: streams and event are live; the launch goes through cuLaunchKernel with the
    // fake's handle and one parameter pointing to the kernel description.
    unsafe {
        let mut k = FakeKernel::writes(r.addr, G, 0x6b, 20_000);
        let mut params = [(&raw mut k).cast::<std::ffi::c_void>()];
        result::module::launch_kernel(
            (s.kernel_function)(),
            result::module::LaunchConfig {
                grid: (1, 1, 1),
                block: (1, 1, 1),
                shared_mem_bytes: 0,
            },
            caller,
            &mut params,
        )
        .unwrap();
        result::event::record(event, caller).unwrap();
        result::stream::wait_event(copier, event, 0).unwrap();
    }
    down(copier);
    // SAFETY: `copier` is live.
    unsafe { result::stream::synchronize(copier) }.unwrap();
    assert_eq!(s.live("stale_reads"), stale + 1);
    // SAFETY: `h` is pinned memory of `G` bytes no copy uses any more.
    let got = unsafe { std::slice::from_raw_parts(h.addr() as usize as *const u8, G) };
    assert!(
        got.iter().all(|&x| x == 0x6b),
        "the fenced copy missed the kernel's bytes"
    );

    // 3. Unmapped under a running kernel: reported at the unmap, and the kernel faults.
    // SAFETY: `caller` is live.
    unsafe { s.launch(caller, &FakeKernel::reads(r.addr, G, 20_000)) };
    std::thread::sleep(std::time::Duration::from_millis(2));
    b.unmap(r.addr, G).unwrap();
    assert_eq!(
        s.live("unmap_busy"),
        busy + 1,
        "the busy unmap was not reported"
    );
    // SAFETY: `caller` is live.
    let e = unsafe { result::stream::synchronize(caller) }.unwrap_err();
    assert!(e.to_string().contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{e}");
    assert_eq!(s.live("kernel_faults"), faults + 1);
    assert_eq!(s.live("kernels"), kernels + 3);
    // Sticky: the stream stays failed; other streams are unaffected.
    // SAFETY: streams and event are live and idle; each is destroyed once.
    unsafe {
        assert!(result::stream::query(caller).is_err());
        assert!(result::stream::query(copier).unwrap());
        result::event::destroy(event).unwrap();
        result::stream::destroy(caller).unwrap();
        result::stream::destroy(copier).unwrap();
    }
    release_all(&b, pages);
    b.free_reservation(r).unwrap();
    free_hosts(&b, vec![h]);
    drop(b);
    let s = Session {
        faults: s.faults + 1,
        stale: stale + 1,
        busy: busy + 1,
        ..s
    };
    s.finish();
}

/// Stamps tokens `from..to` of `slot` with the pattern of `generation`.
fn stamp(cache: &KvCache, slot: SlotId, generation: u32, from: usize, to: usize) {
    // SAFETY: the fake's device memory is memory of this process, mapped read/write for the
    // slot's tokens; this test thread is the only one touching the slot's rows, which hold at
    // least `to` tokens during the call.
    unsafe { kvvm::testing::stamp_tokens(cache, slot, generation, from, to) }.unwrap();
}

/// Checks tokens `0..tokens` of `slot` against the pattern of `generation`.
fn verify(cache: &KvCache, slot: SlotId, generation: u32, tokens: usize) {
    assert_eq!(cache.tokens(slot).unwrap(), tokens);
    // SAFETY: as in `stamp`.
    unsafe { kvvm::testing::verify_tokens(cache, slot, generation, tokens) }.unwrap();
}

/// A cache of 2 layers, 2 KV heads, head_dim 64, f16 (1 KiB a token) with 512 tokens a slot,
/// on pages of the fake's granularity.
fn cache_config(
    layout: Layout,
    max_slots: usize,
    budget_pages: usize,
    lookahead_steps: usize,
) -> CacheConfig {
    CacheConfig::new(2, 2, 64)
        .with_dtype(DType::F16)
        .with_max_slots(max_slots)
        .with_max_tokens(512)
        .with_layout(layout)
        .with_page_size(None)
        .with_budget_bytes((budget_pages * G) as u64)
        .with_backend(BackendConfig::default())
        .with_lookahead_steps(lookahead_steps)
        .with_create_all_pages(false)
}

fn swap_round_trip(s: &Session, layout: Layout) {
    let b = Arc::new(backend());
    let cache = Arc::new(
        KvCache::with_backend(
            cache_config(layout, 3, 32, 0),
            b.clone() as Arc<dyn Backend>,
        )
        .unwrap(),
    );
    let swap = SwapEngine::new(
        cache.clone(),
        SwapConfig {
            host_budget_bytes: 4 << 20,
            chunk_bytes: 1 << 20,
            max_in_flight: 4,
            keep_pages: false,
        },
    )
    .unwrap();
    let g = *cache.geometry();
    assert_eq!(g.page_size, G);
    let bpt = g.bytes_per_token() as u64;
    let per_page = g.page_size / g.token_bytes;

    // A request of 300 tokens: one cuMemMap per page, one cuMemSetAccess per buffer.
    let (maps, access) = (s.calls("cuMemMap"), s.calls("cuMemSetAccess"));
    let a = cache.alloc_slot_for(300).unwrap();
    cache.ensure(a, 300).unwrap();
    assert_eq!(
        s.calls("cuMemMap") - maps,
        (300usize.div_ceil(per_page) * g.buffers) as i64
    );
    assert_eq!(s.calls("cuMemSetAccess") - access, g.buffers as i64);
    stamp(&cache, a, 1, 0, 300);
    let other = cache.alloc_slot_for(100).unwrap();
    cache.ensure(other, 100).unwrap();
    stamp(&cache, other, 2, 0, 100);

    // Swap out while the "device" is busy: the pages stay mapped until the copy is done.
    let (d2h, unmaps, mappings) = (
        s.calls("cuMemcpyDtoHAsync_v2"),
        s.calls("cuMemUnmap"),
        s.live("mappings"),
    );
    s.hold(true);
    let t = swap.swap_out(a).unwrap();
    assert_eq!(t.bytes(), 300 * bpt);
    assert_eq!(
        s.calls("cuMemcpyDtoHAsync_v2") - d2h,
        g.buffers as i64,
        "one transfer per buffer"
    );
    assert!(!t.poll().unwrap());
    assert!(t.event().is_some());
    assert!(s.live("pending") > 0);
    assert!(cache.is_allocated(a), "slot freed before its copy ran");
    assert_eq!(
        s.calls("cuMemUnmap"),
        unmaps,
        "unmapped before the copy ran"
    );
    assert_eq!(s.live("mappings"), mappings);
    // Other slots go on meanwhile.
    cache.ensure(other, 120).unwrap();
    stamp(&cache, other, 2, 100, 120);
    s.hold(false);
    t.wait().unwrap();
    assert!(t.poll().unwrap());
    assert!(!cache.is_allocated(a));
    assert_eq!(cache.capacity(a).unwrap(), 0, "pages not unmapped");
    assert!(s.calls("cuMemUnmap") > unmaps);
    let copy = t.copy();
    assert_eq!(swap.host_tokens(copy).unwrap(), 300);

    // Swap in elsewhere and check every byte.
    let a2 = cache.alloc_slot_for(300).unwrap();
    swap.swap_in(copy, a2).unwrap().wait().unwrap();
    verify(&cache, a2, 1, 300);
    verify(&cache, other, 2, 120);

    // Decode on, then preempt again: only the new tokens travel (KV reuse).
    cache.ensure(a2, 340).unwrap();
    stamp(&cache, a2, 1, 300, 340);
    let t = swap.swap_out(a2).unwrap();
    assert_eq!(t.copy(), copy);
    assert_eq!(t.bytes(), 40 * bpt);
    t.wait().unwrap();

    // A copy failing at submission, and one failing at completion, leave the slot as it was.
    let a3 = cache.alloc_slot_for(340).unwrap();
    swap.swap_in(copy, a3).unwrap().wait().unwrap();
    verify(&cache, a3, 1, 340);
    s.fail_nth("cuMemcpyDtoHAsync_v2", 1, CUDA_ERROR_INVALID_VALUE);
    cache.ensure(a3, 350).unwrap();
    stamp(&cache, a3, 1, 340, 350);
    let e = swap.swap_out(a3).unwrap_err();
    assert_driver_error(
        &e,
        BackendOp::Copy,
        CUDA_ERROR_INVALID_VALUE,
        "cuMemcpyDtoHAsync_v2",
        "CUDA_ERROR_INVALID_VALUE",
    );
    verify(&cache, a3, 1, 350);
    // Both the caller and the completion thread may wait: every wait fails until cleared.
    s.fail_from("cuEventSynchronize", 1, CUDA_ERROR_ILLEGAL_ADDRESS);
    let t = swap.swap_out(a3).unwrap();
    let e = t.wait().unwrap_err();
    s.clear_faults();
    assert_driver_error(
        &e,
        BackendOp::Copy,
        CUDA_ERROR_ILLEGAL_ADDRESS,
        "cuEventSynchronize",
        "CUDA_ERROR_ILLEGAL_ADDRESS",
    );
    assert!(cache.is_allocated(a3));
    verify(&cache, a3, 1, 350);
    // And it swaps out fine afterwards.
    let t = swap.swap_out(a3).unwrap();
    t.wait().unwrap();
    let a4 = cache.alloc_slot_for(350).unwrap();
    swap.swap_in(t.copy(), a4).unwrap().wait().unwrap();
    verify(&cache, a4, 1, 350);
    swap.release(t.copy()).unwrap();

    verify(&cache, other, 2, 120);
    cache.free_slot(a4).unwrap();
    cache.free_slot(other).unwrap();
    assert_eq!(swap.stats().in_flight, 0);
    drop(swap);
    drop(cache);
    drop(b);
}

#[test]
fn kv_cache_and_swap_round_trip_on_the_fake() {
    let s = session!();
    for layout in [Layout::Interleaved, Layout::PerLayer] {
        swap_round_trip(&s, layout);
        for (kind, n) in s.live_counts() {
            assert_eq!(n, 0, "{layout:?}: {n} {kind} left in the fake driver");
        }
    }
    s.finish();
}

#[test]
fn background_mapper_grows_slots_on_the_fake() {
    // The mapper maps from its own thread, where the fake, like the driver, needs the context
    // made current.
    let s = session!();
    for layout in [Layout::Interleaved, Layout::PerLayer] {
        let b = Arc::new(backend());
        let cache = KvCache::with_backend(
            cache_config(layout, 3, 32, 4),
            b.clone() as Arc<dyn Backend>,
        )
        .unwrap();
        let slots: Vec<SlotId> = (0..3).map(|_| cache.alloc_slot().unwrap()).collect();
        for step in 1..=300 {
            // Slots grow at different rates, so their pages run out at different steps.
            let batch: Vec<(SlotId, usize)> = slots
                .iter()
                .enumerate()
                .map(|(i, &slot)| (slot, step * (i + 1) / 3 + 1))
                .collect();
            let before: Vec<usize> = slots.iter().map(|&x| cache.tokens(x).unwrap()).collect();
            cache.step(&batch).unwrap();
            for (&(slot, tokens), from) in batch.iter().zip(before) {
                stamp(&cache, slot, slot.index() + 1, from, tokens);
            }
        }
        for (i, &slot) in slots.iter().enumerate() {
            verify(&cache, slot, slot.index() + 1, 300 * (i + 1) / 3 + 1);
        }
        cache.quiesce();
        drop(cache);
        drop(b);
        for (kind, n) in s.live_counts() {
            assert_eq!(n, 0, "{layout:?}: {n} {kind} left in the fake driver");
        }
    }
    s.finish();
}

#[test]
fn concurrent_swaps_with_an_asynchronous_device() {
    // Copies complete on the fake's device thread at unpredictable times while three requests
    // are swapped out and in again and again from their own threads, with the background mapper
    // on. No copy may find its device range unmapped (checked by `finish`) and no byte may
    // change.
    let s = session!();
    s.set_async(true);
    for layout in [Layout::Interleaved, Layout::PerLayer] {
        let b = Arc::new(backend());
        let cache = Arc::new(
            KvCache::with_backend(
                cache_config(layout, 4, 48, 2),
                b.clone() as Arc<dyn Backend>,
            )
            .unwrap(),
        );
        let swap = SwapEngine::new(
            cache.clone(),
            SwapConfig {
                host_budget_bytes: 8 << 20,
                // Small chunks: many copies per transfer, interleaved across streams.
                chunk_bytes: 16 << 10,
                max_in_flight: 4,
                keep_pages: false,
            },
        )
        .unwrap();
        let copies: Vec<_> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..3usize)
                .map(|w| {
                    let (cache, swap) = (&cache, &swap);
                    scope.spawn(move || {
                        let generation = w as u32 + 1;
                        let mut tokens = 20 + 30 * w;
                        let mut slot = cache.alloc_slot_for(tokens).unwrap();
                        cache.ensure(slot, tokens).unwrap();
                        stamp(cache, slot, generation, 0, tokens);
                        let mut copy = None;
                        for round in 0..8 {
                            let to = tokens + 7 + 3 * round;
                            cache.ensure(slot, to).unwrap();
                            stamp(cache, slot, generation, tokens, to);
                            tokens = to;
                            let out = swap.swap_out(slot).unwrap();
                            if round % 2 == 0 {
                                while !out.poll().unwrap() {
                                    std::thread::yield_now();
                                }
                            } else {
                                out.wait().unwrap();
                            }
                            assert!(copy.is_none_or(|c| c == out.copy()), "copy not reused");
                            copy = Some(out.copy());
                            slot = cache.alloc_slot_for(tokens).unwrap();
                            swap.swap_in(out.copy(), slot).unwrap().wait().unwrap();
                            verify(cache, slot, generation, tokens);
                        }
                        cache.free_slot(slot).unwrap();
                        copy.unwrap()
                    })
                })
                .collect();
            workers.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let stats = swap.stats();
        assert_eq!(stats.in_flight, 0);
        assert!(stats.reuse_saved_bytes > 0, "KV reuse never applied");
        for c in copies {
            swap.release(c).unwrap();
        }
        drop(swap);
        drop(cache);
        drop(b);
        for (kind, n) in s.live_counts() {
            assert_eq!(n, 0, "{layout:?}: {n} {kind} left in the fake driver");
        }
    }
    s.finish();
}

/// Cache operations, as the host model test draws them, with injected backend faults.
fn op_strategy() -> BoxedStrategy<Op> {
    let tokens = 0u16..=220;
    prop_oneof![
        3 => any::<u16>().prop_map(|hint| Op::Alloc { hint: hint % 220 }),
        2 => any::<u8>().prop_map(|k| Op::Free { k }),
        4 => (any::<u8>(), tokens.clone()).prop_map(|(k, tokens)| Op::Ensure { k, tokens }),
        4 => (1u8..=20).prop_map(|by| Op::Decode { by }),
        2 => proptest::collection::vec((any::<u8>(), tokens.clone()), 1..4)
            .prop_map(|items| Op::Step { items }),
        2 => (any::<u8>(), tokens).prop_map(|(k, tokens)| Op::Shrink { k, tokens }),
        1 => Just(Op::Reclaim),
        2 => (0u8..4, 0u8..4).prop_map(|(kind, nth)| Op::Fault { kind, nth }),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(Config { cases: 256, failure_persistence: None, ..Config::default() })]

    /// The cache model test of `tests/cache_model.rs` on the CUDA backend over the fake, with
    /// OS-page granularity: every cache path (growth, shrink, free, reclaim, rollback after an
    /// injected failure) under the driver's rules (whole mappings only, access set per run,
    /// context bound on every thread), every live byte checked after every operation, and no
    /// driver object left at the end.
    #[test]
    fn cache_model_on_the_fake(
        per_layer in any::<bool>(),
        lookahead in prop_oneof![Just(0usize), Just(2)],
        faults in any::<bool>(),
        ops in proptest::collection::vec(op_strategy(), 1..60),
    ) {
        let Some(s) = Session::start() else {
            eprintln!("skipped: no C compiler to build tests/fixtures/fakecuda.c");
            return Ok(());
        };
        let page = kvvm::vmm::host::os_page_size();
        prop_assert!(s.set_granularity(page));
        let b = Arc::new(backend());
        let config = HarnessConfig {
            layout: if per_layer { Layout::PerLayer } else { Layout::Interleaved },
            lookahead,
            faults,
            ..HarnessConfig::default()
        };
        let mut h = Harness::with_backend(config, b.clone() as Arc<dyn Backend>).unwrap();
        for op in &ops {
            if let Err(e) = h.apply(op) {
                return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
            }
        }
        h.finish().map_err(TestCaseError::fail)?;
        drop(b);
        s.finish();
    }
}

#[test]
fn a_stream_waiting_on_a_swap_in_event_sees_every_token() {
    // A serving engine's compute stream may wait on a swap-in ticket's event instead of the
    // host waiting: everything it runs afterwards must see the whole transfer. On the fake's
    // device thread, streams progress in random order, so without the wait (or with an event
    // recorded before the last chunk) the read below would see the pages' poison bytes.
    let s = session!();
    for layout in [Layout::Interleaved, Layout::PerLayer] {
        let b = Arc::new(backend());
        let cache = Arc::new(
            KvCache::with_backend(
                cache_config(layout, 2, 16, 0),
                b.clone() as Arc<dyn Backend>,
            )
            .unwrap(),
        );
        let swap = SwapEngine::new(
            cache.clone(),
            SwapConfig {
                host_budget_bytes: 4 << 20,
                chunk_bytes: 16 << 10,
                max_in_flight: 2,
                keep_pages: false,
            },
        )
        .unwrap();
        let tokens = 200;
        let slot = cache.alloc_slot_for(tokens).unwrap();
        cache.ensure(slot, tokens).unwrap();
        stamp(&cache, slot, 7, 0, tokens);
        let out = swap.swap_out(slot).unwrap();
        out.wait().unwrap();
        let copy = out.copy();

        let stream = result::stream::create(CU_STREAM_NON_BLOCKING).unwrap();
        s.set_async(true);
        for _ in 0..4 {
            s.hold(true);
            let slot = cache.alloc_slot_for(tokens).unwrap();
            let t = swap.swap_in(copy, slot).unwrap();
            let event = t.event().expect("a swap-in with tokens has an event") as usize as CUevent;
            let ranges = cache.slot_ranges(slot, tokens).unwrap();
            let len: usize = ranges.iter().map(|r| r.len).sum();
            let h = b.alloc_host(len).unwrap();
            // SAFETY: `stream` and `event` are live (the ticket keeps its event); the slot's
            // ranges are mapped by `swap_in` and stay mapped until the slot is freed after the
            // stream is synchronized; `h` is a pinned buffer of `len` bytes read only after that.
            unsafe {
                result::stream::wait_event(stream, event, 0).unwrap();
                let mut at = h.addr();
                for r in &ranges {
                    let dst = std::ptr::with_exposed_provenance_mut(at as usize);
                    result::mem::memcpy_dtoh_async(dst, r.addr, r.len, stream).unwrap();
                    at += r.len as u64;
                }
            }
            s.hold(false);
            // SAFETY: `stream` is live.
            unsafe { result::stream::synchronize(stream) }.unwrap();
            t.wait().unwrap();
            verify(&cache, slot, 7, tokens);
            let mut at = h.addr();
            for r in &ranges {
                // SAFETY: both are readable for `r.len` bytes: the slot's mapped range and the
                // part of `h` the stream wrote, which no copy uses any more.
                let (dev, host) = unsafe {
                    (
                        std::slice::from_raw_parts(r.addr as usize as *const u8, r.len),
                        std::slice::from_raw_parts(at as usize as *const u8, r.len),
                    )
                };
                assert!(dev == host, "the stream read before the swap-in completed");
                at += r.len as u64;
            }
            b.free_host(h).map_err(|(_, e)| e).unwrap();
            cache.free_slot(slot).unwrap();
        }
        s.set_async(false);
        // SAFETY: `stream` is idle and not used afterwards.
        unsafe { result::stream::destroy(stream) }.unwrap();
        swap.release(copy).unwrap();
        drop(swap);
        drop(cache);
        drop(b);
    }
    s.finish();
}

/// `KvCache::address_space` on CUDA (issue 16, item 8): after the cache and its backend are
/// dropped, the pages mapped at the drop keep their bytes (page handles released but mapped,
/// streams and the zero page gone with the backend), and dropping the address space synchronizes,
/// unmaps and frees the ranges so that nothing is left in the driver.
#[test]
fn an_address_space_keeps_the_mapped_pages_on_the_fake() {
    let s = session!();
    for (layout, zero_page) in [(Layout::Interleaved, true), (Layout::PerLayer, false)] {
        let b = Arc::new(CudaBackend::with_zero_page(0, zero_page).unwrap());
        let cache = KvCache::with_backend(
            cache_config(layout, 2, 32, 0),
            b.clone() as Arc<dyn Backend>,
        )
        .unwrap();
        let slot = cache.alloc_slot().unwrap();
        cache.ensure(slot, 300).unwrap();
        let view = cache.layer_view(1, kvvm::Kv::V).unwrap();
        let row = cache.geometry().row_bytes();
        let addrs: Vec<u64> = (0..300)
            .step_by(37)
            .map(|t| view.row_addr(slot.as_usize(), t, 0))
            .collect();
        for (i, &a) in addrs.iter().enumerate() {
            fill(a, row, i as u8 + 1);
        }
        let space = cache.address_space();
        drop(cache);
        drop(b);
        assert!(
            s.live("mappings") > 0 && s.live("allocations") > 0,
            "{layout:?}: the mapped pages went with the cache"
        );
        assert_eq!(
            s.live("handles"),
            0,
            "{layout:?}: page handles not released"
        );
        assert_eq!(
            s.live("streams"),
            0,
            "{layout:?}: the backend's streams stayed"
        );
        for (i, &a) in addrs.iter().enumerate() {
            assert!(holds(a, row, i as u8 + 1), "{layout:?}: row {i} changed");
        }
        drop(space);
        for (kind, n) in s.live_counts() {
            assert_eq!(n, 0, "{layout:?}: {n} {kind} left in the fake driver");
        }
    }
    s.finish();
}

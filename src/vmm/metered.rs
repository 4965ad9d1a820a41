//! [`MeteredBackend`]: a backend wrapper that counts and times every call, by kind and by thread
//! (kvvm's background threads or the caller's).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::{
    Access, Backend, BackendInfo, BackendKind, BackendOp, Completion, CopyKind, CopyRegion,
    DetachRefused, Detached, Fence, HostBuffer, PageHandle, VaRange,
};
use crate::error::{Error, Result};

thread_local! {
    static BACKGROUND: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as a kvvm background thread: its backend calls are counted as
/// background calls.
pub(crate) fn mark_background_thread() {
    BACKGROUND.with(|b| b.set(true));
}

fn on_background_thread() -> bool {
    BACKGROUND.with(|b| b.get())
}

#[derive(Debug, Default)]
struct OpCounter {
    // A call counts in exactly one of the two: a snapshot never shows a background call as a
    // foreground one, nor more background calls than calls.
    foreground: AtomicU64,
    background: AtomicU64,
    nanos: AtomicU64,
    failures: AtomicU64,
}

/// Counts and times every call to the wrapped backend.
#[derive(Debug)]
pub struct MeteredBackend {
    inner: Arc<dyn Backend>,
    ops: [OpCounter; BackendOp::COUNT],
}

/// Calls of one kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct OpStats {
    /// All calls.
    pub calls: u64,
    /// Calls made on kvvm's background threads (mapper, pool).
    pub background_calls: u64,
    /// Calls that returned an error.
    pub failures: u64,
    /// Time spent in the calls, in nanoseconds.
    pub total_ns: u64,
}

impl MeteredBackend {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        MeteredBackend {
            inner,
            ops: Default::default(),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &Arc<dyn Backend> {
        &self.inner
    }

    /// Counters of one kind of call.
    pub fn op(&self, op: BackendOp) -> OpStats {
        let c = &self.ops[op as usize];
        let background_calls = c.background.load(Ordering::Relaxed);
        let foreground_calls = c.foreground.load(Ordering::Relaxed);
        OpStats {
            calls: foreground_calls + background_calls,
            background_calls,
            failures: c.failures.load(Ordering::Relaxed),
            total_ns: c.nanos.load(Ordering::Relaxed),
        }
    }

    /// Calls of every kind made on a caller's (not a background) thread.
    pub fn foreground_calls(&self) -> u64 {
        BackendOp::ALL
            .iter()
            .map(|&o| self.ops[o as usize].foreground.load(Ordering::Relaxed))
            .sum()
    }

    /// All calls of every kind.
    pub fn total_calls(&self) -> u64 {
        BackendOp::ALL.iter().map(|&o| self.op(o).calls).sum()
    }

    fn timed<T>(&self, op: BackendOp, ok: impl FnOnce(&T) -> bool, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let r = f();
        let c = &self.ops[op as usize];
        if on_background_thread() {
            c.background.fetch_add(1, Ordering::Relaxed);
        } else {
            c.foreground.fetch_add(1, Ordering::Relaxed);
        }
        if !ok(&r) {
            c.failures.fetch_add(1, Ordering::Relaxed);
        }
        c.nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

impl Backend for MeteredBackend {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }
    fn granularity(&self) -> usize {
        self.inner.granularity()
    }
    fn reserve(&self, len: usize) -> Result<VaRange> {
        self.timed(BackendOp::Reserve, Result::is_ok, || {
            self.inner.reserve(len)
        })
    }
    fn free_reservation(&self, range: VaRange) -> Result<()> {
        self.timed(BackendOp::FreeReservation, Result::is_ok, || {
            self.inner.free_reservation(range)
        })
    }
    fn detach(
        &self,
        ranges: Vec<VaRange>,
        pages: Vec<PageHandle>,
    ) -> std::result::Result<Box<dyn Detached>, DetachRefused> {
        self.inner.detach(ranges, pages)
    }
    fn create_page(&self, size: usize) -> Result<PageHandle> {
        self.timed(BackendOp::CreatePage, Result::is_ok, || {
            self.inner.create_page(size)
        })
    }
    fn release_page(&self, page: PageHandle) -> std::result::Result<(), (PageHandle, Error)> {
        self.timed(BackendOp::ReleasePage, std::result::Result::is_ok, || {
            self.inner.release_page(page)
        })
    }
    fn map(&self, va: u64, pages: &[&PageHandle]) -> Result<()> {
        self.timed(BackendOp::Map, Result::is_ok, || self.inner.map(va, pages))
    }
    fn map_with_access(&self, va: u64, pages: &[&PageHandle], access: Access) -> Result<()> {
        self.timed(BackendOp::Map, Result::is_ok, || {
            self.inner.map_with_access(va, pages, access)
        })
    }
    fn unmap(&self, va: u64, len: usize) -> Result<()> {
        self.timed(BackendOp::Unmap, Result::is_ok, || {
            self.inner.unmap(va, len)
        })
    }
    fn protect(&self, va: u64, len: usize, access: Access) -> Result<()> {
        self.timed(BackendOp::Protect, Result::is_ok, || {
            self.inner.protect(va, len, access)
        })
    }
    fn alloc_host(&self, len: usize) -> Result<HostBuffer> {
        self.timed(BackendOp::AllocHost, Result::is_ok, || {
            self.inner.alloc_host(len)
        })
    }
    fn free_host(&self, buf: HostBuffer) -> std::result::Result<(), (HostBuffer, Error)> {
        self.timed(BackendOp::FreeHost, std::result::Result::is_ok, || {
            self.inner.free_host(buf)
        })
    }
    unsafe fn copy_async(
        &self,
        kind: CopyKind,
        regions: &[CopyRegion],
    ) -> Result<Box<dyn Completion>> {
        self.timed(BackendOp::Copy, Result::is_ok, || {
            // SAFETY: forwarded unchanged; the caller upholds `copy_async`'s contract.
            unsafe { self.inner.copy_async(kind, regions) }
        })
    }
    fn synchronize(&self) -> Result<()> {
        self.timed(BackendOp::Synchronize, Result::is_ok, || {
            self.inner.synchronize()
        })
    }
    fn map_headroom(&self) -> Option<usize> {
        self.inner.map_headroom()
    }
    fn record_fence(&self, stream: u64) -> Result<Option<Arc<dyn Fence>>> {
        self.inner.record_fence(stream)
    }
    fn fence_after_event(&self, event: u64) -> Result<Option<Arc<dyn Fence>>> {
        self.inner.fence_after_event(event)
    }
    fn stream_wait_event(&self, stream: u64, event: u64) -> Result<()> {
        self.inner.stream_wait_event(stream, event)
    }
    fn prepare_thread(&self) {
        self.inner.prepare_thread()
    }
    unsafe fn copy_async_after(
        &self,
        kind: CopyKind,
        regions: &[CopyRegion],
        after: Option<&dyn Fence>,
    ) -> Result<Box<dyn Completion>> {
        self.timed(BackendOp::Copy, Result::is_ok, || {
            // SAFETY: forwarded unchanged; the caller upholds `copy_async`'s contract.
            unsafe { self.inner.copy_async_after(kind, regions, after) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::host::{HostBackend, HostConfig};
    use std::sync::atomic::AtomicBool;

    #[test]
    fn counters_read_while_background_threads_call_stay_consistent() {
        let metered = Arc::new(MeteredBackend::new(Arc::new(
            HostBackend::new(HostConfig::default()).unwrap(),
        )));
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let (metered, stop) = (metered.clone(), stop.clone());
            std::thread::spawn(move || {
                mark_background_thread();
                while !stop.load(Ordering::Relaxed) {
                    metered.synchronize().unwrap();
                }
            })
        };
        // Every call is a background call: no snapshot may show more background calls than
        // calls (which made `foreground_calls` underflow).
        let mut seen = 0;
        for _ in 0..2_000_000 {
            assert_eq!(metered.foreground_calls(), 0);
            let s = metered.op(BackendOp::Synchronize);
            assert!(s.background_calls <= s.calls);
            seen = s.calls;
        }
        stop.store(true, Ordering::Relaxed);
        worker.join().unwrap();
        assert!(seen > 0, "the background thread made no calls");
    }
}

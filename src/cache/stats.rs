//! Statistics of a cache, and the metering backend wrapper that counts and times backend calls.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::pool::PoolStats;
use crate::vmm::{
    Backend, BackendInfo, BackendKind, BackendOp, Completion, CopyKind, CopyRegion, HostBuffer,
    PageHandle, VaRange,
};

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
    calls: AtomicU64,
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
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
        OpStats {
            calls: c.calls.load(Ordering::Relaxed),
            background_calls: c.background.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            total_ns: c.nanos.load(Ordering::Relaxed),
        }
    }

    /// Calls of every kind made on a caller's (not a background) thread.
    pub fn foreground_calls(&self) -> u64 {
        BackendOp::ALL
            .iter()
            .map(|&o| {
                let s = self.op(o);
                s.calls - s.background_calls
            })
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
        c.calls.fetch_add(1, Ordering::Relaxed);
        if on_background_thread() {
            c.background.fetch_add(1, Ordering::Relaxed);
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
    fn unmap(&self, va: u64, len: usize) -> Result<()> {
        self.timed(BackendOp::Unmap, Result::is_ok, || {
            self.inner.unmap(va, len)
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
}

/// A snapshot of a cache's state and counters.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct CacheStats {
    /// Bytes of pages mapped into the cache (all slots, all buffers).
    pub mapped_bytes: u64,
    /// Bytes holding live tokens of allocated slots.
    pub live_bytes: u64,
    /// Allocated slots.
    pub allocated_slots: usize,
    /// For every slot, the pages mapped per buffer (the smallest count over its buffers).
    pub pages_per_slot: Vec<usize>,
    /// Pages on the pool's free list.
    pub free_pool_pages: usize,
    /// The pool's counters.
    pub pool: PoolStats,
    /// Backend calls by kind, in [`BackendOp::ALL`] order, with their names.
    pub backend_calls: Vec<(&'static str, OpStats)>,
    /// Backend calls made on the caller's threads.
    pub foreground_calls: u64,
    /// Times the background mapper mapped ahead.
    pub mapper_batches: u64,
    /// Times a growth call had to notify the sleeping mapper (the rest of its batches it
    /// started by itself, from the measured step cadence, or found pending when it woke).
    pub mapper_notified: u64,
    /// Pages the background mapper mapped (per buffer page counts summed over buffers).
    pub mapper_pages: u64,
    /// Pages taken back from free slots under pressure.
    pub reclaimed_pages: u64,
}

impl CacheStats {
    /// Total backend calls of every kind.
    pub fn total_backend_calls(&self) -> u64 {
        self.backend_calls.iter().map(|(_, s)| s.calls).sum()
    }
    /// Counters of one kind.
    pub fn calls(&self, op: BackendOp) -> OpStats {
        self.backend_calls
            .get(op as usize)
            .map(|(_, s)| *s)
            .unwrap_or_default()
    }
}

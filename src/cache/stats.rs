//! Statistics of a cache.

use crate::pool::PoolStats;
use crate::vmm::{BackendOp, OpStats};

/// A snapshot of a cache's state and counters.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
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
    /// The prefix index's counters.
    pub prefix: super::prefix::PrefixStats,
    /// Bytes of the distinct pages mapped into the cache: a page mapped behind several slots
    /// counts once (`mapped_bytes` counts it once per slot).
    pub distinct_mapped_bytes: u64,
    /// Unmaps that waited in the deferred-unmap queue for the fence of the caller's work (CUDA;
    /// see `docs/ordering.md`).
    pub deferred_unmaps: u64,
    /// Their total wait, from the call that queued them to the unmap, in nanoseconds.
    pub deferred_unmap_wait_ns: u64,
    /// Their longest wait in nanoseconds.
    pub deferred_unmap_max_wait_ns: u64,
    /// Reclamations that had to wait on the host for the fence of a freed slot (no completed
    /// slot had enough pages).
    pub fence_waits: u64,
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

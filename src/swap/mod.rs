//! SwapEngine: asynchronous, coarse-grained KV swapping between device memory and pinned host
//! memory (the FastSwitch design). The implementation is being written; the API below is final.

use std::sync::Arc;

use crate::cache::{KvCache, SlotId};
use crate::error::{Error, Result};

/// Options of a [`SwapEngine`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SwapConfig {
    /// Bytes of host memory the engine may allocate for host copies.
    pub host_budget_bytes: u64,
    /// Transfers are split into chunks of at most this many bytes, only to pipeline them.
    /// Default 4 MiB.
    pub chunk_bytes: usize,
    /// Transfers in flight at once; a swap that would exceed it waits for the oldest.
    pub max_in_flight: usize,
}

impl Default for SwapConfig {
    fn default() -> Self {
        SwapConfig {
            host_budget_bytes: 8 << 30,
            chunk_bytes: 4 << 20,
            max_in_flight: 16,
        }
    }
}

/// Names a host copy of a slot's KV. Opaque; ids are never reused by one engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostCopyId(u64);

impl HostCopyId {
    /// The raw value (for the C ABI).
    pub fn raw(self) -> u64 {
        self.0
    }
    /// Rebuilds an id from [`HostCopyId::raw`]. An id the engine does not know gives
    /// [`Error::InvalidArgument`] wherever it is used.
    pub fn from_raw(raw: u64) -> Self {
        HostCopyId(raw)
    }
}

/// Counters of a [`SwapEngine`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct SwapStats {
    /// Bytes copied device to host by completed swap-outs.
    pub bytes_out: u64,
    /// Bytes copied host to device by completed swap-ins.
    pub bytes_in: u64,
    /// Bytes swap-outs did not copy because the host copy already held them (KV reuse).
    pub reuse_saved_bytes: u64,
    /// Completed transfers (both directions).
    pub transfers: u64,
    /// Bytes of the host arena held by host copies.
    pub host_bytes_used: u64,
    /// The host budget.
    pub host_budget_bytes: u64,
    /// Host copies evicted to make room.
    pub evictions: u64,
    /// Host copies alive.
    pub copies_live: u64,
    /// Transfers submitted and not yet finished.
    pub in_flight: u64,
}

/// The engine. See the [module documentation](self).
#[derive(Debug)]
pub struct SwapEngine {
    cache: Arc<KvCache>,
    config: SwapConfig,
}

/// A transfer in flight: poll or wait for it. Dropping a ticket does not cancel the transfer; the
/// engine finishes it in the background.
#[derive(Debug)]
pub struct SwapTicket {
    copy: HostCopyId,
    bytes: u64,
}

impl SwapTicket {
    /// `Ok(true)` once the transfer and its bookkeeping are done, `Ok(false)` while in flight,
    /// the transfer's error if it failed. Never blocks on the copy.
    ///
    /// # Errors
    /// The error of the failed transfer (the slot and the host copy are then as they were).
    pub fn poll(&self) -> Result<bool> {
        Err(Error::Unsupported("swap engine not yet implemented".into()))
    }
    /// Blocks until the transfer is done.
    ///
    /// # Errors
    /// As [`SwapTicket::poll`].
    pub fn wait(&self) -> Result<()> {
        Err(Error::Unsupported("swap engine not yet implemented".into()))
    }
    /// On CUDA, the raw `CUevent` recorded after the copy, which a stream can wait on with
    /// `cuStreamWaitEvent`; `None` on the host backend or when nothing needed copying.
    pub fn event(&self) -> Option<u64> {
        None
    }
    /// The host copy this transfer reads or writes.
    pub fn copy(&self) -> HostCopyId {
        self.copy
    }
    /// Bytes this transfer copies.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl SwapEngine {
    /// Creates an engine for `cache`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a zero chunk size, in-flight limit or budget.
    pub fn new(cache: Arc<KvCache>, config: SwapConfig) -> Result<Self> {
        Ok(SwapEngine { cache, config })
    }

    /// The cache this engine swaps for.
    pub fn cache(&self) -> &Arc<KvCache> {
        &self.cache
    }

    /// Copies the slot's live KV to host (only the tokens the host copy lacks, if the slot was
    /// swapped in from a copy that is still valid), then unmaps its pages, returns them to the
    /// pool and frees the slot. The ticket names the host copy.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a slot that is not allocated;
    /// [`Error::HostBudgetExhausted`]; backend errors when the copy cannot be submitted.
    pub fn swap_out(&self, slot: SlotId) -> Result<SwapTicket> {
        let _ = (slot, &self.config);
        Err(Error::Unsupported("swap engine not yet implemented".into()))
    }

    /// Maps the pages `slot` needs for the copy's tokens and copies them back. The slot must be
    /// allocated and hold no tokens (e.g. from `cache.alloc_slot_for(n)`); it must not be used
    /// before the ticket completes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown copy or a slot that is not allocated or not
    /// empty; [`Error::Grow`] when the pages cannot be mapped; backend errors.
    pub fn swap_in(&self, copy: HostCopyId, slot: SlotId) -> Result<SwapTicket> {
        let _ = (copy, slot);
        Err(Error::Unsupported("swap engine not yet implemented".into()))
    }

    /// Drops a host copy.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown copy.
    pub fn release(&self, copy: HostCopyId) -> Result<()> {
        let _ = copy;
        Err(Error::Unsupported("swap engine not yet implemented".into()))
    }

    /// Pins or unpins a host copy; pinned copies are never evicted.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown copy.
    pub fn pin(&self, copy: HostCopyId, pinned: bool) -> Result<()> {
        let _ = (copy, pinned);
        Err(Error::Unsupported("swap engine not yet implemented".into()))
    }

    /// Sets a copy's eviction priority: lower priorities are evicted first, least recently used
    /// first within a priority.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown copy.
    pub fn set_priority(&self, copy: HostCopyId, priority: u8) -> Result<()> {
        let _ = (copy, priority);
        Err(Error::Unsupported("swap engine not yet implemented".into()))
    }

    /// Tokens a host copy holds.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown copy.
    pub fn host_tokens(&self, copy: HostCopyId) -> Result<usize> {
        let _ = copy;
        Err(Error::Unsupported("swap engine not yet implemented".into()))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SwapStats {
        SwapStats {
            host_budget_bytes: self.config.host_budget_bytes,
            ..SwapStats::default()
        }
    }
}

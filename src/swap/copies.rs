//! Host copies: their extents in the arena, eviction, and the calls that manage them.

use crate::error::{Error, Result};

use crate::cache::SlotId;

use super::arena::{self, aligned, Extent, MIN_BLOCK};
use super::{HostCopyId, Inner, State, SwapEngine};

/// A host copy of one request's KV.
#[derive(Debug)]
pub(super) struct HostCopy {
    /// `None` while the copy holds no token.
    pub(super) extent: Option<Extent>,
    /// Tokens per buffer the extent has room for.
    pub(super) cap: usize,
    /// Tokens held.
    pub(super) tokens: usize,
    pub(super) pinned: bool,
    pub(super) priority: u8,
    /// Logical time of the last use, for LRU.
    pub(super) last_use: u64,
    /// A transfer reads or writes the copy: it may be neither evicted, freed nor reused.
    pub(super) busy: bool,
    /// Written by a swap-out and not swapped in since: the only place this KV lives.
    pub(super) sole: bool,
    /// The slot (and its epoch) swapped in from this copy, whose next swap-out may append.
    pub(super) attached: Option<(SlotId, u64)>,
    /// Released while busy: dropped when the transfer finishes.
    pub(super) doomed: bool,
}

impl Inner {
    /// Host tokens per buffer a copy of `tokens` tokens reserves room for.
    pub(super) fn capacity_for(&self, tokens: usize) -> usize {
        let max = self.cache.geometry().max_tokens;
        (tokens + tokens / 4)
            .div_ceil(16)
            .saturating_mul(16)
            .clamp(tokens, max.max(tokens))
    }

    /// Extent bytes for `cap` tokens per buffer.
    pub(super) fn extent_bytes(&self, cap: usize) -> usize {
        aligned(cap * self.cache.geometry().bytes_per_token())
    }

    /// Takes a host extent of `len` bytes: a free hole, else a new block within the budget, else
    /// room made by evicting cached copies. Fails without evicting anything when the free,
    /// unallocated and evictable bytes together fall short.
    pub(super) fn alloc_extent(&self, st: &mut State, len: usize) -> Result<Extent> {
        let budget = self.config.host_budget_bytes;
        loop {
            if let Some(e) = st.arena.try_alloc(len) {
                return Ok(e);
            }
            let unreserved = budget.saturating_sub(st.arena.reserved());
            if unreserved >= len as u64 {
                let block =
                    ((unreserved as usize).min(MIN_BLOCK.max(len)) / arena::ALIGN) * arena::ALIGN;
                st.arena.grow(self.backend(), block.max(len))?;
                continue;
            }
            if unreserved + st.arena.empty_block_bytes() >= len as u64
                && st.arena.release_empty(self.backend()) > 0
            {
                continue;
            }
            let evictable: u64 = st
                .copies
                .values()
                .filter(|c| Self::evictable(c))
                .filter_map(|c| c.extent.map(|e| e.len as u64))
                .sum();
            let available = unreserved + st.arena.free_bytes() + evictable;
            let victim = if available >= len as u64 {
                st.copies
                    .iter()
                    .filter(|(_, c)| Self::evictable(c) && c.extent.is_some())
                    .min_by_key(|(id, c)| (c.priority, c.last_use, **id))
                    .map(|(&id, _)| id)
            } else {
                None
            };
            match victim {
                Some(id) => {
                    self.drop_copy(st, id);
                    st.stats.evictions += 1;
                }
                None => {
                    return Err(Error::HostBudgetExhausted {
                        needed: len as u64,
                        available: available.min(budget),
                        budget_bytes: budget,
                    })
                }
            }
        }
    }

    pub(super) fn evictable(c: &HostCopy) -> bool {
        !c.pinned && !c.busy && !c.sole && !c.doomed
    }

    /// Removes a copy that no transfer uses and frees its extent.
    pub(super) fn drop_copy(&self, st: &mut State, id: u64) {
        if let Some(c) = st.copies.remove(&id) {
            if let Some(e) = c.extent {
                st.arena.free(e);
            }
            if let Some((slot, _)) = c.attached {
                if st.by_slot.get(&slot) == Some(&id) {
                    st.by_slot.remove(&slot);
                }
            }
        }
    }

    pub(super) fn tick(st: &mut State) -> u64 {
        st.clock += 1;
        st.clock
    }
}

impl SwapEngine {
    pub(super) fn with_copy<T>(
        &self,
        copy: HostCopyId,
        f: impl FnOnce(&mut HostCopy) -> T,
    ) -> Result<T> {
        let mut st = self.inner.lock();
        match st.copies.get_mut(&copy.0) {
            Some(c) if !c.doomed => Ok(f(c)),
            _ => Err(Error::InvalidArgument(format!(
                "host copy {} does not exist (released or evicted)",
                copy.0
            ))),
        }
    }

    /// Drops a host copy. A copy in a transfer is dropped when the transfer finishes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown, released or evicted copy.
    pub fn release(&self, copy: HostCopyId) -> Result<()> {
        self.inner.fork.check("swap engine")?;
        let busy = self.with_copy(copy, |c| {
            c.doomed = true;
            c.busy
        })?;
        if !busy {
            let mut st = self.inner.lock();
            self.inner.drop_copy(&mut st, copy.0);
        }
        Ok(())
    }

    /// Pins or unpins a host copy; pinned copies are never evicted.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown, released or evicted copy.
    pub fn pin(&self, copy: HostCopyId, pinned: bool) -> Result<()> {
        self.inner.fork.check("swap engine")?;
        self.with_copy(copy, |c| c.pinned = pinned)
    }

    /// Sets a copy's eviction priority: lower priorities are evicted first, least recently used
    /// first within a priority. New copies have priority 0.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown, released or evicted copy.
    pub fn set_priority(&self, copy: HostCopyId, priority: u8) -> Result<()> {
        self.inner.fork.check("swap engine")?;
        self.with_copy(copy, |c| c.priority = priority)
    }

    /// Tokens a host copy holds (those of completed transfers).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown, released or evicted copy.
    pub fn host_tokens(&self, copy: HostCopyId) -> Result<usize> {
        self.inner.fork.check("swap engine")?;
        self.with_copy(copy, |c| c.tokens)
    }
}

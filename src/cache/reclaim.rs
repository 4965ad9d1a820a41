//! Reclamation: taking pages back from free slots and from pages mapped ahead, under pressure.

use crate::error::{Error, Result};
use crate::vmm::{Access, Backend, PageHandle};

use super::{Shared, State};

impl Shared {
    /// Takes `n` pages from the pool; with `reclaim`, evicts cached prefix pages no slot maps
    /// and takes pages back from free slots when the pool runs short (free slots only if that
    /// makes the request succeed, as far as can be told: a shared page unmapped from a free slot
    /// frees memory only once the prefix index lets go of it too, which the next round does).
    pub(super) fn acquire(&self, n: usize, reclaim: bool) -> Result<Vec<PageHandle>> {
        let mut attempts = 0;
        loop {
            match self.pool.acquire(n) {
                Ok(p) => return Ok(p),
                Err(Error::BudgetExhausted { available, .. }) if reclaim && attempts < 8 => {
                    attempts += 1;
                    let deficit = n - available.min(n);
                    // Cached pages of finished requests go first.
                    if self.evict_cached(deficit) > 0 {
                        continue;
                    }
                    let reclaimable: usize = {
                        let st = self.lock();
                        // Cached pages that only free slots map become free once those are
                        // taken back (the next round evicts them).
                        self.victims(&st).iter().map(|v| v.excess).sum::<usize>()
                            + cached_reclaimable(&st) * self.geometry.buffers
                    };
                    if reclaimable < deficit {
                        // Pages the background mapper holds right now become reclaimable once
                        // it is done: wait for it rather than fail.
                        let mut st = self.lock();
                        if st.mapper_active {
                            while st.mapper_active {
                                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                            }
                            continue;
                        }
                        drop(st);
                        return self.pool.acquire(n);
                    }
                    self.reclaim(deficit)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Candidates for reclamation: free slots first (largest first), then allocated slots' pages
    /// mapped ahead of their tokens. Busy slots are skipped.
    pub(super) fn victims(&self, st: &State) -> Vec<Victim> {
        let mut free = Vec::new();
        let mut ahead = Vec::new();
        for (i, s) in st.slots.iter().enumerate() {
            if s.busy {
                continue;
            }
            let floor = if s.allocated {
                self.geometry.pages_for(s.tokens.max(s.pending))
            } else {
                0
            };
            let excess: usize = s.pages.iter().map(|p| p.len().saturating_sub(floor)).sum();
            if excess == 0 {
                continue;
            }
            let v = Victim {
                slot: i,
                floor,
                excess,
            };
            if s.allocated {
                ahead.push(v);
            } else {
                free.push(v);
            }
        }
        // Slots whose fence has completed first: their pages can go without waiting for the
        // caller's kernels (`docs/ordering.md`).
        let pending = |i: usize| {
            st.slots[i]
                .fence
                .as_ref()
                .is_some_and(|f| !f.poll().unwrap_or(true))
        };
        free.sort_by_cached_key(|v| (pending(v.slot), std::cmp::Reverse(v.excess), v.slot));
        ahead.sort_by_cached_key(|v| (pending(v.slot), std::cmp::Reverse(v.excess), v.slot));
        free.extend(ahead);
        free
    }

    /// Unmaps pages of free slots (largest first), then pages mapped ahead by allocated slots,
    /// until `pages` pool pages were returned or nothing is left. Returns how many were returned.
    pub(super) fn reclaim(&self, pages: usize) -> Result<usize> {
        let mut st = self.lock();
        let mut remaining = pages;
        let mut plan: Vec<Shrink> = Vec::new();
        for Victim { slot: i, floor, .. } in self.victims(&st) {
            if remaining == 0 {
                break;
            }
            let s = &mut st.slots[i];
            let freed_at = |keep: usize| -> usize {
                s.pages.iter().map(|p| p.len().saturating_sub(keep)).sum()
            };
            // Keep as many leading pages as possible while freeing enough.
            let mut keep = s.pages.iter().map(Vec::len).max().unwrap_or(0);
            while keep > floor && freed_at(keep) < remaining {
                keep -= 1;
            }
            let freed = freed_at(keep);
            if freed == 0 {
                continue;
            }
            let tails = s.tails(keep);
            remaining = remaining.saturating_sub(freed);
            s.busy = true;
            s.shrinking = true;
            if s.allocated {
                s.ahead = 0;
            }
            plan.push(Shrink {
                slot: i,
                keep,
                tails,
                fence: s.fence.take(),
            });
        }
        drop(st);
        let mut result = Ok(());
        let mut total = 0;
        for p in &plan {
            // The caller's kernels queued before the slot was freed (or shrunk) may still read
            // these pages: they cannot be reused before its fence. Slots whose fence completed
            // come first (see `victims`), so this waits only when they did not suffice.
            if let Some(f) = &p.fence {
                if !f.poll().unwrap_or(true) {
                    self.lock().fence_waits += 1;
                    if let Err(e) = f.wait() {
                        tracing::warn!("waiting for slot {}'s fence failed: {e}", p.slot);
                    }
                }
            }
            match self.unmap_tails(p.slot, p.keep, &p.tails) {
                Ok(n) => total += n,
                Err(e) => result = Err(e),
            }
        }
        let slots: Vec<usize> = plan.iter().map(|p| p.slot).collect();
        self.lock().reclaimed_pages += total as u64;
        self.finish(&slots);
        result.map(|()| total)
    }

    /// Unmaps, in every buffer listed in `tails` (buffer, current length), the pages of slot `i`
    /// beyond `keep`, and gives the slot's references to them back to the pool (a shared page
    /// returns to the free list only with its last owner). The slot must be marked busy by the
    /// caller. Returns how many pages went to the free list.
    pub(super) fn unmap_tails(
        &self,
        i: usize,
        keep: usize,
        tails: &[(usize, usize)],
    ) -> Result<usize> {
        let mut first_err = None;
        let mut freed = 0;
        for &(b, len) in tails {
            let bytes = (len - keep) * self.geometry.page_size;
            let va = self.va(b, i, keep);
            let mut r = self.backend.unmap(va, bytes);
            if r.is_err() && keep < self.lock().slots[i].ro {
                // Shared read-only pages left behind would be written by the slot's next
                // occupant or growth: try once more before giving up on them.
                r = self.backend.unmap(va, bytes);
            }
            match r {
                Ok(()) => {
                    let pages = {
                        let mut st = self.lock();
                        let s = &mut st.slots[i];
                        let tail = s.pages[b].split_off(keep);
                        s.refresh();
                        s.ro = s.ro.min(s.pages.iter().map(Vec::len).max().unwrap_or(0));
                        tail
                    };
                    freed += self.pool.give_back(pages);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(freed), Err)
    }
}

impl Shared {
    /// After a swap-out: unmaps pages `done..len` of buffer `b` of the busy slot `i` (pages
    /// `..done` were unmapped while the copies ran) and gives every page of the buffer back to
    /// the pool.
    ///
    /// # Errors
    /// The backend's error; the buffer is then as it was.
    pub(super) fn release_swapped(
        &self,
        i: usize,
        b: usize,
        done: usize,
        len: usize,
    ) -> Result<()> {
        if len > done {
            self.backend
                .unmap(self.va(b, i, done), (len - done) * self.geometry.page_size)?;
        }
        let pages = {
            let mut st = self.lock();
            let s = &mut st.slots[i];
            let all = std::mem::take(&mut s.pages[b]);
            s.refresh();
            s.ro = s.ro.min(s.pages.iter().map(Vec::len).max().unwrap_or(0));
            all
        };
        self.pool.give_back(pages);
        Ok(())
    }

    /// Maps the first `n` listed pages of buffer `b` of the busy slot `i` back where they were
    /// (after an early unmap; page contents are kept), with their original access: the slot's
    /// shared read-only prefix pages read-only.
    ///
    /// # Errors
    /// The backend's error; nothing is mapped then.
    pub(super) fn map_back(&self, i: usize, b: usize, n: usize) -> Result<()> {
        let st = self.lock();
        let s = &st.slots[i];
        let n = n.min(s.pages[b].len());
        let ro = s.ro.min(n);
        // The slot is busy: nobody else changes its page list, and this one backend call under
        // the lock (a rare path) only delays other threads briefly.
        let refs: Vec<&PageHandle> = s.pages[b][..n].iter().collect();
        if ro > 0 {
            self.backend
                .map_with_access(self.va(b, i, 0), &refs[..ro], Access::ReadOnly)?;
        }
        if n > ro {
            if let Err(e) = self.backend.map(self.va(b, i, ro), &refs[ro..]) {
                if ro > 0 {
                    if let Err(u) = self
                        .backend
                        .unmap(self.va(b, i, 0), ro * self.geometry.page_size)
                    {
                        tracing::warn!("slot {i}: undoing a partial map-back failed: {u}");
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

/// A slot reclamation may take pages from.
#[derive(Debug, Clone, Copy)]
pub(super) struct Victim {
    pub(super) slot: usize,
    /// Pages per buffer the slot must keep (its live and promised tokens).
    pub(super) floor: usize,
    /// Pages beyond the floor (summed over buffers).
    pub(super) excess: usize,
}

/// A planned shrink of one slot.
#[derive(Debug)]
pub(super) struct Shrink {
    pub(super) slot: usize,
    /// Pages to keep per buffer.
    pub(super) keep: usize,
    /// (buffer, current length) of every buffer holding more than `keep` pages.
    pub(super) tails: Vec<(usize, usize)>,
    /// The fence of the caller's work that may still read the pages (waited for first).
    pub(super) fence: Option<std::sync::Arc<dyn crate::vmm::Fence>>,
}

/// Cached prefix page indices that no allocated slot maps (each is one page per buffer).
pub(super) fn cached_reclaimable(st: &State) -> usize {
    if st.prefix.entries.is_empty() {
        return 0;
    }
    let live: std::collections::HashSet<u64> = st
        .slots
        .iter()
        .filter(|s| s.allocated)
        .flat_map(|s| s.pages.iter().flat_map(move |b| b.iter().take(s.ro)))
        .map(PageHandle::raw)
        .collect();
    st.prefix
        .entries
        .values()
        .filter(|e| !e.pages.iter().any(|p| live.contains(&p.raw())))
        .count()
}

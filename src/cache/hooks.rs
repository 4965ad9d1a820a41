//! Crate-internal entry points the swap engine uses to take a slot out of service while its KV
//! moves, and to hand it back afterwards. They keep the cache's rules: backend calls happen
//! outside the lock, and a slot that is being changed is marked busy (so `step`, `shrink`,
//! `free_slot`, reclamation and the background mapper leave it alone) until the engine calls
//! [`KvCache::swap_out_commit`], [`KvCache::swap_in_commit`] or [`KvCache::swap_abort`].

use std::collections::VecDeque;
use std::sync::Arc;

use super::{attach, AfterUnmap, KvCache, MapFailure, SlotId, Work};
use crate::error::{Error, Result};
use crate::vmm::{Backend, Fence, PageHandle};

/// Attempts at mapping a failed swap-out's released pages back.
const RESTORE_TRIES: u32 = 8;

/// The pages a deferred swap-in (see [`KvCache::swap_in_begin_with`]) took from the pool and has
/// not mapped yet. They must end up mapped or given back with [`KvCache::swap_in_unused`].
#[derive(Debug)]
pub(crate) struct PendingPages {
    slot: usize,
    /// Per buffer: the index (from the slot's start) of the next page to map.
    next: Vec<usize>,
    /// Per buffer: the pages still to map, in address order.
    pages: Vec<VecDeque<PageHandle>>,
}

impl KvCache {
    /// Marks `slot` busy for a swap-out once no one else is changing it, and returns its live
    /// tokens and its epoch (which changes whenever the slot is allocated anew or shrunk).
    pub(crate) fn swap_out_begin(&self, slot: SlotId) -> Result<(usize, u64)> {
        self.shared.fork.check("cache")?;
        let sh = &*self.shared;
        let (mut st, i) = sh.wait_idle(sh.lock(), slot)?;
        let s = &mut st.slots[i];
        s.busy = true;
        // The slot is about to lose every page: growth on it must wait (and then finds it free).
        s.shrinking = true;
        s.ahead = 0;
        Ok((s.tokens, s.epoch))
    }

    /// Ends a successful swap-out: unmaps every page of the busy `slot`, gives them to the pool
    /// and frees the slot. A page that cannot be unmapped stays mapped to the (now free) slot,
    /// where reclamation finds it later; nothing leaks. A buffer whose first pages were unmapped
    /// early and whose rest cannot be unmapped gets them mapped back; if that fails too, the slot
    /// stays allocated and busy until the unmapper has released the buffer (never is a free slot
    /// left with listed pages that are not mapped).
    ///
    /// `fence` is the swap-out's fence: the copies waited for it on the device, so once they
    /// completed it has completed too and the unmap happens now; a swap-out without copies (no
    /// tokens) defers the unmap until the fence completes (the slot stays busy until then).
    ///
    /// `released[b]`: the first pages of buffer `b` that [`KvCache::swap_out_unmap`] already
    /// unmapped while the copies ran (empty or zeros when none were).
    pub(crate) fn swap_out_commit(
        &self,
        slot: SlotId,
        fence: Option<Arc<dyn Fence>>,
        released: &[usize],
    ) {
        let sh = &*self.shared;
        let i = slot.as_usize();
        let tails = {
            let mut st = sh.lock();
            st.slots[i].fence = None;
            st.slots[i].tails(0)
        };
        let any_released = released.iter().any(|&n| n > 0);
        if !any_released {
            if let Some(fence) = fence.filter(|f| !f.poll().unwrap_or(true)) {
                sh.defer_unmap(i, 0, tails, fence, AfterUnmap::Free);
                return;
            }
            if let Err(e) = sh.unmap_tails(i, 0, &tails) {
                tracing::warn!(
                    "slot {slot}: unmapping after swap-out failed, pages stay mapped: {e}"
                );
            }
        } else {
            // Pages released early are unmapped already (their copies completed, hence the
            // fence too): unmap the rest of each buffer, then return the buffer's pages.
            let mut stuck = Vec::new();
            for (b, len) in tails {
                let done = released.get(b).copied().unwrap_or(0).min(len);
                let Err(e) = sh.release_swapped(i, b, done, len) else {
                    continue;
                };
                tracing::warn!("slot {slot}: unmapping after swap-out failed: {e}");
                // A free slot's listed pages must all be mapped (its next occupant uses
                // them): map the released ones back, so that the whole buffer stays mapped
                // to the free slot, where reclamation finds it later.
                if done == 0 || sh.map_back(i, b, done).is_ok() {
                    continue;
                }
                stuck.push((b, done, len));
            }
            if !stuck.is_empty() {
                // Neither worked: the buffers are half unmapped. The slot stays allocated and
                // busy (nobody may use those pages) until the unmapper has released them.
                tracing::warn!(
                    "slot {slot}: {} buffer(s) half released after swap-out; retrying in the background",
                    stuck.len()
                );
                sh.defer_release(i, stuck);
                return;
            }
        }
        self.free_swapped(i, None);
    }

    /// Ends a successful swap-out that keeps the pages ([`crate::SwapConfig::keep_pages`]): frees
    /// the busy `slot` as [`KvCache::free_slot`] does, its pages mapped for the next occupant
    /// or for reclamation, which waits for `fence` (the caller's work the copies waited for).
    pub(crate) fn swap_out_keep(&self, slot: SlotId, fence: Option<Arc<dyn Fence>>) {
        self.free_swapped(slot.as_usize(), fence);
    }

    /// Frees the busy, swapped-out slot `i` with whatever pages it still has; reclamation of
    /// them waits for `fence`.
    fn free_swapped(&self, i: usize, fence: Option<Arc<dyn Fence>>) {
        let sh = &*self.shared;
        let mut st = sh.lock();
        let s = &mut st.slots[i];
        s.allocated = false;
        s.tokens = 0;
        s.ahead = 0;
        s.busy = false;
        s.shrinking = false;
        s.fence = fence;
        drop(st);
        sh.changed.notify_all();
    }

    /// Swap-out pipelining: unmaps pages `from..to` of buffer `b` of the busy `slot` (whose data
    /// the host copy holds and which no work of the caller's can still read: the caller checks
    /// that the copies covering them completed and the swap-out's fence passed). The pages stay
    /// in the slot's list, unmapped, until [`KvCache::swap_out_commit`] returns them to the pool
    /// or [`KvCache::swap_out_restore`] maps them back.
    pub(crate) fn swap_out_unmap(
        &self,
        slot: SlotId,
        b: usize,
        from: usize,
        to: usize,
    ) -> Result<()> {
        let sh = &*self.shared;
        if to <= from {
            return Ok(());
        }
        sh.backend.unmap(
            sh.va(b, slot.as_usize(), from),
            (to - from) * sh.geometry.page_size,
        )
    }

    /// Undoes [`KvCache::swap_out_unmap`] after a failed swap-out: maps the first `released[b]`
    /// pages of every buffer `b` back where they were (page contents are kept by unmapping), so
    /// that the slot holds every token as before. Each buffer mapped back has its count set to
    /// zero, so that a second call after an error maps only what is still missing.
    ///
    /// # Errors
    /// The backend's error after a few attempts; the buffers mapped back before it stay mapped
    /// (and have zero in `released`).
    pub(crate) fn swap_out_restore(&self, slot: SlotId, released: &mut [usize]) -> Result<()> {
        let sh = &*self.shared;
        let i = slot.as_usize();
        for (b, n) in released.iter_mut().enumerate() {
            if *n == 0 {
                continue;
            }
            // A transient failure (the map count momentarily short) is retried: the tokens
            // live in these pages.
            let mut tries = 0;
            while let Err(e) = sh.map_back(i, b, *n) {
                tries += 1;
                if tries >= RESTORE_TRIES {
                    return Err(e);
                }
                tracing::warn!("slot {slot}: mapping released pages back failed ({e}); retrying");
                std::thread::sleep(std::time::Duration::from_millis(1 << tries.min(6)));
            }
            *n = 0;
        }
        Ok(())
    }

    /// Ends a failed transfer: the busy `slot` becomes usable again, as it was.
    pub(crate) fn swap_abort(&self, slot: SlotId) {
        self.shared.finish(&[slot.as_usize()]);
    }

    /// Starts a swap-in: `slot` must be allocated and empty; marks it busy and maps the pages
    /// `tokens` tokens need (taking pages back from free slots if the pool runs short). Returns the
    /// slot's epoch. On error the slot is as it was and not busy.
    ///
    /// With `defer`, only takes the pages from the pool and leaves mapping them to [`KvCache::swap_in_map`] (chunk by chunk, ahead of each chunk's
    /// copy); the pages not mapped in the end go back with [`KvCache::swap_in_unused`].
    pub(crate) fn swap_in_begin_with(
        &self,
        slot: SlotId,
        tokens: usize,
        defer: bool,
    ) -> Result<(u64, Option<PendingPages>)> {
        self.shared.fork.check("cache")?;
        let sh = &*self.shared;
        let g = &sh.geometry;
        if tokens > g.max_tokens {
            return Err(Error::InvalidArgument(format!(
                "{tokens} tokens exceed max_tokens {}",
                g.max_tokens
            )));
        }
        let (mut st, i) = sh.wait_idle(sh.lock(), slot)?;
        let s = &mut st.slots[i];
        if s.tokens != 0 {
            return Err(Error::InvalidArgument(format!(
                "slot {slot} holds {} tokens; swap-in needs an empty slot",
                s.tokens
            )));
        }
        let need = g.pages_for(tokens);
        let missing = s.missing(need);
        let epoch = s.epoch;
        s.busy = true;
        s.ahead = 0;
        drop(st);
        if missing == 0 {
            return Ok((epoch, None));
        }
        let pages = match sh.acquire(missing, true) {
            Ok(p) => p,
            Err(e) => {
                sh.finish(&[i]);
                return Err(Error::Grow {
                    slot,
                    missing_pages: missing,
                    source: Box::new(e),
                });
            }
        };
        let plan = sh.plan(
            &[Work {
                slot: i,
                need,
                missing,
            }],
            pages,
        );
        if defer {
            let buffers = sh.geometry.buffers;
            let mut p = PendingPages {
                slot: i,
                next: vec![0; buffers],
                pages: (0..buffers).map(|_| VecDeque::new()).collect(),
            };
            {
                let st = sh.lock();
                for (b, have) in st.slots[i].pages.iter().enumerate() {
                    p.next[b] = have.len();
                }
            }
            for piece in plan {
                p.pages[piece.buffer].extend(piece.pages);
            }
            return Ok((epoch, Some(p)));
        }
        match sh.map_pieces(plan) {
            Ok(done) => {
                attach(&mut sh.lock(), done);
                Ok((epoch, None))
            }
            Err(MapFailure { error: e, kept, .. }) => {
                attach(&mut sh.lock(), kept);
                sh.finish(&[i]);
                Err(Error::Grow {
                    slot,
                    missing_pages: missing,
                    source: Box::new(e),
                })
            }
        }
    }

    /// Maps the pending pages of buffer `b` of a deferred swap-in up to page `upto` (exclusive,
    /// counted from the slot's start; at most every pending page) and attaches them to the slot.
    ///
    /// # Errors
    /// [`Error::Grow`] when the backend cannot map them; they stay pending.
    pub(crate) fn swap_in_map(&self, p: &mut PendingPages, b: usize, upto: usize) -> Result<()> {
        let sh = &*self.shared;
        let have = p.next[b] + p.pages[b].len();
        if upto > have {
            // A chunk beyond the pages taken for the tokens would copy into unmapped memory.
            return Err(Error::Internal(format!(
                "swap-in of slot {}: buffer {b} needs {upto} pages, {have} were taken",
                p.slot
            )));
        }
        let n = upto.saturating_sub(p.next[b]);
        if n == 0 {
            return Ok(());
        }
        let pages: Vec<PageHandle> = p.pages[b].drain(..n).collect();
        let refs: Vec<&PageHandle> = pages.iter().collect();
        if let Err(e) = sh.backend.map(sh.va(b, p.slot, p.next[b]), &refs) {
            for page in pages.into_iter().rev() {
                p.pages[b].push_front(page);
            }
            return Err(Error::Grow {
                slot: SlotId::new(p.slot as u32),
                missing_pages: p.pages.iter().map(VecDeque::len).sum(),
                source: Box::new(e),
            });
        }
        let mut st = sh.lock();
        let s = &mut st.slots[p.slot];
        debug_assert_eq!(s.pages[b].len(), p.next[b]);
        s.pages[b].extend(pages);
        s.refresh();
        p.next[b] += n;
        Ok(())
    }

    /// Maps every pending page of a deferred swap-in.
    ///
    /// # Errors
    /// As [`KvCache::swap_in_map`].
    pub(crate) fn swap_in_map_all(&self, p: &mut PendingPages) -> Result<()> {
        for b in 0..p.next.len() {
            let upto = p.next[b] + p.pages[b].len();
            self.swap_in_map(p, b, upto)?;
        }
        Ok(())
    }

    /// Returns the pages a deferred swap-in did not map to the pool.
    pub(crate) fn swap_in_unused(&self, p: PendingPages) {
        let rest: Vec<PageHandle> = p.pages.into_iter().flatten().collect();
        if !rest.is_empty() {
            self.shared.pool.give_back(rest);
        }
    }

    /// Ends a successful swap-in: the busy `slot` holds `tokens` tokens and is usable again.
    pub(crate) fn swap_in_commit(&self, slot: SlotId, tokens: usize) {
        let sh = &*self.shared;
        let i = slot.as_usize();
        let mut st = sh.lock();
        st.slots[i].busy = false;
        // Not a decode step: it must not shorten the step cadence the mapper measures.
        let wake = sh.commit_tokens(&mut st, &[(i, tokens)], None, false);
        drop(st);
        sh.changed.notify_all();
        sh.wake_mapper(wake);
    }
}

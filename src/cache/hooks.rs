//! Crate-internal entry points the swap engine uses to take a slot out of service while its KV
//! moves, and to hand it back afterwards. They keep the cache's rules: backend calls happen
//! outside the lock, and a slot that is being changed is marked busy (so `step`, `shrink`,
//! `free_slot`, reclamation and the background mapper leave it alone) until the engine calls
//! [`KvCache::swap_out_commit`], [`KvCache::swap_in_commit`] or [`KvCache::swap_abort`].

use std::sync::Arc;

use super::{attach, AfterUnmap, KvCache, MapFailure, SlotId, Work};
use crate::error::{Error, Result};
use crate::vmm::Fence;

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
    /// where reclamation finds it later; nothing leaks.
    ///
    /// `fence` is the swap-out's fence: the copies waited for it on the device, so once they
    /// completed it has completed too and the unmap happens now; a swap-out without copies (no
    /// tokens) defers the unmap until the fence completes (the slot stays busy until then).
    pub(crate) fn swap_out_commit(&self, slot: SlotId, fence: Option<Arc<dyn Fence>>) {
        let sh = &*self.shared;
        let i = slot.as_usize();
        let tails = {
            let mut st = sh.lock();
            st.slots[i].fence = None;
            st.slots[i].tails(0)
        };
        if let Some(fence) = fence.filter(|f| !f.poll().unwrap_or(true)) {
            sh.defer_unmap(i, 0, tails, fence, AfterUnmap::Free);
            return;
        }
        if let Err(e) = sh.unmap_tails(i, 0, &tails) {
            tracing::warn!("slot {slot}: unmapping after swap-out failed, pages stay mapped: {e}");
        }
        let mut st = sh.lock();
        let s = &mut st.slots[i];
        s.allocated = false;
        s.tokens = 0;
        s.ahead = 0;
        s.busy = false;
        s.shrinking = false;
        drop(st);
        sh.changed.notify_all();
    }

    /// Ends a failed transfer: the busy `slot` becomes usable again, as it was.
    pub(crate) fn swap_abort(&self, slot: SlotId) {
        self.shared.finish(&[slot.as_usize()]);
    }

    /// Starts a swap-in: `slot` must be allocated and empty; marks it busy and maps the pages
    /// `tokens` tokens need (taking pages back from free slots if the pool runs short). Returns the
    /// slot's epoch. On error the slot is as it was and not busy.
    pub(crate) fn swap_in_begin(&self, slot: SlotId, tokens: usize) -> Result<u64> {
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
            return Ok(epoch);
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
        match sh.map_pieces(plan) {
            Ok(done) => {
                attach(&mut sh.lock(), done);
                Ok(epoch)
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

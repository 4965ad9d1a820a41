//! Growth: `ensure`/`step` map what a batch is missing, all or nothing, outside the cache lock.

use crate::error::{Error, Result};
use crate::vmm::{Backend, PageHandle};

use super::reclaim::Shrink;
use super::{Shared, SlotId, State};

impl Shared {
    /// The foreground growth path of `ensure` and `step`.
    pub(super) fn grow(&self, batch: &[(SlotId, usize)]) -> Result<()> {
        let targets = self.targets(batch)?;
        // A commit re-checks that every target fits its slot's pages; should a concurrent call
        // have taken pages promised to this one after all, the growth starts over (bounded: it
        // is a defence, not a path that runs).
        for _ in 0..8 {
            if let Some(r) = self.grow_targets(&targets)? {
                return Ok(r);
            }
        }
        Err(Error::Internal(
            "a growth kept losing its pages to concurrent calls".into(),
        ))
    }

    /// Validates a batch and merges duplicates (the largest target wins), without the cache
    /// lock: a batch of millions of entries does not hold up other threads' calls. Returns
    /// (slot index, tokens) sorted by slot.
    fn targets(&self, batch: &[(SlotId, usize)]) -> Result<Vec<(usize, usize)>> {
        let g = &self.geometry;
        let mut targets: Vec<(usize, usize)> = Vec::new();
        // The batch's length comes from the caller: an allocation that fails is an error, not
        // an abort.
        targets.try_reserve_exact(batch.len()).map_err(|_| {
            Error::InvalidArgument(format!(
                "a batch of {} entries is too large to process",
                batch.len()
            ))
        })?;
        for &(slot, tokens) in batch {
            if slot.as_usize() >= g.max_slots {
                return Err(Error::SlotOutOfRange {
                    slot,
                    max_slots: g.max_slots,
                });
            }
            if tokens > g.max_tokens {
                return Err(Error::InvalidArgument(format!(
                    "slot {slot}: {tokens} tokens exceed max_tokens {}",
                    g.max_tokens
                )));
            }
            targets.push((slot.as_usize(), tokens));
        }
        if !targets.windows(2).all(|w| w[0].0 < w[1].0) {
            targets.sort_unstable();
            // Sorted by (slot, tokens): keep the last, largest entry of each slot.
            targets.reverse();
            targets.dedup_by_key(|t| t.0);
            targets.reverse();
        }
        Ok(targets)
    }

    /// One attempt at growing `targets` (sorted, distinct slots). `Ok(None)`: a slot lost pages
    /// promised to this call to a concurrent one; nothing was committed, try again.
    fn grow_targets(&self, targets: &[(usize, usize)]) -> Result<Option<()>> {
        let g = &self.geometry;
        let mut st = self.lock();
        for &(i, _) in targets {
            self.check_slot(&st, SlotId::new(i as u32))?;
        }
        // Which occupant of each slot this call is for (see `commit_tokens`): recorded only
        // when the lock is about to be released, the fast path holds it throughout.
        let mut epochs: Option<Vec<u64>> = None;
        let record = |st: &State| targets.iter().map(|&(i, _)| st.slots[i].epoch).collect();
        // Wait until no slot that needs pages is busy, then claim them all at once (no
        // hold-and-wait, so concurrent steps cannot deadlock).
        let work: Vec<Work> = loop {
            let work: Vec<Work> = targets
                .iter()
                .filter_map(|&(i, t)| {
                    if g.fits(t, st.slots[i].min_pages) {
                        return None;
                    }
                    let need = g.pages_for(t);
                    let missing = st.slots[i].missing(need);
                    (missing > 0).then_some(Work {
                        slot: i,
                        need,
                        missing,
                    })
                })
                .collect();
            // A slot losing pages (reclamation of its mapped-ahead tail) must be waited for
            // even when its target fits the pages it lists now: they may be unmapped under us.
            if work.iter().all(|w| !st.slots[w.slot].busy)
                && targets.iter().all(|&(i, _)| !st.slots[i].shrinking)
            {
                break work;
            }
            if epochs.is_none() {
                epochs = Some(record(&st));
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            // Slots may have been freed meanwhile.
            for &(i, _) in targets {
                self.check_slot(&st, SlotId::new(i as u32))?;
            }
        };
        if work.is_empty() {
            let wake = self.commit_tokens(&mut st, targets, epochs.as_deref(), true);
            drop(st);
            self.wake_mapper(wake);
            return Ok(Some(()));
        }
        let epochs = epochs.unwrap_or_else(|| record(&st));
        for w in &work {
            st.slots[w.slot].busy = true;
        }
        // Slots of this batch that already have their pages must keep them while the pages of
        // the others are acquired (reclamation would otherwise take them as "mapped ahead").
        for &(i, t) in targets {
            let s = &mut st.slots[i];
            s.pending = s.pending.max(t);
            s.promises += 1;
        }
        let total: usize = work.iter().map(|w| w.missing).sum();
        // A slot left uneven by an earlier failed unmap may hold pages beyond its target in one
        // buffer while missing some in another; the surplus holds no live token, so when pages
        // are short it goes back to the pool first (the slot is ours: it is marked busy).
        let surplus: Vec<Shrink> = if self.pool.available() < total {
            work.iter()
                .filter_map(|w| {
                    let tails = st.slots[w.slot].tails(w.need);
                    (!tails.is_empty()).then(|| Shrink {
                        slot: w.slot,
                        keep: w.need,
                        tails,
                        fence: st.slots[w.slot].fence.clone(),
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        drop(st);
        // A surplus that could not be unmapped is the reason pages are short if they turn out
        // short: then its error is the cause reported, not the budget.
        let mut surplus_error: Option<(usize, Error)> = None;
        for sh in surplus {
            // As in `reclaim`: the pages may have been read by work queued before the slot's
            // last shrink.
            if let Some(Err(e)) = sh.fence.as_ref().map(|f| f.wait()) {
                tracing::warn!("waiting for slot {}'s fence failed: {e}", sh.slot);
            }
            if let Err(e) = self.unmap_tails(sh.slot, sh.keep, &sh.tails) {
                tracing::debug!("could not return surplus pages of slot {}: {e}", sh.slot);
                surplus_error.get_or_insert((sh.slot, e));
            }
        }
        let busy: Vec<usize> = work.iter().map(|w| w.slot).collect();

        let pages = match self.acquire(total, true) {
            Ok(p) => p,
            Err(e) => {
                self.clear_pending(targets);
                self.finish(&busy);
                let (slot, missing, cause) = match (surplus_error, &e) {
                    (Some((slot, u)), Error::BudgetExhausted { .. }) => {
                        let missing = work
                            .iter()
                            .find(|w| w.slot == slot)
                            .map_or(0, |w| w.missing);
                        (slot, missing, u)
                    }
                    _ => {
                        let (slot, missing) = blame(&work, &e);
                        (slot, missing, e)
                    }
                };
                return Err(Error::Grow {
                    slot: SlotId::new(slot as u32),
                    missing_pages: missing,
                    source: Box::new(cause),
                });
            }
        };
        let plan = self.plan(&work, pages);
        match self.map_pieces(plan) {
            Ok(done) => {
                let mut st = self.lock();
                attach(&mut st, done);
                for &i in &busy {
                    st.slots[i].busy = false;
                }
                // Every target still held by this call's occupant must fit the slot's pages
                // before any token is committed (all or nothing).
                let short = targets.iter().zip(&epochs).any(|(&(i, t), &e)| {
                    let s = &st.slots[i];
                    s.allocated && s.epoch == e && !g.fits(t, s.min_pages)
                });
                if short {
                    clear_pending(&mut st, targets);
                    drop(st);
                    self.changed.notify_all();
                    return Ok(None);
                }
                let wake = self.commit_tokens(&mut st, targets, Some(&epochs), true);
                clear_pending(&mut st, targets);
                drop(st);
                self.changed.notify_all();
                self.wake_mapper(wake);
                Ok(Some(()))
            }
            Err(MapFailure {
                slot: failed_slot,
                error: e,
                kept,
            }) => {
                let mut st = self.lock();
                attach(&mut st, kept);
                for &i in &busy {
                    st.slots[i].busy = false;
                }
                clear_pending(&mut st, targets);
                drop(st);
                self.changed.notify_all();
                let missing = work
                    .iter()
                    .find(|w| w.slot == failed_slot)
                    .map_or(0, |w| w.missing);
                Err(Error::Grow {
                    slot: SlotId::new(failed_slot as u32),
                    missing_pages: missing,
                    source: Box::new(e),
                })
            }
        }
    }

    /// Forgets the promise of a growth call that gave up (see [`Slot::pending`]).
    pub(super) fn clear_pending(&self, targets: &[(usize, usize)]) {
        clear_pending(&mut self.lock(), targets);
    }

    /// Records the new token counts after a successful growth and wakes the mapper.
    /// Returns whether the mapper was given work: the caller must then call
    /// [`Shared::wake_mapper`] after releasing the lock.
    #[must_use]
    pub(super) fn commit_tokens(
        &self,
        st: &mut State,
        targets: &[(usize, usize)],
        epochs: Option<&[u64]>,
        decode: bool,
    ) -> bool {
        let mut wake = false;
        if self.lookahead > 0 && decode {
            st.clock.tick();
        }
        for (k, &(i, t)) in targets.iter().enumerate() {
            let s = &mut st.slots[i];
            // A slot of the batch that needed no page was not held: if it was freed (and maybe
            // handed to another request) meanwhile, the new occupant must not inherit tokens.
            if !s.allocated || epochs.is_some_and(|e| e.get(k) != Some(&s.epoch)) {
                continue;
            }
            s.tokens = s.tokens.max(t);
            if self.lookahead > 0 {
                s.ahead = (s.tokens + self.lookahead).min(self.geometry.max_tokens);
                wake |= !self.geometry.fits(s.ahead, s.min_pages);
            }
        }
        if wake {
            st.mapper_wake = true;
        }
        // A mapper that is awake sees the flag before it sleeps again: no system call needed.
        let notify = wake && st.mapper_sleeping;
        st.mapper_notified += u64::from(notify);
        notify
    }

    /// Wakes the background mapper (call without holding the lock).
    pub(super) fn wake_mapper(&self, wake: bool) {
        if wake {
            self.mapper_cv.notify_one();
        }
    }

    /// Splits `pages` into per-(slot, buffer) pieces for `work`.
    pub(super) fn plan(&self, work: &[Work], mut pages: Vec<PageHandle>) -> Vec<Piece> {
        let st = self.lock();
        let mut plan = Vec::new();
        for w in work {
            for (b, have) in st.slots[w.slot].pages.iter().enumerate() {
                let n = w.need.saturating_sub(have.len());
                if n > 0 {
                    let rest = pages.split_off(pages.len() - n);
                    plan.push(Piece {
                        slot: w.slot,
                        buffer: b,
                        start: have.len(),
                        pages: rest,
                    });
                }
            }
        }
        plan
    }

    /// Maps every piece. On failure unmaps what this call mapped, gives the pages back, and
    /// returns the failing slot, the error, and the pieces that could not be rolled back (still
    /// mapped; they must be attached to their slots).
    pub(super) fn map_pieces(
        &self,
        plan: Vec<Piece>,
    ) -> std::result::Result<Vec<Piece>, MapFailure> {
        let mut done: Vec<Piece> = Vec::with_capacity(plan.len());
        let mut it = plan.into_iter();
        while let Some(p) = it.next() {
            let refs: Vec<&PageHandle> = p.pages.iter().collect();
            if let Err(e) = self.backend.map(self.va(p.buffer, p.slot, p.start), &refs) {
                let failed = p.slot;
                let mut back = p.pages;
                for q in it {
                    back.extend(q.pages);
                }
                let mut kept = Vec::new();
                for q in done.into_iter().rev() {
                    let len = q.pages.len() * self.geometry.page_size;
                    match self.backend.unmap(self.va(q.buffer, q.slot, q.start), len) {
                        Ok(()) => back.extend(q.pages),
                        Err(u) => {
                            tracing::warn!("rollback unmap failed, pages stay mapped: {u}");
                            kept.push(q);
                        }
                    }
                }
                self.pool.give_back(back);
                return Err(MapFailure {
                    slot: failed,
                    error: e,
                    kept,
                });
            }
            done.push(p);
        }
        Ok(done)
    }
}

/// A planned mapping: `pages` go into buffer `buffer` of `slot` starting at page index `start`.
#[derive(Debug)]
pub(super) struct Piece {
    pub(super) slot: usize,
    pub(super) buffer: usize,
    pub(super) start: usize,
    pub(super) pages: Vec<PageHandle>,
}

/// A slot a growth call (or the mapper) maps pages for.
#[derive(Debug, Clone, Copy)]
pub(super) struct Work {
    /// The slot's index.
    pub(super) slot: usize,
    /// Pages per buffer the slot must have.
    pub(super) need: usize,
    /// Pool pages missing to get there (summed over buffers).
    pub(super) missing: usize,
}

/// A failed [`Shared::map_pieces`].
#[derive(Debug)]
pub(super) struct MapFailure {
    /// The slot whose piece failed to map.
    pub(super) slot: usize,
    /// Why.
    pub(super) error: Error,
    /// Pieces that could not be rolled back (still mapped; attach them to their slots).
    pub(super) kept: Vec<Piece>,
}

/// Forgets the promises of a growth call that has finished: a slot's promise is cleared when no
/// other call in flight still holds one (their largest promise stands until then).
pub(super) fn clear_pending(st: &mut State, targets: &[(usize, usize)]) {
    for &(i, _) in targets {
        let s = &mut st.slots[i];
        s.promises = s.promises.saturating_sub(1);
        if s.promises == 0 {
            s.pending = 0;
        }
    }
}

/// Attaches mapped pieces to their slots.
pub(super) fn attach(st: &mut State, pieces: Vec<Piece>) {
    // Pieces come grouped by slot: refresh each slot once, after its last piece (a refresh
    // looks at every buffer, so once per piece would be quadratic in the per-layer layout).
    let mut last: Option<usize> = None;
    for p in pieces {
        if let Some(prev) = last.filter(|&prev| prev != p.slot) {
            st.slots[prev].refresh();
        }
        last = Some(p.slot);
        let s = &mut st.slots[p.slot];
        debug_assert_eq!(s.pages[p.buffer].len(), p.start);
        s.pages[p.buffer].extend(p.pages);
    }
    if let Some(prev) = last {
        st.slots[prev].refresh();
    }
}

/// Which slot a budget failure is charged to: the first whose cumulative need passes what was
/// available.
pub(super) fn blame(work: &[Work], e: &Error) -> (usize, usize) {
    if let Error::BudgetExhausted { available, .. } = e {
        let mut sum = 0;
        for w in work {
            sum += w.missing;
            if sum > *available {
                return (w.slot, w.missing);
            }
        }
    }
    work.first().map_or((0, 0), |w| (w.slot, w.missing))
}

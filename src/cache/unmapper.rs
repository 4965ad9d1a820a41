//! Ordering after the caller's stream (`docs/ordering.md`): fences, and the deferred-unmap queue
//! that the `kvvm-unmapper` thread drains.
//!
//! An unmap that the caller's queued kernels may still race (a `shrink` whose fence has not
//! completed, a swap-out without copies) is queued with its fence instead of running; the slot
//! stays busy meanwhile. The thread polls the fences without blocking (`cuEventQuery`), every
//! 100 µs while some are pending, unmaps once one completes, and only then gives the pages to the
//! pool and the slot back. At shutdown it waits for the rest.
//!
//! It also finishes what a swap-out could not (on every backend): when a pipelined swap-out has
//! unmapped a buffer's first pages early and then neither unmapping the rest nor mapping those
//! back succeeds, the buffer is half unmapped; the slot stays allocated and busy, and the thread
//! retries releasing it with a growing delay (1 ms to 128 ms) until it succeeds, then frees the
//! slot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Shared;
use crate::vmm::{Backend, Fence};

/// What happens to a slot once its deferred unmap is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AfterUnmap {
    /// The slot stops being busy (shrink).
    Finish,
    /// The slot is freed (swap-out commit).
    Free,
}

/// What a deferred entry unmaps.
#[derive(Debug)]
enum Job {
    /// The slot's pages beyond `keep` in each (buffer, current length) of `tails`; a failure
    /// leaves them mapped (and listed), which is a valid state.
    Tails {
        keep: usize,
        tails: Vec<(usize, usize)>,
    },
    /// A swapped-out slot's buffers whose first pages are unmapped already: (buffer, pages
    /// unmapped, pages listed). Retried until every one is released.
    Release(Vec<(usize, usize, usize)>),
}

/// An unmap waiting for the fence of the caller's work that may still read the pages.
#[derive(Debug)]
struct Deferred {
    slot: usize,
    job: Job,
    /// `None`: nothing of the caller's can read the pages any more.
    fence: Option<Arc<dyn Fence>>,
    then: AfterUnmap,
    since: Instant,
    /// A retried release waits until then.
    not_before: Option<Instant>,
    /// Failed attempts so far (releases).
    tries: u32,
}

/// The longest wait between two attempts at a release.
const MAX_BACKOFF: Duration = Duration::from_millis(128);

/// The deferred-unmap queue.
#[derive(Debug, Default)]
pub(super) struct UnmapQueue {
    items: Vec<Deferred>,
    pub(super) shutdown: bool,
}

/// How often pending fences are polled.
const POLL: Duration = Duration::from_micros(100);

/// The `kvvm-unmapper` thread.
pub(super) fn run(sh: Arc<Shared>) {
    crate::vmm::mark_background_thread();
    sh.backend.prepare_thread();
    loop {
        let mut q = sh.unmap_queue();
        while q.items.is_empty() && !q.shutdown {
            q = sh.unmaps_cv.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        if q.items.is_empty() {
            return;
        }
        let shutdown = q.shutdown;
        let now = Instant::now();
        let mut ready = Vec::new();
        let mut k = 0;
        while k < q.items.len() {
            let item = &q.items[k];
            let due = item.not_before.is_none_or(|t| t <= now);
            let done = shutdown
                || due
                    && item.fence.as_ref().is_none_or(|f| {
                        f.poll().unwrap_or_else(|e| {
                            // A failed fence (a faulted context) never completes, and nothing
                            // of the caller's runs any more: the pages can go.
                            tracing::warn!("a deferred unmap's fence failed: {e}");
                            true
                        })
                    });
            if done {
                ready.push(q.items.swap_remove(k));
            } else {
                k += 1;
            }
        }
        if ready.is_empty() {
            // Poll again shortly; a new entry wakes the thread at once.
            drop(sh.unmaps_cv.wait_timeout(q, POLL));
            continue;
        }
        drop(q);
        for d in ready {
            if shutdown {
                if let Some(Err(e)) = d.fence.as_ref().map(|f| f.wait()) {
                    tracing::warn!("waiting for a deferred unmap's fence failed: {e}");
                }
            }
            sh.complete_deferred(d, shutdown);
        }
    }
}

impl Shared {
    pub(super) fn unmap_queue(&self) -> std::sync::MutexGuard<'_, UnmapQueue> {
        self.unmaps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fence after the work queued so far on the caller's stream (the legacy default stream
    /// when none is set); `None` where the backend needs none (host). If it cannot be recorded
    /// (e.g. the stream was destroyed), everything the device was given is waited for instead,
    /// on the host, and `None` is returned.
    pub(super) fn fence_now(&self) -> Option<Arc<dyn Fence>> {
        let stream = (*self.stream.lock().unwrap_or_else(|p| p.into_inner())).unwrap_or(0);
        match self.backend.record_fence(stream) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(
                    "recording a fence on stream {stream:#x} failed ({e}); synchronizing the device"
                );
                if let Err(e) = self.backend.synchronize() {
                    tracing::error!("synchronizing the device failed: {e}");
                }
                None
            }
        }
    }

    /// Queues the unmap of slot `i`'s pages beyond `keep` until `fence` completes. The slot must
    /// be busy (and shrinking); it stays so until the unmap is done.
    pub(super) fn defer_unmap(
        &self,
        i: usize,
        keep: usize,
        tails: Vec<(usize, usize)>,
        fence: Arc<dyn Fence>,
        then: AfterUnmap,
    ) {
        self.unmap_queue().items.push(Deferred {
            slot: i,
            job: Job::Tails { keep, tails },
            fence: Some(fence),
            then,
            since: Instant::now(),
            not_before: None,
            tries: 0,
        });
        self.unmaps_cv.notify_all();
    }

    /// Queues the release of a swapped-out slot's half-unmapped buffers: (buffer, pages
    /// unmapped, pages listed). The slot must be busy and allocated; it is freed once all are
    /// released (see [`Shared::release_swapped`]).
    pub(super) fn defer_release(&self, i: usize, stuck: Vec<(usize, usize, usize)>) {
        self.unmap_queue().items.push(Deferred {
            slot: i,
            job: Job::Release(stuck),
            fence: None,
            then: AfterUnmap::Free,
            since: Instant::now(),
            not_before: Some(Instant::now() + Duration::from_millis(1)),
            tries: 0,
        });
        self.unmaps_cv.notify_all();
    }

    /// Performs a deferred unmap whose fence has completed. A release that fails again is
    /// queued again, later (also at shutdown: the cache's drop waits for it).
    fn complete_deferred(&self, mut d: Deferred, shutdown: bool) {
        match &mut d.job {
            Job::Tails { keep, tails } => {
                if let Err(e) = self.unmap_tails(d.slot, *keep, tails) {
                    tracing::warn!(
                        "slot {}: a deferred unmap failed, the pages stay mapped: {e}",
                        d.slot
                    );
                }
            }
            Job::Release(stuck) => {
                let mut first_err = None;
                stuck.retain(
                    |&(b, done, len)| match self.release_swapped(d.slot, b, done, len) {
                        Ok(()) => false,
                        Err(e) => {
                            first_err.get_or_insert(e);
                            true
                        }
                    },
                );
                if let Some(e) = first_err {
                    d.tries += 1;
                    let wait = Duration::from_millis(1 << d.tries.min(7)).min(MAX_BACKOFF);
                    tracing::warn!(
                        "slot {}: releasing swapped-out pages failed again ({e}); retrying in {wait:?}",
                        d.slot
                    );
                    if shutdown && d.tries > 16 {
                        // The cache is going away and the backend keeps refusing: its drop
                        // unmaps the whole reservation, these pages included.
                        tracing::error!(
                            "slot {}: giving up releasing swapped-out pages at shutdown",
                            d.slot
                        );
                        return;
                    }
                    if shutdown {
                        std::thread::sleep(wait);
                    } else {
                        d.not_before = Some(Instant::now() + wait);
                    }
                    self.unmap_queue().items.push(d);
                    return;
                }
            }
        }
        let waited = u64::try_from(d.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut st = self.lock();
        st.deferred_unmaps += 1;
        st.deferred_unmap_wait_ns = st.deferred_unmap_wait_ns.saturating_add(waited);
        st.deferred_unmap_max_wait_ns = st.deferred_unmap_max_wait_ns.max(waited);
        let s = &mut st.slots[d.slot];
        if d.then == AfterUnmap::Free {
            s.allocated = false;
            s.tokens = 0;
            s.ahead = 0;
        }
        s.busy = false;
        s.shrinking = false;
        drop(st);
        self.changed.notify_all();
    }
}

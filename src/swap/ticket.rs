//! Tickets and transfers: one swap-out or swap-in in flight, its completion and its result.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError, Weak};
use std::time::Instant;

use crate::cache::SlotId;
use crate::error::{Error, Result};
use crate::fork::ForkGuard;
use crate::vmm::{Completion, CopyRegion, Fence};

use super::arena::Extent;
use super::{HostCopyId, Inner, Timers};

/// A transfer in flight: poll or wait for it. Dropping a ticket does not cancel the transfer; the
/// engine finishes it in the background.
#[derive(Debug)]
pub struct SwapTicket {
    pub(super) transfer: Arc<Transfer>,
    /// Weak, so that a ticket kept around does not keep the engine and the cache alive: once the
    /// engine is gone every transfer is finished and the ticket only reads the outcome.
    pub(super) inner: Weak<Inner>,
    /// The process the ticket belongs to (see [`crate::fork`]).
    pub(super) fork: ForkGuard,
}

impl SwapTicket {
    /// `Ok(true)` once the transfer and its bookkeeping are done, `Ok(false)` while in flight,
    /// the transfer's error if it failed. Never blocks on the copy.
    ///
    /// # Errors
    /// The error of the failed transfer (the slot and the host copy are then as they were).
    pub fn poll(&self) -> Result<bool> {
        self.fork.check("swap ticket")?;
        match self.transfer.try_finish(&self.inner.upgrade(), false) {
            None => Ok(false),
            Some(r) => r.map(|()| true),
        }
    }
    /// Blocks until the transfer is done.
    ///
    /// # Errors
    /// As [`SwapTicket::poll`].
    pub fn wait(&self) -> Result<()> {
        self.fork.check("swap ticket")?;
        self.transfer
            .try_finish(&self.inner.upgrade(), true)
            .unwrap_or(Ok(()))
    }
    /// On CUDA, the raw `CUevent` recorded after the copy, which a stream can wait on with
    /// `cuStreamWaitEvent`; `None` on the host backend or when nothing needed copying.
    ///
    /// A swap-in is one copy, and its event covers all of it. A swap-out is submitted chunk by
    /// chunk (so that each chunk's pages can go as soon as it is copied), possibly on several
    /// copy streams: its event is that of the last chunk only. To order a stream after a whole
    /// swap-out, use [`SwapTicket::stream_wait`], which waits for every chunk's event.
    pub fn event(&self) -> Option<u64> {
        self.transfer.completions.last().and_then(|c| c.event())
    }
    /// The host copy this transfer reads or writes.
    pub fn copy(&self) -> HostCopyId {
        HostCopyId(self.transfer.copy)
    }
    /// Makes the caller's `stream` (a raw `CUstream`, e.g. torch's `stream.cuda_stream`; 0 is
    /// the legacy default stream) wait for this transfer's copies on the device
    /// (`cuStreamWaitEvent`): work enqueued on it afterwards may use a swapped-in slot in
    /// stream order, without the host waiting (see `docs/ordering.md`). Calls that change the
    /// slot (`step`, `shrink`, ...) still wait on the host until the ticket is done. On the host
    /// backend, which has no streams, this waits for the copies.
    ///
    /// # Errors
    /// The driver's error (e.g. an invalid stream); on the host backend, the transfer's error.
    pub fn stream_wait(&self, stream: u64) -> Result<()> {
        let Some(inner) = self.inner.upgrade() else {
            // The engine is gone, so every transfer has finished.
            return self.wait();
        };
        let backend = inner.backend();
        for c in &self.transfer.completions {
            match c.event() {
                Some(event) => backend.stream_wait_event(stream, event)?,
                None => c.wait()?,
            }
        }
        Ok(())
    }
    /// Bytes this transfer copies.
    pub fn bytes(&self) -> u64 {
        self.transfer.bytes
    }
    /// The slot this transfer empties (swap-out) or fills (swap-in).
    pub fn slot(&self) -> SlotId {
        self.transfer.slot
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Direction {
    Out,
    In,
}

#[derive(Debug)]
pub(super) enum Phase {
    InFlight,
    Finishing,
    Done(Result<()>),
}

/// One submitted transfer and what finishing it must do.
#[derive(Debug)]
pub(super) struct Transfer {
    pub(super) dir: Direction,
    pub(super) slot: SlotId,
    pub(super) copy: u64,
    /// Tokens the copy holds once the transfer succeeded.
    pub(super) tokens: usize,
    /// Swap-out: tokens the copy already held (not copied again).
    pub(super) reused: usize,
    /// Swap-out: the copy was created for this transfer (removed if it fails).
    pub(super) created: bool,
    /// Swap-out: the copy moves to this extent (and capacity) if the transfer succeeds.
    pub(super) relocate: Option<(Extent, usize)>,
    /// Swap-in: the slot's epoch, for the attachment.
    pub(super) epoch: u64,
    pub(super) bytes: u64,
    /// The submitted copies (one per chunk on the host backend's swap-in, else one).
    pub(super) completions: Vec<Box<dyn Completion>>,
    /// Swap-out: the fence of the caller's work the copies waited for.
    pub(super) fence: Option<Arc<dyn Fence>>,
    /// Swap-out with copies: which pages the copies completed so far let go (see
    /// [`Transfer::advance`]).
    pub(super) release: Option<Mutex<Release>>,
    /// Swap-out: the slot keeps its pages mapped once done ([`super::SwapConfig::keep_pages`]).
    pub(super) keep_pages: bool,
    /// When the transfer was submitted (for [`SwapStats::copy_ns`](super::SwapStats::copy_ns)).
    pub(super) submitted: Instant,
    pub(super) phase: Mutex<Phase>,
    pub(super) done: Condvar,
}

/// A swap-out's early page release: as its copies complete, in submission order, the pages under
/// them are unmapped while later chunks still copy.
#[derive(Debug)]
pub(super) struct Release {
    /// Per completion: the buffer its copy reads and the end of what it reads, in bytes from
    /// the slot's start in that buffer. A buffer's copies are submitted in address order.
    pub(super) marks: Vec<(usize, usize)>,
    /// Per completion: the chunk it copies (to copy again what a failed chunk did not).
    pub(super) regions: Vec<CopyRegion>,
    /// Completions `0..next` are complete and accounted for.
    pub(super) next: usize,
    /// Per buffer: pages unmapped so far, from the slot's start.
    pub(super) released: Vec<usize>,
    /// Nothing more is released (a copy or an unmap failed, or the transfer is finishing).
    pub(super) stopped: bool,
}

impl Transfer {
    pub(super) fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn wait_done(&self, mut ph: MutexGuard<'_, Phase>) -> Result<()> {
        loop {
            if let Phase::Done(r) = &*ph {
                return r.clone();
            }
            ph = self.done.wait(ph).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Finishes the transfer if its copy is complete (or, with `block`, once it is). Exactly one
    /// caller runs the bookkeeping; `None` means "not yet" (only without `block`).
    pub(super) fn try_finish(&self, inner: &Option<Arc<Inner>>, block: bool) -> Option<Result<()>> {
        let Some(inner) = inner else {
            // The engine is gone, and it finished every transfer before it went.
            let ph = self.phase();
            return match &*ph {
                Phase::Done(r) => Some(r.clone()),
                _ if block => Some(self.wait_done(ph)),
                _ => None,
            };
        };
        {
            let ph = self.phase();
            match &*ph {
                Phase::Done(r) => return Some(r.clone()),
                Phase::Finishing if block => return Some(self.wait_done(ph)),
                Phase::Finishing => return None,
                Phase::InFlight => {}
            }
        }
        // Swap-out: release the pages of the chunks that completed (with `block`, chunk by chunk
        // as they complete) before looking at the whole transfer.
        // A panic there (a backend's) must not keep the transfer from finishing: what was
        // released is recorded only after each successful unmap.
        let _ =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.advance(inner, block)));
        let copied = if block {
            wait_all(&self.completions)
        } else {
            // Done only when every copy is done; the first error wins.
            let mut first_err = None;
            for c in &self.completions {
                match c.poll() {
                    Ok(false) => return None,
                    Ok(true) => {}
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            first_err.map_or(Ok(()), Err)
        };
        {
            let mut ph = self.phase();
            match &*ph {
                Phase::InFlight => {
                    *ph = Phase::Finishing;
                    Timers::add(&inner.timers.copy_ns, self.submitted);
                }
                Phase::Done(r) => return Some(r.clone()),
                Phase::Finishing if block => return Some(self.wait_done(ph)),
                Phase::Finishing => return None,
            }
        }
        // Whatever happens in `finish`, the transfer must reach `Done`: waiters (the completion
        // thread, `quiesce`, the engine's drop) would otherwise wait forever.
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.finish(self, copied)))
                .unwrap_or_else(|_| {
                    Err(Error::Internal("finishing a swap transfer panicked".into()))
                });
        *self.phase() = Phase::Done(r.clone());
        self.done.notify_all();
        Some(r)
    }
}

impl Transfer {
    /// Swap-out: unmaps the pages that the copies completed so far (in submission order) hold,
    /// once the swap-out's fence has passed: a page is unmapped only when every copy reading
    /// part of it is complete. With `block`, waits for each copy in turn and unmaps behind it;
    /// without, only looks (and returns at once if another thread is at it). Stops for good at
    /// the first failed copy, failed unmap, or once the transfer finishes.
    pub(super) fn advance(&self, inner: &Inner, block: bool) {
        let Some(rel) = &self.release else {
            return;
        };
        // The copies were ordered after the fence, so a completed copy implies it; checked
        // anyway, because unmapping before the caller's kernels finished would fault them. Waited
        // for before taking the lock: a poller that finishes the transfer takes it too
        // (`stop_release`), and must not wait for the fence there.
        let fence = match &self.fence {
            Some(f) => reached(block, || f.wait(), || f.poll()),
            None => Ok(true),
        };
        if matches!(fence, Ok(false)) {
            return;
        }
        let mut r = if block {
            rel.lock().unwrap_or_else(|p| p.into_inner())
        } else {
            match rel.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            }
        };
        if r.stopped || r.next >= self.completions.len() {
            return;
        }
        if fence.is_err() {
            r.stopped = true;
            return;
        }
        let page = inner.cache.geometry().page_size;
        while r.next < self.completions.len() {
            let c = &self.completions[r.next];
            match reached(block, || c.wait(), || c.poll()) {
                Ok(true) => {}
                Ok(false) => return,
                Err(_) => {
                    r.stopped = true;
                    return;
                }
            }
            let (b, end) = r.marks[r.next];
            r.next += 1;
            // Pages wholly below `end`: every copy reading them is complete (earlier copies of
            // this buffer completed before; bytes before the first copy were on the host already).
            let upto = end / page;
            let from = r.released[b];
            if upto > from {
                let t0 = Instant::now();
                let res = inner.cache.swap_out_unmap(self.slot, b, from, upto);
                Timers::add(&inner.timers.unmap_ns, t0);
                match res {
                    Ok(()) => r.released[b] = upto,
                    Err(e) => {
                        tracing::warn!(
                            "slot {}: an early unmap during swap-out failed (retried at the end): {e}",
                            self.slot
                        );
                        r.stopped = true;
                        return;
                    }
                }
            }
        }
    }

    /// Stops the early release and returns the pages it unmapped per buffer, and the chunks
    /// not known to be copied (those after the last one released behind): their sources are all
    /// still mapped.
    pub(super) fn stop_release(&self) -> (Vec<usize>, Vec<CopyRegion>) {
        match &self.release {
            Some(rel) => {
                let mut r = rel.lock().unwrap_or_else(|p| p.into_inner());
                r.stopped = true;
                (r.released.clone(), r.regions[r.next..].to_vec())
            }
            None => (Vec::new(), Vec::new()),
        }
    }
}

/// Whether a copy or fence is done: with `block`, waits for it (`wait`), else looks (`poll`).
fn reached(
    block: bool,
    wait: impl FnOnce() -> Result<()>,
    poll: impl FnOnce() -> Result<bool>,
) -> Result<bool> {
    if block {
        wait().map(|()| true)
    } else {
        poll()
    }
}

/// Waits for every copy (even after one failed: none may still run when the transfer is
/// finished); returns the first error.
pub(super) fn wait_all(completions: &[Box<dyn Completion>]) -> Result<()> {
    let mut first_err = None;
    for c in completions {
        if let Err(e) = c.wait() {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

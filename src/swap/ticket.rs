//! Tickets and transfers: one swap-out or swap-in in flight, its completion and its result.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use crate::cache::SlotId;
use crate::error::{Error, Result};
use crate::fork::ForkGuard;
use crate::vmm::{Completion, Fence};

use super::arena::Extent;
use super::{HostCopyId, Inner};

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
    pub(super) phase: Mutex<Phase>,
    pub(super) done: Condvar,
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
                Phase::InFlight => *ph = Phase::Finishing,
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

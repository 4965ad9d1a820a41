//! SwapEngine: asynchronous, coarse-grained KV swapping between device memory and pinned host
//! memory (the FastSwitch design).
//!
//! A serving engine preempts a request by swapping its slot out to host memory and resumes it
//! later by swapping it into any empty slot:
//!
//! ```
//! use std::sync::Arc;
//! use kvvm::{CacheConfig, KvCache, Layout};
//! use kvvm::{SwapConfig, SwapEngine};
//! use kvvm::vmm::{BackendChoice, BackendConfig};
//!
//! let mut config = CacheConfig::for_model("llama-3-8b", 4, 1024, 64 << 20)?;
//! config.layers = 2; // keep the doctest small
//! config.layout = Layout::Interleaved;
//! config.backend = BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() };
//! let cache = Arc::new(KvCache::new(config)?);
//! let swap = SwapEngine::new(cache.clone(), SwapConfig { host_budget_bytes: 64 << 20, ..Default::default() })?;
//!
//! // A request with 300 tokens of KV (prefill writes it through the layer views).
//! let slot = cache.alloc_slot()?;
//! cache.ensure(slot, 300)?;
//!
//! // Preempt: copy its KV to host. The slot's pages are unmapped and the slot freed only once
//! // the copy has completed; meanwhile other slots keep decoding.
//! let ticket = swap.swap_out(slot)?;
//! let copy = ticket.copy();
//! ticket.wait()?;
//! assert!(!cache.is_allocated(slot));
//! assert_eq!(swap.host_tokens(copy)?, 300);
//!
//! // Resume into any empty slot. On CUDA the compute stream may instead wait on
//! // `ticket.event()` with `cuStreamWaitEvent`.
//! let slot = cache.alloc_slot_for(300)?;
//! let ticket = swap.swap_in(copy, slot)?;
//! ticket.wait()?;
//! assert_eq!(cache.tokens(slot)?, 300);
//!
//! // Decode 20 more tokens, then preempt again: the host copy still holds the first 300
//! // tokens (KV of past tokens never changes), so only the 20 new ones are copied.
//! cache.ensure(slot, 320)?;
//! let ticket = swap.swap_out(slot)?;
//! assert_eq!(ticket.copy(), copy);
//! assert_eq!(ticket.bytes(), 20 * cache.geometry().bytes_per_token() as u64);
//! ticket.wait()?;
//! swap.release(copy)?; // the request finished while swapped out
//! # Ok::<(), kvvm::Error>(())
//! ```
//!
//! # Transfers
//!
//! A swap copies a slot's tokens in as few, as large transfers as the layout permits: the
//! interleaved layout keeps a slot's tokens in one contiguous range, the per-layer layout in one
//! range per buffer (2 × layers). Ranges are cut into [`SwapConfig::chunk_bytes`] pieces only so
//! that the backend can pipeline them (worker threads on the host backend, copy streams on CUDA).
//! Up to [`SwapConfig::max_in_flight`] transfers run at once; a swap never holds the cache's lock
//! while copying: the slot is marked busy instead, so `step` on other slots goes on. On the host
//! backend a swap-in first fills in the page tables of the pages it just mapped, chunk by chunk
//! ahead of the copy, rather than taking a page fault per OS page inside the copy.
//!
//! Ordering with the caller's compute: copies run on the backend's own streams (CUDA) or threads
//! (host). Before `swap_out`, the kernels that wrote the slot's KV must have completed (on CUDA,
//! synchronize the compute stream or an event recorded on it); after `swap_in`, the slot may be
//! read once the ticket is complete, or, on CUDA, by work that a stream orders after
//! [`SwapTicket::event`] with `cuStreamWaitEvent`.
//!
//! A transfer finishes when its copy completes: a swap-out then (and never before) unmaps the
//! slot's pages, returns them to the pool and frees the slot; a swap-in gives the slot its tokens.
//! The finishing work runs in whichever comes first of [`SwapTicket::poll`] / [`SwapTicket::wait`]
//! and the engine's completion thread, so a caller that never polls leaks nothing; dropping the
//! engine waits for every transfer in flight and finishes it.
//!
//! # Failures
//!
//! A copy that fails (at submission or at completion) or pages that cannot be mapped leave the
//! slot as it was (still allocated, every token intact; after a failed swap-in, still empty) and
//! the host copy as it was; the error is returned by `swap_out` / `swap_in` (submission) or by the
//! ticket (completion).
//!
//! # Host memory and KV reuse
//!
//! Host copies live in an arena of large blocks obtained from the backend (page-locked on CUDA)
//! within [`SwapConfig::host_budget_bytes`], carved by a first-fit extent allocator. A copy's
//! extent holds, per buffer, room for a *capacity* of tokens: the copied tokens plus a quarter
//! (rounded up to 16 tokens, at most `max_tokens`), so that a conversation that is swapped in,
//! decodes a little and is swapped out again appends its new tokens in place. When it has grown
//! past the capacity, the copy is relocated: a larger extent is taken, the old tokens are copied
//! host-to-host (no device traffic) and the old extent is returned once the transfer succeeded.
//!
//! After a swap-in completes, the host copy stays valid and tied to the slot; the next swap-out of
//! that slot copies only the tokens added since, provided the slot was neither freed nor shrunk in
//! between. Such copies (the device holds their tokens too) are a cache: when the budget runs
//! short they are evicted, lowest [`SwapEngine::set_priority`] first and least recently used
//! within a priority, unless [`SwapEngine::pin`]ned. A copy written by a swap-out is the only
//! place its request's KV lives and is never evicted; it goes away with [`SwapEngine::release`]
//! (or becomes evictable once swapped in again). When the free, unallocated and evictable bytes
//! together fall short, the swap fails with [`Error::HostBudgetExhausted`] before evicting
//! anything; when they suffice in total but no hole is large enough even after evicting every
//! evictable copy (fragmentation), it fails the same way, having evicted only cached copies. In
//! both cases the slot and every copy a swap-out wrote are as they were.

mod arena;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;

use arena::{aligned, Arena, Extent, MIN_BLOCK};

use crate::cache::{KvCache, SlotId};
use crate::error::{Error, Result};
use crate::vmm::{Backend, BackendKind, Completion, CopyKind, CopyRegion, Fence};

/// The smallest [`SwapConfig::chunk_bytes`] accepted.
pub const MIN_CHUNK_BYTES: usize = 256;

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
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
    inner: Arc<Inner>,
    /// Hands transfers to the completion thread; dropped first at teardown.
    tx: Option<crossbeam_channel::Sender<Arc<Transfer>>>,
    worker: Option<JoinHandle<()>>,
    /// Host backend: hands swap-ins to the staging thread (see [`Staged`]).
    stage_tx: Option<crossbeam_channel::Sender<StageJob>>,
    stager: Option<JoinHandle<()>>,
}

/// A transfer in flight: poll or wait for it. Dropping a ticket does not cancel the transfer; the
/// engine finishes it in the background.
#[derive(Debug)]
pub struct SwapTicket {
    transfer: Arc<Transfer>,
    /// Weak, so that a ticket kept around does not keep the engine and the cache alive: once the
    /// engine is gone every transfer is finished and the ticket only reads the outcome.
    inner: Weak<Inner>,
}

impl SwapTicket {
    /// `Ok(true)` once the transfer and its bookkeeping are done, `Ok(false)` while in flight,
    /// the transfer's error if it failed. Never blocks on the copy.
    ///
    /// # Errors
    /// The error of the failed transfer (the slot and the host copy are then as they were).
    pub fn poll(&self) -> Result<bool> {
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
        self.transfer
            .try_finish(&self.inner.upgrade(), true)
            .unwrap_or(Ok(()))
    }
    /// On CUDA, the raw `CUevent` recorded after the copy, which a stream can wait on with
    /// `cuStreamWaitEvent`; `None` on the host backend or when nothing needed copying.
    pub fn event(&self) -> Option<u64> {
        self.transfer.completions.last().and_then(|c| c.event())
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
    /// The host copy this transfer reads or writes.
    pub fn copy(&self) -> HostCopyId {
        HostCopyId(self.transfer.copy)
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

/// A host copy of one request's KV.
#[derive(Debug)]
struct HostCopy {
    /// `None` while the copy holds no token.
    extent: Option<Extent>,
    /// Tokens per buffer the extent has room for.
    cap: usize,
    /// Tokens held.
    tokens: usize,
    pinned: bool,
    priority: u8,
    /// Logical time of the last use, for LRU.
    last_use: u64,
    /// A transfer reads or writes the copy: it may be neither evicted, freed nor reused.
    busy: bool,
    /// Written by a swap-out and not swapped in since: the only place this KV lives.
    sole: bool,
    /// The slot (and its epoch) swapped in from this copy, whose next swap-out may append.
    attached: Option<(SlotId, u64)>,
    /// Released while busy: dropped when the transfer finishes.
    doomed: bool,
}

#[derive(Debug, Default)]
struct State {
    arena: Arena,
    copies: HashMap<u64, HostCopy>,
    /// Slot → the copy attached to it.
    by_slot: HashMap<SlotId, u64>,
    next_id: u64,
    clock: u64,
    in_flight: usize,
    stats: SwapStats,
}

#[derive(Debug)]
struct Inner {
    cache: Arc<KvCache>,
    config: SwapConfig,
    state: Mutex<State>,
    /// Signalled when a transfer finishes (in-flight room, copies no longer busy).
    changed: Condvar,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Out,
    In,
}

#[derive(Debug)]
enum Phase {
    InFlight,
    Finishing,
    Done(Result<()>),
}

/// One submitted transfer and what finishing it must do.
#[derive(Debug)]
struct Transfer {
    dir: Direction,
    slot: SlotId,
    copy: u64,
    /// Tokens the copy holds once the transfer succeeded.
    tokens: usize,
    /// Swap-out: tokens the copy already held (not copied again).
    reused: usize,
    /// Swap-out: the copy was created for this transfer (removed if it fails).
    created: bool,
    /// Swap-out: the copy moves to this extent (and capacity) if the transfer succeeds.
    relocate: Option<(Extent, usize)>,
    /// Swap-in: the slot's epoch, for the attachment.
    epoch: u64,
    bytes: u64,
    /// The submitted copies (one per chunk on the host backend's swap-in, else one).
    completions: Vec<Box<dyn Completion>>,
    /// Swap-out: the fence of the caller's work the copies waited for.
    fence: Option<Arc<dyn Fence>>,
    phase: Mutex<Phase>,
    done: Condvar,
}

impl Transfer {
    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_done(&self, mut ph: MutexGuard<'_, Phase>) -> Result<()> {
        loop {
            if let Phase::Done(r) = &*ph {
                return r.clone();
            }
            ph = self.done.wait(ph).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Finishes the transfer if its copy is complete (or, with `block`, once it is). Exactly one
    /// caller runs the bookkeeping; `None` means "not yet" (only without `block`).
    fn try_finish(&self, inner: &Option<Arc<Inner>>, block: bool) -> Option<Result<()>> {
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
fn wait_all(completions: &[Box<dyn Completion>]) -> Result<()> {
    let mut first_err = None;
    for c in completions {
        if let Err(e) = c.wait() {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Asks the kernel to fill in the page tables of `[addr, addr+len)` (`MADV_POPULATE_READ`), so
/// that a copy into freshly mapped host-backend pages does not take one page fault per OS page.
/// The pages are shared memfd pages already allocated, which a read fault maps writable and with
/// fault-around (several pages per fault): on the machine this was measured on, populating
/// 128 MiB took 10 ms this way, 20 ms with `MADV_POPULATE_WRITE` and 130 ms through faults in
/// the copy itself. Best effort: without it (kernels before 5.14) the copy takes the faults.
fn prefault(addr: u64, len: usize) {
    // SAFETY: madvise does not touch Rust-visible memory; the caller passes a range of pages
    // mapped read/write for a busy slot, and populating them changes no byte.
    let r = unsafe {
        libc::madvise(
            addr as usize as *mut libc::c_void,
            len,
            libc::MADV_POPULATE_READ,
        )
    };
    if r != 0 {
        tracing::trace!(
            "MADV_POPULATE_READ failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Submits `regions` (`kind`) in one call (none if empty), after `after` on the device.
fn submit_after(
    backend: &dyn Backend,
    kind: CopyKind,
    regions: &[CopyRegion],
    after: Option<&dyn Fence>,
) -> Result<Vec<Box<dyn Completion>>> {
    if regions.is_empty() {
        return Ok(Vec::new());
    }
    // SAFETY: forwarded from the caller, who upholds `copy_async`'s contract for `regions`.
    Ok(vec![unsafe { backend.copy_async_after(kind, regions, after) }?])
}

/// Submits `regions` (`kind`) in one call (none if empty).
fn submit(
    backend: &dyn Backend,
    kind: CopyKind,
    regions: &[CopyRegion],
) -> Result<Vec<Box<dyn Completion>>> {
    if regions.is_empty() {
        return Ok(Vec::new());
    }
    // SAFETY: forwarded from the caller, who upholds `copy_async`'s contract for `regions`.
    Ok(vec![unsafe { backend.copy_async(kind, regions) }?])
}

/// A host-backend swap-in's copies, submitted by the engine's staging thread one chunk at a
/// time after populating the chunk's page tables (see [`prefault`]), so that `swap_in` returns
/// at once and populating a chunk overlaps copying the previous one.
#[derive(Debug, Default)]
struct Staged {
    /// Set once every chunk is submitted (or submission failed): the copies and the
    /// submission error.
    done: Mutex<Option<Submitted>>,
    cv: Condvar,
}

/// What the staging thread submitted for one swap-in: the copies, and the submission error.
type Submitted = (Arc<Vec<Box<dyn Completion>>>, Option<Error>);

/// The [`Completion`] of a [`Staged`] swap-in.
#[derive(Debug)]
struct StagedCompletion(Arc<Staged>);

impl StagedCompletion {
    fn submitted(&self, block: bool) -> Option<Submitted> {
        let mut done = self.0.done.lock().unwrap_or_else(|p| p.into_inner());
        while block && done.is_none() {
            done = self.0.cv.wait(done).unwrap_or_else(|p| p.into_inner());
        }
        done.clone()
    }
}

impl Completion for StagedCompletion {
    fn poll(&self) -> Result<bool> {
        let Some((copies, submit_err)) = self.submitted(false) else {
            return Ok(false);
        };
        let mut first_err = None;
        for c in copies.iter() {
            match c.poll() {
                Ok(false) => return Ok(false),
                Ok(true) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        submit_err.or(first_err).map_or(Ok(true), Err)
    }

    fn wait(&self) -> Result<()> {
        let (copies, submit_err) = self
            .submitted(true)
            .unwrap_or_else(|| (Arc::new(Vec::new()), None));
        let copied = wait_all(&copies);
        submit_err.map_or(copied, Err)
    }
}

/// One swap-in for the staging thread.
#[derive(Debug)]
struct StageJob {
    staged: Arc<Staged>,
    regions: Vec<CopyRegion>,
}

/// The staging thread: populates and submits each job's chunks in order.
fn stage(backend: Arc<dyn Backend>, rx: crossbeam_channel::Receiver<StageJob>) {
    backend.prepare_thread();
    for job in rx {
        let mut copies: Vec<Box<dyn Completion>> = Vec::with_capacity(job.regions.len());
        let mut error = None;
        for r in &job.regions {
            prefault(r.dst, r.len);
            // SAFETY: `swap_in` built these regions under `copy_async`'s contract: the slot
            // (destination) and the host copy (source) stay busy until the transfer finishes,
            // which waits for this job's completion, hence for every copy submitted here.
            match unsafe { backend.copy_async(CopyKind::HostToDevice, std::slice::from_ref(r)) } {
                Ok(c) => copies.push(c),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        *job.staged.done.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Arc::new(copies), error));
        job.staged.cv.notify_all();
    }
}

/// Appends `[src, src+len)` → `[dst, dst+len)` to `out` in pieces of at most `chunk` bytes.
fn push_chunked(out: &mut Vec<CopyRegion>, dst: u64, src: u64, len: usize, chunk: usize) {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk);
        out.push(CopyRegion {
            dst: dst + done as u64,
            src: src + done as u64,
            len: n,
        });
        done += n;
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn backend(&self) -> &dyn Backend {
        &**self.cache.backend()
    }

    /// Host tokens per buffer a copy of `tokens` tokens reserves room for.
    fn capacity_for(&self, tokens: usize) -> usize {
        let max = self.cache.geometry().max_tokens;
        (tokens + tokens / 4)
            .div_ceil(16)
            .saturating_mul(16)
            .clamp(tokens, max.max(tokens))
    }

    /// Extent bytes for `cap` tokens per buffer.
    fn extent_bytes(&self, cap: usize) -> usize {
        aligned(cap * self.cache.geometry().bytes_per_token())
    }

    /// Takes a host extent of `len` bytes: a free hole, else a new block within the budget, else
    /// room made by evicting cached copies. Fails without evicting anything when the free,
    /// unallocated and evictable bytes together fall short.
    fn alloc_extent(&self, st: &mut State, len: usize) -> Result<Extent> {
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

    fn evictable(c: &HostCopy) -> bool {
        !c.pinned && !c.busy && !c.sole && !c.doomed
    }

    /// Removes a copy that no transfer uses and frees its extent.
    fn drop_copy(&self, st: &mut State, id: u64) {
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

    fn tick(st: &mut State) -> u64 {
        st.clock += 1;
        st.clock
    }

    /// Waits for room under `max_in_flight` and takes it.
    fn enter(&self) {
        let mut st = self.lock();
        while st.in_flight >= self.config.max_in_flight {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.in_flight += 1;
    }

    /// Gives back room taken by [`Inner::enter`].
    fn leave(&self, st: &mut State) {
        st.in_flight -= 1;
        self.changed.notify_all();
    }

    /// The bookkeeping after a transfer's copy completed (`copied` is its outcome).
    fn finish(&self, t: &Transfer, copied: Result<()>) -> Result<()> {
        match (t.dir, &copied) {
            (Direction::Out, Ok(())) => self.cache.swap_out_commit(t.slot, t.fence.clone()),
            (Direction::In, Ok(())) => self.cache.swap_in_commit(t.slot, t.tokens),
            (_, Err(_)) => self.cache.swap_abort(t.slot),
        }
        let mut st = self.lock();
        let now = Self::tick(&mut st);
        let st = &mut *st;
        match (t.dir, &copied) {
            (Direction::Out, Ok(())) => {
                if st.by_slot.get(&t.slot) == Some(&t.copy) {
                    st.by_slot.remove(&t.slot);
                }
                if let Some(c) = st.copies.get_mut(&t.copy) {
                    if let Some((e, cap)) = t.relocate {
                        if let Some(old) = c.extent.replace(e) {
                            st.arena.free(old);
                        }
                        c.cap = cap;
                    }
                    c.tokens = t.tokens;
                    c.busy = false;
                    c.sole = true;
                    c.attached = None;
                    c.last_use = now;
                }
                let bpt = self.cache.geometry().bytes_per_token() as u64;
                st.stats.bytes_out += t.bytes;
                st.stats.reuse_saved_bytes += t.reused as u64 * bpt;
                st.stats.transfers += 1;
            }
            (Direction::Out, Err(_)) => {
                if let Some((e, _)) = t.relocate {
                    st.arena.free(e);
                }
                if t.created {
                    if let Some(c) = st.copies.get_mut(&t.copy) {
                        c.busy = false;
                    }
                    self.drop_copy(st, t.copy);
                } else if let Some(c) = st.copies.get_mut(&t.copy) {
                    c.busy = false;
                }
            }
            (Direction::In, Ok(())) => {
                if let Some(prev) = st.by_slot.insert(t.slot, t.copy) {
                    if prev != t.copy {
                        if let Some(p) = st.copies.get_mut(&prev) {
                            p.attached = None;
                        }
                    }
                }
                if let Some(c) = st.copies.get_mut(&t.copy) {
                    if let Some((old, _)) = c.attached {
                        if old != t.slot && st.by_slot.get(&old) == Some(&t.copy) {
                            st.by_slot.remove(&old);
                        }
                    }
                    c.attached = Some((t.slot, t.epoch));
                    c.busy = false;
                    c.sole = false;
                    c.last_use = now;
                }
                st.stats.bytes_in += t.bytes;
                st.stats.transfers += 1;
            }
            (Direction::In, Err(_)) => {
                if let Some(c) = st.copies.get_mut(&t.copy) {
                    c.busy = false;
                }
            }
        }
        if st.copies.get(&t.copy).is_some_and(|c| c.doomed) {
            self.drop_copy(st, t.copy);
        }
        self.leave(st);
        copied
    }
}

impl SwapEngine {
    /// Creates an engine for `cache`. Host memory is taken from the cache's backend as swaps
    /// need it, up to the budget.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a zero chunk size or in-flight limit, or when the completion
    /// thread cannot be started.
    pub fn new(cache: Arc<KvCache>, config: SwapConfig) -> Result<Self> {
        // Tiny chunks would describe a swap with one copy region per few bytes (memory use
        // proportional to the bytes moved); a huge in-flight limit would not bound anything.
        if config.chunk_bytes < MIN_CHUNK_BYTES
            || config.max_in_flight == 0
            || config.max_in_flight > 1 << 16
        {
            return Err(Error::InvalidConfig(format!(
                "swap chunk_bytes ({}) must be at least {MIN_CHUNK_BYTES} and max_in_flight ({}) within 1..=65536",
                config.chunk_bytes, config.max_in_flight
            )));
        }
        let inner = Arc::new(Inner {
            cache,
            config,
            state: Mutex::new(State {
                next_id: 1,
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        let (tx, rx) = crossbeam_channel::unbounded::<Arc<Transfer>>();
        let worker_inner = inner.clone();
        let worker = std::thread::Builder::new()
            .name("kvvm-swap".into())
            .spawn(move || {
                worker_inner.backend().prepare_thread();
                let inner = Some(worker_inner);
                for t in rx {
                    let _ = t.try_finish(&inner, true);
                }
            })
            .map_err(|e| Error::InvalidConfig(format!("cannot start the swap thread: {e}")))?;
        let mut engine = SwapEngine {
            inner,
            tx: Some(tx),
            worker: Some(worker),
            stage_tx: None,
            stager: None,
        };
        if engine.inner.backend().kind() == BackendKind::Host {
            let (stage_tx, stage_rx) = crossbeam_channel::unbounded::<StageJob>();
            let backend: Arc<dyn Backend> = engine.inner.cache.backend().clone();
            let stager = std::thread::Builder::new()
                .name("kvvm-swap-stage".into())
                .spawn(move || stage(backend, stage_rx))
                .map_err(|e| {
                    Error::InvalidConfig(format!("cannot start the swap staging thread: {e}"))
                })?;
            engine.stage_tx = Some(stage_tx);
            engine.stager = Some(stager);
        }
        Ok(engine)
    }

    /// The cache this engine swaps for.
    pub fn cache(&self) -> &Arc<KvCache> {
        &self.inner.cache
    }

    /// The configuration.
    pub fn config(&self) -> &SwapConfig {
        &self.inner.config
    }

    /// Hands a submitted transfer to the completion thread and wraps it in a ticket.
    fn launch(&self, transfer: Transfer) -> SwapTicket {
        let transfer = Arc::new(transfer);
        let immediate = transfer.completions.is_empty();
        let sent = !immediate
            && self
                .tx
                .as_ref()
                .is_some_and(|tx| tx.send(transfer.clone()).is_ok());
        if !sent {
            // Nothing to copy (or no completion thread): finish now.
            let _ = transfer.try_finish(&Some(self.inner.clone()), true);
        }
        SwapTicket {
            transfer,
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// Copies the slot's live KV to host (only the tokens the host copy lacks, if the slot was
    /// swapped in from a copy that is still valid), then unmaps its pages, returns them to the
    /// pool and frees the slot. The ticket names the host copy.
    ///
    /// The slot must not be used (written, grown, freed) after this call; once the ticket is
    /// complete it is free. Waits while [`SwapConfig::max_in_flight`] transfers are in flight.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a slot that is not allocated;
    /// [`Error::HostBudgetExhausted`] when the host copy does not fit even after evicting every
    /// evictable copy; a backend error when host memory cannot be allocated or the copy cannot
    /// be submitted. The slot and any host copy are then as they were. A copy that fails later
    /// is reported by the ticket, with the same guarantee.
    pub fn swap_out(&self, slot: SlotId) -> Result<SwapTicket> {
        self.swap_out_fenced(slot, None)
    }

    /// [`SwapEngine::swap_out`] ordered after the caller's `event` (a raw `CUevent`, e.g.
    /// torch's `event.cuda_event`, recorded after the kernels that write the slot's last
    /// tokens) instead of after the compute stream: the copies start once the event, as
    /// recorded at this call, has completed. The host backend ignores the event.
    ///
    /// # Errors
    /// As [`SwapEngine::swap_out`]; the driver's error for an invalid event.
    pub fn swap_out_after(&self, slot: SlotId, event: u64) -> Result<SwapTicket> {
        let fence = self.inner.backend().fence_after_event(event)?;
        self.swap_out_fenced(slot, Some(fence))
    }

    /// `fence`: `None` to record one on the cache's compute stream, else the fence to use.
    fn swap_out_fenced(
        &self,
        slot: SlotId,
        fence: Option<Option<Arc<dyn Fence>>>,
    ) -> Result<SwapTicket> {
        let inner = &*self.inner;
        // The copies wait for the caller's work queued before this call (see `docs/ordering.md`).
        let fence = fence.unwrap_or_else(|| inner.cache.fence_now());
        inner.enter();
        let (tokens, epoch) = match inner.cache.swap_out_begin(slot) {
            Ok(v) => v,
            Err(e) => {
                inner.leave(&mut inner.lock());
                return Err(e);
            }
        };
        match self.submit_out(slot, tokens, epoch, fence) {
            Ok(t) => Ok(self.launch(t)),
            Err(e) => {
                inner.cache.swap_abort(slot);
                inner.leave(&mut inner.lock());
                Err(e)
            }
        }
    }

    /// The part of [`SwapEngine::swap_out`] after the slot is busy. On error, everything the
    /// engine changed is undone (the caller releases the slot and the in-flight room).
    fn submit_out(
        &self,
        slot: SlotId,
        tokens: usize,
        epoch: u64,
        fence: Option<Arc<dyn Fence>>,
    ) -> Result<Transfer> {
        let inner = &*self.inner;
        let g = *inner.cache.geometry();
        let mut st = inner.lock();
        let now = Inner::tick(&mut st);
        // Reuse the copy this slot was swapped in from, if it still matches the slot.
        let reuse = st.by_slot.get(&slot).copied().filter(|id| {
            st.copies.get(id).is_some_and(|c| {
                c.attached == Some((slot, epoch)) && !c.busy && !c.doomed && c.tokens <= tokens
            })
        });
        let (id, created, from, relocate) = match reuse {
            Some(id) => {
                let c = st.copies.get_mut(&id).expect("checked above");
                c.busy = true;
                let (from, cap, old) = (c.tokens, c.cap, c.extent);
                let relocate = if tokens > cap {
                    let cap = inner.capacity_for(tokens);
                    match inner.alloc_extent(&mut st, inner.extent_bytes(cap)) {
                        Ok(e) => Some((e, cap, old)),
                        Err(e) => {
                            if let Some(c) = st.copies.get_mut(&id) {
                                c.busy = false;
                            }
                            return Err(e);
                        }
                    }
                } else {
                    None
                };
                (id, false, from, relocate)
            }
            None => {
                let cap = inner.capacity_for(tokens);
                let extent = if cap > 0 {
                    Some(inner.alloc_extent(&mut st, inner.extent_bytes(cap))?)
                } else {
                    None
                };
                let id = st.next_id;
                st.next_id += 1;
                st.copies.insert(
                    id,
                    HostCopy {
                        extent,
                        cap,
                        tokens: 0,
                        pinned: false,
                        priority: 0,
                        last_use: now,
                        busy: true,
                        sole: false,
                        attached: None,
                        doomed: false,
                    },
                );
                (id, true, 0, None)
            }
        };
        // Where the copy's tokens go: its own extent, or the larger one it moves to.
        let c = &st.copies[&id];
        let (dst_extent, dst_cap) = match relocate {
            Some((e, cap, _)) => (Some(e), cap),
            None => (c.extent, c.cap),
        };
        let old = relocate
            .and_then(|r| r.2)
            .map(|e| (st.arena.addr(&e), c.cap));
        let dst_base = dst_extent.map(|e| st.arena.addr(&e));
        drop(st);
        let undo = |st: &mut State| {
            if let Some((e, _, _)) = relocate {
                st.arena.free(e);
            }
            if created {
                if let Some(c) = st.copies.get_mut(&id) {
                    c.busy = false;
                }
                inner.drop_copy(st, id);
            } else if let Some(c) = st.copies.get_mut(&id) {
                c.busy = false;
            }
        };
        let tb = g.token_bytes;
        // A relocated copy first moves the tokens it holds, host to host.
        if let (Some((old_base, old_cap)), Some(base)) = (old, dst_base) {
            for b in 0..g.buffers {
                // SAFETY: both extents belong to copy `id`, which is marked busy: no transfer,
                // eviction or release touches them until this swap finishes. The old extent
                // holds `from` tokens per buffer at stride `old_cap`, the new one has room for
                // `dst_cap >= tokens >= from`; they are distinct extents, so they do not overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (old_base + (b * old_cap * tb) as u64) as usize as *const u8,
                        (base + (b * dst_cap * tb) as u64) as usize as *mut u8,
                        from * tb,
                    )
                };
            }
        }
        let mut regions = Vec::new();
        if let Some(base) = dst_base {
            let buffers = inner.cache.buffers();
            for (b, r) in buffers.iter().enumerate() {
                let src = r.addr + (slot.as_usize() * g.slot_bytes + from * tb) as u64;
                let dst = base + (b * dst_cap * tb + from * tb) as u64;
                push_chunked(
                    &mut regions,
                    dst,
                    src,
                    (tokens - from) * tb,
                    inner.config.chunk_bytes,
                );
            }
        }
        let bytes: u64 = regions.iter().map(|r| r.len as u64).sum();
        // SAFETY: the sources are the slot's first `tokens` tokens, mapped (a slot's tokens
        // always lie in mapped pages) and kept mapped because the slot is busy until this
        // transfer finishes; the destinations lie in copy `id`'s extent in the arena (host
        // buffers of this backend), which nothing else reads, writes or frees while the copy is
        // busy; destinations of distinct regions are disjoint.
        let completions = match submit_after(
            inner.backend(),
            CopyKind::DeviceToHost,
            &regions,
            fence.as_deref(),
        ) {
            Ok(c) => c,
            Err(e) => {
                undo(&mut inner.lock());
                return Err(e);
            }
        };
        Ok(Transfer {
            dir: Direction::Out,
            slot,
            copy: id,
            tokens,
            reused: from,
            created,
            relocate: relocate.map(|(e, cap, _)| (e, cap)),
            epoch,
            bytes,
            completions,
            fence,
            phase: Mutex::new(Phase::InFlight),
            done: Condvar::new(),
        })
    }

    /// Maps the pages `slot` needs for the copy's tokens and copies them back. The slot must be
    /// allocated and hold no tokens (e.g. from `cache.alloc_slot_for(n)`); it must not be used
    /// before the ticket completes. The copy stays valid afterwards (see the
    /// [module documentation](self) on KV reuse). Waits while the copy is in another transfer,
    /// and while [`SwapConfig::max_in_flight`] transfers are in flight.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown, released or evicted copy, or a slot that is not
    /// allocated or not empty; [`Error::Grow`] when the pages cannot be mapped; a backend error
    /// when the copy cannot be submitted. The slot and the copy are then as they were.
    pub fn swap_in(&self, copy: HostCopyId, slot: SlotId) -> Result<SwapTicket> {
        let inner = &*self.inner;
        inner.enter();
        let mut st = inner.lock();
        let (tokens, cap, base) = loop {
            match st.copies.get_mut(&copy.0) {
                Some(c) if !c.doomed && !c.busy => {
                    c.busy = true;
                    let (t, cap, e) = (c.tokens, c.cap, c.extent);
                    break (t, cap, e.map(|e| st.arena.addr(&e)));
                }
                Some(c) if !c.doomed => {
                    st = inner.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                _ => {
                    inner.leave(&mut st);
                    return Err(Error::InvalidArgument(format!(
                        "host copy {} does not exist (released or evicted)",
                        copy.0
                    )));
                }
            }
        };
        drop(st);
        let unbusy = |st: &mut State| {
            if let Some(c) = st.copies.get_mut(&copy.0) {
                c.busy = false;
            }
            inner.leave(st);
        };
        let epoch = match inner.cache.swap_in_begin(slot, tokens) {
            Ok(e) => e,
            Err(e) => {
                unbusy(&mut inner.lock());
                return Err(e);
            }
        };
        let g = inner.cache.geometry();
        let tb = g.token_bytes;
        let mut regions = Vec::new();
        if let Some(base) = base {
            for (b, r) in inner.cache.buffers().iter().enumerate() {
                push_chunked(
                    &mut regions,
                    r.addr + (slot.as_usize() * g.slot_bytes) as u64,
                    base + (b * cap * tb) as u64,
                    tokens * tb,
                    inner.config.chunk_bytes,
                );
            }
        }
        let bytes: u64 = regions.iter().map(|r| r.len as u64).sum();
        // On the host backend, pages mapped just now have no page-table entries yet: the staging
        // thread populates each chunk's destination before submitting it (overlapping with the
        // copy of the previous chunk) instead of the copy taking a fault per OS page.
        let staged = match (&self.stage_tx, regions.is_empty()) {
            (Some(tx), false) => {
                let staged = Arc::new(Staged::default());
                let job = StageJob {
                    staged: staged.clone(),
                    regions: regions.clone(),
                };
                tx.send(job).ok().map(|()| staged)
            }
            _ => None,
        };
        let completions: Vec<Box<dyn Completion>> = match staged {
            Some(staged) => vec![Box::new(StagedCompletion(staged))],
            // SAFETY: the destinations are the slot's first `tokens` tokens, whose pages
            // `swap_in_begin` mapped; the slot stays busy (nobody else maps, unmaps or uses it)
            // until this transfer finishes. The sources lie in the copy's extent, which stays
            // allocated and unwritten while the copy is busy. Destinations are disjoint.
            None => match submit(inner.backend(), CopyKind::HostToDevice, &regions) {
                Ok(c) => c,
                Err(e) => {
                    inner.cache.swap_abort(slot);
                    unbusy(&mut inner.lock());
                    return Err(e);
                }
            },
        };
        Ok(self.launch(Transfer {
            dir: Direction::In,
            slot,
            copy: copy.0,
            tokens,
            reused: 0,
            created: false,
            relocate: None,
            epoch,
            bytes,
            completions,
            fence: None,
            phase: Mutex::new(Phase::InFlight),
            done: Condvar::new(),
        }))
    }

    fn with_copy<T>(&self, copy: HostCopyId, f: impl FnOnce(&mut HostCopy) -> T) -> Result<T> {
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
        self.with_copy(copy, |c| c.pinned = pinned)
    }

    /// Sets a copy's eviction priority: lower priorities are evicted first, least recently used
    /// first within a priority. New copies have priority 0.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown, released or evicted copy.
    pub fn set_priority(&self, copy: HostCopyId, priority: u8) -> Result<()> {
        self.with_copy(copy, |c| c.priority = priority)
    }

    /// Tokens a host copy holds (those of completed transfers).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown, released or evicted copy.
    pub fn host_tokens(&self, copy: HostCopyId) -> Result<usize> {
        self.with_copy(copy, |c| c.tokens)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SwapStats {
        let st = self.inner.lock();
        SwapStats {
            host_bytes_used: st.arena.used(),
            host_budget_bytes: self.inner.config.host_budget_bytes,
            copies_live: st.copies.values().filter(|c| !c.doomed).count() as u64,
            in_flight: st.in_flight as u64,
            ..st.stats
        }
    }

    /// Bytes of host memory the arena holds from the backend (blocks, used or not).
    pub fn host_bytes_reserved(&self) -> u64 {
        self.inner.lock().arena.reserved()
    }

    /// Waits until no transfer is in flight (each finished, successfully or not).
    pub fn quiesce(&self) {
        let mut st = self.inner.lock();
        while st.in_flight > 0 {
            st = self
                .inner
                .changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for SwapEngine {
    fn drop(&mut self) {
        // Closing the channels lets the staging thread submit every queued swap-in and the
        // completion thread finish every queued transfer, and both exit.
        self.stage_tx.take();
        if let Some(h) = self.stager.take() {
            let _ = h.join();
        }
        self.tx.take();
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
        self.quiesce();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        st.copies.clear();
        st.by_slot.clear();
        let backend = self.cache.backend().clone();
        st.arena.release_all(&*backend);
    }
}

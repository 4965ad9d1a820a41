//! [`SwapEngine`]: asynchronous, coarse KV swapping between device and host memory.

mod arena;
mod copies;
mod staging;
mod ticket;

use copies::HostCopy;
use staging::{push_chunked, stage, submit, StageJob, Staged, StagedCompletion};
pub use ticket::SwapTicket;
use ticket::{Direction, Phase, Release, Transfer};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use arena::Arena;

use crate::cache::{KvCache, SlotId};
use crate::error::{Error, Result};
use crate::fork::ForkGuard;
use crate::vmm::{Backend, BackendKind, Completion, CopyKind, CopyRegion, Fence};
use crate::worker::Worker;

/// Host copy ids, unique in the process (never 0).
static NEXT_COPY_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

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
    /// A completed swap-out leaves the slot's pages mapped to the freed slot, as
    /// [`KvCache::free_slot`] does, instead of unmapping them while the copy runs and returning
    /// them to the pool. A later swap-in into that slot ([`KvCache::alloc_slot_for`] prefers a
    /// slot with pages) then maps and populates nothing: it is a copy alone. The pages are not
    /// lost to others: reclamation takes them back (unmapping them then) when the pool runs
    /// short. Use it when device memory is plentiful (offloading finished turns of a chat); leave
    /// it off to preempt, where the pages are wanted at once. Default `false`; changed later by
    /// [`SwapEngine::set_keep_pages`].
    pub keep_pages: bool,
}

impl Default for SwapConfig {
    fn default() -> Self {
        SwapConfig {
            host_budget_bytes: 8 << 30,
            chunk_bytes: 4 << 20,
            max_in_flight: 16,
            keep_pages: false,
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
    /// Nanoseconds spent mapping pages for swap-ins (summed over transfers).
    pub map_ns: u64,
    /// Nanoseconds spent populating the page tables of swap-in destinations (host backend).
    pub populate_ns: u64,
    /// Nanoseconds from each transfer's submission until its copies were seen complete, summed
    /// over transfers (transfers run concurrently, and with pipelining this overlaps the page
    /// management, so it can exceed the wall time).
    pub copy_ns: u64,
    /// Nanoseconds spent unmapping swapped-out pages and returning them to the pool.
    pub unmap_ns: u64,
}

/// The per-phase timers behind [`SwapStats`]'s `*_ns` fields.
#[derive(Debug, Default)]
struct Timers {
    map_ns: AtomicU64,
    populate_ns: AtomicU64,
    copy_ns: AtomicU64,
    unmap_ns: AtomicU64,
}

impl Timers {
    fn add(counter: &AtomicU64, since: Instant) {
        let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        counter.fetch_add(ns, Ordering::Relaxed);
    }
}

/// SwapEngine: asynchronous, coarse-grained KV swapping between device memory and pinned host
/// memory (the FastSwitch design).
///
/// A serving engine preempts a request by swapping its slot out to host memory and resumes it
/// later by swapping it into any empty slot:
///
/// ```
/// use std::sync::Arc;
/// use kvvm::{CacheConfig, KvCache, Layout};
/// use kvvm::{SwapConfig, SwapEngine};
/// use kvvm::vmm::{BackendChoice, BackendConfig};
///
/// let mut config = CacheConfig::for_model("llama-3-8b", 4, 1024, 64 << 20)?;
/// config.layers = 2; // keep the doctest small
/// config.layout = Layout::Interleaved;
/// config.backend = BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() };
/// let cache = Arc::new(KvCache::new(config)?);
/// let swap = SwapEngine::new(cache.clone(), SwapConfig { host_budget_bytes: 64 << 20, ..Default::default() })?;
///
/// // A request with 300 tokens of KV (prefill writes it through the layer views).
/// let slot = cache.alloc_slot()?;
/// cache.ensure(slot, 300)?;
///
/// // Preempt: copy its KV to host. The slot's pages are unmapped and the slot freed only once
/// // the copy has completed; meanwhile other slots keep decoding.
/// let ticket = swap.swap_out(slot)?;
/// let copy = ticket.copy();
/// ticket.wait()?;
/// assert!(!cache.is_allocated(slot));
/// assert_eq!(swap.host_tokens(copy)?, 300);
///
/// // Resume into any empty slot. On CUDA the compute stream may instead wait on
/// // `ticket.event()` with `cuStreamWaitEvent`.
/// let slot = cache.alloc_slot_for(300)?;
/// let ticket = swap.swap_in(copy, slot)?;
/// ticket.wait()?;
/// assert_eq!(cache.tokens(slot)?, 300);
///
/// // Decode 20 more tokens, then preempt again: the host copy still holds the first 300
/// // tokens (KV of past tokens never changes), so only the 20 new ones are copied.
/// cache.ensure(slot, 320)?;
/// let ticket = swap.swap_out(slot)?;
/// assert_eq!(ticket.copy(), copy);
/// assert_eq!(ticket.bytes(), 20 * cache.geometry().bytes_per_token() as u64);
/// ticket.wait()?;
/// swap.release(copy)?; // the request finished while swapped out
/// # Ok::<(), kvvm::Error>(())
/// ```
///
/// # Transfers
///
/// A swap copies a slot's tokens in as few, as large transfers as the layout permits: the
/// interleaved layout keeps a slot's tokens in one contiguous range, the per-layer layout in one
/// range per buffer (2 × layers). Ranges are cut into [`SwapConfig::chunk_bytes`] pieces only so
/// that the backend can pipeline them (worker threads on the host backend, copy streams on CUDA).
/// Up to [`SwapConfig::max_in_flight`] transfers run at once; a swap never holds the cache's lock
/// while copying: the slot is marked busy instead, so `step` on other slots goes on. On the host
/// backend a swap-in first fills in the page tables of the pages it just mapped, chunk by chunk
/// ahead of the copy, rather than taking a page fault per OS page inside the copy.
///
/// Ordering with the caller's compute: copies run on the backend's own streams (CUDA) or threads
/// (host). Before `swap_out`, the kernels that wrote the slot's KV must have completed (on CUDA,
/// synchronize the compute stream or an event recorded on it); after `swap_in`, the slot may be
/// read once the ticket is complete, or, on CUDA, by work that a stream orders after
/// [`SwapTicket::event`] with `cuStreamWaitEvent`.
///
/// Page management is pipelined with the copies. A swap-out submits one copy per chunk and, as
/// the chunks complete in order (and after its fence), unmaps the pages wholly under the
/// completed chunks while later chunks still copy; a page that a chunk boundary cuts is unmapped
/// only once both chunks are done. When the last chunk completes, the rest is unmapped, every
/// page returns to the pool and the slot is freed; until then the slot stays allocated and busy.
/// If a later chunk fails, the pages released early are mapped back (their contents survive
/// unmapping), so the slot is as it was. On the host backend a swap-in maps each chunk's pages
/// on the staging thread just before populating and copying that chunk (the first chunk's in
/// `swap_in` itself); elsewhere `swap_in` maps every page before submitting. A swap-in gives
/// the slot its tokens when its last copy completes.
/// The finishing work runs in whichever comes first of [`SwapTicket::poll`] / [`SwapTicket::wait`]
/// and the engine's completion thread, so a caller that never polls leaks nothing; dropping the
/// engine waits for every transfer in flight and finishes it.
///
/// # Failures
///
/// A copy that fails (at submission or at completion) or pages that cannot be mapped leave the
/// slot as it was (still allocated, every token intact; after a failed swap-in, still empty) and
/// the host copy as it was; the error is returned by `swap_out` / `swap_in` (submission) or by the
/// ticket (completion; on the host backend also a swap-in whose later chunks' pages cannot be
/// mapped, and after a failed swap-in the slot may hold some of those pages, without tokens).
/// A swap-out whose later chunk fails after early-released pages went maps them back (shared
/// prefix pages read-only, as they were); if that keeps failing, it copies the unfinished chunks
/// again from their still-mapped pages and succeeds instead, alternating the two with a growing
/// delay until one works, so no token is ever lost. A successful swap-out whose last unmap
/// fails maps the released pages back (the buffer then stays mapped to the free slot, where
/// reclamation finds it); if that fails too, the slot stays allocated and busy — its tokens are
/// on the host and the ticket has completed — until the cache's unmapper thread has released
/// the pages, retrying every 1 to 128 ms.
///
/// # Host memory and KV reuse
///
/// Host copies live in an arena of large blocks obtained from the backend (page-locked on CUDA)
/// within [`SwapConfig::host_budget_bytes`], carved by a first-fit extent allocator. A copy's
/// extent holds, per buffer, room for a *capacity* of tokens: the copied tokens plus a quarter
/// (rounded up to 16 tokens, at most `max_tokens`), so that a conversation that is swapped in,
/// decodes a little and is swapped out again appends its new tokens in place. When it has grown
/// past the capacity, the copy is relocated: a larger extent is taken, the old tokens are copied
/// host-to-host (no device traffic) and the old extent is returned once the transfer succeeded.
///
/// After a swap-in completes, the host copy stays valid and tied to the slot; the next swap-out of
/// that slot copies only the tokens added since, provided the slot was neither freed nor shrunk in
/// between. Such copies (the device holds their tokens too) are a cache: when the budget runs
/// short they are evicted, lowest [`SwapEngine::set_priority`] first and least recently used
/// within a priority, unless [`SwapEngine::pin`]ned. A copy written by a swap-out is the only
/// place its request's KV lives and is never evicted; it goes away with [`SwapEngine::release`]
/// (or becomes evictable once swapped in again). When the free, unallocated and evictable bytes
/// together fall short, the swap fails with [`Error::HostBudgetExhausted`] before evicting
/// anything; when they suffice in total but no hole is large enough even after evicting every
/// evictable copy (fragmentation), it fails the same way, having evicted only cached copies. In
/// both cases the slot and every copy a swap-out wrote are as they were.
#[derive(Debug)]
pub struct SwapEngine {
    inner: Arc<Inner>,
    /// Hands transfers to the completion thread; dropped first at teardown.
    tx: Option<crossbeam_channel::Sender<Arc<Transfer>>>,
    worker: Option<Worker>,
    /// Host backend: hands swap-ins to the staging thread (see [`Staged`]).
    stage_tx: Option<crossbeam_channel::Sender<StageJob>>,
    stager: Option<Worker>,
}

#[derive(Debug, Default)]
struct State {
    arena: Arena,
    copies: HashMap<u64, HostCopy>,
    /// Slot → the copy attached to it.
    by_slot: HashMap<SlotId, u64>,
    clock: u64,
    in_flight: usize,
    stats: SwapStats,
}

#[derive(Debug)]
struct Inner {
    cache: Arc<KvCache>,
    /// The process the engine belongs to (see [`crate::fork`]).
    fork: ForkGuard,
    config: SwapConfig,
    state: Mutex<State>,
    /// Signalled when a transfer finishes (in-flight room, copies no longer busy).
    changed: Condvar,
    timers: Timers,
    /// [`SwapEngine::set_keep_pages`].
    keep_pages: std::sync::atomic::AtomicBool,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn backend(&self) -> &dyn Backend {
        &**self.cache.backend()
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

    /// A swap-out whose copy failed after its first chunks' pages were unmapped (`released`
    /// per buffer): maps them back (then returns `false`: the swap-out failed, the slot is as it
    /// was), or, when that keeps failing, copies `unfinished` again, from pages that are still
    /// mapped, and returns `true` once that succeeded (every token is then on the host and the
    /// swap-out can commit). Alternates the two, waiting longer each round (up to 128 ms), until
    /// one works: the slot's tokens are either in its pages or on the host, never lost.
    fn recover_out(&self, t: &Transfer, released: &mut [usize], unfinished: &[CopyRegion]) -> bool {
        let mut round = 0u32;
        loop {
            match self.cache.swap_out_restore(t.slot, released) {
                Ok(()) => return false,
                Err(e) => tracing::error!(
                    "slot {}: mapping released pages back after a failed swap-out failed: {e}; copying the rest again",
                    t.slot
                ),
            }
            // SAFETY: as in `swap_out_fenced`: the sources are chunks of the slot's tokens in
            // pages that are still mapped (a chunk's pages are unmapped only after it and every
            // chunk before it completed; these did not), and the slot stays busy; the
            // destinations lie in the transfer's extent, still busy. The swap-out's fence
            // passed (pages were released behind it). The copy is waited for below.
            let again = unsafe {
                self.backend()
                    .copy_async(CopyKind::DeviceToHost, unfinished)
            };
            match again.and_then(|c| c.wait()) {
                Ok(()) => return true,
                Err(e) => tracing::error!(
                    "slot {}: copying a failed swap-out's rest again failed: {e}",
                    t.slot
                ),
            }
            round += 1;
            std::thread::sleep(std::time::Duration::from_millis(1 << round.min(7)));
        }
    }

    /// The bookkeeping after a transfer's copy completed (`copied` is its outcome).
    fn finish(&self, t: &Transfer, mut copied: Result<()>) -> Result<()> {
        let (mut released, unfinished) = t.stop_release();
        if copied.is_err() && t.dir == Direction::Out && released.iter().any(|&n| n > 0) {
            // A later chunk failed after the first ones' pages went: put the slot back as it
            // was, or else (mapping back keeps failing) finish the swap-out by copying again
            // what the failed chunks did not (their pages are all still mapped).
            if self.recover_out(t, &mut released, &unfinished) {
                copied = Ok(());
            }
        }
        match (t.dir, &copied) {
            (Direction::Out, Ok(())) if t.keep_pages => {
                self.cache.swap_out_keep(t.slot, t.fence.clone());
            }
            (Direction::Out, Ok(())) => {
                let t0 = Instant::now();
                self.cache
                    .swap_out_commit(t.slot, t.fence.clone(), &released);
                Timers::add(&self.timers.unmap_ns, t0);
            }
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
    /// [`Error::InvalidConfig`] for a zero chunk size or in-flight limit;
    /// [`Error::ThreadSpawn`] when the completion or staging thread cannot be started.
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
            fork: ForkGuard::new(),
            config,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            timers: Timers::default(),
            keep_pages: config.keep_pages.into(),
        });
        let (tx, rx) = crossbeam_channel::unbounded::<Arc<Transfer>>();
        let worker_inner = inner.clone();
        let worker = Worker::spawn("kvvm-swap", move || {
            worker_inner.backend().prepare_thread();
            let inner = Some(worker_inner);
            for t in rx {
                let _ = t.try_finish(&inner, true);
            }
        })?;
        let mut engine = SwapEngine {
            inner,
            tx: Some(tx),
            worker: Some(worker),
            stage_tx: None,
            stager: None,
        };
        if engine.inner.backend().kind() == BackendKind::Host {
            let (stage_tx, stage_rx) = crossbeam_channel::unbounded::<StageJob>();
            let stage_inner = engine.inner.clone();
            let stager = Worker::spawn("kvvm-swap-stage", move || stage(stage_inner, stage_rx))?;
            engine.stage_tx = Some(stage_tx);
            engine.stager = Some(stager);
        }
        Ok(engine)
    }

    /// Allocates host memory (pinned on CUDA) for host copies now, up to `bytes` and within the
    /// host budget, in blocks of at least 64 MiB, so that later swaps do not allocate it
    /// (`cuMemHostAlloc` costs milliseconds per GiB). The allocation runs outside the engine's
    /// lock; swaps may go on meanwhile. Returns the bytes the engine now holds.
    ///
    /// # Errors
    /// A backend error when host memory cannot be allocated; what was allocated before it stays.
    pub fn reserve_host(&self, bytes: u64) -> Result<u64> {
        let inner = &*self.inner;
        let budget = inner.config.host_budget_bytes;
        let want = bytes.min(budget);
        loop {
            let held = inner.lock().arena.reserved();
            if held >= want {
                return Ok(held);
            }
            let len = (want - held).clamp(arena::MIN_BLOCK as u64, 1 << 30);
            let len = usize::try_from(len.min(budget - held)).unwrap_or(usize::MAX);
            let len = len / arena::ALIGN * arena::ALIGN;
            if len == 0 {
                return Ok(held);
            }
            let buf = inner.backend().alloc_host(len)?;
            let mut st = inner.lock();
            if st.arena.reserved() + len as u64 > budget {
                // A swap grew the arena meanwhile: give this block back.
                drop(st);
                if let Err((_, e)) = inner.backend().free_host(buf) {
                    tracing::warn!("freeing a surplus host block failed: {e}");
                }
                return Ok(inner.lock().arena.reserved());
            }
            st.arena.add_block(buf);
        }
    }

    /// The cache this engine swaps for.
    pub fn cache(&self) -> &Arc<KvCache> {
        &self.inner.cache
    }

    /// The configuration it was created with (see [`SwapEngine::keep_pages`] for the current
    /// page policy).
    pub fn config(&self) -> &SwapConfig {
        &self.inner.config
    }

    /// Sets [`SwapConfig::keep_pages`] for the swap-outs submitted from now on.
    ///
    /// # Examples
    /// ```
    /// # use std::sync::Arc;
    /// # use kvvm::{CacheConfig, KvCache, SwapConfig, SwapEngine};
    /// # use kvvm::vmm::{BackendChoice, BackendConfig};
    /// # let host = BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() };
    /// # let cache = Arc::new(KvCache::new(CacheConfig::new(2, 2, 64).with_max_slots(4).with_max_tokens(1024)
    /// #     .with_budget_bytes(16 << 20).with_backend(host))?);
    /// let swap = SwapEngine::new(cache.clone(), SwapConfig { host_budget_bytes: 16 << 20, ..Default::default() })?;
    /// let a = cache.alloc_slot_for(300)?;
    /// cache.ensure(a, 300)?;
    /// swap.set_keep_pages(true);
    /// let t = swap.swap_out(a)?;
    /// t.wait()?;
    /// // The slot is free and still has its pages: swapping back into it maps nothing.
    /// assert!(!cache.is_allocated(a));
    /// assert!(cache.capacity(a)? >= 300);
    /// let b = cache.alloc_slot_for(300)?;
    /// assert_eq!(a, b);
    /// swap.swap_in(t.copy(), b)?.wait()?;
    /// assert_eq!(cache.tokens(b)?, 300);
    /// # Ok::<(), kvvm::Error>(())
    /// ```
    pub fn set_keep_pages(&self, keep: bool) {
        self.inner.keep_pages.store(keep, Ordering::Relaxed);
    }

    /// Whether swap-outs submitted now keep the slot's pages mapped
    /// ([`SwapConfig::keep_pages`]).
    pub fn keep_pages(&self) -> bool {
        self.inner.keep_pages.load(Ordering::Relaxed)
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
            fork: ForkGuard::new(),
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
    ///
    /// # Examples
    /// ```
    /// # use std::sync::Arc;
    /// # use kvvm::{CacheConfig, KvCache, SwapConfig, SwapEngine};
    /// # use kvvm::vmm::{BackendChoice, BackendConfig};
    /// # let host = BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() };
    /// # let cache = Arc::new(KvCache::new(CacheConfig::new(2, 2, 64).with_max_slots(4).with_max_tokens(1024)
    /// #     .with_budget_bytes(16 << 20).with_backend(host))?);
    /// # let swap = SwapEngine::new(cache.clone(), SwapConfig { host_budget_bytes: 16 << 20, ..Default::default() })?;
    /// let s = cache.alloc_slot()?;
    /// cache.ensure(s, 300)?;
    /// let out = swap.swap_out(s)?; // returns at once; the copy runs in the background
    /// out.wait()?; // or poll(); or, on CUDA, make a stream wait on out.event()
    /// assert!(!cache.is_allocated(s)); // the slot's pages went back to the pool
    /// assert_eq!(swap.host_tokens(out.copy())?, 300);
    /// # Ok::<(), kvvm::Error>(())
    /// ```
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
        self.inner.fork.check("swap engine")?;
        let fence = self.inner.backend().fence_after_event(event)?;
        self.swap_out_fenced(slot, Some(fence))
    }

    /// `fence`: `None` to record one on the cache's compute stream, else the fence to use.
    fn swap_out_fenced(
        &self,
        slot: SlotId,
        fence: Option<Option<Arc<dyn Fence>>>,
    ) -> Result<SwapTicket> {
        self.inner.fork.check("swap engine")?;
        let inner = &*self.inner;
        // The copies wait for the caller's work queued before this call (`docs/ordering.md`).
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
                // Unique in the process, so that an engine never takes another's id for one of
                // its own copies.
                let id = NEXT_COPY_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        // Per region: its buffer and where it ends, from the slot's start in that buffer.
        let mut marks = Vec::new();
        if let Some(base) = dst_base {
            let buffers = inner.cache.buffers();
            for (b, r) in buffers.iter().enumerate() {
                let start = r.addr + (slot.as_usize() * g.slot_bytes) as u64;
                let src = start + (from * tb) as u64;
                let dst = base + (b * dst_cap * tb + from * tb) as u64;
                let first = regions.len();
                push_chunked(
                    &mut regions,
                    dst,
                    src,
                    (tokens - from) * tb,
                    inner.config.chunk_bytes,
                );
                marks.extend(
                    regions[first..]
                        .iter()
                        .map(|c| (b, (c.src - start) as usize + c.len)),
                );
            }
        }
        let bytes: u64 = regions.iter().map(|r| r.len as u64).sum();
        let submitted = Instant::now();
        // One copy per chunk, so that each chunk's pages can be unmapped as soon as its copy
        // completes while later chunks still copy (`Transfer::advance`).
        let mut completions: Vec<Box<dyn Completion>> = Vec::with_capacity(regions.len());
        for r in &regions {
            // SAFETY: the sources are the slot's first `tokens` tokens, mapped (a slot's tokens
            // always lie in mapped pages) and kept mapped until this chunk's copy completed:
            // the slot is busy until this transfer finishes, and `Transfer::advance` unmaps a
            // page only once every copy reading it completed. The destinations lie in copy
            // `id`'s extent in the arena (host buffers of this backend), which nothing else
            // reads, writes or frees while the copy is busy; destinations of distinct regions
            // are disjoint.
            match unsafe {
                inner.backend().copy_async_after(
                    CopyKind::DeviceToHost,
                    std::slice::from_ref(r),
                    fence.as_deref(),
                )
            } {
                Ok(c) => completions.push(c),
                Err(e) => {
                    // The chunks already submitted read the slot and write the extent: they
                    // must be done before the extent can be freed.
                    let _ = ticket::wait_all(&completions);
                    undo(&mut inner.lock());
                    return Err(e);
                }
            }
        }
        let keep = inner.keep_pages.load(Ordering::Relaxed);
        let release = (!keep && !completions.is_empty()).then(|| {
            Mutex::new(Release {
                marks,
                regions: regions.clone(),
                next: 0,
                released: vec![0; g.buffers],
                stopped: false,
            })
        });
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
            release,
            keep_pages: keep,
            submitted,
            phase: Mutex::new(Phase::InFlight),
            done: Condvar::new(),
        })
    }

    /// Maps the pages `slot` needs for the copy's tokens and copies them back. The slot must be
    /// allocated and hold no tokens (e.g. from `cache.alloc_slot_for(n)`); it must not be used
    /// before the ticket completes. The copy stays valid afterwards (see the
    /// [type documentation](SwapEngine) on KV reuse). Waits while the copy is in another transfer,
    /// and while [`SwapConfig::max_in_flight`] transfers are in flight.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown, released or evicted copy, or a slot that is not
    /// allocated or not empty; [`Error::Grow`] when the pages cannot be mapped (on the host
    /// backend, pages beyond the first chunk's are mapped later and such an error reaches the
    /// ticket); a backend error
    /// when the copy cannot be submitted. The slot and the copy are then as they were.
    ///
    /// # Examples
    /// ```
    /// # use std::sync::Arc;
    /// # use kvvm::{CacheConfig, KvCache, SwapConfig, SwapEngine};
    /// # use kvvm::vmm::{BackendChoice, BackendConfig};
    /// # let host = BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() };
    /// # let cache = Arc::new(KvCache::new(CacheConfig::new(2, 2, 64).with_max_slots(4).with_max_tokens(1024)
    /// #     .with_budget_bytes(16 << 20).with_backend(host))?);
    /// # let swap = SwapEngine::new(cache.clone(), SwapConfig { host_budget_bytes: 16 << 20, ..Default::default() })?;
    /// let s = cache.alloc_slot()?;
    /// cache.ensure(s, 300)?;
    /// let copy = { let t = swap.swap_out(s)?; t.wait()?; t.copy() };
    /// let into = cache.alloc_slot_for(300)?; // any empty slot
    /// swap.swap_in(copy, into)?.wait()?;
    /// assert_eq!(cache.tokens(into)?, 300);
    /// # Ok::<(), kvvm::Error>(())
    /// ```
    pub fn swap_in(&self, copy: HostCopyId, slot: SlotId) -> Result<SwapTicket> {
        self.inner.fork.check("swap engine")?;
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
        let submitted = Instant::now();
        // On the host backend the staging thread maps each chunk's pages just before copying
        // it (overlapping the copy of the previous chunk); elsewhere every page is mapped here.
        let defer = self.stage_tx.is_some() && base.is_some() && tokens > 0;
        let t0 = Instant::now();
        let (epoch, mut pending) = match inner.cache.swap_in_begin_with(slot, tokens, defer) {
            Ok(v) => v,
            Err(e) => {
                unbusy(&mut inner.lock());
                return Err(e);
            }
        };
        Timers::add(&inner.timers.map_ns, t0);
        let g = inner.cache.geometry();
        let tb = g.token_bytes;
        let mut regions = Vec::new();
        // Per region: its buffer and where it ends, from the slot's start in that buffer.
        let mut marks = Vec::new();
        if let Some(base) = base {
            for (b, r) in inner.cache.buffers().iter().enumerate() {
                let start = r.addr + (slot.as_usize() * g.slot_bytes) as u64;
                let first = regions.len();
                push_chunked(
                    &mut regions,
                    start,
                    base + (b * cap * tb) as u64,
                    tokens * tb,
                    inner.config.chunk_bytes,
                );
                marks.extend(
                    regions[first..]
                        .iter()
                        .map(|c| (b, (c.dst - start) as usize + c.len)),
                );
            }
        }
        let bytes: u64 = regions.iter().map(|r| r.len as u64).sum();
        // The first chunk's pages are mapped here, so that a slot that cannot be mapped at all
        // fails the call rather than the ticket.
        if let (Some(p), Some(&(b, end))) = (pending.as_mut(), marks.first()) {
            let t0 = Instant::now();
            let r = inner.cache.swap_in_map(p, b, end.div_ceil(g.page_size));
            Timers::add(&inner.timers.map_ns, t0);
            if let Err(e) = r {
                if let Some(p) = pending.take() {
                    inner.cache.swap_in_unused(p);
                }
                inner.cache.swap_abort(slot);
                unbusy(&mut inner.lock());
                return Err(e);
            }
        }
        // On the host backend, pages mapped just now have no page-table entries yet: the staging
        // thread populates each chunk's destination before submitting it (overlapping with the
        // copy of the previous chunk) instead of the copy taking a fault per OS page.
        let staged = match (&self.stage_tx, regions.is_empty()) {
            (Some(tx), false) => {
                let staged = Arc::new(Staged::default());
                let job = StageJob {
                    staged: staged.clone(),
                    regions: regions.clone(),
                    marks,
                    populate: pending.is_some(),
                    pages: pending.take(),
                };
                match tx.send(job) {
                    Ok(()) => Some(staged),
                    Err(crossbeam_channel::SendError(job)) => {
                        // No staging thread (not reached while the engine lives): map the rest
                        // here and copy directly.
                        pending = job.pages;
                        None
                    }
                }
            }
            _ => None,
        };
        if let Some(mut p) = pending.take() {
            let mapped = inner.cache.swap_in_map_all(&mut p);
            inner.cache.swap_in_unused(p);
            if let Err(e) = mapped {
                inner.cache.swap_abort(slot);
                unbusy(&mut inner.lock());
                return Err(e);
            }
        }
        let completions: Vec<Box<dyn Completion>> = match staged {
            Some(staged) => vec![Box::new(StagedCompletion(staged))],
            // SAFETY: the destinations are the slot's first `tokens` tokens, whose pages
            // `swap_in_begin_with` (or the mapping just above) mapped; the slot stays busy
            // (nobody else maps, unmaps or uses it) until this transfer finishes. The sources
            // lie in the copy's extent, which stays allocated and unwritten while the copy is
            // busy. Destinations are disjoint.
            None => match submit(inner.backend(), CopyKind::HostToDevice, &regions, None) {
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
            release: None,
            keep_pages: false,
            submitted,
            phase: Mutex::new(Phase::InFlight),
            done: Condvar::new(),
        }))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SwapStats {
        let st = self.inner.lock();
        SwapStats {
            host_bytes_used: st.arena.used(),
            host_budget_bytes: self.inner.config.host_budget_bytes,
            copies_live: st.copies.values().filter(|c| !c.doomed).count() as u64,
            in_flight: st.in_flight as u64,
            map_ns: self.inner.timers.map_ns.load(Ordering::Relaxed),
            populate_ns: self.inner.timers.populate_ns.load(Ordering::Relaxed),
            copy_ns: self.inner.timers.copy_ns.load(Ordering::Relaxed),
            unmap_ns: self.inner.timers.unmap_ns.load(Ordering::Relaxed),
            ..st.stats
        }
    }

    /// Bytes of host memory the arena holds from the backend (blocks, used or not).
    pub fn host_bytes_reserved(&self) -> u64 {
        self.inner.lock().arena.reserved()
    }

    /// Waits until no transfer is in flight (each finished, successfully or not).
    pub fn quiesce(&self) {
        if self.inner.fork.inherited() {
            return;
        }
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
        if self.inner.fork.inherited() {
            // The threads and the transfers stayed in the parent process.
            return;
        }
        // Closing the channels lets the staging thread submit every queued swap-in and the
        // completion thread finish every queued transfer, and both exit.
        self.stage_tx.take();
        if let Some(mut w) = self.stager.take() {
            w.join();
        }
        self.tx.take();
        if let Some(mut w) = self.worker.take() {
            w.join();
        }
        self.quiesce();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.fork.inherited() {
            return;
        }
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        st.copies.clear();
        st.by_slot.clear();
        let backend = self.cache.backend().clone();
        st.arena.release_all(&*backend);
    }
}

//! [`KvCache`]: contiguous virtual KV tensors with physical pages mapped on demand.

mod config;
mod grow;
mod hooks;
mod mapper;
mod prefix;
mod reclaim;
mod sharing;
mod slot;
mod space;
mod stats;
mod unmapper;
mod view;

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

pub use config::{
    CacheConfig, DType, Geometry, Layout, ModelShape, MAX_LAYERS, MAX_PAGE_LISTS, MAX_SLOTS,
    MAX_VIRTUAL_BYTES, PRESETS,
};
use grow::{attach, MapFailure, Work};
pub(crate) use hooks::PendingPages;
pub use prefix::{page_key, prefix_keys, PrefixStats};
pub use sharing::PrefixHit;
use slot::Slot;
pub use slot::SlotId;
pub use space::AddressSpace;
use space::{KeptRanges, SpaceCell};
pub use stats::CacheStats;
use unmapper::{AfterUnmap, UnmapQueue};
pub use view::{ByteRange, Device, Kv, TensorView};

use crate::error::{Error, Result};
use crate::fork::ForkGuard;
use crate::pool::{PagePool, PoolConfig};
use crate::vmm::{Backend, BackendOp, Fence, MeteredBackend, VaRange};
use crate::worker::Worker;

#[derive(Debug, Default)]
struct State {
    slots: Vec<Slot>,
    shutdown: bool,
    /// The mapper has new hints to look at.
    mapper_wake: bool,
    /// The mapper holds pages or busy slots.
    mapper_active: bool,
    /// The mapper waits on its condition variable (a wake-up needs a notification).
    mapper_sleeping: bool,
    /// Decode-step cadence, so that the mapper can wake itself before slots run short.
    clock: StepClock,
    mapper_batches: u64,
    mapper_notified: u64,
    mapper_pages: u64,
    reclaimed_pages: u64,
    /// Published pages (see `sharing.rs`).
    prefix: prefix::PrefixIndex,
    deferred_unmaps: u64,
    deferred_unmap_wait_ns: u64,
    deferred_unmap_max_wait_ns: u64,
    fence_waits: u64,
}

/// The cadence of growth calls, measured by `commit_tokens`.
#[derive(Debug, Default)]
struct StepClock {
    /// When the last growth committed.
    last: Option<std::time::Instant>,
    /// Moving average of the time between growth calls, in nanoseconds (0: unknown).
    interval_ns: u64,
    /// Growth calls committed so far.
    steps: u64,
    /// `steps` at the last `quiesce`: the mapper does not wake itself again before a growth
    /// call after it, so that a quiesced cache stays still.
    fence: u64,
}

impl StepClock {
    fn tick(&mut self) {
        let now = std::time::Instant::now();
        if let Some(last) = self.last {
            let dt = u64::try_from((now - last).as_nanos()).unwrap_or(u64::MAX);
            self.interval_ns = if self.interval_ns == 0 {
                dt
            } else {
                (self.interval_ns.saturating_mul(7) / 8).saturating_add(dt / 8)
            };
        }
        self.last = Some(now);
        self.steps += 1;
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    geometry: Geometry,
    device: Device,
    backend: Arc<MeteredBackend>,
    pool: PagePool,
    buffers: Vec<VaRange>,
    lookahead: usize,
    state: Mutex<State>,
    /// Signalled when a slot stops being busy.
    changed: Condvar,
    /// Wakes the background mapper.
    mapper_cv: Condvar,
    /// The caller's compute stream (see [`CacheConfig::compute_stream`]).
    stream: Mutex<Option<u64>>,
    /// Unmaps waiting for their fence (see [`unmapper`]).
    unmaps: Mutex<UnmapQueue>,
    /// Wakes the unmapper.
    unmaps_cv: Condvar,
    /// The process the cache belongs to (see [`crate::fork`]).
    fork: ForkGuard,
    /// Shared with every [`AddressSpace`] handed out: what outlives the cache for them.
    space: Arc<SpaceCell>,
}

/// `KvCache`: contiguous virtual KV tensors with physical pages mapped on demand (vAttention).
///
/// Every slot (one request) owns a contiguous, page-aligned region in every buffer of the cache.
/// Pages are mapped behind a slot only as its tokens need them, from a [`PagePool`] under a byte
/// budget, so an attention kernel reads a slot's KV at fixed strides without a block table.
///
/// # A decode loop
///
/// ```
/// use kvvm::{CacheConfig, KvCache, Kv, Layout};
/// use kvvm::vmm::{BackendChoice, BackendConfig};
///
/// let mut config = CacheConfig::for_model("llama-3-8b", 4, 1024, 64 << 20)?;
/// config.layers = 2; // keep the doctest small
/// config.layout = Layout::Interleaved;
/// config.backend = BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() };
/// let cache = KvCache::new(config)?;
///
/// // Admit two requests and prefill their prompts.
/// let a = cache.alloc_slot()?;
/// let b = cache.alloc_slot()?;
/// cache.ensure(a, 100)?;
/// cache.ensure(b, 37)?;
/// let (mut la, mut lb) = (100, 37);
/// // Decode: one token per request per step; the kernels read layer l's K/V through
/// // `cache.layer_view(l, Kv::K)` at the slot's row.
/// for _ in 0..50 {
///     la += 1;
///     lb += 1;
///     cache.step(&[(a, la), (b, lb)])?;
///     let k0 = cache.layer_view(0, Kv::K)?;
///     let _row = k0.row_addr(a.as_usize(), la - 1, 0); // where the new token's K goes
/// }
/// assert_eq!(cache.tokens(a)?, 150);
/// cache.free_slot(b)?; // its pages stay mapped for the next request (deferred reclamation)
/// let c = cache.alloc_slot_for(40)?;
/// assert_eq!(c, b); // reuses the slot whose pages are already mapped
/// # Ok::<(), kvvm::Error>(())
/// ```
///
/// # Concurrency
///
/// [`KvCache`] is `Send + Sync` and every method takes `&self`. Calls on different slots run
/// concurrently: backend calls happen outside the cache's lock. Calls that change the same slot's
/// mappings (`ensure`, `step`, `shrink`, `free_slot`, and the background mapper) are serialized
/// per slot. Views and statistics may be read at any time. After every interleaving of these
/// calls, every allocated slot's live tokens lie in mapped pages
/// (`tokens(slot) <= capacity(slot)`).
#[derive(Debug)]
pub struct KvCache {
    shared: Arc<Shared>,
    mapper: Option<Worker>,
    unmapper: Option<Worker>,
}

impl KvCache {
    /// Opens the backend `config.backend` asks for and creates a cache on it.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an impossible configuration; the backend's errors.
    ///
    /// # Examples
    /// ```
    /// use kvvm::{CacheConfig, DType, KvCache};
    /// use kvvm::vmm::{BackendChoice, BackendConfig};
    ///
    /// let config = CacheConfig::new(2, 2, 64) // layers, KV heads, head dim
    ///     .with_dtype(DType::F32)
    ///     .with_max_slots(4)
    ///     .with_max_tokens(1024)
    ///     .with_budget_bytes(16 << 20)
    ///     .with_backend(BackendConfig { choice: BackendChoice::Host, ..Default::default() });
    /// let cache = KvCache::new(config)?;
    /// assert_eq!(cache.geometry().max_slots, 4);
    /// # Ok::<(), kvvm::Error>(())
    /// ```
    pub fn new(config: CacheConfig) -> Result<Self> {
        let backend = crate::vmm::open(&config.backend)?;
        Self::with_backend(config, backend)
    }

    /// Creates a cache on an existing backend (`config.backend` is ignored).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an impossible configuration; the backend's errors when
    /// reserving address space or creating pages up front.
    pub fn with_backend(config: CacheConfig, backend: Arc<dyn Backend>) -> Result<Self> {
        let geometry = Geometry::new(&config, backend.granularity())?;
        let info = backend.info();
        // Before anything is reserved or created: the host must be able to back the budget, and
        // every buffer is one reservation (at least one mapping) of the process's map count.
        crate::vmm::host::check_budget(
            info.usable_memory,
            geometry.page_size,
            config.budget_bytes,
        )?;
        if let Some(max) = info.max_map_count {
            if geometry.buffers > max {
                return Err(Error::InvalidConfig(format!(
                    "{} buffers need at least as many mappings, more than the process may hold \
                     ({max}, vm.max_map_count); use the interleaved layout",
                    geometry.buffers
                )));
            }
        }
        let metered = Arc::new(MeteredBackend::new(backend));
        let mut buffers = Vec::with_capacity(geometry.buffers);
        for _ in 0..geometry.buffers {
            match metered.reserve(geometry.buffer_bytes()) {
                Ok(r) => buffers.push(r),
                Err(e) => {
                    for r in buffers {
                        let _ = metered.free_reservation(r);
                    }
                    return Err(e);
                }
            }
        }
        let pool_config = PoolConfig {
            create_all: config.create_all_pages,
            low_watermark: 2 * geometry.buffers,
            // Free pages above this go back to the system (see `CacheConfig::max_free_pages`;
            // by default the budget, already checked against usable memory, bounds them).
            high_watermark: config.max_free_pages.unwrap_or(usize::MAX),
            ..PoolConfig::with_budget(geometry.page_size, config.budget_bytes)
        };
        let pool = match PagePool::new(metered.clone(), pool_config) {
            Ok(p) => p,
            Err(e) => {
                for r in buffers {
                    let _ = metered.free_reservation(r);
                }
                return Err(e);
            }
        };
        let slots = (0..geometry.max_slots)
            .map(|_| Slot {
                pages: (0..geometry.buffers).map(|_| Vec::new()).collect(),
                ..Slot::default()
            })
            .collect();
        let shared = Arc::new(Shared {
            geometry,
            device: Device {
                kind: info.kind,
                ordinal: info.device_ordinal,
            },
            backend: metered,
            pool,
            buffers,
            lookahead: config.lookahead_steps,
            state: Mutex::new(State {
                slots,
                ..State::default()
            }),
            changed: Condvar::new(),
            mapper_cv: Condvar::new(),
            stream: Mutex::new(config.compute_stream),
            unmaps: Mutex::new(UnmapQueue::default()),
            unmaps_cv: Condvar::new(),
            fork: ForkGuard::new(),
            space: Arc::new(SpaceCell::default()),
        });
        let mut cache = KvCache {
            shared,
            mapper: None,
            unmapper: None,
        };
        if config.lookahead_steps > 0 {
            let s = cache.shared.clone();
            cache.mapper = Some(Worker::spawn("kvvm-mapper", move || mapper::run(s))?);
        }
        // Backends with fences (CUDA) defer unmaps behind the caller's work; on every backend
        // the unmapper finishes releasing a swap-out's pages that the swap could not.
        let s = cache.shared.clone();
        cache.unmapper = Some(Worker::spawn("kvvm-unmapper", move || unmapper::run(s))?);
        Ok(cache)
    }

    /// Sets the caller's compute stream (a raw `CUstream`, e.g. torch's `stream.cuda_stream`;
    /// 0 is the legacy default stream), after whose queued work kvvm orders its swap-out copies
    /// and its unmaps; `None` falls back to the legacy default stream. See `docs/ordering.md`.
    /// The host backend has no streams and ignores it.
    pub fn set_compute_stream(&self, stream: Option<u64>) {
        *self.shared.stream.lock().unwrap_or_else(|p| p.into_inner()) = stream;
    }

    /// The compute stream set by [`KvCache::set_compute_stream`] or the configuration.
    pub fn compute_stream(&self) -> Option<u64> {
        *self.shared.stream.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fence after the work queued so far on the compute stream (`None` on the host backend).
    pub(crate) fn fence_now(&self) -> Option<Arc<dyn Fence>> {
        self.shared.fence_now()
    }

    /// A handle that keeps the cache's reserved ranges, and the pages mapped in them when the
    /// cache is dropped, valid until the handle's last clone is dropped, without keeping the
    /// cache's threads, free pages or files: what an exported tensor holds (see
    /// [`AddressSpace`]).
    ///
    /// # Examples
    /// ```
    /// # use kvvm::{CacheConfig, KvCache};
    /// # use kvvm::vmm::{BackendChoice, BackendConfig};
    /// # let cache = KvCache::new(CacheConfig::new(1, 1, 16).with_max_slots(2).with_max_tokens(64)
    /// #     .with_budget_bytes(1 << 20)
    /// #     .with_backend(BackendConfig { choice: BackendChoice::Host, host_granularity: 4096, ..Default::default() }))?;
    /// let space = cache.address_space();
    /// drop(cache);
    /// drop(space); // the ranges are freed here
    /// # Ok::<(), kvvm::Error>(())
    /// ```
    pub fn address_space(&self) -> AddressSpace {
        AddressSpace(self.shared.space.clone())
    }

    /// The derived sizes.
    pub fn geometry(&self) -> &Geometry {
        &self.shared.geometry
    }

    /// The backend the cache maps its pages through, wrapped in the meter whose counters are
    /// part of [`KvCache::stats`].
    ///
    /// Use it to allocate host buffers ([`Backend::alloc_host`]) and copy between them and the
    /// cache's rows ([`Backend::copy_async`]) on the cache's own device, as a stamping or
    /// prefetching tool does. Mapping or unmapping through it behind the cache's back breaks the
    /// cache's invariants.
    pub fn backend(&self) -> &Arc<MeteredBackend> {
        &self.shared.backend
    }

    /// The reserved range of every buffer.
    pub(crate) fn buffers(&self) -> &[VaRange] {
        &self.shared.buffers
    }

    /// Allocates a free slot, preferring the one with the most pages already mapped.
    ///
    /// # Errors
    /// [`Error::SlotsExhausted`] when every slot is allocated.
    pub fn alloc_slot(&self) -> Result<SlotId> {
        self.alloc_slot_for(self.shared.geometry.max_tokens)
    }

    /// Allocates a free slot for a request expected to need `tokens` tokens: the free slot with
    /// the most pages mapped up to what `tokens` needs (ties go to the slot with fewer pages, so
    /// that large mapped slots stay for large requests). Slots that map shared read-only pages
    /// come last; such a slot gives its pages up before it is handed out.
    ///
    /// # Errors
    /// [`Error::SlotsExhausted`] when every slot is allocated; a backend error if a slot's
    /// shared pages cannot be unmapped (then no slot was allocated).
    ///
    /// # Examples
    /// ```
    /// # use kvvm::{CacheConfig, KvCache, Kv, SlotId};
    /// # use kvvm::vmm::{BackendChoice, BackendConfig};
    /// # let host = BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() };
    /// # let cache = KvCache::new(CacheConfig::new(2, 2, 64).with_max_slots(4).with_max_tokens(1024)
    /// #     .with_budget_bytes(16 << 20).with_backend(host))?;
    /// let a = cache.alloc_slot_for(300)?;
    /// cache.ensure(a, 300)?;
    /// cache.free_slot(a)?; // its pages stay mapped
    /// let b = cache.alloc_slot_for(200)?; // prefers the slot that still has pages
    /// assert_eq!(a, b);
    /// assert!(cache.capacity(b)? >= 200);
    /// # Ok::<(), kvvm::Error>(())
    /// ```
    pub fn alloc_slot_for(&self, tokens: usize) -> Result<SlotId> {
        self.shared.fork.check("cache")?;
        let want = self
            .shared
            .geometry
            .pages_for(tokens.min(self.shared.geometry.max_tokens));
        let mut st = self.shared.lock();
        let best = st
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.allocated)
            .max_by_key(|(i, s)| {
                let m = s.mapped();
                // A slot whose first pages are shared read-only must give them up first.
                (
                    s.ro == 0,
                    m.min(want),
                    std::cmp::Reverse(m),
                    std::cmp::Reverse(*i),
                )
            })
            .map(|(i, _)| i);
        let i = best.ok_or(Error::SlotsExhausted {
            max_slots: self.shared.geometry.max_slots,
        })?;
        let s = &mut st.slots[i];
        s.allocated = true;
        s.tokens = 0;
        s.ahead = 0;
        s.epoch += 1;
        if s.ro > 0 {
            // Its first page would be written by the new request: let go of every page (the
            // list has no holes), dropping the references to the shared ones. Reclamation may
            // be taking pages from it right now: wait for that first.
            while st.slots[i].busy {
                st = self
                    .shared
                    .changed
                    .wait(st)
                    .unwrap_or_else(|p| p.into_inner());
            }
            let s = &mut st.slots[i];
            if s.ro > 0 {
                s.busy = true;
                s.shrinking = true;
                let tails = s.tails(0);
                let fence = s.fence.take();
                drop(st);
                // The previous occupant's kernels may still read these pages.
                self.shared.wait_fence(fence.as_deref(), i);
                let r = self.shared.unmap_tails(i, 0, &tails);
                let mut st = self.shared.lock();
                let s = &mut st.slots[i];
                s.busy = false;
                s.shrinking = false;
                if let Err(e) = r {
                    s.allocated = false;
                    drop(st);
                    self.shared.changed.notify_all();
                    return Err(e);
                }
                drop(st);
                self.shared.changed.notify_all();
            }
        }
        Ok(SlotId::new(i as u32))
    }

    /// Frees a slot. Its pages stay mapped (deferred reclamation): a later request can reuse them,
    /// and they are taken back only when the pool runs short.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the slot is out of range or not allocated.
    ///
    /// # Examples
    /// ```
    /// # use kvvm::{CacheConfig, KvCache, Kv, SlotId};
    /// # use kvvm::vmm::{BackendChoice, BackendConfig};
    /// # let host = BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() };
    /// # let cache = KvCache::new(CacheConfig::new(2, 2, 64).with_max_slots(4).with_max_tokens(1024)
    /// #     .with_budget_bytes(16 << 20).with_backend(host))?;
    /// let s = cache.alloc_slot()?;
    /// cache.free_slot(s)?;
    /// assert!(!cache.is_allocated(s));
    /// assert!(matches!(cache.free_slot(s), Err(kvvm::Error::SlotNotAllocated { .. })));
    /// # Ok::<(), kvvm::Error>(())
    /// ```
    pub fn free_slot(&self, slot: SlotId) -> Result<()> {
        self.shared.fork.check("cache")?;
        let sh = &*self.shared;
        // The caller's kernels queued so far may still read the slot: its pages are reclaimed
        // only after this fence (see `docs/ordering.md`).
        let fence = sh.fence_now();
        let (mut st, i) = sh.wait_idle(sh.lock(), slot)?;
        let s = &mut st.slots[i];
        s.allocated = false;
        s.tokens = 0;
        s.ahead = 0;
        if fence.is_some() {
            s.fence = fence;
        }
        Ok(())
    }

    /// Makes sure `slot` can hold `tokens` tokens, mapping what is missing. All or nothing.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad slot or `tokens > max_tokens`; [`Error::Grow`] naming
    /// the slot and the missing pages when the budget or the backend cannot supply them. On error
    /// nothing changed.
    ///
    /// # Examples
    /// ```
    /// # use kvvm::{CacheConfig, KvCache, Kv, SlotId};
    /// # use kvvm::vmm::{BackendChoice, BackendConfig};
    /// # let host = BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() };
    /// # let cache = KvCache::new(CacheConfig::new(2, 2, 64).with_max_slots(4).with_max_tokens(1024)
    /// #     .with_budget_bytes(16 << 20).with_backend(host))?;
    /// let s = cache.alloc_slot()?;
    /// cache.ensure(s, 100)?; // prefill
    /// assert_eq!(cache.tokens(s)?, 100);
    /// assert!(cache.ensure(s, 5000).is_err()); // beyond max_tokens: nothing changed
    /// assert_eq!(cache.tokens(s)?, 100);
    /// # Ok::<(), kvvm::Error>(())
    /// ```
    pub fn ensure(&self, slot: SlotId, tokens: usize) -> Result<()> {
        self.step(&[(slot, tokens)])
    }

    /// [`KvCache::ensure`] for a batch: every `(slot, tokens)` pair, all or nothing. In steady
    /// state the background mapper has mapped the pages ahead, and `step` makes no backend call.
    ///
    /// # Errors
    /// As [`KvCache::ensure`]; the error names the first slot that could not be served. On error
    /// no slot changed.
    ///
    /// # Examples
    /// ```
    /// # use kvvm::{CacheConfig, KvCache, Kv, SlotId};
    /// # use kvvm::vmm::{BackendChoice, BackendConfig};
    /// # let host = BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() };
    /// # let cache = KvCache::new(CacheConfig::new(2, 2, 64).with_max_slots(4).with_max_tokens(1024)
    /// #     .with_budget_bytes(16 << 20).with_backend(host))?;
    /// let (a, b) = (cache.alloc_slot()?, cache.alloc_slot()?);
    /// cache.step(&[(a, 10), (b, 20)])?;
    /// for t in 11..50 {
    ///     cache.step(&[(a, t), (b, t + 10)])?; // one decode step: one token each
    /// }
    /// assert_eq!((cache.tokens(a)?, cache.tokens(b)?), (49, 59));
    /// # Ok::<(), kvvm::Error>(())
    /// ```
    pub fn step(&self, batch: &[(SlotId, usize)]) -> Result<()> {
        self.shared.fork.check("cache")?;
        self.shared.grow(batch)
    }

    /// Cuts `slot` to `tokens` tokens and unmaps the pages beyond them. Pages that a `step` in
    /// flight on another thread has promised to this slot stay mapped (the step then commits
    /// its tokens into them); reclamation takes them back later if they are not used.
    ///
    /// Shrinking into the slot's read-only (shared) pages drops the slot's references to the
    /// pages beyond `tokens` and nothing else; it must end on a page boundary there, since the
    /// next token would be written into a read-only page.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad slot, or for `tokens` inside a read-only page (see
    /// [`KvCache::read_only_tokens`]) but not on its boundary (nothing changed); a backend error
    /// if unmapping fails, in which case the slot holds `min(tokens, current)` tokens and the
    /// pages that could not be unmapped stay mapped to it (nothing leaks).
    ///
    /// # Examples
    /// ```
    /// # use kvvm::{CacheConfig, KvCache, Kv, SlotId};
    /// # use kvvm::vmm::{BackendChoice, BackendConfig};
    /// # let host = BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() };
    /// # let cache = KvCache::new(CacheConfig::new(2, 2, 64).with_max_slots(4).with_max_tokens(1024)
    /// #     .with_budget_bytes(16 << 20).with_backend(host))?;
    /// let s = cache.alloc_slot()?;
    /// cache.ensure(s, 900)?;
    /// cache.shrink(s, 10)?; // e.g. a rejected speculative draft, or a cut conversation
    /// assert_eq!(cache.tokens(s)?, 10);
    /// assert!(cache.capacity(s)? < 900);
    /// # Ok::<(), kvvm::Error>(())
    /// ```
    pub fn shrink(&self, slot: SlotId, tokens: usize) -> Result<()> {
        self.shared.fork.check("cache")?;
        let sh = &*self.shared;
        // Kernels queued so far may still read the pages beyond `tokens`: they are unmapped
        // after this fence, by the unmapper if it has not completed yet (`docs/ordering.md`).
        let fence = sh.fence_now();
        let (mut st, i) = sh.wait_idle(sh.lock(), slot)?;
        // Beyond max_tokens nothing is mapped anyway (and `pages_for` must not overflow).
        let tokens = tokens.min(sh.geometry.max_tokens);
        let s = &mut st.slots[i];
        if s.ro > 0 {
            let tpp = sh.tokens_per_page()?;
            if tokens < s.ro * tpp && tokens % tpp != 0 {
                return Err(Error::InvalidArgument(format!(
                    "slot {slot}: cannot shrink to {tokens} tokens, inside read-only page {} \
                     (tokens {}..{} are shared); shrink to {} or to at least {}",
                    tokens / tpp,
                    tokens / tpp * tpp,
                    (tokens / tpp + 1) * tpp,
                    tokens / tpp * tpp,
                    s.ro * tpp
                )));
            }
        }
        // A growth call in flight on a batch naming this slot may have found its pages present
        // and promised them (see `Slot::pending`): they stay, or the call would commit tokens
        // to pages this shrink unmapped. Reclamation takes them once the promise is over.
        let keep = sh.geometry.pages_for(tokens.max(s.pending));
        if tokens < s.tokens {
            s.epoch += 1;
        }
        s.tokens = s.tokens.min(tokens);
        s.ahead = 0;
        if s.pages.iter().all(|p| p.len() <= keep) {
            return Ok(());
        }
        s.busy = true;
        s.shrinking = true;
        let tails = s.tails(keep);
        if fence.is_some() {
            s.fence.clone_from(&fence);
        }
        drop(st);
        if let Some(fence) = fence.filter(|f| !f.poll().unwrap_or(true)) {
            sh.defer_unmap(i, keep, tails, fence, AfterUnmap::Finish);
            return Ok(());
        }
        let r = sh.unmap_tails(i, keep, &tails);
        sh.finish(&[i]);
        r.map(|_| ())
    }

    /// Takes every page back from every free slot, and the pages allocated slots have mapped
    /// ahead of their tokens (for example before handing memory to another user of the device).
    /// Returns how many pages went back to the pool.
    ///
    /// # Errors
    /// A backend error if unmapping fails; the pages concerned stay mapped.
    pub fn reclaim_free_slots(&self) -> Result<usize> {
        self.shared.fork.check("cache")?;
        self.shared.reclaim(usize::MAX)
    }

    /// Live tokens of an allocated slot.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad slot.
    pub fn tokens(&self, slot: SlotId) -> Result<usize> {
        self.shared.fork.check("cache")?;
        let st = self.shared.lock();
        let i = self.shared.check_slot(&st, slot)?;
        Ok(st.slots[i].tokens)
    }

    /// Tokens the slot's mapped pages can hold now (at least [`KvCache::tokens`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a slot out of range.
    pub fn capacity(&self, slot: SlotId) -> Result<usize> {
        self.shared.fork.check("cache")?;
        let st = self.shared.lock();
        let s = st.slots.get(slot.as_usize()).ok_or(Error::SlotOutOfRange {
            slot,
            max_slots: self.shared.geometry.max_slots,
        })?;
        Ok(self.shared.geometry.tokens_in(s.mapped()))
    }

    /// Whether a slot is allocated.
    pub fn is_allocated(&self, slot: SlotId) -> bool {
        if self.shared.fork.inherited() {
            return false;
        }
        let st = self.shared.lock();
        st.slots.get(slot.as_usize()).is_some_and(|s| s.allocated)
    }

    /// The view of layer `layer`'s K or V for the whole batch.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `layer` is out of range.
    pub fn layer_view(&self, layer: usize, kv: Kv) -> Result<TensorView> {
        let g = &self.shared.geometry;
        if layer >= g.layers {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} out of range (the model has {})",
                g.layers
            )));
        }
        let (b, off) = g.locate(layer, kv.is_v());
        let e = g.dtype.size();
        Ok(TensorView {
            addr: self.shared.buffers[b].addr + off as u64,
            shape: [g.max_slots, g.max_tokens, g.kv_heads, g.head_dim],
            strides: [g.slot_bytes / e, g.token_bytes / e, g.head_dim, 1],
            dtype: g.dtype,
            device: self.shared.device,
        })
    }

    /// The byte ranges that hold the first `tokens` tokens of `slot`: one per buffer (interleaved:
    /// one in all). This is what the swap engine copies.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a slot out of range or `tokens > max_tokens`.
    pub fn slot_ranges(&self, slot: SlotId, tokens: usize) -> Result<Vec<ByteRange>> {
        let g = &self.shared.geometry;
        if slot.as_usize() >= g.max_slots {
            return Err(Error::SlotOutOfRange {
                slot,
                max_slots: g.max_slots,
            });
        }
        if tokens > g.max_tokens {
            return Err(Error::InvalidArgument(format!(
                "{tokens} tokens exceed max_tokens {}",
                g.max_tokens
            )));
        }
        Ok(self
            .shared
            .buffers
            .iter()
            .map(|b| ByteRange {
                addr: b.addr + (slot.as_usize() * g.slot_bytes) as u64,
                len: tokens * g.token_bytes,
            })
            .collect())
    }

    /// Address and length of the `[kv_heads, head_dim]` row of `token` in `layer`'s K or V of
    /// `slot`, checking that the slot is allocated and the token is one of its live tokens (pages
    /// beyond the live tokens may be reclaimed by any other call at any time).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if anything is out of range, the slot is free, or the token is
    /// not below [`KvCache::tokens`].
    ///
    /// # Examples
    /// ```
    /// # use kvvm::{CacheConfig, KvCache, Kv, SlotId};
    /// # use kvvm::vmm::{BackendChoice, BackendConfig};
    /// # let host = BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() };
    /// # let cache = KvCache::new(CacheConfig::new(2, 2, 64).with_max_slots(4).with_max_tokens(1024)
    /// #     .with_budget_bytes(16 << 20).with_backend(host))?;
    /// let s = cache.alloc_slot()?;
    /// cache.ensure(s, 8)?;
    /// let r = cache.row(s, 7, 1, Kv::V)?; // 2 heads × 64 elements of f16
    /// assert_eq!(r.len, 2 * 64 * 2);
    /// assert!(matches!(cache.row(s, 8, 1, Kv::V), Err(kvvm::Error::TokenNotLive { .. })));
    /// # Ok::<(), kvvm::Error>(())
    /// ```
    pub fn row(&self, slot: SlotId, token: usize, layer: usize, kv: Kv) -> Result<ByteRange> {
        let live = self.tokens(slot)?;
        if token >= live {
            return Err(Error::TokenNotLive { slot, token, live });
        }
        let v = self.layer_view(layer, kv)?;
        Ok(ByteRange {
            addr: v.row_addr(slot.as_usize(), token, 0),
            len: self.shared.geometry.row_bytes(),
        })
    }

    /// A snapshot of the statistics.
    ///
    /// # Examples
    /// ```
    /// # use kvvm::{CacheConfig, KvCache, Kv, SlotId};
    /// # use kvvm::vmm::{BackendChoice, BackendConfig};
    /// # let host = BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() };
    /// # let cache = KvCache::new(CacheConfig::new(2, 2, 64).with_max_slots(4).with_max_tokens(1024)
    /// #     .with_budget_bytes(16 << 20).with_backend(host))?;
    /// let s = cache.alloc_slot()?;
    /// cache.ensure(s, 100)?;
    /// let st = cache.stats();
    /// assert_eq!(st.allocated_slots, 1);
    /// assert!(st.mapped_bytes >= st.live_bytes && st.live_bytes > 0);
    /// # Ok::<(), kvvm::Error>(())
    /// ```
    pub fn stats(&self) -> CacheStats {
        if self.shared.fork.inherited() {
            return CacheStats::default();
        }
        let sh = &*self.shared;
        let g = &sh.geometry;
        let st = sh.lock();
        let mut stats = CacheStats {
            pages_per_slot: st.slots.iter().map(Slot::mapped).collect(),
            mapped_bytes: st
                .slots
                .iter()
                .map(|s| (s.total_pages() * g.page_size) as u64)
                .sum(),
            live_bytes: st
                .slots
                .iter()
                .filter(|s| s.allocated)
                .map(|s| (s.tokens * g.bytes_per_token()) as u64)
                .sum(),
            allocated_slots: st.slots.iter().filter(|s| s.allocated).count(),
            mapper_batches: st.mapper_batches,
            mapper_notified: st.mapper_notified,
            mapper_pages: st.mapper_pages,
            reclaimed_pages: st.reclaimed_pages,
            prefix: st.prefix.stats,
            deferred_unmaps: st.deferred_unmaps,
            deferred_unmap_wait_ns: st.deferred_unmap_wait_ns,
            deferred_unmap_max_wait_ns: st.deferred_unmap_max_wait_ns,
            fence_waits: st.fence_waits,
            ..CacheStats::default()
        };
        // Only read-only pages can be mapped behind several slots: count each once.
        let mut seen = std::collections::HashSet::new();
        let mut dup = 0u64;
        for s in &st.slots {
            for b in &s.pages {
                for p in b.iter().take(s.ro) {
                    if !seen.insert(p.raw()) {
                        dup += 1;
                    }
                }
            }
        }
        stats.distinct_mapped_bytes = stats.mapped_bytes - dup * g.page_size as u64;
        stats.prefix.cached_pages = st.prefix.entries.len();
        stats.prefix.reclaimable_pages = reclaim::cached_reclaimable(&st);
        drop(st);
        stats.pool = sh.pool.stats();
        stats.free_pool_pages = stats.pool.free;
        stats.backend_calls = BackendOp::ALL
            .iter()
            .map(|&o| (o.name(), sh.backend.op(o)))
            .collect();
        stats.foreground_calls = sh.backend.foreground_calls();
        stats
    }

    /// Waits until the background mapper has nothing left to do, and keeps it from waking
    /// itself until the next growth call (for tests and benchmarks that inspect the mappings).
    pub fn quiesce(&self) {
        if self.shared.fork.inherited() {
            return;
        }
        let sh = &*self.shared;
        let mut st = sh.lock();
        while st.mapper_wake || st.mapper_active || st.slots.iter().any(|s| s.busy) {
            st = sh.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.clock.fence = st.clock.steps;
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        if self.shared.fork.inherited() {
            // The mapper thread stayed in the parent (its handle is forgotten, not joined), and
            // the lock may have been held by one of the parent's threads at the fork.
            return;
        }
        self.shared.lock().shutdown = true;
        self.shared.mapper_cv.notify_all();
        if let Some(mut w) = self.mapper.take() {
            w.join();
        }
        // The unmapper finishes every queued unmap (waiting for its fence) before it exits.
        self.shared.unmap_queue().shutdown = true;
        self.shared.unmaps_cv.notify_all();
        if let Some(mut w) = self.unmapper.take() {
            w.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no one is changing `slot`'s mappings, re-checking after every wait that it
    /// is still allocated; returns the lock and the slot's index.
    fn wait_idle<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        slot: SlotId,
    ) -> Result<(MutexGuard<'a, State>, usize)> {
        let mut i = self.check_slot(&st, slot)?;
        while st.slots[i].busy {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            i = self.check_slot(&st, slot)?;
        }
        Ok((st, i))
    }

    fn check_slot(&self, st: &State, slot: SlotId) -> Result<usize> {
        match st.slots.get(slot.as_usize()) {
            Some(s) if s.allocated => Ok(slot.as_usize()),
            Some(_) => Err(Error::SlotNotAllocated { slot }),
            None => Err(Error::SlotOutOfRange {
                slot,
                max_slots: st.slots.len(),
            }),
        }
    }

    fn va(&self, buffer: usize, slot: usize, page: usize) -> u64 {
        self.buffers[buffer].addr
            + (slot * self.geometry.slot_bytes + page * self.geometry.page_size) as u64
    }

    /// Clears the busy flag of `slots` and wakes waiters.
    fn finish(&self, slots: &[usize]) {
        let mut st = self.lock();
        for &i in slots {
            st.slots[i].busy = false;
            st.slots[i].shrinking = false;
        }
        drop(st);
        self.changed.notify_all();
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if self.fork.inherited() {
            // The pages are the parent's (shared memfd pages): a child forgets them.
            return;
        }
        let slots = std::mem::take(
            &mut self
                .state
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .slots,
        );
        let cached = self
            .state
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .prefix
            .drain();
        if Arc::strong_count(&self.space) > 1 {
            self.hand_over(slots, cached);
            return;
        }
        self.unmap_all(slots);
        self.pool.give_back(cached);
        for r in std::mem::take(&mut self.buffers) {
            if let Err(e) = self.backend.free_reservation(r) {
                tracing::warn!("freeing a reservation at drop failed: {e}");
            }
        }
    }
}

impl Shared {
    /// Unmaps every slot's pages (after the caller's queued work) and gives them back.
    fn unmap_all(&self, slots: Vec<Slot>) {
        for pages in self.unmap_slots(slots) {
            self.pool.give_back(pages);
        }
    }

    /// The drop of a cache whose [`AddressSpace`] is still held: the reserved ranges and the
    /// pages mapped in them go to the address spaces ([`Backend::detach`]); the rest (free and
    /// cached pages, the pool, the backend) goes as at any drop.
    fn hand_over(&mut self, slots: Vec<Slot>, cached: Vec<crate::vmm::PageHandle>) {
        // A page mapped in a slot and also kept by the prefix index must have its last
        // reference in the slot, so that it is taken out of the pool rather than freed.
        self.pool.give_back(cached);
        let mapped: Vec<_> = slots
            .iter()
            .flat_map(|s| s.pages.iter().flatten())
            .map(|p| crate::vmm::PageHandle::from_raw(p.raw(), p.size()))
            .collect();
        let pages = self.pool.take_out(mapped);
        let ranges = std::mem::take(&mut self.buffers);
        let kept: Box<dyn crate::vmm::Detached> = match self.backend.detach(ranges, pages) {
            Ok(d) => d,
            Err((ranges, pages)) => {
                tracing::debug!(
                    "the backend cannot hand its ranges over: unmapping them, keeping them reserved"
                );
                self.buffers = ranges;
                // The pages left the pool: they are released after the unmap, not through it
                // (the slots' handles are copies of them).
                let lists = slots
                    .iter()
                    .map(|s| s.pages.iter().filter(|p| !p.is_empty()).count())
                    .sum::<usize>();
                if self.unmap_slots(slots).len() == lists {
                    for p in pages {
                        if let Err((_, e)) = self.backend.release_page(p) {
                            tracing::warn!("releasing a page at drop failed: {e}");
                        }
                    }
                } else {
                    // A page still mapped somewhere must not be released: leak them all.
                    tracing::warn!("{} pages leaked: an unmap failed at drop", pages.len());
                }
                Box::new(KeptRanges {
                    backend: self.backend.clone(),
                    ranges: std::mem::take(&mut self.buffers),
                })
            }
        };
        *self
            .space
            .detached
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(kept);
    }

    /// Unmaps every slot's pages after the caller's queued work; returns the page lists whose
    /// unmap succeeded (a list whose unmap failed stays mapped, and is logged).
    fn unmap_slots(&self, slots: Vec<Slot>) -> Vec<Vec<crate::vmm::PageHandle>> {
        // Nothing of the caller's queued before the drop may still read a page when it is
        // unmapped: wait for every slot's fence and for one recorded now.
        if slots.iter().any(|s| s.pages.iter().any(|p| !p.is_empty())) {
            let now = self.fence_now();
            for f in slots
                .iter()
                .filter_map(|s| s.fence.as_ref())
                .chain(now.as_ref())
            {
                if let Err(e) = f.wait() {
                    tracing::warn!("waiting for a fence at drop failed: {e}");
                }
            }
        }
        let mut unmapped = Vec::new();
        for (i, s) in slots.into_iter().enumerate() {
            for (b, pages) in s.pages.into_iter().enumerate() {
                if pages.is_empty() {
                    continue;
                }
                let len = pages.len() * self.geometry.page_size;
                match self.backend.unmap(self.va(b, i, 0), len) {
                    Ok(()) => unmapped.push(pages),
                    Err(e) => tracing::warn!("unmapping slot {i} at drop failed: {e}"),
                }
            }
        }
        unmapped
    }
}

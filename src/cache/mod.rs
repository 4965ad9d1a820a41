//! `KvCache`: contiguous virtual KV tensors with physical pages mapped on demand (vAttention).
//!
//! Every slot (one request) owns a contiguous, page-aligned region in every buffer of the cache.
//! Pages are mapped behind a slot only as its tokens need them, from a [`PagePool`] under a byte
//! budget, so an attention kernel reads a slot's KV at fixed strides without a block table.
//!
//! # A decode loop
//!
//! ```
//! use kvvm::{CacheConfig, KvCache, Kv, Layout};
//! use kvvm::vmm::{BackendChoice, BackendConfig};
//!
//! let mut config = CacheConfig::for_model("llama-3-8b", 4, 1024, 64 << 20)?;
//! config.layers = 2; // keep the doctest small
//! config.layout = Layout::Interleaved;
//! config.backend = BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() };
//! let cache = KvCache::new(config)?;
//!
//! // Admit two requests and prefill their prompts.
//! let a = cache.alloc_slot()?;
//! let b = cache.alloc_slot()?;
//! cache.ensure(a, 100)?;
//! cache.ensure(b, 37)?;
//! let (mut la, mut lb) = (100, 37);
//! // Decode: one token per request per step; the kernels read layer l's K/V through
//! // `cache.layer_view(l, Kv::K)` at the slot's row.
//! for _ in 0..50 {
//!     la += 1;
//!     lb += 1;
//!     cache.step(&[(a, la), (b, lb)])?;
//!     let k0 = cache.layer_view(0, Kv::K)?;
//!     let _row = k0.row_addr(a.as_usize(), la - 1, 0); // where the new token's K goes
//! }
//! assert_eq!(cache.tokens(a)?, 150);
//! cache.free_slot(b)?; // its pages stay mapped for the next request (deferred reclamation)
//! let c = cache.alloc_slot_for(40)?;
//! assert_eq!(c, b); // reuses the slot whose pages are already mapped
//! # Ok::<(), kvvm::Error>(())
//! ```
//!
//! # Concurrency
//!
//! [`KvCache`] is `Send + Sync` and every method takes `&self`. Calls on different slots run
//! concurrently: backend calls happen outside the cache's lock. Calls that change the same slot's
//! mappings (`ensure`, `step`, `shrink`, `free_slot`, and the background mapper) are serialized
//! per slot. Views and statistics may be read at any time.

mod config;
mod hooks;
mod mapper;
mod stats;
mod view;

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

pub use config::{
    CacheConfig, DType, Geometry, Layout, ModelShape, MAX_SLOTS, MAX_VIRTUAL_BYTES, PRESETS,
};
pub use stats::CacheStats;
pub use view::{ByteRange, Device, Kv, TensorView};

use crate::error::{Error, Result};
use crate::pool::{PagePool, PoolConfig};
use crate::vmm::{Backend, BackendOp, Fence, MeteredBackend, PageHandle, VaRange};

/// A slot of a [`KvCache`]: one request's contiguous region in every buffer, `0..max_slots`.
///
/// The index is the slot's position in the batch dimension of the views
/// ([`KvCache::layer_view`]), so an engine may use it as the row of its batch tensors.
///
/// ```
/// use kvvm::SlotId;
/// let s = SlotId::new(3);
/// assert_eq!(s.index(), 3);
/// assert_eq!(u32::from(s), 3);
/// assert_eq!(s.to_string(), "3");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(transparent))]
pub struct SlotId(u32);

impl SlotId {
    /// The slot with index `index` (whether it exists is checked by the cache's calls).
    pub const fn new(index: u32) -> Self {
        SlotId(index)
    }

    /// The slot's index.
    pub const fn index(self) -> u32 {
        self.0
    }

    /// The slot's index as a `usize` (for indexing batch tensors).
    pub const fn as_usize(self) -> usize {
        self.0 as usize
    }
}

impl From<u32> for SlotId {
    fn from(index: u32) -> Self {
        SlotId(index)
    }
}

impl From<SlotId> for u32 {
    fn from(slot: SlotId) -> Self {
        slot.0
    }
}

impl std::fmt::Display for SlotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Default)]
struct Slot {
    allocated: bool,
    /// Live tokens (allocated slots only).
    tokens: usize,
    /// Mapped pages per buffer, in address order from the slot's start.
    pages: Vec<Vec<PageHandle>>,
    /// A thread is changing this slot's mappings outside the lock.
    busy: bool,
    /// Of `busy`: the change takes pages away (shrink, reclamation), so pages the slot lists now
    /// may be gone when it ends; growth must wait even if it needs no new page.
    shrinking: bool,
    /// Tokens the background mapper should make room for.
    ahead: usize,
    /// Cached smallest page count over the buffers (kept by `refresh`).
    min_pages: usize,
    /// Tokens promised by growth calls in flight (0 when none): reclamation keeps the pages
    /// they need even before the calls commit their new token counts.
    pending: usize,
    /// Growth calls in flight that made a promise in `pending` (it is cleared when the last ends).
    promises: u32,
    /// Bumped whenever the slot's tokens stop being a continuation of what they were
    /// (allocation, shrink): lets the swap engine tell whether a host copy still matches.
    epoch: u64,
    /// The fence of the caller's work that may still read this slot's pages (recorded by
    /// `free_slot` and `shrink`; `None` when nothing can).
    fence: Option<Arc<dyn Fence>>,
}

impl Slot {
    /// Pages mapped in every buffer.
    fn mapped(&self) -> usize {
        self.min_pages
    }
    /// (buffer, page count) of every buffer holding more than `keep` pages: what to unmap to
    /// cut the slot to `keep` pages per buffer.
    fn tails(&self, keep: usize) -> Vec<(usize, usize)> {
        self.pages
            .iter()
            .enumerate()
            .filter(|(_, p)| p.len() > keep)
            .map(|(b, p)| (b, p.len()))
            .collect()
    }
    /// Recomputes the cached page count after the page lists changed.
    fn refresh(&mut self) {
        self.min_pages = self.pages.iter().map(Vec::len).min().unwrap_or(0);
    }
    fn total_pages(&self) -> usize {
        self.pages.iter().map(Vec::len).sum()
    }
    /// Pool pages needed so that every buffer has `target` pages.
    fn missing(&self, target: usize) -> usize {
        if self.min_pages >= target {
            // Every buffer has enough (the common case of a decode step): no need to look.
            return 0;
        }
        self.pages
            .iter()
            .map(|p| target.saturating_sub(p.len()))
            .sum()
    }
}

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
    deferred_unmaps: u64,
    deferred_unmap_wait_ns: u64,
    deferred_unmap_max_wait_ns: u64,
    fence_waits: u64,
}

/// What happens to a slot once its deferred unmap is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterUnmap {
    /// The slot stops being busy (shrink).
    Finish,
    /// The slot is freed (swap-out commit).
    Free,
}

/// An unmap waiting for the fence of the caller's work that may still read the pages.
#[derive(Debug)]
struct Deferred {
    slot: usize,
    keep: usize,
    tails: Vec<(usize, usize)>,
    fence: Arc<dyn Fence>,
    then: AfterUnmap,
    since: std::time::Instant,
}

/// The deferred-unmap queue, drained by the `kvvm-unmapper` thread.
#[derive(Debug, Default)]
struct UnmapQueue {
    items: Vec<Deferred>,
    shutdown: bool,
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

/// A planned mapping: `pages` go into buffer `buffer` of `slot` starting at page index `start`.
#[derive(Debug)]
struct Piece {
    slot: usize,
    buffer: usize,
    start: usize,
    pages: Vec<PageHandle>,
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
    /// Unmaps waiting for their fence.
    unmaps: Mutex<UnmapQueue>,
    /// Wakes the unmapper.
    unmaps_cv: Condvar,
}

/// A KV cache of contiguous virtual tensors. See the [module documentation](self).
#[derive(Debug)]
pub struct KvCache {
    shared: Arc<Shared>,
    mapper: Option<JoinHandle<()>>,
    unmapper: Option<JoinHandle<()>>,
}

impl KvCache {
    /// Opens the backend `config.backend` asks for and creates a cache on it.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an impossible configuration; the backend's errors.
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
        let info = metered.info();
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
        });
        let mapper = if config.lookahead_steps > 0 {
            let s = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("kvvm-mapper".into())
                    .spawn(move || mapper::run(s))
                    .map_err(|e| Error::ThreadSpawn {
                        thread: "kvvm-mapper",
                        message: e.to_string(),
                    })?,
            )
        } else {
            None
        };
        // Only backends with fences (CUDA) ever defer an unmap.
        let unmapper = if info.kind == crate::vmm::BackendKind::Cuda {
            let s = shared.clone();
            match std::thread::Builder::new()
                .name("kvvm-unmapper".into())
                .spawn(move || run_unmapper(s))
            {
                Ok(h) => Some(h),
                Err(e) => {
                    let cache = KvCache {
                        shared,
                        mapper,
                        unmapper: None,
                    };
                    drop(cache);
                    return Err(Error::ThreadSpawn {
                        thread: "kvvm-unmapper",
                        message: e.to_string(),
                    });
                }
            }
        } else {
            None
        };
        Ok(KvCache {
            shared,
            mapper,
            unmapper,
        })
    }

    /// Sets the caller's compute stream (a raw `CUstream`, e.g. torch's `stream.cuda_stream`;
    /// 0 is the legacy default stream), after whose queued work kvvm orders its swap-out copies
    /// and its unmaps; `None` falls back to the legacy default stream. See `docs/ordering.md`.
    /// The host backend has no streams and ignores it.
    pub fn set_compute_stream(&self, stream: Option<u64>) {
        *self
            .shared
            .stream
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = stream;
    }

    /// The compute stream set by [`KvCache::set_compute_stream`] or the configuration.
    pub fn compute_stream(&self) -> Option<u64> {
        *self
            .shared
            .stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A fence after the work queued so far on the compute stream (`None` on the host backend).
    pub(crate) fn fence_now(&self) -> Option<Arc<dyn Fence>> {
        self.shared.fence_now()
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
    /// that large mapped slots stay for large requests).
    ///
    /// # Errors
    /// [`Error::SlotsExhausted`] when every slot is allocated.
    pub fn alloc_slot_for(&self, tokens: usize) -> Result<SlotId> {
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
                (m.min(want), std::cmp::Reverse(m), std::cmp::Reverse(*i))
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
        Ok(SlotId(i as u32))
    }

    /// Frees a slot. Its pages stay mapped (deferred reclamation): a later request can reuse them,
    /// and they are taken back only when the pool runs short.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the slot is out of range or not allocated.
    pub fn free_slot(&self, slot: SlotId) -> Result<()> {
        let sh = &*self.shared;
        // The caller's kernels queued so far may still read the slot: its pages are reclaimed
        // only after this fence.
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
    pub fn ensure(&self, slot: SlotId, tokens: usize) -> Result<()> {
        self.step(&[(slot, tokens)])
    }

    /// [`KvCache::ensure`] for a batch: every `(slot, tokens)` pair, all or nothing. In steady
    /// state the background mapper has mapped the pages ahead, and `step` makes no backend call.
    ///
    /// # Errors
    /// As [`KvCache::ensure`]; the error names the first slot that could not be served. On error
    /// no slot changed.
    pub fn step(&self, batch: &[(SlotId, usize)]) -> Result<()> {
        self.shared.grow(batch)
    }

    /// Cuts `slot` to `tokens` tokens and unmaps the pages beyond them.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad slot; a backend error if unmapping fails, in which case
    /// the slot holds `min(tokens, current)` tokens and the pages that could not be unmapped stay
    /// mapped to it (nothing leaks).
    pub fn shrink(&self, slot: SlotId, tokens: usize) -> Result<()> {
        let sh = &*self.shared;
        // Kernels queued so far may still read the pages beyond `tokens`: they are unmapped
        // after this fence (by the unmapper, if it has not completed yet).
        let fence = sh.fence_now();
        let (mut st, i) = sh.wait_idle(sh.lock(), slot)?;
        // Beyond max_tokens nothing is mapped anyway (and `pages_for` must not overflow).
        let tokens = tokens.min(sh.geometry.max_tokens);
        let keep = sh.geometry.pages_for(tokens);
        let s = &mut st.slots[i];
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
        r
    }

    /// Takes every page back from every free slot, and the pages allocated slots have mapped
    /// ahead of their tokens (for example before handing memory to another user of the device).
    /// Returns how many pages went back to the pool.
    ///
    /// # Errors
    /// A backend error if unmapping fails; the pages concerned stay mapped.
    pub fn reclaim_free_slots(&self) -> Result<usize> {
        self.shared.reclaim(usize::MAX)
    }

    /// Live tokens of an allocated slot.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad slot.
    pub fn tokens(&self, slot: SlotId) -> Result<usize> {
        let st = self.shared.lock();
        let i = self.shared.check_slot(&st, slot)?;
        Ok(st.slots[i].tokens)
    }

    /// Tokens the slot's mapped pages can hold now (at least [`KvCache::tokens`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a slot out of range.
    pub fn capacity(&self, slot: SlotId) -> Result<usize> {
        let st = self.shared.lock();
        let s = st.slots.get(slot.as_usize()).ok_or(Error::SlotOutOfRange {
            slot,
            max_slots: self.shared.geometry.max_slots,
        })?;
        Ok(self.shared.geometry.tokens_in(s.mapped()))
    }

    /// Whether a slot is allocated.
    pub fn is_allocated(&self, slot: SlotId) -> bool {
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
    pub fn stats(&self) -> CacheStats {
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
            deferred_unmaps: st.deferred_unmaps,
            deferred_unmap_wait_ns: st.deferred_unmap_wait_ns,
            deferred_unmap_max_wait_ns: st.deferred_unmap_max_wait_ns,
            fence_waits: st.fence_waits,
            ..CacheStats::default()
        };
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
        self.shared.lock().shutdown = true;
        self.shared.mapper_cv.notify_all();
        if let Some(h) = self.mapper.take() {
            let _ = h.join();
        }
        // The unmapper finishes every queued unmap (waiting for its fence) before it exits.
        self.shared.unmap_queue().shutdown = true;
        self.shared.unmaps_cv.notify_all();
        if let Some(h) = self.unmapper.take() {
            let _ = h.join();
        }
    }
}

/// The `kvvm-unmapper` thread: unmaps queued ranges once their fences complete, polling them
/// without blocking (`cuEventQuery`); at shutdown it waits for the rest.
fn run_unmapper(sh: Arc<Shared>) {
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
        let mut ready = Vec::new();
        let mut k = 0;
        while k < q.items.len() {
            let done = shutdown
                || q.items[k].fence.poll().unwrap_or_else(|e| {
                    // A failed fence (a faulted context) will never complete: nothing of the
                    // caller's runs any more, so the pages can go.
                    tracing::warn!("a deferred unmap's fence failed: {e}");
                    true
                });
            if done {
                ready.push(q.items.swap_remove(k));
            } else {
                k += 1;
            }
        }
        if ready.is_empty() {
            // Poll again shortly; a new entry wakes the thread at once.
            let _ = sh
                .unmaps_cv
                .wait_timeout(q, std::time::Duration::from_micros(100));
            continue;
        }
        drop(q);
        for d in ready {
            if shutdown {
                if let Err(e) = d.fence.wait() {
                    tracing::warn!("waiting for a deferred unmap's fence failed: {e}");
                }
            }
            sh.complete_deferred(d);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unmap_queue(&self) -> MutexGuard<'_, UnmapQueue> {
        self.unmaps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fence after the work queued so far on the caller's stream (the legacy default stream
    /// when none is set); `None` where the backend needs none (host). If it cannot be recorded
    /// (e.g. the stream was destroyed), everything the device was given is waited for instead,
    /// on the host, and `None` is returned.
    fn fence_now(&self) -> Option<Arc<dyn Fence>> {
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
    fn defer_unmap(
        &self,
        i: usize,
        keep: usize,
        tails: Vec<(usize, usize)>,
        fence: Arc<dyn Fence>,
        then: AfterUnmap,
    ) {
        self.unmap_queue().items.push(Deferred {
            slot: i,
            keep,
            tails,
            fence,
            then,
            since: std::time::Instant::now(),
        });
        self.unmaps_cv.notify_all();
    }

    /// Performs a deferred unmap whose fence has completed.
    fn complete_deferred(&self, d: Deferred) {
        if let Err(e) = self.unmap_tails(d.slot, d.keep, &d.tails) {
            tracing::warn!(
                "slot {}: a deferred unmap failed, the pages stay mapped: {e}",
                d.slot
            );
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

    /// The foreground growth path of `ensure` and `step`.
    fn grow(&self, batch: &[(SlotId, usize)]) -> Result<()> {
        let g = &self.geometry;
        let mut st = self.lock();
        // Validate and merge duplicates (the largest target wins).
        let mut targets: Vec<(usize, usize)> = Vec::with_capacity(batch.len());
        for &(slot, tokens) in batch {
            let i = self.check_slot(&st, slot)?;
            if tokens > g.max_tokens {
                return Err(Error::InvalidArgument(format!(
                    "slot {slot}: {tokens} tokens exceed max_tokens {}",
                    g.max_tokens
                )));
            }
            targets.push((i, tokens));
        }
        if !targets.windows(2).all(|w| w[0].0 < w[1].0) {
            targets.sort_unstable();
            // Sorted by (slot, tokens): keep the last, largest entry of each slot.
            targets.reverse();
            targets.dedup_by_key(|t| t.0);
        }
        // Which occupant of each slot this call is for (see `commit_tokens`): recorded only
        // when the lock is about to be released, the fast path holds it throughout.
        let mut epochs: Option<Vec<u64>> = None;
        let record = |st: &State| targets.iter().map(|&(i, _)| st.slots[i].epoch).collect();
        // Wait until no slot that needs pages is busy, then claim them all at once (no
        // hold-and-wait, so concurrent steps cannot deadlock).
        let work: Vec<(usize, usize, usize)> = loop {
            let work: Vec<(usize, usize, usize)> = targets
                .iter()
                .filter_map(|&(i, t)| {
                    if g.fits(t, st.slots[i].min_pages) {
                        return None;
                    }
                    let need = g.pages_for(t);
                    let missing = st.slots[i].missing(need);
                    (missing > 0).then_some((i, need, missing))
                })
                .collect();
            // A slot losing pages (reclamation of its mapped-ahead tail) must be waited for
            // even when its target fits the pages it lists now: they may be unmapped under us.
            if work.iter().all(|&(i, _, _)| !st.slots[i].busy)
                && targets.iter().all(|&(i, _)| !st.slots[i].shrinking)
            {
                break work;
            }
            if epochs.is_none() {
                epochs = Some(record(&st));
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            // Slots may have been freed meanwhile.
            for &(i, _) in &targets {
                self.check_slot(&st, SlotId(i as u32))?;
            }
        };
        if work.is_empty() {
            let wake = self.commit_tokens(&mut st, &targets, epochs.as_deref(), true);
            drop(st);
            self.wake_mapper(wake);
            return Ok(());
        }
        let epochs = epochs.unwrap_or_else(|| record(&st));
        for &(i, _, _) in &work {
            st.slots[i].busy = true;
        }
        // Slots of this batch that already have their pages must keep them while the pages of
        // the others are acquired (reclamation would otherwise take them as "mapped ahead").
        for &(i, t) in &targets {
            let s = &mut st.slots[i];
            s.pending = s.pending.max(t);
            s.promises += 1;
        }
        let total: usize = work.iter().map(|w| w.2).sum();
        // A slot left uneven by an earlier failed unmap may hold pages beyond its target in one
        // buffer while missing some in another; the surplus holds no live token, so when pages
        // are short it goes back to the pool first (the slot is ours: it is marked busy).
        let surplus: Vec<Shrink> = if self.pool.available() < total {
            work.iter()
                .filter_map(|&(i, need, _)| {
                    let tails = st.slots[i].tails(need);
                    (!tails.is_empty()).then(|| (i, need, tails, st.slots[i].fence.clone()))
                })
                .collect()
        } else {
            Vec::new()
        };
        drop(st);
        for (i, need, tails, fence) in surplus {
            // As in `reclaim`: the pages may have been read by work queued before the slot's
            // last shrink.
            if let Some(Err(e)) = fence.map(|f| f.wait()) {
                tracing::warn!("waiting for slot {i}'s fence failed: {e}");
            }
            if let Err(e) = self.unmap_tails(i, need, &tails) {
                tracing::debug!("could not return surplus pages of slot {i}: {e}");
            }
        }
        let busy: Vec<usize> = work.iter().map(|w| w.0).collect();

        let pages = match self.acquire(total, true) {
            Ok(p) => p,
            Err(e) => {
                self.clear_pending(&targets);
                self.finish(&busy);
                let (slot, missing) = blame(&work, &e);
                return Err(Error::Grow {
                    slot: SlotId(slot as u32),
                    missing_pages: missing,
                    source: Box::new(e),
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
                let wake = self.commit_tokens(&mut st, &targets, Some(&epochs), true);
                clear_pending(&mut st, &targets);
                drop(st);
                self.changed.notify_all();
                self.wake_mapper(wake);
                Ok(())
            }
            Err((failed_slot, e, kept)) => {
                let mut st = self.lock();
                attach(&mut st, kept);
                for &i in &busy {
                    st.slots[i].busy = false;
                }
                clear_pending(&mut st, &targets);
                drop(st);
                self.changed.notify_all();
                let missing = work.iter().find(|w| w.0 == failed_slot).map_or(0, |w| w.2);
                Err(Error::Grow {
                    slot: SlotId(failed_slot as u32),
                    missing_pages: missing,
                    source: Box::new(e),
                })
            }
        }
    }

    /// Forgets the promise of a growth call that gave up (see [`Slot::pending`]).
    fn clear_pending(&self, targets: &[(usize, usize)]) {
        clear_pending(&mut self.lock(), targets);
    }

    /// Records the new token counts after a successful growth and wakes the mapper.
    /// Returns whether the mapper was given work: the caller must then call
    /// [`Shared::wake_mapper`] after releasing the lock.
    #[must_use]
    fn commit_tokens(
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
    fn wake_mapper(&self, wake: bool) {
        if wake {
            self.mapper_cv.notify_one();
        }
    }

    /// Splits `pages` into per-(slot, buffer) pieces for `work` = (slot, target pages, missing).
    fn plan(&self, work: &[(usize, usize, usize)], mut pages: Vec<PageHandle>) -> Vec<Piece> {
        let st = self.lock();
        let mut plan = Vec::new();
        for &(i, need, _) in work {
            for (b, have) in st.slots[i].pages.iter().enumerate() {
                let n = need.saturating_sub(have.len());
                if n > 0 {
                    let rest = pages.split_off(pages.len() - n);
                    plan.push(Piece {
                        slot: i,
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
    #[allow(clippy::type_complexity)]
    fn map_pieces(
        &self,
        plan: Vec<Piece>,
    ) -> std::result::Result<Vec<Piece>, (usize, Error, Vec<Piece>)> {
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
                return Err((failed, e, kept));
            }
            done.push(p);
        }
        Ok(done)
    }

    /// Takes `n` pages from the pool; with `reclaim`, takes pages back from free slots when the
    /// pool runs short (only if that makes the request succeed).
    fn acquire(&self, n: usize, reclaim: bool) -> Result<Vec<PageHandle>> {
        let mut attempts = 0;
        loop {
            match self.pool.acquire(n) {
                Ok(p) => return Ok(p),
                Err(Error::BudgetExhausted { available, .. }) if reclaim && attempts < 4 => {
                    attempts += 1;
                    let deficit = n - available.min(n);
                    let reclaimable: usize = {
                        let st = self.lock();
                        self.victims(&st).iter().map(|v| v.2).sum()
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

    /// Candidates for reclamation: (slot, floor) where `floor` is the page count the slot must
    /// keep per buffer; free slots first (largest first), then allocated slots' pages mapped ahead
    /// of their tokens. Busy slots are skipped.
    fn victims(&self, st: &State) -> Vec<(usize, usize, usize)> {
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
            if s.allocated {
                ahead.push((i, floor, excess));
            } else {
                free.push((i, floor, excess));
            }
        }
        // Slots whose fence has completed first: their pages can go without waiting.
        let pending = |i: usize| {
            st.slots[i]
                .fence
                .as_ref()
                .is_some_and(|f| !f.poll().unwrap_or(true))
        };
        free.sort_by_cached_key(|&(i, _, n)| (pending(i), std::cmp::Reverse(n), i));
        ahead.sort_by_cached_key(|&(i, _, n)| (pending(i), std::cmp::Reverse(n), i));
        free.extend(ahead);
        free
    }

    /// Unmaps pages of free slots (largest first), then pages mapped ahead by allocated slots,
    /// until `pages` pool pages were returned or nothing is left. Returns how many were returned.
    fn reclaim(&self, pages: usize) -> Result<usize> {
        let mut st = self.lock();
        let mut remaining = pages;
        let mut plan: Vec<Shrink> = Vec::new();
        for (i, floor, _) in self.victims(&st) {
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
            plan.push((i, keep, tails, s.fence.take()));
        }
        drop(st);
        let mut result = Ok(());
        let mut total = 0;
        for (i, keep, tails, fence) in &plan {
            // The caller's kernels queued before the slot was freed (or shrunk) may still read
            // these pages: they cannot be reused before its fence. Slots whose fence completed
            // come first (see `victims`), so this waits only when they did not suffice.
            if let Some(f) = fence {
                if !f.poll().unwrap_or(true) {
                    self.lock().fence_waits += 1;
                    if let Err(e) = f.wait() {
                        tracing::warn!("waiting for slot {i}'s fence failed: {e}");
                    }
                }
            }
            let before: usize = tails.iter().map(|&(_, l)| l - keep).sum();
            match self.unmap_tails(*i, *keep, tails) {
                Ok(()) => total += before,
                Err(e) => result = Err(e),
            }
        }
        let slots: Vec<usize> = plan.iter().map(|p| p.0).collect();
        self.lock().reclaimed_pages += total as u64;
        self.finish(&slots);
        result.map(|()| total)
    }

    /// Unmaps, in every buffer listed in `tails` (buffer, current length), the pages of slot `i`
    /// beyond `keep`, and gives them to the pool. The slot must be marked busy by the caller.
    fn unmap_tails(&self, i: usize, keep: usize, tails: &[(usize, usize)]) -> Result<()> {
        let mut first_err = None;
        for &(b, len) in tails {
            let bytes = (len - keep) * self.geometry.page_size;
            match self.backend.unmap(self.va(b, i, keep), bytes) {
                Ok(()) => {
                    let pages = {
                        let mut st = self.lock();
                        let s = &mut st.slots[i];
                        let tail = s.pages[b].split_off(keep);
                        s.refresh();
                        tail
                    };
                    self.pool.give_back(pages);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// A planned shrink: (slot, pages to keep per buffer, (buffer, current length) of each tail,
/// the fence of the caller's work that may still read the pages).
type Shrink = (usize, usize, Vec<(usize, usize)>, Option<Arc<dyn Fence>>);

/// Forgets the promises of a growth call that has finished: a slot's promise is cleared when no
/// other call in flight still holds one (their largest promise stands until then).
fn clear_pending(st: &mut State, targets: &[(usize, usize)]) {
    for &(i, _) in targets {
        let s = &mut st.slots[i];
        s.promises = s.promises.saturating_sub(1);
        if s.promises == 0 {
            s.pending = 0;
        }
    }
}

/// Attaches mapped pieces to their slots.
fn attach(st: &mut State, pieces: Vec<Piece>) {
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
fn blame(work: &[(usize, usize, usize)], e: &Error) -> (usize, usize) {
    if let Error::BudgetExhausted { available, .. } = e {
        let mut sum = 0;
        for &(i, _, m) in work {
            sum += m;
            if sum > *available {
                return (i, m);
            }
        }
    }
    work.first().map_or((0, 0), |w| (w.0, w.2))
}

impl Drop for Shared {
    fn drop(&mut self) {
        let slots = std::mem::take(
            &mut self
                .state
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .slots,
        );
        // Nothing of the caller's queued before the drop may still read a page when it is
        // unmapped: wait for every slot's fence and for one recorded now.
        if slots.iter().any(|s| s.pages.iter().any(|p| !p.is_empty())) {
            let now = self.fence_now();
            for f in slots.iter().filter_map(|s| s.fence.as_ref()).chain(now.as_ref()) {
                if let Err(e) = f.wait() {
                    tracing::warn!("waiting for a fence at drop failed: {e}");
                }
            }
        }
        for (i, s) in slots.into_iter().enumerate() {
            for (b, pages) in s.pages.into_iter().enumerate() {
                if pages.is_empty() {
                    continue;
                }
                let len = pages.len() * self.geometry.page_size;
                match self.backend.unmap(self.va(b, i, 0), len) {
                    Ok(()) => self.pool.give_back(pages),
                    Err(e) => tracing::warn!("unmapping slot {i} at drop failed: {e}"),
                }
            }
        }
        for r in std::mem::take(&mut self.buffers) {
            if let Err(e) = self.backend.free_reservation(r) {
                tracing::warn!("freeing a reservation at drop failed: {e}");
            }
        }
    }
}

//! A model-checking harness for [`KvCache`], shared by the property tests, the fuzz targets and
//! anyone who wants to test kvvm against their own operation sequences.
//!
//! [`Harness`] drives a cache on the host backend with small pages (optionally through a
//! [`FaultyBackend`]) and keeps a shadow model of the allocated slots. Every token that a slot
//! gains is stamped with a byte pattern derived from (allocation, token, layer, K/V); after every
//! operation [`Harness::check`] verifies the model's invariants and that **every live token's K
//! and V bytes read back exactly as written**.
//!
//! Every request has token ids, and the pattern of a token is derived from the ids of the whole
//! prefix ending at it (its "content"), as real KV is: a page shared through the prefix index
//! reads back as whoever wrote it first, and the check proves that the page mapped behind a new
//! request is one whose tokens match its own. Page references are checked against the pool: the
//! distinct pages and the references that slots and the prefix index hold equal the pool's counts.

pub mod process;

#[cfg(feature = "arbitrary")]
use arbitrary::Arbitrary;
use std::sync::Arc;

use crate::cache::{CacheConfig, DType, Kv, KvCache, Layout, SlotId};
use crate::error::Error;
use crate::vmm::faulty::FaultyBackend;
use crate::vmm::host::{os_page_size, HostBackend, HostConfig};
use crate::vmm::{Backend, BackendConfig, BackendOp};

/// One operation on the cache. Slot references `k` index the live slots in allocation order
/// (modulo their number), token counts are taken modulo `max_tokens + 1`, so that any value is
/// meaningful.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Op {
    /// Allocate a slot for about `hint` tokens.
    Alloc {
        /// Expected tokens.
        hint: u16,
    },
    /// Free the `k`-th live slot.
    Free {
        /// Live slot index.
        k: u8,
    },
    /// Ensure the `k`-th live slot holds `tokens` tokens.
    Ensure {
        /// Live slot index.
        k: u8,
        /// Target tokens.
        tokens: u16,
    },
    /// Grow every live slot by `by` tokens (a decode step), capped at `max_tokens`.
    Decode {
        /// Tokens per slot.
        by: u8,
    },
    /// A batch of explicit targets.
    Step {
        /// (live slot index, target tokens).
        items: Vec<(u8, u16)>,
    },
    /// Shrink the `k`-th live slot to `tokens`.
    Shrink {
        /// Live slot index.
        k: u8,
        /// Target tokens.
        tokens: u16,
    },
    /// Take back every free slot's pages.
    Reclaim,
    /// Arm a fault: the `nth` next call of a kind fails (only with faults enabled).
    Fault {
        /// 0 map, 1 unmap, 2 create page, 3 release page, 4 protect.
        kind: u8,
        /// 1-based call number from now.
        nth: u8,
    },
    /// Publish the full pages of the `k`-th live slot's tokens in the prefix index.
    Publish {
        /// Live slot index.
        k: u8,
    },
    /// Admit a request through the prefix index: its tokens are the first `len` (modulo the
    /// source's length + 1) of the `src`-th published token sequence, then `extra` new ones;
    /// then prefill the rest.
    AllocPrefix {
        /// Published sequence index.
        src: u8,
        /// Tokens taken from it.
        len: u16,
        /// New tokens after them.
        extra: u8,
    },
    /// Evict up to `n` cached page indices that no slot maps.
    Evict {
        /// Page indices.
        n: u8,
    },
}

/// The namespace the harness publishes in.
const NAMESPACE: u64 = 0x6b76_766d;

/// A 32-bit mix of two words (token ids, content ids).
fn mix(a: u32, b: u32) -> u32 {
    stamp(a, b as usize, 0, Kv::K, 0)
}

#[derive(Clone, Debug)]
struct Live {
    slot: SlotId,
    tokens: usize,
    generation: u32,
    /// Token ids (at least `tokens` of them).
    ids: Vec<u32>,
    /// Content id of every prefix: `cids[t]` = mix(cids[t-1], ids[t]).
    cids: Vec<u32>,
    /// Leading tokens mapped read-only.
    ro: usize,
}

impl Live {
    fn new(slot: SlotId, generation: u32, ids: Vec<u32>) -> Self {
        let mut l = Live {
            slot,
            tokens: 0,
            generation,
            ids: Vec::new(),
            cids: Vec::new(),
            ro: 0,
        };
        for id in ids {
            l.push(id);
        }
        l
    }
    fn push(&mut self, id: u32) {
        let prev = self.cids.last().copied().unwrap_or(0x5eed);
        self.ids.push(id);
        self.cids.push(mix(prev, id));
    }
    /// Makes sure ids exist for `to` tokens (new tokens get ids unique to this request).
    fn extend_to(&mut self, to: usize) {
        while self.ids.len() < to {
            let id = mix(self.generation, self.ids.len() as u32);
            self.push(id);
        }
    }
}

/// The harness. See the [module documentation](self).
#[derive(Debug)]
pub struct Harness {
    cache: Option<KvCache>,
    /// The host backend [`Harness::new`] made, whose pages [`Harness::finish`] checks.
    host: Option<Arc<HostBackend>>,
    faulty: Option<Arc<FaultyBackend>>,
    live: Vec<Live>,
    next_generation: u32,
    budget_pages: usize,
    /// Token sequences published so far (the most recent few), for [`Op::AllocPrefix`].
    catalog: Vec<Vec<u32>>,
}

/// Options of a [`Harness`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HarnessConfig {
    /// Layout under test.
    pub layout: Layout,
    /// Background mapper lookahead (0: inline mapping only).
    pub lookahead: usize,
    /// Route backend calls through a [`FaultyBackend`] and honour [`Op::Fault`].
    pub faults: bool,
    /// Slots.
    pub max_slots: usize,
    /// Tokens per slot.
    pub max_tokens: usize,
    /// Budget in pages: of the OS page size for [`Harness::new`], of the backend's granularity
    /// for [`Harness::with_backend`].
    pub budget_pages: usize,
    /// [`Harness::new`]'s host backend backs unmapped ranges with zeros
    /// ([`HostConfig::zero_page`]).
    pub zero_page: bool,
}

impl Default for HarnessConfig {
    fn default() -> Self {
        HarnessConfig {
            layout: Layout::Interleaved,
            lookahead: 0,
            faults: false,
            max_slots: 4,
            max_tokens: 200,
            budget_pages: 36,
            zero_page: true,
        }
    }
}

/// The 32-bit word the pattern puts at `word` of the row of (`generation`, `token`, `layer`, `kv`).
pub fn stamp(generation: u32, token: usize, layer: usize, kv: Kv, word: usize) -> u32 {
    // A cheap mix (splitmix-like) of the coordinates, never constant across tokens.
    let mut x = (u64::from(generation) << 40)
        ^ ((token as u64) << 20)
        ^ ((layer as u64) << 8)
        ^ ((kv.is_v() as u64) << 7)
        ^ word as u64;
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (x ^ (x >> 31)) as u32
}

fn row_ptr(
    cache: &KvCache,
    slot: SlotId,
    token: usize,
    layer: usize,
    kv: Kv,
) -> Result<*mut u32, String> {
    let r = cache
        .row(slot, token, layer, kv)
        .map_err(|e| format!("row({slot}, {token}, {layer}, {kv:?}): {e}"))?;
    Ok(r.addr as usize as *mut u32)
}

/// Stamps tokens `from..to` of `slot` (every layer, K and V) with the byte pattern of allocation
/// `generation`, the pattern [`verify_tokens`] checks. `generation` tells apart successive
/// requests that use the same slot. Rows are written as whole `u32` words (a trailing part of a
/// row shorter than 4 bytes is left alone).
///
/// # Errors
/// A description if a token is out of range or not mapped.
///
/// # Safety
/// The cache must be on a host-addressable backend (host backend). `slot` must stay allocated
/// with at least `to` tokens for the whole call (no concurrent `shrink`, `free_slot` of it), and
/// no other thread may read or write these rows meanwhile.
pub unsafe fn stamp_tokens(
    cache: &KvCache,
    slot: SlotId,
    generation: u32,
    from: usize,
    to: usize,
) -> Result<(), String> {
    let g = cache.geometry();
    let words = g.row_bytes() / 4;
    for t in from..to {
        for layer in 0..g.layers {
            for kv in [Kv::K, Kv::V] {
                let p = row_ptr(cache, slot, t, layer, kv)?;
                for w in 0..words {
                    // SAFETY: `row` checked that the token lies in pages mapped read/write for
                    // this slot, and the caller guarantees they stay mapped and unshared; the row
                    // holds `words` aligned u32s (rows start at multiples of the row size).
                    unsafe { p.add(w).write_volatile(stamp(generation, t, layer, kv, w)) };
                }
            }
        }
    }
    Ok(())
}

/// Checks that tokens `0..tokens` of `slot` hold the pattern [`stamp_tokens`] wrote for
/// allocation `generation`.
///
/// # Errors
/// A description of the first byte that differs, or of a token that is not mapped.
///
/// # Safety
/// As [`stamp_tokens`]: `slot` must stay allocated with at least `tokens` tokens for the whole
/// call, and no other thread may write these rows meanwhile.
pub unsafe fn verify_tokens(
    cache: &KvCache,
    slot: SlotId,
    generation: u32,
    tokens: usize,
) -> Result<(), String> {
    let g = cache.geometry();
    let words = g.row_bytes() / 4;
    for t in 0..tokens {
        for layer in 0..g.layers {
            for kv in [Kv::K, Kv::V] {
                let p = row_ptr(cache, slot, t, layer, kv)?;
                for w in 0..words {
                    // SAFETY: as in `stamp_tokens`: the row is mapped, readable and aligned.
                    let got = unsafe { p.add(w).read_volatile() };
                    let want = stamp(generation, t, layer, kv, w);
                    if got != want {
                        return Err(format!(
                            "slot {slot} token {t} layer {layer} {kv:?} word {w}: read {got:#x}, wrote {want:#x}"
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

impl Harness {
    /// A cache with 2 layers, 2 KV heads, head_dim 8, f32, pages of the OS page size.
    ///
    /// # Errors
    /// Any error creating the backend or the cache.
    pub fn new(config: HarnessConfig) -> crate::Result<Self> {
        let page = os_page_size();
        let host = Arc::new(HostBackend::new(HostConfig {
            granularity: page,
            copy_threads: 1,
            zero_page: config.zero_page,
            ..HostConfig::default()
        })?);
        Self::build(config, host.clone(), Some(host))
    }

    /// The same cache on `backend` (e.g. the CUDA backend over a stand-in driver), with pages of
    /// its granularity: [`HarnessConfig::budget_pages`] counts such pages. With
    /// [`HarnessConfig::faults`], calls go through a [`FaultyBackend`] wrapping `backend`.
    /// [`Harness::finish`] cannot see `backend`'s pages: the caller checks them for leaks.
    ///
    /// The stamping functions write the cache's memory from the CPU, so `backend` must map
    /// memory that this process can address (as the host backend does).
    ///
    /// # Errors
    /// Any error creating the cache.
    pub fn with_backend(config: HarnessConfig, backend: Arc<dyn Backend>) -> crate::Result<Self> {
        Self::build(config, backend, None)
    }

    fn build(
        config: HarnessConfig,
        backend: Arc<dyn Backend>,
        host: Option<Arc<HostBackend>>,
    ) -> crate::Result<Self> {
        let page = backend.granularity();
        let faulty = config
            .faults
            .then(|| Arc::new(FaultyBackend::new(backend.clone())));
        let backend: Arc<dyn Backend> = match &faulty {
            Some(f) => f.clone(),
            None => backend,
        };
        let cache = KvCache::with_backend(
            CacheConfig::new(2, 2, 8)
                .with_dtype(DType::F32)
                .with_max_slots(config.max_slots)
                .with_max_tokens(config.max_tokens)
                .with_layout(config.layout)
                .with_page_size(None)
                .with_budget_bytes((config.budget_pages * page) as u64)
                .with_backend(BackendConfig::default())
                .with_lookahead_steps(config.lookahead)
                .with_create_all_pages(false),
            backend,
        )?;
        Ok(Harness {
            cache: Some(cache),
            host,
            faulty,
            live: Vec::new(),
            next_generation: 1,
            budget_pages: config.budget_pages,
            catalog: Vec::new(),
        })
    }

    /// The cache under test.
    ///
    /// # Panics
    /// Never: the cache is present until [`Harness::finish`] consumes the harness.
    pub fn cache(&self) -> &KvCache {
        self.cache.as_ref().expect("cache present until finish")
    }

    /// Slots the model holds: (slot, tokens).
    pub fn live(&self) -> Vec<(SlotId, usize)> {
        self.live.iter().map(|l| (l.slot, l.tokens)).collect()
    }

    fn write_tokens(&self, l: &Live, from: usize, to: usize) -> Result<(), String> {
        for t in from..to {
            // SAFETY: the harness is the only user of its cache; `l` is allocated and holds at
            // least `to` tokens (the model was updated after a successful growth), the tokens
            // from `from` on lie beyond its read-only pages, and no other thread touches the
            // slot during the call.
            unsafe { stamp_tokens(self.cache(), l.slot, l.cids[t], t, t + 1)? };
        }
        Ok(())
    }

    fn verify_slot(&self, l: &Live) -> Result<(), String> {
        let g = self.cache().geometry();
        let words = g.row_bytes() / 4;
        for t in 0..l.tokens {
            for layer in 0..g.layers {
                for kv in [Kv::K, Kv::V] {
                    let p = row_ptr(self.cache(), l.slot, t, layer, kv)?;
                    for w in 0..words {
                        // SAFETY: `row` checked that the token is live, so its row is mapped
                        // and readable; rows are u32-aligned; nothing writes it meanwhile.
                        let got = unsafe { p.add(w).read_volatile() };
                        let want = stamp(l.cids[t], t, layer, kv, w);
                        if got != want {
                            return Err(format!(
                                "slot {} token {t} layer {layer} {kv:?} word {w}: read {got:#x}, wrote {want:#x} (read-only tokens {})",
                                l.slot, l.ro
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Tokens per page index (prefix sharing's unit), or `None` when pages do not hold whole
    /// tokens.
    fn tpp(&self) -> Option<usize> {
        self.cache().tokens_per_page().ok()
    }

    /// Whether a growth failure is legitimate: injected, or the live tokens after the operation
    /// would not fit the budget.
    fn legit_failure(&self, e: &Error, targets: &[(usize, usize)]) -> Result<(), String> {
        let root = match e {
            Error::Grow { source, .. } => &**source,
            other => return Err(format!("growth failed with a non-Grow error: {other}")),
        };
        if matches!(root, Error::Injected { .. }) && self.faulty.is_some() {
            return Ok(());
        }
        // A slot that still maps read-only pages beyond its tokens (their unmapping failed
        // twice) refuses to grow rather than write into them.
        if matches!(root, Error::Internal(_))
            && self.faulty.is_some()
            && targets
                .iter()
                .any(|&(k, _)| self.live[k].ro > self.live[k].tokens)
        {
            return Ok(());
        }
        if let Error::BudgetExhausted { .. } = root {
            let g = self.cache().geometry();
            // Read-only pages may be shared between slots: count each once.
            let mut shared = std::collections::HashSet::new();
            let private: usize = self
                .live
                .iter()
                .enumerate()
                .map(|(k, l)| {
                    let t = targets
                        .iter()
                        .filter(|(j, _)| *j == k)
                        .map(|&(_, t)| t)
                        .max()
                        .unwrap_or(0)
                        .max(l.tokens);
                    let ro_pages = self.tpp().map_or(0, |tpp| l.ro / tpp);
                    for b in self.cache().debug_page_ids(l.slot) {
                        shared.extend(b.into_iter().take(ro_pages));
                    }
                    (g.pages_for(t) - ro_pages) * g.buffers
                })
                .sum();
            let need = private + shared.len();
            if need > self.budget_pages {
                return Ok(());
            }
            return Err(format!(
                "budget refused although the live tokens need {need} of {} pages: {e}",
                self.budget_pages
            ));
        }
        Err(format!("unexpected growth error: {e}"))
    }

    /// Applies one operation and checks the outcome against the model.
    ///
    /// # Errors
    /// A description of the first divergence from the model.
    pub fn apply(&mut self, op: &Op) -> Result<(), String> {
        let max_tokens = self.cache().geometry().max_tokens;
        let clamp = |t: u16| usize::from(t) % (max_tokens + 1);
        let n = self.live.len();
        match op {
            Op::Alloc { hint } => match self.cache().alloc_slot_for(clamp(*hint)) {
                Ok(slot) => {
                    if self.live.iter().any(|l| l.slot == slot) {
                        return Err(format!("alloc returned live slot {slot}"));
                    }
                    self.live
                        .push(Live::new(slot, self.next_generation, Vec::new()));
                    self.next_generation += 1;
                }
                Err(Error::SlotsExhausted { .. }) if n == self.cache().geometry().max_slots => {}
                // Giving up a free slot's shared pages may fail.
                Err(Error::Injected { .. }) if self.faulty.is_some() => {}
                Err(e) => return Err(format!("alloc failed with {n} live slots: {e}")),
            },
            Op::Free { k } if n > 0 => {
                let l = self.live.remove(usize::from(*k) % n);
                self.cache()
                    .free_slot(l.slot)
                    .map_err(|e| format!("free {}: {e}", l.slot))?;
            }
            Op::Ensure { k, tokens } if n > 0 => {
                self.grow(&[(usize::from(*k) % n, clamp(*tokens))])?;
            }
            Op::Decode { by } if n > 0 => {
                let items: Vec<(usize, usize)> = (0..n)
                    .map(|k| (k, (self.live[k].tokens + usize::from(*by)).min(max_tokens)))
                    .collect();
                self.grow(&items)?;
            }
            Op::Step { items } if n > 0 => {
                let items: Vec<(usize, usize)> = items
                    .iter()
                    .map(|&(k, t)| (usize::from(k) % n, clamp(t)))
                    .collect();
                self.grow(&items)?;
            }
            Op::Shrink { k, tokens } if n > 0 => {
                let k = usize::from(*k) % n;
                let t = clamp(*tokens);
                let r = self.cache().shrink(self.live[k].slot, t);
                let l = &self.live[k];
                let tpp = self.tpp().unwrap_or(1);
                if t < l.ro && t % tpp != 0 {
                    // Inside a read-only page, not on its boundary: refused, nothing changed.
                    return match r {
                        Err(Error::InvalidArgument(_)) => self.check(),
                        other => Err(format!(
                            "shrink of slot {} to {t} inside its {} read-only tokens gave {other:?}",
                            l.slot, l.ro
                        )),
                    };
                }
                let old_ro = l.ro;
                let l = &mut self.live[k];
                l.tokens = l.tokens.min(t);
                l.ro = l.ro.min(t);
                if let Err(e) = r {
                    if !(self.faulty.is_some() && matches!(e, Error::Injected { .. })) {
                        return Err(format!("shrink failed: {e}"));
                    }
                    // Shared pages that could not be unmapped (twice) stay read-only.
                    let slot = self.live[k].slot;
                    let ro = self
                        .cache()
                        .read_only_tokens(slot)
                        .map_err(|e| e.to_string())?;
                    if ro < self.live[k].ro || ro > old_ro {
                        return Err(format!(
                            "failed shrink of slot {slot} left {ro} read-only tokens (had {old_ro})"
                        ));
                    }
                    self.live[k].ro = ro;
                }
            }
            Op::Reclaim => {
                if let Err(e) = self.cache().reclaim_free_slots() {
                    if !(self.faulty.is_some() && matches!(e, Error::Injected { .. })) {
                        return Err(format!("reclaim failed: {e}"));
                    }
                }
            }
            Op::Fault { kind, nth } => {
                if let Some(f) = &self.faulty {
                    let op = match kind % 5 {
                        0 => BackendOp::Map,
                        1 => BackendOp::Unmap,
                        2 => BackendOp::CreatePage,
                        3 => BackendOp::ReleasePage,
                        _ => BackendOp::Protect,
                    };
                    f.fail_nth(op, u64::from(*nth % 8) + 1);
                }
            }
            Op::Publish { k } if n > 0 => self.publish(usize::from(*k) % n)?,
            Op::AllocPrefix { src, len, extra } => self.alloc_prefix(*src, *len, *extra)?,
            Op::Evict { n } => {
                self.cache().evict_prefixes(usize::from(*n));
            }
            _ => {}
        }
        self.settle_surplus_read_only()?;
        self.check()
    }

    /// Read-only pages beyond a slot's live tokens (left mapped by a shrink whose unmap failed)
    /// are surplus that any reclaiming call (`reclaim_free_slots`, or growth of another slot
    /// under a tight budget) may take: the slot's read-only tokens may then fall to what its live
    /// tokens' pages hold, never lower, and the model follows.
    fn settle_surplus_read_only(&mut self) -> Result<(), String> {
        let Some(tpp) = self.tpp() else {
            return Ok(());
        };
        for k in 0..self.live.len() {
            let (slot, tokens, ro) = (self.live[k].slot, self.live[k].tokens, self.live[k].ro);
            let floor = ro.min(tokens.div_ceil(tpp) * tpp);
            if ro <= floor {
                continue;
            }
            let now = self
                .cache()
                .read_only_tokens(slot)
                .map_err(|e| format!("read_only_tokens({slot}): {e}"))?;
            if now < floor || now > ro {
                return Err(format!(
                    "slot {slot} has {now} read-only tokens; its surplus read-only pages allow \
                     {floor}..={ro}"
                ));
            }
            self.live[k].ro = now;
        }
        Ok(())
    }

    fn publish(&mut self, k: usize) -> Result<(), String> {
        let Some(tpp) = self.tpp() else {
            return Ok(());
        };
        let l = &self.live[k];
        let ids = l.ids[..l.tokens].to_vec();
        match self.cache().publish(l.slot, &ids, NAMESPACE) {
            Ok(full) => {
                if full != l.tokens / tpp {
                    return Err(format!(
                        "publish of slot {} with {} tokens made {full} pages read-only, expected {}",
                        l.slot,
                        l.tokens,
                        l.tokens / tpp
                    ));
                }
                let l = &mut self.live[k];
                l.ro = l.ro.max(full * tpp);
                if full > 0 {
                    if self.catalog.len() == 8 {
                        self.catalog.remove(0);
                    }
                    self.catalog.push(ids);
                }
                Ok(())
            }
            Err(Error::Injected { .. }) if self.faulty.is_some() => {
                // Pages whose write access could not be restored either (a second injected
                // failure) count as read-only: they hold live tokens only.
                let ro = self
                    .cache()
                    .read_only_tokens(l.slot)
                    .map_err(|e| e.to_string())?;
                if ro != l.ro && ro != l.tokens / tpp * tpp {
                    return Err(format!(
                        "failed publish of slot {} left {ro} read-only tokens (model {}, {} live)",
                        l.slot, l.ro, l.tokens
                    ));
                }
                self.live[k].ro = ro;
                Ok(())
            }
            Err(e) => Err(format!("publish of slot {}: {e}", l.slot)),
        }
    }

    fn alloc_prefix(&mut self, src: u8, len: u16, extra: u8) -> Result<(), String> {
        let Some(tpp) = self.tpp() else {
            return Ok(());
        };
        let g = self.cache().geometry();
        let max_tokens = g.max_tokens;
        let max_slots = g.max_slots;
        let mut ids: Vec<u32> = match self.catalog.len() {
            0 => Vec::new(),
            c => {
                let base = &self.catalog[usize::from(src) % c];
                base[..usize::from(len) % (base.len() + 1)].to_vec()
            }
        };
        let generation = self.next_generation;
        self.next_generation += 1;
        for i in 0..usize::from(extra) {
            ids.push(mix(generation, (ids.len() + i) as u32));
        }
        ids.truncate(max_tokens);
        let n = self.live.len();
        let hit = match self.cache().alloc_slot_with_prefix(&ids, NAMESPACE) {
            Ok(hit) => hit,
            Err(Error::SlotsExhausted { .. }) if n == max_slots => return Ok(()),
            Err(Error::Grow { source, .. })
                if self.faulty.is_some() && matches!(*source, Error::Injected { .. }) =>
            {
                return Ok(())
            }
            Err(Error::Injected { .. }) if self.faulty.is_some() => return Ok(()),
            Err(e) => return Err(format!("alloc with a prefix of {} tokens: {e}", ids.len())),
        };
        if self.live.iter().any(|l| l.slot == hit.slot) {
            return Err(format!(
                "alloc with a prefix returned live slot {}",
                hit.slot
            ));
        }
        if hit.tokens % tpp != 0 || hit.tokens > ids.len() {
            return Err(format!(
                "alloc with a prefix of {} tokens reused {} (pages of {tpp})",
                ids.len(),
                hit.tokens
            ));
        }
        let prompt = ids.len();
        let mut l = Live::new(hit.slot, generation, ids);
        l.tokens = hit.tokens;
        l.ro = hit.tokens;
        self.live.push(l);
        // The shared tokens must read back as their first writer stamped them.
        self.check()?;
        // Prefill the rest.
        let k = self.live.len() - 1;
        self.grow(&[(k, prompt)])
    }

    fn grow(&mut self, items: &[(usize, usize)]) -> Result<(), String> {
        let batch: Vec<(SlotId, usize)> =
            items.iter().map(|&(k, t)| (self.live[k].slot, t)).collect();
        let before: Vec<usize> = self.live.iter().map(|l| l.tokens).collect();
        match self.cache().step(&batch) {
            Ok(()) => {
                for &(k, t) in items {
                    let old = self.live[k].tokens;
                    if t > old {
                        self.live[k].extend_to(t);
                        self.live[k].tokens = t;
                        let l = self.live[k].clone();
                        self.write_tokens(&l, old, t)?;
                    }
                }
                Ok(())
            }
            Err(e) => {
                self.legit_failure(&e, items)?;
                // Nothing changed: the model stays as it was.
                debug_assert_eq!(
                    before,
                    self.live.iter().map(|l| l.tokens).collect::<Vec<_>>()
                );
                Ok(())
            }
        }
    }

    /// Checks every invariant and every live byte.
    ///
    /// # Errors
    /// A description of the first violation.
    pub fn check(&self) -> Result<(), String> {
        let cache = self.cache();
        cache.quiesce();
        let g = cache.geometry();
        for l in &self.live {
            let t = cache
                .tokens(l.slot)
                .map_err(|e| format!("tokens({}): {e}", l.slot))?;
            if t != l.tokens {
                return Err(format!(
                    "slot {} holds {t} tokens, model {}",
                    l.slot, l.tokens
                ));
            }
            let cap = cache.capacity(l.slot).map_err(|e| e.to_string())?;
            if cap < t {
                return Err(format!(
                    "slot {} capacity {cap} below its {t} tokens",
                    l.slot
                ));
            }
            let ro = cache
                .read_only_tokens(l.slot)
                .map_err(|e| format!("read_only_tokens({}): {e}", l.slot))?;
            if ro != l.ro {
                return Err(format!(
                    "slot {} has {ro} read-only tokens, model {}",
                    l.slot, l.ro
                ));
            }
            self.verify_slot(l)?;
        }
        let stats = cache.stats();
        if stats.allocated_slots != self.live.len() {
            return Err(format!(
                "{} slots allocated, model {}",
                stats.allocated_slots,
                self.live.len()
            ));
        }
        let live_bytes: u64 = self
            .live
            .iter()
            .map(|l| (l.tokens * g.bytes_per_token()) as u64)
            .sum();
        if stats.live_bytes != live_bytes {
            return Err(format!(
                "live bytes {} != model {live_bytes}",
                stats.live_bytes
            ));
        }
        // Every page the pool hands out is mapped by a slot or kept by the prefix index, and
        // every reference the pool counts is held by one of them.
        let (distinct, references) = cache.debug_page_census();
        if (stats.pool.in_use, stats.pool.references) != (distinct, references) {
            return Err(format!(
                "pool has {} pages in use and {} references, but slots and the prefix index hold {distinct} pages and {references} references",
                stats.pool.in_use, stats.pool.references
            ));
        }
        if stats.distinct_mapped_bytes > stats.mapped_bytes {
            return Err(format!(
                "distinct mapped bytes above mapped bytes: {stats:?}"
            ));
        }
        if stats.pool.live > stats.pool.budget_pages {
            return Err(format!("pool over budget: {:?}", stats.pool));
        }
        Ok(())
    }

    /// Drops the cache and checks that every page went back to the system (on the host backend
    /// of [`Harness::new`]; after [`Harness::with_backend`] the caller checks its backend).
    ///
    /// # Errors
    /// A description of the leak.
    pub fn finish(mut self) -> Result<(), String> {
        if let Some(f) = &self.faulty {
            f.clear();
        }
        self.cache.take();
        let left = self.host.as_ref().map_or(0, |h| h.live_pages());
        if left != 0 {
            return Err(format!("{left} pages leaked after the cache was dropped"));
        }
        Ok(())
    }
}

/// The input format of the `cache_ops` fuzz target: a harness configuration and an operation
/// sequence, decoded from raw bytes with `arbitrary`.
///
/// Layout of the bytes: a 4-byte header — flags (bit 0: per-layer layout, bit 1: fault
/// injection, bits 2–4: mapper lookahead), `max_slots = 1 + b1 % 6`, `max_tokens = 1 + 2·b2`,
/// `budget_pages = 4 + b3 % 61` — then [`Op`]s as `arbitrary` decodes an iterator of them (a
/// continue byte with bit 0 set before each), at most [`FuzzInput::MAX_OPS`]. Missing bytes read
/// as zeros, so every byte string is an input. [`FuzzInput::encode`] writes this format back,
/// which is how the seed corpus is produced.
#[cfg(feature = "arbitrary")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuzzInput {
    /// The harness configuration.
    pub config: HarnessConfig,
    /// The operations, applied in order.
    pub ops: Vec<Op>,
}

#[cfg(feature = "arbitrary")]
impl FuzzInput {
    /// Operations beyond this many are ignored (keeps every input fast).
    pub const MAX_OPS: usize = 200;

    /// Decodes an input. Never fails: short or odd inputs decode to short sequences.
    pub fn decode(data: &[u8]) -> FuzzInput {
        let mut u = arbitrary::Unstructured::new(data);
        let mut byte = || u8::arbitrary(&mut u).unwrap_or(0);
        let (flags, slots, tokens, budget) = (byte(), byte(), byte(), byte());
        let config = HarnessConfig {
            layout: if flags & 1 == 1 {
                Layout::PerLayer
            } else {
                Layout::Interleaved
            },
            faults: flags & 2 == 2,
            lookahead: usize::from((flags >> 2) & 7),
            max_slots: 1 + usize::from(slots % 6),
            max_tokens: 1 + 2 * usize::from(tokens),
            budget_pages: 4 + usize::from(budget % 61),
            // Both modes of the host backend's unmapped ranges (zeros, or no access).
            zero_page: flags & 0x20 == 0,
        };
        let mut ops = Vec::new();
        if let Ok(iter) = u.arbitrary_iter::<Op>() {
            for op in iter.take(Self::MAX_OPS) {
                match op {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
        }
        FuzzInput { config, ops }
    }

    /// Encodes an input so that [`FuzzInput::decode`] gives it back. Configuration values out
    /// of the format's range are brought into it (`max_slots` 1–6, `max_tokens` odd 1–511,
    /// `budget_pages` 4–64, `lookahead` 0–7).
    pub fn encode(&self) -> Vec<u8> {
        let c = &self.config;
        let flags = u8::from(c.layout == Layout::PerLayer)
            | (u8::from(c.faults) << 1)
            | ((c.lookahead.min(7) as u8) << 2)
            | (u8::from(!c.zero_page) << 5);
        let mut out = vec![
            flags,
            (c.max_slots.clamp(1, 6) - 1) as u8,
            ((c.max_tokens.clamp(1, 511) - 1) / 2) as u8,
            (c.budget_pages.clamp(4, 64) - 4) as u8,
        ];
        // `arbitrary` picks variant v of n for a little-endian u32 x as (x·n) >> 32.
        let tag = |out: &mut Vec<u8>, v: u32| {
            let x = ((u64::from(v) << 32).div_ceil(Op::VARIANTS)) as u32;
            out.extend_from_slice(&x.to_le_bytes());
        };
        for op in self.ops.iter().take(Self::MAX_OPS) {
            out.push(1);
            match op {
                Op::Alloc { hint } => {
                    tag(&mut out, 0);
                    out.extend_from_slice(&hint.to_le_bytes());
                }
                Op::Free { k } => {
                    tag(&mut out, 1);
                    out.push(*k);
                }
                Op::Ensure { k, tokens } => {
                    tag(&mut out, 2);
                    out.push(*k);
                    out.extend_from_slice(&tokens.to_le_bytes());
                }
                Op::Decode { by } => {
                    tag(&mut out, 3);
                    out.push(*by);
                }
                Op::Step { items } => {
                    tag(&mut out, 4);
                    for (k, t) in items {
                        out.push(1);
                        out.push(*k);
                        out.extend_from_slice(&t.to_le_bytes());
                    }
                    out.push(0);
                }
                Op::Shrink { k, tokens } => {
                    tag(&mut out, 5);
                    out.push(*k);
                    out.extend_from_slice(&tokens.to_le_bytes());
                }
                Op::Reclaim => tag(&mut out, 6),
                Op::Fault { kind, nth } => {
                    tag(&mut out, 7);
                    out.push(*kind);
                    out.push(*nth);
                }
                Op::Publish { k } => {
                    tag(&mut out, 8);
                    out.push(*k);
                }
                Op::AllocPrefix { src, len, extra } => {
                    tag(&mut out, 9);
                    out.push(*src);
                    out.extend_from_slice(&len.to_le_bytes());
                    out.push(*extra);
                }
                Op::Evict { n } => {
                    tag(&mut out, 10);
                    out.push(*n);
                }
            }
        }
        out.push(0);
        out
    }
}

#[cfg(feature = "arbitrary")]
impl Op {
    /// Number of variants (what `arbitrary` picks among).
    const VARIANTS: u64 = 11;
}

/// Runs one fuzz input (see [`FuzzInput`]): builds the harness, applies every operation with
/// the harness's invariant and byte-pattern checks after each, then drops the cache and checks
/// that no page leaked. The `cache_ops` fuzz target and the corpus replay test both call this.
///
/// # Errors
/// A description of the first divergence, naming the operation and the input's configuration.
#[cfg(feature = "arbitrary")]
pub fn fuzz_cache_ops(data: &[u8]) -> Result<(), String> {
    let input = FuzzInput::decode(data);
    let mut h =
        Harness::new(input.config).map_err(|e| format!("harness for {:?}: {e}", input.config))?;
    for (i, op) in input.ops.iter().enumerate() {
        h.apply(op)
            .map_err(|e| format!("{:?}, op {i} {op:?}: {e}", input.config))?;
    }
    h.finish()
        .map_err(|e| format!("{:?} after {} ops: {e}", input.config, input.ops.len()))
}

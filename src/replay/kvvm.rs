//! The kvvm allocator adapter: a real [`KvCache`] with real pages, preemption by swapping whole
//! requests to host memory, and a stamp in every token's KV that is checked when a request
//! resumes and when it finishes.

use std::collections::HashMap;
use std::sync::Arc;

use super::alloc::{Cost, Counters, KvAllocator, Preempted, Usage};
use crate::cache::{KvCache, Kv, SlotId, TensorView};
use crate::error::{Error, Result};
use crate::vmm::{Backend, CopyKind, CopyRegion, HostBuffer};

/// The stamp of token `token` of request `id` in stamped row `row` (a splitmix64 mix, never
/// constant across requests, tokens or rows).
pub fn stamp(id: u64, token: usize, row: usize) -> u64 {
    let mut x = (id << 32) ^ ((token as u64) << 4) ^ row as u64;
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Moves stamps between the cache and a host staging buffer through the backend's copies, so
/// that stamping works the same on the host and on a CUDA device.
#[derive(Debug)]
struct Stamper {
    backend: Arc<dyn Backend>,
    /// The stamped rows: layer 0's K, the middle layer's V and the last layer's V (on the
    /// per-layer layout three different buffers).
    views: Vec<TensorView>,
    staging: Option<HostBuffer>,
}

impl Stamper {
    fn new(cache: &KvCache, backend: Arc<dyn Backend>) -> Result<Self> {
        let g = cache.geometry();
        let mut views = vec![cache.layer_view(0, Kv::K)?];
        if g.layers > 2 {
            views.push(cache.layer_view(g.layers / 2, Kv::V)?);
        }
        views.push(cache.layer_view(g.layers - 1, Kv::V)?);
        let words = g.max_tokens.max(g.max_slots) * views.len();
        let staging = backend.alloc_host(words * 8)?;
        Ok(Stamper {
            backend,
            views,
            staging: Some(staging),
        })
    }

    fn staging(&self) -> Result<&HostBuffer> {
        self.staging
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("stamp buffer already freed".into()))
    }

    /// Words that fit in one round trip.
    fn capacity(&self) -> Result<usize> {
        Ok(self.staging()?.len() / 8)
    }

    /// Writes the stamps of `items` = (request, slot, token).
    fn write(&self, items: &[(u64, SlotId, usize)]) -> Result<()> {
        let rows = self.views.len();
        let per = (self.capacity()? / rows).max(1);
        let base = self.staging()?.addr();
        for chunk in items.chunks(per) {
            let mut regions = Vec::with_capacity(chunk.len() * rows);
            for (i, &(id, slot, token)) in chunk.iter().enumerate() {
                for (r, v) in self.views.iter().enumerate() {
                    let w = i * rows + r;
                    let src = base + (w * 8) as u64;
                    // SAFETY: `w < per * rows <= capacity`, so the word lies inside the staging
                    // buffer, which this stamper owns and no copy is using now.
                    unsafe { (src as usize as *mut u64).write_unaligned(stamp(id, token, r)) };
                    regions.push(CopyRegion {
                        dst: v.row_addr(slot as usize, token, 0),
                        src,
                        len: 8,
                    });
                }
            }
            // SAFETY: every destination is the first word of a row of a token the slot holds
            // (the cache mapped it before the caller asked for the stamp) and no one else writes
            // it; the sources lie in the staging buffer; we wait before touching either again.
            unsafe { self.backend.copy_async(CopyKind::HostToDevice, &regions)? }.wait()?;
        }
        Ok(())
    }

    /// Counts the tokens `0..tokens` of request `id` in `slot` whose stamps differ.
    fn check(&self, id: u64, slot: SlotId, tokens: usize) -> Result<u64> {
        let rows = self.views.len();
        let per = (self.capacity()? / rows).max(1);
        let base = self.staging()?.addr();
        let mut bad = 0;
        let mut start = 0;
        while start < tokens {
            let end = (start + per).min(tokens);
            let mut regions = Vec::with_capacity((end - start) * rows);
            for t in start..end {
                for (r, v) in self.views.iter().enumerate() {
                    regions.push(CopyRegion {
                        dst: base + (((t - start) * rows + r) * 8) as u64,
                        src: v.row_addr(slot as usize, t, 0),
                        len: 8,
                    });
                }
            }
            // SAFETY: the sources are rows of tokens the slot holds (mapped); the destinations
            // are distinct words of the staging buffer, which only this stamper uses; we wait
            // before reading them.
            unsafe { self.backend.copy_async(CopyKind::DeviceToHost, &regions)? }.wait()?;
            for t in start..end {
                let ok = (0..rows).all(|r| {
                    let p = base + (((t - start) * rows + r) * 8) as u64;
                    // SAFETY: inside the staging buffer, written by the completed copy above.
                    let got = unsafe { (p as usize as *const u64).read_unaligned() };
                    got == stamp(id, t, r)
                });
                bad += u64::from(!ok);
            }
            start = end;
        }
        Ok(bad)
    }
}

impl Drop for Stamper {
    fn drop(&mut self) {
        if let Some(b) = self.staging.take() {
            if let Err((_, e)) = self.backend.free_host(b) {
                tracing::warn!("freeing the stamp buffer failed: {e}");
            }
        }
    }
}

/// One host copy of a request's KV: segments of consecutive tokens, each holding every buffer's
/// bytes of its tokens one after the other.
#[derive(Debug)]
struct HostCopy {
    segments: Vec<(usize, usize, HostBuffer)>,
    tokens: usize,
    bytes: u64,
    last_use: u64,
}

/// Swapping whole requests to host buffers: a swap-out copies only the tokens the host copy of
/// the request lacks (KV never changes once written), a swap-in copies everything back and
/// keeps the host copy for the next swap-out. Copies of running requests are evicted (least
/// recently used first) when the host budget runs short.
#[derive(Debug)]
struct HostSwap {
    budget: u64,
    used: u64,
    copies: HashMap<u64, HostCopy>,
    clock: u64,
}

fn exhausted(e: &Error) -> bool {
    e.is_exhaustion() || matches!(e, Error::SlotsExhausted { .. })
}

/// kvvm as a replay allocator. See the [module documentation](self).
#[derive(Debug)]
pub struct KvvmAllocator {
    cache: Arc<KvCache>,
    backend: Arc<dyn Backend>,
    stamper: Stamper,
    swap: HostSwap,
    running: HashMap<u64, (SlotId, usize)>,
    /// Preempted requests whose KV was dropped instead of swapped.
    dropped: std::collections::HashSet<u64>,
    budget: u64,
    counters: Counters,
}

impl KvvmAllocator {
    /// Wraps `cache` (which must be fresh: no slot allocated) with `host_budget_bytes` of host
    /// memory for swapped-out KV.
    ///
    /// # Errors
    /// Backend errors allocating the staging buffer.
    pub fn new(cache: Arc<KvCache>, host_budget_bytes: u64) -> Result<Self> {
        let backend = cache.backend().inner().clone();
        let stamper = Stamper::new(&cache, backend.clone())?;
        let budget = cache.pool().stats().budget_pages as u64 * cache.geometry().page_size as u64;
        Ok(KvvmAllocator {
            cache,
            backend,
            stamper,
            swap: HostSwap {
                budget: host_budget_bytes,
                used: 0,
                copies: HashMap::new(),
                clock: 0,
            },
            running: HashMap::new(),
            dropped: Default::default(),
            budget,
            counters: Counters::default(),
        })
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<KvCache> {
        &self.cache
    }

    fn slot(&self, id: u64) -> Result<(SlotId, usize)> {
        self.running
            .get(&id)
            .copied()
            .ok_or_else(|| Error::InvalidArgument(format!("request {id} is not running")))
    }

    fn held(&self) -> u64 {
        let stats = self.cache.stats();
        let g = self.cache.geometry();
        self.running
            .values()
            .map(|&(s, _)| stats.pages_per_slot.get(s as usize).copied().unwrap_or(0) as u64)
            .sum::<u64>()
            * (g.page_size * g.buffers) as u64
    }

    /// Frees `slot` and takes its pages back (what a swap-out does after the copy).
    fn release_slot(&self, slot: SlotId) -> Result<()> {
        let r = self.cache.shrink(slot, 0);
        self.cache.free_slot(slot)?;
        r
    }

    /// Makes room for `bytes` on the host by evicting copies of running requests.
    fn host_room(&mut self, bytes: u64) -> Result<bool> {
        while self.swap.used + bytes > self.swap.budget {
            let victim = self
                .swap
                .copies
                .iter()
                .filter(|(id, _)| self.running.contains_key(id))
                .min_by_key(|(_, c)| c.last_use)
                .map(|(&id, _)| id);
            match victim {
                Some(id) => self.drop_copy(id)?,
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    fn drop_copy(&mut self, id: u64) -> Result<()> {
        if let Some(c) = self.swap.copies.remove(&id) {
            self.swap.used -= c.bytes;
            for (_, _, b) in c.segments {
                self.backend
                    .free_host(b)
                    .map_err(|(_, e)| e)?;
            }
        }
        Ok(())
    }

    /// Copies tokens `from..to` of `slot` into a new host buffer.
    fn copy_out(&self, slot: SlotId, from: usize, to: usize) -> Result<(HostBuffer, u64)> {
        let ranges = self.cache.slot_ranges(slot, to)?;
        let tb = self.cache.geometry().token_bytes;
        let seg = (to - from) * tb;
        let buf = self.backend.alloc_host(seg * ranges.len())?;
        let regions: Vec<CopyRegion> = ranges
            .iter()
            .enumerate()
            .map(|(i, r)| CopyRegion {
                dst: buf.addr() + (i * seg) as u64,
                src: r.addr + (from * tb) as u64,
                len: seg,
            })
            .collect();
        // SAFETY: the sources are the slot's first `to` tokens, mapped and not written while the
        // request is being preempted; the destinations are disjoint parts of a fresh host buffer;
        // we wait before anything else touches either.
        let r = unsafe { self.backend.copy_async(CopyKind::DeviceToHost, &regions) }
            .and_then(|c| c.wait());
        match r {
            Ok(()) => Ok((buf, regions.len() as u64)),
            Err(e) => {
                let _ = self.backend.free_host(buf);
                Err(e)
            }
        }
    }

    /// Copies every segment of `copy` back into `slot`.
    fn copy_in(&self, slot: SlotId, copy: &HostCopy) -> Result<u64> {
        let ranges = self.cache.slot_ranges(slot, copy.tokens)?;
        let tb = self.cache.geometry().token_bytes;
        let mut regions = Vec::new();
        for (from, to, buf) in &copy.segments {
            let seg = (to - from) * tb;
            for (i, r) in ranges.iter().enumerate() {
                regions.push(CopyRegion {
                    dst: r.addr + (from * tb) as u64,
                    src: buf.addr() + (i * seg) as u64,
                    len: seg,
                });
            }
        }
        // SAFETY: the destinations are the first `copy.tokens` tokens of a slot the caller just
        // grew to that size (mapped, not used by anyone else); the sources lie in host buffers
        // owned by `copy`; we wait before anything else touches either.
        unsafe { self.backend.copy_async(CopyKind::HostToDevice, &regions)? }.wait()?;
        Ok(regions.len() as u64)
    }

    /// Allocates a slot holding `tokens` tokens, or `None` when there is no room.
    fn slot_for(&self, tokens: usize) -> Result<Option<SlotId>> {
        let slot = match self.cache.alloc_slot_for(tokens) {
            Ok(s) => s,
            Err(e) if exhausted(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        match self.cache.ensure(slot, tokens) {
            Ok(()) => {
                // A reused slot may have more pages mapped than this request needs (its last
                // user was longer): give the excess back rather than hold it for nothing.
                let g = self.cache.geometry();
                if g.pages_for(self.cache.capacity(slot)?) > g.pages_for(tokens) + 1 {
                    self.cache.shrink(slot, tokens)?;
                }
                Ok(Some(slot))
            }
            Err(e) => {
                self.cache.free_slot(slot)?;
                if exhausted(&e) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    fn stamp_new(&self, id: u64, slot: SlotId, from: usize, to: usize) -> Result<()> {
        let items: Vec<(u64, SlotId, usize)> = (from..to).map(|t| (id, slot, t)).collect();
        self.stamper.write(&items)
    }
}

impl KvAllocator for KvvmAllocator {
    fn name(&self) -> String {
        format!("kvvm-{}", self.cache.geometry().layout)
    }
    fn preemption(&self) -> &'static str {
        "swap whole requests in coarse copies, reusing host copies (recompute when the host is full)"
    }
    fn token_bytes(&self) -> u64 {
        self.cache.geometry().bytes_per_token() as u64
    }
    fn bytes_for(&self, tokens: usize) -> u64 {
        let g = self.cache.geometry();
        (g.pages_for(tokens) * g.page_size * g.buffers) as u64
    }
    fn free_bytes(&self) -> u64 {
        self.budget.saturating_sub(self.held())
    }
    fn admit(&mut self, id: u64, tokens: usize) -> Result<bool> {
        if self.running.contains_key(&id) {
            return Err(Error::InvalidArgument(format!("request {id} already runs")));
        }
        let Some(slot) = self.slot_for(tokens)? else {
            return Ok(false);
        };
        self.running.insert(id, (slot, tokens));
        self.stamp_new(id, slot, 0, tokens)?;
        Ok(true)
    }
    fn grow(&mut self, batch: &[(u64, usize)]) -> Result<bool> {
        let mut targets = Vec::with_capacity(batch.len());
        for &(id, t) in batch {
            targets.push((self.slot(id)?.0, t));
        }
        match self.cache.step(&targets) {
            Ok(()) => {}
            Err(e) if exhausted(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
        let mut items = Vec::new();
        for &(id, t) in batch {
            if let Some(r) = self.running.get_mut(&id) {
                items.extend((r.1..t).map(|tok| (id, r.0, tok)));
                r.1 = r.1.max(t);
            }
        }
        self.stamper.write(&items)?;
        Ok(true)
    }
    fn preempt(&mut self, id: u64) -> Result<(Preempted, Cost)> {
        let (slot, tokens) = self.slot(id)?;
        let have = self.swap.copies.get(&id).map_or(0, |c| c.tokens);
        let bpt = self.token_bytes();
        let new_bytes = (tokens - have.min(tokens)) as u64 * bpt;
        // The copy being extended is not evictable while we make room for its new part.
        let keep = self.running.remove(&id);
        let room = self.host_room(new_bytes);
        if let Some(k) = keep {
            self.running.insert(id, k);
        }
        if !room? {
            self.drop_copy(id)?;
            self.release_slot(slot)?;
            self.running.remove(&id);
            self.dropped.insert(id);
            return Ok((Preempted::Dropped, Cost::default()));
        }
        let mut cost = Cost::default();
        if tokens > have {
            let (buf, calls) = self.copy_out(slot, have, tokens)?;
            self.swap.clock += 1;
            let clock = self.swap.clock;
            let c = self.swap.copies.entry(id).or_insert(HostCopy {
                segments: Vec::new(),
                tokens: 0,
                bytes: 0,
                last_use: 0,
            });
            c.segments.push((have, tokens, buf));
            c.tokens = tokens;
            c.bytes += new_bytes;
            c.last_use = clock;
            self.swap.used += new_bytes;
            cost = Cost {
                copy_bytes: new_bytes,
                copy_calls: calls,
            };
        }
        self.counters.reuse_saved_bytes += have.min(tokens) as u64 * bpt;
        self.counters.swapped_bytes += cost.copy_bytes;
        self.counters.copy_calls += cost.copy_calls;
        self.release_slot(slot)?;
        self.running.remove(&id);
        Ok((Preempted::Swapped, cost))
    }
    fn resume(&mut self, id: u64, tokens: usize) -> Result<Option<Cost>> {
        let Some(slot) = self.slot_for(tokens)? else {
            return Ok(None);
        };
        let mut cost = Cost::default();
        if self.dropped.remove(&id) {
            // Recompute: the prefill writes the KV again.
            self.stamp_new(id, slot, 0, tokens)?;
        } else {
            let copy = self.swap.copies.get(&id).ok_or_else(|| {
                Error::InvalidArgument(format!("request {id} has no host copy to resume from"))
            })?;
            if copy.tokens != tokens {
                let held = copy.tokens;
                self.cache.free_slot(slot)?;
                return Err(Error::InvalidArgument(format!(
                    "request {id}: host copy holds {held} tokens, {tokens} asked"
                )));
            }
            let calls = match self.copy_in(slot, copy) {
                Ok(c) => c,
                Err(e) => {
                    self.cache.free_slot(slot)?;
                    return Err(e);
                }
            };
            cost = Cost {
                copy_bytes: tokens as u64 * self.token_bytes(),
                copy_calls: calls,
            };
            self.swap.clock += 1;
            let clock = self.swap.clock;
            if let Some(c) = self.swap.copies.get_mut(&id) {
                c.last_use = clock;
            }
            self.counters.swapped_bytes += cost.copy_bytes;
            self.counters.copy_calls += cost.copy_calls;
            self.counters.integrity_errors += self.stamper.check(id, slot, tokens)?;
        }
        self.running.insert(id, (slot, tokens));
        Ok(Some(cost))
    }
    fn finish(&mut self, id: u64) -> Result<()> {
        let (slot, tokens) = self.slot(id)?;
        self.counters.integrity_errors += self.stamper.check(id, slot, tokens)?;
        self.cache.free_slot(slot)?;
        self.running.remove(&id);
        self.drop_copy(id)
    }
    fn usage(&self) -> Usage {
        Usage {
            live_bytes: self.running.values().map(|&(_, t)| t as u64).sum::<u64>()
                * self.token_bytes(),
            held_bytes: self.held(),
        }
    }
    fn counters(&self) -> Counters {
        Counters {
            backend_calls: self.cache.stats().total_backend_calls() + self.counters.copy_calls,
            ..self.counters
        }
    }
}

impl Drop for KvvmAllocator {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.swap.copies.keys().copied().collect();
        for id in ids {
            if let Err(e) = self.drop_copy(id) {
                tracing::warn!("freeing a host copy failed: {e}");
            }
        }
    }
}

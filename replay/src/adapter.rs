//! The kvvm allocator adapter: a real [`KvCache`] with real pages, preemption by swapping whole
//! requests to host memory, and a stamp in every token's KV that is checked when a request
//! resumes and when it finishes.

use std::collections::HashMap;
use std::sync::Arc;

use crate::alloc::{Counters, KvAllocator, Outcome, Preempted, Usage};
use crate::error::{Error, Result};
use crate::sched::Job;
use crate::timing::{Dir, Submit, Transfer, VmmCalls, VmmCounters};
use kvvm::vmm::{Backend, BackendOp, CopyKind, CopyRegion, HostBuffer};
use kvvm::{HostCopyId, SwapConfig, SwapEngine};
use kvvm::{Kv, KvCache, SlotId, TensorView};

/// The stamp of token `token` of request `id` in stamped row `row`: a 64-bit mix
/// (splitmix64's finalizer) of the three, never constant across tokens, requests or rows.
pub fn stamp(id: u64, token: usize, row: usize) -> u64 {
    let mut x = id.wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ ((token as u64) << 16)
        ^ (row as u64).wrapping_mul(0x8CB9_2BA7_2F3D_8DD7);
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
                        dst: v.row_addr(slot.as_usize(), token, 0),
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
    fn check(&self, key: &dyn Fn(usize) -> u64, slot: SlotId, tokens: usize) -> Result<u64> {
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
                        src: v.row_addr(slot.as_usize(), t, 0),
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
                    got == stamp(key(t), t, r)
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

fn exhausted(e: &kvvm::Error) -> bool {
    e.is_exhaustion() || matches!(e, kvvm::Error::SlotsExhausted { .. })
}

/// kvvm as a replay allocator. See the [module documentation](self).
#[derive(Debug)]
pub struct KvvmAllocator {
    cache: Arc<KvCache>,
    stamper: Stamper,
    swap: SwapEngine,
    /// Host copies of requests that were swapped out at least once.
    copies: HashMap<u64, HostCopyId>,
    running: HashMap<u64, (SlotId, usize)>,
    /// Preempted requests whose KV was dropped instead of swapped.
    dropped: std::collections::HashSet<u64>,
    budget: u64,
    counters: Counters,
    /// Hash blocks and whole-block prompt tokens of requests admitted through the prefix index:
    /// the KV of those tokens is the same for every request with those blocks.
    content: HashMap<u64, (Arc<[u64]>, usize)>,
}

impl KvvmAllocator {
    /// Wraps `cache` (which must be fresh: no slot allocated) with `host_budget_bytes` of host
    /// memory for swapped-out KV.
    ///
    /// # Errors
    /// Backend errors allocating the staging buffer.
    pub fn new(cache: Arc<KvCache>, host_budget_bytes: u64) -> Result<Self> {
        let backend = cache.backend().inner().clone();
        let stamper = Stamper::new(&cache, backend)?;
        let swap = SwapEngine::new(
            cache.clone(),
            SwapConfig {
                host_budget_bytes,
                ..SwapConfig::default()
            },
        )?;
        let budget = cache.stats().pool.budget_pages as u64 * cache.geometry().page_size as u64;
        Ok(KvvmAllocator {
            cache,
            stamper,
            swap,
            copies: HashMap::new(),
            running: HashMap::new(),
            dropped: Default::default(),
            budget,
            counters: Counters::default(),
            content: HashMap::new(),
        })
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<KvCache> {
        &self.cache
    }

    /// The slot of running request `id`.
    pub fn slot_of(&self, id: u64) -> Option<SlotId> {
        self.running.get(&id).map(|r| r.0)
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
            .map(|&(s, _)| stats.pages_per_slot.get(s.as_usize()).copied().unwrap_or(0) as u64)
            .sum::<u64>()
            * (g.page_size * g.buffers) as u64
    }

    /// Frees `slot` and takes its pages back (what a swap-out does after the copy).
    fn release_slot(&self, slot: SlotId) -> Result<()> {
        let r = self.cache.shrink(slot, 0);
        self.cache.free_slot(slot)?;
        Ok(r?)
    }

    /// Drops the host copy of request `id`, if any. A copy the engine evicted is already gone.
    fn drop_copy(&mut self, id: u64) -> Result<()> {
        match self.copies.remove(&id) {
            Some(c) => match self.swap.release(c) {
                Ok(()) | Err(kvvm::Error::InvalidArgument(_)) => Ok(()),
                Err(e) => Err(e.into()),
            },
            None => Ok(()),
        }
    }

    /// Copy calls a transfer of `tokens` tokens makes: every buffer's range cut into chunks.
    fn calls_for(&self, tokens: usize) -> u64 {
        let g = self.cache.geometry();
        let chunk = self.swap.config().chunk_bytes.max(1);
        (g.buffers * (tokens * g.token_bytes).div_ceil(chunk)) as u64
    }

    /// Gives back pages a reused slot has mapped beyond what `tokens` tokens need.
    fn trim(&self, slot: SlotId, tokens: usize) -> kvvm::Result<()> {
        let g = self.cache.geometry();
        if g.pages_for(self.cache.capacity(slot)?) > g.pages_for(tokens) + 1 {
            self.cache.shrink(slot, tokens)?;
        }
        Ok(())
    }

    /// Allocates a slot holding `tokens` tokens, or `None` when there is no room.
    fn slot_for(&self, tokens: usize) -> Result<Option<SlotId>> {
        let slot = match self.cache.alloc_slot_for(tokens) {
            Ok(s) => s,
            Err(e) if exhausted(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match self.cache.ensure(slot, tokens) {
            Ok(()) => {
                // A reused slot may have more pages mapped than this request needs (its last
                // user was longer): give the excess back rather than hold it for nothing.
                self.trim(slot, tokens)?;
                Ok(Some(slot))
            }
            Err(e) => {
                self.cache.free_slot(slot)?;
                if exhausted(&e) {
                    Ok(None)
                } else {
                    Err(e.into())
                }
            }
        }
    }

    /// Checks the cache's promise that a successful step mapped every slot's new tokens, before
    /// any stamp is written there (a broken promise is reported, never written through).
    fn check_mapped(&self, batch: &[(u64, usize)]) -> Result<()> {
        for &(id, t) in batch {
            let (slot, _) = self.slot(id)?;
            let capacity = self.cache.capacity(slot)?;
            if capacity < t {
                return Err(Error::InvalidArgument(format!(
                    "cache invariant broken: slot {slot} holds {t} tokens with pages for {capacity}"
                )));
            }
        }
        Ok(())
    }

    /// A swap transfer of `bytes` covering `tokens` tokens: the swap engine's chunks, submitted
    /// and completed on its own threads, overlapping the caller's compute.
    fn transfer(&self, dir: Dir, bytes: u64, tokens: usize) -> Transfer {
        Transfer {
            dir,
            bytes,
            descriptors: self.calls_for(tokens),
            submit: Submit::PerCall,
            sync: false,
            submit_on_step: false,
        }
    }

    fn stamp_new(&self, id: u64, slot: SlotId, from: usize, to: usize) -> Result<()> {
        let items: Vec<(u64, SlotId, usize)> = (from..to)
            .map(|t| (self.stamp_id(id, t), slot, t))
            .collect();
        self.stamper.write(&items)
    }

    /// Whose stamp token `t` of request `id` carries: its hash block's inside the prompt's
    /// whole shared blocks (the same KV for every request with those blocks), else the
    /// request's own.
    fn stamp_id(&self, id: u64, t: usize) -> u64 {
        match self.content.get(&id) {
            Some((h, content)) if t < *content => h[t / BLOCK] ^ CONTENT_TAG,
            _ => id,
        }
    }

    /// Counts the tokens of request `id` in `slot` whose stamps differ.
    fn check_stamps(&self, id: u64, slot: SlotId, tokens: usize) -> Result<u64> {
        self.stamper.check(&|t| self.stamp_id(id, t), slot, tokens)
    }

    /// The page keys of the prompt's whole hash blocks, chained: page `j` is named by the hash
    /// of the block holding its last token (a hash id names its whole prefix) and by `j`.
    fn page_keys(&self, hash_ids: &[u64], content: usize) -> Option<Vec<u64>> {
        let tpp = self.cache.tokens_per_page().ok()?;
        let mut parent = 0;
        Some(
            (0..content / tpp)
                .map(|j| {
                    let h = hash_ids[((j + 1) * tpp - 1) / BLOCK];
                    parent = kvvm::page_key(
                        parent,
                        PREFIX_NAMESPACE,
                        &[h as u32, (h >> 32) as u32, j as u32],
                    );
                    parent
                })
                .collect(),
        )
    }

    /// Admission through the prefix index: maps the cached pages of the prompt's longest
    /// published prefix (read-only), prefills the rest, and publishes the prompt's whole
    /// pages. `Ok(None)` when the prompt has no whole hash block a page fits in.
    fn admit_prefixed(&mut self, job: &Job, tokens: usize) -> Result<Option<Option<Outcome>>> {
        let h = &job.hash_ids;
        let content = h.len().min(tokens / BLOCK) * BLOCK;
        let keys = match self.page_keys(h, content) {
            Some(k) if !k.is_empty() => k,
            _ => return Ok(None),
        };
        let hit = match self.cache.alloc_slot_with_prefix_keys(&keys, tokens) {
            Ok(hit) => hit,
            Err(e) if exhausted(&e) => return Ok(Some(None)),
            Err(e) => return Err(e.into()),
        };
        if let Err(e) = self.cache.ensure(hit.slot, tokens) {
            self.cache.free_slot(hit.slot)?;
            return if exhausted(&e) {
                Ok(Some(None))
            } else {
                Err(e.into())
            };
        }
        self.content.insert(job.id, (h.clone(), content));
        self.running.insert(job.id, (hit.slot, tokens));
        self.stamp_new(job.id, hit.slot, hit.tokens, tokens)?;
        self.cache.publish_keys(hit.slot, &keys)?;
        Ok(Some(Some(Outcome {
            cached_tokens: hit.tokens,
            transfers: Vec::new(),
        })))
    }
}

/// Tokens of one Mooncake hash block.
const BLOCK: usize = 512;
/// Namespace of the page keys made from hash blocks.
const PREFIX_NAMESPACE: u64 = 0x6d6f_6f6e;
/// Tells content stamps (by hash block) apart from request stamps.
const CONTENT_TAG: u64 = 0xC0DE_0000_0000_0000;

impl KvAllocator for KvvmAllocator {
    fn name(&self) -> String {
        format!("kvvm-{}", self.cache.geometry().layout)
    }
    fn is_model(&self) -> bool {
        false
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
    fn admit(&mut self, job: &Job, tokens: usize) -> Result<Option<Outcome>> {
        let id = job.id;
        if self.running.contains_key(&id) {
            return Err(Error::InvalidArgument(format!("request {id} already runs")));
        }
        if let Some(outcome) = self.admit_prefixed(job, tokens)? {
            return Ok(outcome);
        }
        let Some(slot) = self.slot_for(tokens)? else {
            return Ok(None);
        };
        self.running.insert(id, (slot, tokens));
        self.stamp_new(id, slot, 0, tokens)?;
        Ok(Some(Outcome::none()))
    }
    fn grow(&mut self, batch: &[(u64, usize)]) -> Result<bool> {
        let mut targets = Vec::with_capacity(batch.len());
        for &(id, t) in batch {
            targets.push((self.slot(id)?.0, t));
        }
        match self.cache.step(&targets) {
            Ok(()) => {}
            Err(e) if exhausted(&e) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        self.check_mapped(batch)?;
        let mut items = Vec::new();
        for &(id, t) in batch {
            if let Some(r) = self.running.get_mut(&id) {
                items.extend((r.1..t).map(|tok| (id, r.0, tok)));
                r.1 = r.1.max(t);
            }
        }
        let items: Vec<(u64, SlotId, usize)> = items
            .into_iter()
            .map(|(id, slot, t)| (self.stamp_id(id, t), slot, t))
            .collect();
        self.stamper.write(&items)?;
        Ok(true)
    }
    fn preempt(&mut self, id: u64) -> Result<(Preempted, Outcome)> {
        let (slot, tokens) = self.slot(id)?;
        let ticket = match self.swap.swap_out(slot) {
            Ok(t) => t,
            Err(e) if exhausted(&e) => {
                // No room on the host: drop the KV, recompute it on resume.
                self.drop_copy(id)?;
                self.release_slot(slot)?;
                self.running.remove(&id);
                self.dropped.insert(id);
                return Ok((Preempted::Dropped, Outcome::none()));
            }
            Err(e) => return Err(e.into()),
        };
        ticket.wait()?;
        self.running.remove(&id);
        self.copies.insert(id, ticket.copy());
        let bytes = ticket.bytes();
        let new_tokens = (bytes / self.token_bytes().max(1)) as usize;
        debug_assert!(new_tokens <= tokens);
        Ok((
            Preempted::Swapped,
            Outcome {
                cached_tokens: 0,
                transfers: vec![self.transfer(Dir::ToHost, bytes, new_tokens)],
            },
        ))
    }
    fn resume(&mut self, job: &Job, tokens: usize) -> Result<Option<Outcome>> {
        let id = job.id;
        if self.dropped.contains(&id) {
            // Recompute: the prefill writes the KV again.
            let Some(slot) = self.slot_for(tokens)? else {
                return Ok(None);
            };
            self.dropped.remove(&id);
            self.running.insert(id, (slot, tokens));
            self.stamp_new(id, slot, 0, tokens)?;
            return Ok(Some(Outcome::none()));
        }
        let copy = *self.copies.get(&id).ok_or_else(|| {
            Error::InvalidArgument(format!("request {id} has no host copy to resume from"))
        })?;
        let held = self.swap.host_tokens(copy)?;
        if held != tokens {
            return Err(Error::InvalidArgument(format!(
                "request {id}: host copy holds {held} tokens, {tokens} asked"
            )));
        }
        let slot = match self.cache.alloc_slot_for(tokens) {
            Ok(s) => s,
            Err(e) if exhausted(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let started = self
            .trim(slot, tokens)
            .and_then(|()| self.swap.swap_in(copy, slot));
        let ticket = match started {
            Ok(t) => t,
            Err(e) => {
                self.cache.free_slot(slot)?;
                return if exhausted(&e) {
                    Ok(None)
                } else {
                    Err(e.into())
                };
            }
        };
        if let Err(e) = ticket.wait() {
            if self.cache.is_allocated(slot) {
                self.cache.free_slot(slot)?;
            }
            return Err(e.into());
        }
        self.running.insert(id, (slot, tokens));
        self.counters.integrity_errors += self.check_stamps(id, slot, tokens)?;
        Ok(Some(Outcome {
            cached_tokens: tokens,
            transfers: vec![self.transfer(Dir::ToDevice, ticket.bytes(), tokens)],
        }))
    }
    fn finish(&mut self, id: u64) -> Result<()> {
        let (slot, tokens) = self.slot(id)?;
        self.counters.integrity_errors += self.check_stamps(id, slot, tokens)?;
        self.cache.free_slot(slot)?;
        self.running.remove(&id);
        self.content.remove(&id);
        self.drop_copy(id)
    }
    fn vmm_calls(&self) -> VmmCounters {
        let stats = self.cache.stats();
        let count = |background: bool| {
            let n = |op: BackendOp| {
                let s = stats.calls(op);
                if background {
                    s.background_calls
                } else {
                    s.calls.saturating_sub(s.background_calls)
                }
            };
            VmmCalls {
                create: n(BackendOp::CreatePage),
                map: n(BackendOp::Map),
                unmap: n(BackendOp::Unmap),
            }
        };
        VmmCounters {
            foreground: count(false),
            background: count(true),
        }
    }
    fn usage(&self) -> Usage {
        Usage {
            live_bytes: self.running.values().map(|&(_, t)| t as u64).sum::<u64>()
                * self.token_bytes(),
            held_bytes: self.held(),
        }
    }
    fn counters(&self) -> Counters {
        let sw = self.swap.stats();
        let stats = self.cache.stats();
        Counters {
            swapped_bytes: sw.bytes_out + sw.bytes_in,
            reuse_saved_bytes: sw.reuse_saved_bytes,
            // The swap engine copies through the cache's metered backend.
            backend_calls: stats.total_backend_calls(),
            copy_calls: stats.calls(BackendOp::Copy).calls,
            integrity_errors: self.counters.integrity_errors,
        }
    }
}

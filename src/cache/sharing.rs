//! Copy-free prefix sharing: the same physical pages mapped, read-only, behind several slots.
//!
//! A slot's full pages are published under chained content keys (`prefix.rs`); a new
//! request whose tokens start with a cached chain gets a slot whose range already maps those
//! pages, and prefills only the rest. Nothing is copied: the pages are mapped a second time.
//!
//!
//! Rules (see `docs/prefix-sharing.md`):
//! - Only whole pages are shared; a page must hold whole tokens (`page_size % token_bytes == 0`).
//! - Published and shared pages are mapped read-only, for their first owner too: a write faults.
//!   A slot's read-only pages are always its first [`KvCache::read_only_tokens`] tokens.
//! - Freeing, shrinking, swapping out or reclaiming a slot drops its references only; a page
//!   returns to the pool when no slot maps it and the index does not keep it.
//! - The index keeps published pages after their requests end (reclaimable); under budget
//!   pressure it evicts least recently used chain tails no allocated slot maps, before free slots'
//!   pages are taken back.

use super::prefix::{prefix_keys, PageRef};
use super::{KvCache, Shared, SlotId};
use crate::error::{Error, Result};
use crate::vmm::{Access, Backend, PageHandle};

/// What [`KvCache::alloc_slot_with_prefix`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PrefixHit {
    /// The allocated slot.
    pub slot: SlotId,
    /// Leading tokens already in the slot (mapped from the cache, read-only): a multiple of
    /// [`KvCache::tokens_per_page`]. The slot's token count is this.
    pub tokens: usize,
}

impl KvCache {
    /// Tokens one page index of a slot holds (16 for Llama-3-8B at 2 MiB in the interleaved
    /// layout, 1024 per-layer): the unit of prefix sharing.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when a page does not hold a whole number of tokens (then pages
    /// cannot be shared).
    pub fn tokens_per_page(&self) -> Result<usize> {
        self.shared.tokens_per_page()
    }

    /// Publishes the full pages of `slot` that `tokens` (the slot's token ids, from its first
    /// token) cover, under chained keys in `namespace` (see [`crate::page_key`]). Pages up to
    /// `min(tokens.len(), live tokens)` rounded down to whole pages become read-only for the slot
    /// too, and stay cached after the slot is freed. Pages whose key is already cached (the same
    /// content published before) are not published twice. Returns how many leading page indices
    /// of the slot are now read-only.
    ///
    /// Call it once the prefill's writes are done: on CUDA a kernel still writing these pages
    /// when they become read-only faults (synchronize the stream, or wait on an event recorded
    /// after the prefill, first).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad slot; [`Error::Unsupported`] as
    /// [`KvCache::tokens_per_page`]; a backend error if changing the access fails (then nothing
    /// changed).
    pub fn publish(&self, slot: SlotId, tokens: &[u32], namespace: u64) -> Result<usize> {
        let tpp = self.shared.tokens_per_page()?;
        let keys = prefix_keys(tokens, tpp, namespace);
        let refs: Vec<PageRef<'_>> = keys
            .iter()
            .zip(tokens.chunks_exact(tpp))
            .map(|(&key, t)| PageRef {
                key,
                tokens: Some(t),
            })
            .collect();
        self.shared.publish(slot, &refs)
    }

    /// [`KvCache::publish`] with the caller's own per-page keys: `keys[i]` names the content of
    /// the slot's first `i + 1` pages (equal keys must mean equal KV; chain them as
    /// [`crate::page_key`] does).
    ///
    /// # Errors
    /// As [`KvCache::publish`].
    pub fn publish_keys(&self, slot: SlotId, keys: &[u64]) -> Result<usize> {
        self.shared.tokens_per_page()?;
        let refs: Vec<PageRef<'_>> = keys
            .iter()
            .map(|&key| PageRef { key, tokens: None })
            .collect();
        self.shared.publish(slot, &refs)
    }

    /// Allocates a slot for a request whose token ids are `tokens`, with the longest cached
    /// chain of its full pages already mapped (read-only): the slot holds
    /// [`PrefixHit::tokens`] tokens and the caller prefills the rest. All or nothing: on error no
    /// slot is allocated. With no cached page this is [`KvCache::alloc_slot_for`].
    ///
    /// When every full page is cached and the prompt is a whole number of pages, nothing is left
    /// to prefill; an engine that needs the last token's logits passes `&tokens[..len - 1]`.
    ///
    /// See `docs/prefix-sharing.md` for the whole contract.
    ///
    /// ```
    /// use kvvm::{CacheConfig, KvCache, Layout};
    /// use kvvm::vmm::{BackendChoice, BackendConfig};
    ///
    /// let mut config = CacheConfig::for_model("llama-3-8b", 4, 1024, 64 << 20)?;
    /// config.layers = 2; // keep the doctest small
    /// config.layout = Layout::Interleaved;
    /// config.backend = BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() };
    /// let cache = KvCache::new(config)?;
    /// let tpp = cache.tokens_per_page()?; // tokens in one page index of a slot
    ///
    /// // Request A: prefill its prompt, then publish its full pages.
    /// let prompt: Vec<u32> = (0..300).collect();
    /// let a = cache.alloc_slot()?;
    /// cache.ensure(a, prompt.len())?;
    /// // ... the engine writes the prompt's KV ...
    /// let published = cache.publish(a, &prompt, 0)?;
    /// assert_eq!(published, prompt.len() / tpp);
    ///
    /// // Request B shares A's prompt and adds its own question.
    /// let mut prompt_b = prompt.clone();
    /// prompt_b.extend(1000..1040);
    /// let hit = cache.alloc_slot_with_prefix(&prompt_b, 0)?;
    /// assert_eq!(hit.tokens, published * tpp); // already mapped: prefill only the rest
    /// assert_eq!(cache.tokens(hit.slot)?, hit.tokens);
    /// cache.ensure(hit.slot, prompt_b.len())?;
    /// assert!(cache.stats().prefix.hit_tokens > 0);
    /// # Ok::<(), kvvm::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::SlotsExhausted`]; [`Error::Unsupported`] as [`KvCache::tokens_per_page`];
    /// [`Error::Grow`] if mapping the shared pages fails.
    pub fn alloc_slot_with_prefix(&self, tokens: &[u32], namespace: u64) -> Result<PrefixHit> {
        let tpp = self.shared.tokens_per_page()?;
        let keys = prefix_keys(tokens, tpp, namespace);
        let refs: Vec<PageRef<'_>> = keys
            .iter()
            .zip(tokens.chunks_exact(tpp))
            .map(|(&key, t)| PageRef {
                key,
                tokens: Some(t),
            })
            .collect();
        self.alloc_with_refs(&refs, tokens.len())
    }

    /// [`KvCache::alloc_slot_with_prefix`] with the caller's own per-page keys (see
    /// [`KvCache::publish_keys`]); `tokens_hint` is the request's expected length.
    ///
    /// # Errors
    /// As [`KvCache::alloc_slot_with_prefix`].
    pub fn alloc_slot_with_prefix_keys(
        &self,
        keys: &[u64],
        tokens_hint: usize,
    ) -> Result<PrefixHit> {
        self.shared.tokens_per_page()?;
        let refs: Vec<PageRef<'_>> = keys
            .iter()
            .map(|&key| PageRef { key, tokens: None })
            .collect();
        self.alloc_with_refs(&refs, tokens_hint)
    }

    /// Evicts up to `pages` page indices from the prefix index, least recently used chain tails
    /// first, among those no slot maps (call [`KvCache::reclaim_free_slots`] first to let go of
    /// free slots' mappings too). Returns how many pool pages went back to the free list.
    pub fn evict_prefixes(&self, pages: usize) -> usize {
        if self.shared.fork.inherited() {
            // A forked child's copy of the cache changes nothing of the parent's pages.
            return 0;
        }
        self.shared
            .evict_cached(pages.saturating_mul(self.shared.geometry.buffers))
    }

    /// Leading tokens of `slot` that are mapped read-only (shared or published pages).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad slot.
    pub fn read_only_tokens(&self, slot: SlotId) -> Result<usize> {
        let st = self.shared.lock();
        let i = self.shared.check_slot(&st, slot)?;
        let ro = st.slots[i].ro;
        drop(st);
        Ok(if ro == 0 {
            0
        } else {
            ro * self.shared.tokens_per_page()?
        })
    }

    /// For tests: (distinct pages referenced by slots and the prefix index, references held),
    /// which must equal the pool's `in_use` and `references` when the cache is idle.
    #[cfg(feature = "testing")]
    pub fn debug_page_census(&self) -> (usize, usize) {
        let st = self.shared.lock();
        let mut distinct = std::collections::HashSet::new();
        let mut refs = 0;
        for s in &st.slots {
            for p in s.pages.iter().flatten() {
                distinct.insert(p.raw());
                refs += 1;
            }
        }
        for e in st.prefix.entries.values() {
            for p in &e.pages {
                distinct.insert(p.raw());
                refs += 1;
            }
        }
        (distinct.len(), refs)
    }

    /// For tests: the raw page handles slot `slot` maps, per buffer.
    #[cfg(feature = "testing")]
    pub fn debug_page_ids(&self, slot: SlotId) -> Vec<Vec<u64>> {
        let st = self.shared.lock();
        st.slots.get(slot.as_usize()).map_or_else(Vec::new, |s| {
            s.pages
                .iter()
                .map(|b| b.iter().map(PageHandle::raw).collect())
                .collect()
        })
    }

    fn alloc_with_refs(&self, refs: &[PageRef<'_>], hint: usize) -> Result<PrefixHit> {
        self.shared.fork.check("cache")?;
        let sh = &*self.shared;
        let g = &sh.geometry;
        let tpp = sh.tokens_per_page()?;
        let mut st = sh.lock();
        st.prefix.stats.lookups += 1;
        let keys = st.prefix.lookup(refs);
        let m = keys.len().min(g.max_tokens / tpp);
        if m == 0 {
            drop(st);
            let slot = self.alloc_slot_for(hint)?;
            return Ok(PrefixHit { slot, tokens: 0 });
        }
        // References to the chain's pages, per page index then buffer, taken under the lock:
        // from here on eviction cannot free them.
        let mut chain: Vec<Vec<PageHandle>> = keys[..m]
            .iter()
            .filter_map(|k| st.prefix.entries.get(k))
            .map(|e| e.pages.iter().map(|p| sh.pool.share(p)).collect())
            .collect();
        debug_assert_eq!(chain.len(), m);
        // A free slot that already maps the chain's first pages (a request of the same
        // conversation that just ended) needs fewer calls; then one with little to unmap.
        let common = |s: &super::Slot| -> usize {
            let mut c = 0;
            while c < m.min(s.ro)
                && s.pages
                    .iter()
                    .zip(&chain[c])
                    .all(|(b, page)| b.get(c).is_some_and(|p| p.raw() == page.raw()))
            {
                c += 1;
            }
            c
        };
        let best = st
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.allocated)
            .map(|(i, s)| (i, common(s), s.total_pages()))
            .max_by_key(|&(i, c, total)| {
                (
                    c,
                    std::cmp::Reverse(total.saturating_sub(c * g.buffers)),
                    std::cmp::Reverse(i),
                )
            })
            .map(|(i, _, _)| i);
        let Some(i) = best else {
            drop(st);
            sh.pool.give_back(chain.into_iter().flatten().collect());
            return Err(Error::SlotsExhausted {
                max_slots: g.max_slots,
            });
        };
        let s = &mut st.slots[i];
        s.allocated = true;
        s.tokens = 0;
        s.ahead = 0;
        s.epoch += 1;
        // Reclamation may be taking pages from it right now.
        while st.slots[i].busy {
            st = sh.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let c = common(&st.slots[i]);
        let s = &mut st.slots[i];
        s.busy = true;
        s.shrinking = true;
        // Pages the slot maps beyond the chain stay (as pages mapped ahead) if they are its
        // own; otherwise it is cut to what it shares with the chain (its page lists have no
        // holes), dropping its references to the rest.
        let tails = if c == m && s.ro <= m {
            Vec::new()
        } else {
            s.tails(c)
        };
        let fence = if tails.is_empty() {
            None
        } else {
            s.fence.take()
        };
        drop(st);
        // The previous occupant's kernels may still read the pages about to be unmapped.
        sh.wait_fence(fence.as_deref(), i);
        // The slot holds references to the first `c` pages already.
        let rest = chain.split_off(c);
        sh.pool.give_back(chain.into_iter().flatten().collect());
        let mut shares: Vec<Vec<PageHandle>> = (0..g.buffers).map(|_| Vec::new()).collect();
        for page in rest {
            for (b, p) in page.into_iter().enumerate() {
                shares[b].push(p);
            }
        }

        let fail = |e: Error, shares: Vec<Vec<PageHandle>>| -> Error {
            sh.pool.give_back(shares.into_iter().flatten().collect());
            let mut st = sh.lock();
            let s = &mut st.slots[i];
            s.allocated = false;
            s.busy = false;
            s.shrinking = false;
            drop(st);
            sh.changed.notify_all();
            Error::Grow {
                slot: SlotId::new(i as u32),
                missing_pages: (m - c) * g.buffers,
                source: Box::new(e),
            }
        };
        // Cut the slot to the pages it shares with the chain.
        if !tails.is_empty() {
            if let Err(e) = sh.unmap_tails(i, c, &tails) {
                return Err(fail(e, shares));
            }
        }
        // Map the rest of the chain, read-only.
        let mut mapped: Vec<usize> = Vec::new();
        for (b, pages) in shares.iter().enumerate() {
            if pages.is_empty() {
                continue;
            }
            let refs: Vec<&PageHandle> = pages.iter().collect();
            if let Err(e) = sh
                .backend
                .map_with_access(sh.va(b, i, c), &refs, Access::ReadOnly)
            {
                let mut kept = Vec::new();
                for &mb in &mapped {
                    let (va, len) = (sh.va(mb, i, c), (m - c) * g.page_size);
                    let r = sh
                        .backend
                        .unmap(va, len)
                        .or_else(|_| sh.backend.unmap(va, len));
                    if let Err(u) = r {
                        tracing::warn!("rollback unmap failed, pages stay mapped: {u}");
                        kept.push(mb);
                    }
                }
                if !kept.is_empty() {
                    // Attach what could not be unmapped so that nothing leaks; those buffers
                    // then hold shared pages beyond the others (the slot is free, reclamation
                    // takes them back).
                    let mut rest = Vec::new();
                    let mut st = sh.lock();
                    for (bb, pages) in shares.into_iter().enumerate() {
                        if kept.contains(&bb) {
                            st.slots[i].pages[bb].extend(pages);
                        } else {
                            rest.push(pages);
                        }
                    }
                    let s = &mut st.slots[i];
                    s.refresh();
                    // Read-only pages stay in those buffers: a plain allocation of this slot
                    // must let go of them first.
                    s.ro = m;
                    drop(st);
                    return Err(fail(e, rest));
                }
                return Err(fail(e, shares));
            }
            mapped.push(b);
        }
        let mut st = sh.lock();
        let s = &mut st.slots[i];
        for (b, pages) in shares.into_iter().enumerate() {
            s.pages[b].extend(pages);
        }
        s.refresh();
        s.ro = m;
        s.tokens = m * tpp;
        s.busy = false;
        s.shrinking = false;
        let stats = &mut st.prefix.stats;
        stats.hits += 1;
        stats.hit_tokens += (m * tpp) as u64;
        stats.bytes_saved += (m * g.buffers * g.page_size) as u64;
        drop(st);
        sh.changed.notify_all();
        Ok(PrefixHit {
            slot: SlotId::new(i as u32),
            tokens: m * tpp,
        })
    }
}

impl Shared {
    /// Waits for `fence` (the work of a free slot's previous occupant that may still read its
    /// pages) before they are unmapped.
    pub(super) fn wait_fence(&self, fence: Option<&dyn crate::vmm::Fence>, slot: usize) {
        if let Some(f) = fence {
            if !f.poll().unwrap_or(true) {
                self.lock().fence_waits += 1;
                if let Err(e) = f.wait() {
                    tracing::warn!("waiting for slot {slot}'s fence failed: {e}");
                }
            }
        }
    }

    /// Tokens per page, when a page holds whole tokens.
    pub(super) fn tokens_per_page(&self) -> Result<usize> {
        let g = &self.geometry;
        if g.page_size % g.token_bytes != 0 {
            return Err(Error::Unsupported(format!(
                "prefix sharing needs pages of whole tokens: a page of {} bytes holds {} tokens of {} bytes",
                g.page_size,
                g.page_size as f64 / g.token_bytes as f64,
                g.token_bytes
            )));
        }
        Ok(g.page_size / g.token_bytes)
    }

    fn publish(&self, slot: SlotId, refs: &[PageRef<'_>]) -> Result<usize> {
        self.fork.check("cache")?;
        let g = &self.geometry;
        let tpp = self.tokens_per_page()?;
        let (mut st, i) = self.wait_idle(self.lock(), slot)?;
        let s = &mut st.slots[i];
        let full = refs.len().min(s.tokens / tpp).min(s.mapped());
        let ro = s.ro;
        if full > ro {
            // Make the pages read-only for this slot first (outside the lock, the slot busy).
            s.busy = true;
            drop(st);
            let len = (full - ro) * g.page_size;
            let mut done = 0;
            let mut err = None;
            for b in 0..g.buffers {
                match self
                    .backend
                    .protect(self.va(b, i, ro), len, Access::ReadOnly)
                {
                    Ok(()) => done += 1,
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = err {
                let mut stuck = false;
                for b in 0..done {
                    let va = self.va(b, i, ro);
                    let r = self
                        .backend
                        .protect(va, len, Access::ReadWrite)
                        .or_else(|_| self.backend.protect(va, len, Access::ReadWrite));
                    if let Err(u) = r {
                        tracing::warn!("restoring write access after a failed publish: {u}");
                        stuck = true;
                    }
                }
                if stuck {
                    // Some of these pages stay read-only: count them as such (they hold live
                    // tokens only), so that nothing writes them (see `Slot::ro`).
                    self.lock().slots[i].ro = full;
                }
                self.finish(&[i]);
                return Err(e);
            }
            st = self.lock();
            st.slots[i].ro = full;
            st.slots[i].busy = false;
        }
        // Index the pages whose keys are new.
        for (j, r) in refs.iter().enumerate().take(full) {
            if st.prefix.contains(r.key) {
                st.prefix.touch(r.key);
                continue;
            }
            let pages: Vec<PageHandle> = st.slots[i]
                .pages
                .iter()
                .map(|b| self.pool.share(&b[j]))
                .collect();
            let parent = j.checked_sub(1).map(|p| refs[p].key);
            st.prefix.insert(*r, parent, j, pages);
        }
        drop(st);
        self.changed.notify_all();
        Ok(full)
    }

    /// Evicts cached prefix pages that only the index holds until `pages` pool pages went back
    /// to the free list (or none is left). Returns how many did.
    pub(super) fn evict_cached(&self, pages: usize) -> usize {
        if pages == 0 {
            return 0;
        }
        let entries = pages.div_ceil(self.geometry.buffers);
        let handles = {
            let mut st = self.lock();
            let pool = &self.pool;
            st.prefix
                .evict(entries, |e| e.pages.iter().all(|p| pool.owners(p) == 1))
        };
        self.pool.give_back(handles)
    }
}

//! The physical page pool: a byte budget, pages created ahead of need and reused.
//!
//! Creating a page is the most expensive backend call (about 190 µs for `cuMemCreate` of 2 MiB on
//! an A100), so the pool keeps released pages on a free list and hands them out again instead of
//! releasing them. A background thread keeps at least `low_watermark` free pages ready (within the
//! budget) and releases free pages above `high_watermark` back to the system, so that after
//! warm-up no page is created or released on the caller's thread. With
//! [`PoolConfig::create_all`] every page of the budget is created up front, like vAttention's
//! `reserve_physical_pages`.
//!
//! A page may be held by several owners at once (a page mapped behind several slots, or kept by
//! the prefix index): [`PagePool::share`] hands out one more handle to a page and counts the
//! reference, and [`PagePool::give_back`] drops one reference per handle. A page returns to the
//! free list only when its last reference is given back.
//!
//! The pool is internal to the cache; the `testing` feature makes this module public for the
//! backend-contract tests.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::fork::ForkGuard;
use crate::vmm::{Backend, PageHandle};
use crate::worker::Worker;

/// Options of a [`PagePool`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolConfig {
    /// Size of every page, a positive multiple of the backend's granularity.
    pub page_size: usize,
    /// Most bytes of pages that may exist at once (rounded down to whole pages).
    pub budget_bytes: u64,
    /// Create every page of the budget when the pool is made.
    pub create_all: bool,
    /// The background thread keeps at least this many free pages (within the budget).
    pub low_watermark: usize,
    /// Free pages above this many are released back to the system (not with `create_all`).
    pub high_watermark: usize,
    /// Run the background refill/trim thread. Without it, pages are created on demand and
    /// trimmed inline in [`PagePool::give_back`].
    pub background: bool,
}

/// Free pages a pool keeps for reuse by default; more are released to the system (a free page
/// holds memory that no mapping shows, so the free list must not grow with the budget).
pub const DEFAULT_HIGH_WATERMARK: usize = 64;

impl PoolConfig {
    /// A pool of `budget_bytes` with pages of `page_size`, default watermarks (low 4 pages, high
    /// [`DEFAULT_HIGH_WATERMARK`] pages: a bounded number of free pages is kept for reuse, the
    /// rest goes back to the system) and the background thread on.
    pub fn with_budget(page_size: usize, budget_bytes: u64) -> Self {
        PoolConfig {
            page_size,
            budget_bytes,
            create_all: false,
            low_watermark: 4,
            high_watermark: DEFAULT_HIGH_WATERMARK,
            background: true,
        }
    }
}

/// Counters of a [`PagePool`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PoolStats {
    /// Page size in bytes.
    pub page_size: usize,
    /// Pages the budget allows.
    pub budget_pages: usize,
    /// Pages that exist now (created and not released).
    pub live: usize,
    /// Pages on the free list.
    pub free: usize,
    /// Pages handed out and not given back (mapped by the cache).
    pub in_use: usize,
    /// Pages created since the pool was made.
    pub created: u64,
    /// Pages released to the system since the pool was made.
    pub released: u64,
    /// Of `created`, pages created on a caller's thread inside [`PagePool::acquire`].
    pub created_on_demand: u64,
    /// Backend calls that failed inside the pool (creation or release).
    pub failures: u64,
    /// Free pages being released right now (counted in `live`, not in `free`):
    /// `live == free + in_use + releasing` in every snapshot.
    pub releasing: usize,
    /// Of `in_use`, pages held by more than one owner (see [`PagePool::share`]).
    pub shared: usize,
    /// References to pages in use: `in_use` plus one for every extra owner of a shared page.
    pub references: usize,
}

#[derive(Debug)]
struct State {
    free: Vec<PageHandle>,
    in_use: usize,
    /// Extra references of shared pages (raw handle → owners beyond the first).
    extra: std::collections::HashMap<u64, usize>,
    /// Sum of `extra`.
    extra_total: usize,
    live: usize,
    /// Pages being created outside the lock (they count against the budget).
    creating: usize,
    /// Free pages being released outside the lock (still counted in `live`).
    releasing: usize,
    created: u64,
    released: u64,
    created_on_demand: u64,
    failures: u64,
    /// The background thread stops refilling after a failure until the next acquire.
    refill_stalled: bool,
    shutdown: bool,
}

impl State {
    /// Drops one reference per handle; returns the handles whose last reference this was.
    fn drop_references(&mut self, pages: Vec<PageHandle>) -> Vec<PageHandle> {
        let mut last = Vec::with_capacity(pages.len());
        for p in pages {
            match self.extra.get_mut(&p.raw()) {
                Some(n) => {
                    *n -= 1;
                    if *n == 0 {
                        self.extra.remove(&p.raw());
                    }
                    self.extra_total -= 1;
                }
                None => last.push(p),
            }
        }
        last
    }
}

#[derive(Debug)]
struct Inner {
    backend: Arc<dyn Backend>,
    config: PoolConfig,
    budget_pages: usize,
    state: Mutex<State>,
    /// Wakes the background thread.
    work: Condvar,
    /// Wakes callers waiting for pages under creation.
    created: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn needs_refill(&self, s: &State) -> bool {
        !s.refill_stalled
            && s.free.len() + s.creating < self.config.low_watermark
            && s.live + s.creating < self.budget_pages
    }

    fn needs_trim(&self, s: &State) -> bool {
        // Pages created up front are meant to be kept.
        !self.config.create_all && s.free.len() > self.config.high_watermark
    }

    /// Releases one free page (the lock is dropped during the call). Returns false if there was
    /// none or the release failed.
    fn trim_one<'a>(&'a self, mut s: MutexGuard<'a, State>) -> (MutexGuard<'a, State>, bool) {
        let Some(page) = s.free.pop() else {
            return (s, false);
        };
        // The page stays counted as live until the backend has released it, so that a snapshot
        // taken meanwhile keeps `created - released == live` and the budget counts it.
        s.releasing += 1;
        drop(s);
        let r = self.backend.release_page(page);
        let mut s = self.lock();
        s.releasing -= 1;
        match r {
            Ok(()) => {
                s.live -= 1;
                s.released += 1;
                // The budget has room again for an acquire waiting to create.
                self.created.notify_all();
                (s, true)
            }
            Err((page, e)) => {
                tracing::warn!("releasing a free page failed: {e}");
                s.free.push(page);
                s.failures += 1;
                (s, false)
            }
        }
    }

    fn background(self: Arc<Self>) {
        let mut s = self.lock();
        loop {
            while !s.shutdown && !self.needs_refill(&s) && !self.needs_trim(&s) {
                s = self.work.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            if s.shutdown {
                return;
            }
            if self.needs_refill(&s) {
                s.creating += 1;
                drop(s);
                let r = self.backend.create_page(self.config.page_size);
                s = self.lock();
                s.creating -= 1;
                match r {
                    Ok(p) => {
                        s.free.push(p);
                        s.live += 1;
                        s.created += 1;
                    }
                    Err(e) => {
                        tracing::warn!("background page creation failed: {e}");
                        s.failures += 1;
                        s.refill_stalled = true;
                    }
                }
                self.created.notify_all();
            } else {
                let (g, ok) = self.trim_one(s);
                s = g;
                if !ok {
                    // Do not retry a failing release in a loop; wait for the next give_back.
                    s = self.work.wait(s).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }
}

/// A pool of physical pages of one size under a byte budget. See the
/// [module documentation](self).
///
/// All methods take `&self` and may be called from several threads.
#[derive(Debug)]
pub struct PagePool {
    inner: Arc<Inner>,
    worker: Option<Worker>,
    /// The process the pool belongs to (see [`crate::fork`]).
    fork: ForkGuard,
}

impl PagePool {
    /// Creates a pool on `backend`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the page size is not a positive multiple of the backend's
    /// granularity or the budget holds no page; with `create_all`, the error of the first page
    /// creation that failed (pages already created are released).
    pub fn new(backend: Arc<dyn Backend>, config: PoolConfig) -> Result<Self> {
        let g = backend.granularity();
        if config.page_size == 0 || config.page_size % g != 0 {
            return Err(Error::InvalidConfig(format!(
                "page size {} is not a positive multiple of the backend granularity {g}",
                config.page_size
            )));
        }
        let budget_pages =
            usize::try_from(config.budget_bytes / config.page_size as u64).unwrap_or(usize::MAX);
        if budget_pages == 0 {
            return Err(Error::InvalidConfig(format!(
                "budget of {} bytes holds no page of {} bytes",
                config.budget_bytes, config.page_size
            )));
        }
        crate::vmm::host::check_budget(
            backend.info().usable_memory,
            config.page_size,
            config.budget_bytes,
        )?;
        let inner = Arc::new(Inner {
            backend,
            budget_pages,
            state: Mutex::new(State {
                free: Vec::new(),
                in_use: 0,
                extra: std::collections::HashMap::new(),
                extra_total: 0,
                live: 0,
                creating: 0,
                releasing: 0,
                created: 0,
                released: 0,
                created_on_demand: 0,
                failures: 0,
                refill_stalled: false,
                shutdown: false,
            }),
            work: Condvar::new(),
            created: Condvar::new(),
            config,
        });
        let mut pool = PagePool {
            inner,
            worker: None,
            fork: ForkGuard::new(),
        };
        if pool.inner.config.create_all {
            pool.prefill(budget_pages)?;
        }
        if pool.inner.config.background {
            let inner = pool.inner.clone();
            pool.worker = Some(Worker::spawn("kvvm-pool", move || {
                crate::vmm::mark_background_thread();
                inner.background()
            })?);
        }
        Ok(pool)
    }

    /// Pages [`PagePool::acquire`] could hand out now: free ones plus those the budget still
    /// allows creating.
    pub fn available(&self) -> usize {
        let s = self.inner.lock();
        s.free.len() + self.inner.budget_pages.saturating_sub(s.live)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PoolStats {
        let s = self.inner.lock();
        PoolStats {
            page_size: self.inner.config.page_size,
            budget_pages: self.inner.budget_pages,
            live: s.live,
            free: s.free.len(),
            in_use: s.in_use,
            created: s.created,
            released: s.released,
            created_on_demand: s.created_on_demand,
            failures: s.failures,
            releasing: s.releasing,
            shared: s.extra.len(),
            references: s.in_use + s.extra_total,
        }
    }

    /// Hands out one more handle to `page`, a page taken with [`PagePool::acquire`] and not given
    /// back, and counts the reference. Each handle is given back on its own; the page returns to
    /// the free list with the last one.
    pub fn share(&self, page: &PageHandle) -> PageHandle {
        let mut s = self.inner.lock();
        *s.extra.entry(page.raw()).or_insert(0) += 1;
        s.extra_total += 1;
        PageHandle::from_raw(page.raw(), page.size())
    }

    /// How many owners hold `page` now (1 for a page handed out once; 0 for a page not in use).
    pub fn owners(&self, page: &PageHandle) -> usize {
        let s = self.inner.lock();
        1 + s.extra.get(&page.raw()).copied().unwrap_or(0)
    }

    /// Creates pages on the caller's thread until `pages` are free (or the budget is reached).
    ///
    /// # Errors
    /// The backend error of the first creation that failed; pages created before stay in the
    /// pool.
    pub fn prefill(&self, pages: usize) -> Result<()> {
        self.fork.check("page pool")?;
        let inner = &*self.inner;
        let mut s = inner.lock();
        while s.free.len() < pages && s.live + s.creating < inner.budget_pages {
            s.creating += 1;
            drop(s);
            let r = inner.backend.create_page(inner.config.page_size);
            s = inner.lock();
            s.creating -= 1;
            match r {
                Ok(p) => {
                    s.free.push(p);
                    s.live += 1;
                    s.created += 1;
                }
                Err(e) => {
                    s.failures += 1;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Takes `n` pages, all or none.
    ///
    /// Free pages are used first; the rest are created within the budget on the caller's thread
    /// (counted in [`PoolStats::created_on_demand`]).
    ///
    /// # Errors
    /// [`Error::BudgetExhausted`] if free pages plus the remaining budget cannot supply `n`; the
    /// backend's error if creating a page fails. The pool is unchanged in both cases.
    pub fn acquire(&self, n: usize) -> Result<Vec<PageHandle>> {
        self.fork.check("page pool")?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let inner = &*self.inner;
        let mut s = inner.lock();
        // Pages the background thread is creating will land on the free list: wait for them
        // rather than failing or creating more.
        loop {
            let creatable = inner.budget_pages.saturating_sub(s.live + s.creating);
            if s.free.len() + creatable >= n {
                break;
            }
            if s.creating == 0 {
                return Err(Error::BudgetExhausted {
                    needed: n,
                    available: s.free.len() + creatable,
                    budget_bytes: inner.config.budget_bytes,
                    page_size: inner.config.page_size,
                });
            }
            s = inner.created.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        let from_free = n.min(s.free.len());
        let split = s.free.len() - from_free;
        let mut out = s.free.split_off(split);
        let missing = n - from_free;
        if missing > 0 {
            s.creating += missing;
            drop(s);
            let mut failure = None;
            for _ in 0..missing {
                match inner.backend.create_page(inner.config.page_size) {
                    Ok(p) => out.push(p),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            s = inner.lock();
            s.creating -= missing;
            let made = out.len() - from_free;
            s.live += made;
            s.created += made as u64;
            s.created_on_demand += made as u64;
            // Another acquire may be waiting for pages in creation (`creating > 0`): it must
            // re-check now, or it sleeps although none will land on the free list.
            inner.created.notify_all();
            if let Some(e) = failure {
                s.failures += 1;
                s.free.extend(out);
                inner.created.notify_all();
                return Err(e);
            }
        }
        s.in_use += n;
        s.refill_stalled = false;
        if inner.needs_refill(&s) {
            inner.work.notify_one();
        }
        Ok(out)
    }

    /// Returns pages taken with [`PagePool::acquire`] or [`PagePool::share`]: one reference per
    /// handle. A page whose last reference this was must be unmapped everywhere; it goes to the
    /// free list. Returns how many pages went to the free list.
    ///
    /// Free pages above the high watermark are released: by the background thread, or here when
    /// it does not run.
    pub fn give_back(&self, pages: Vec<PageHandle>) -> usize {
        if pages.is_empty() || self.fork.inherited() {
            return 0;
        }
        let inner = &*self.inner;
        let mut s = inner.lock();
        let freed = s.drop_references(pages);
        let n = freed.len();
        if n == 0 {
            return 0;
        }
        s.in_use = s.in_use.saturating_sub(n);
        s.free.extend(freed);
        inner.created.notify_all();
        if inner.needs_trim(&s) {
            if self.worker.is_some() {
                inner.work.notify_one();
            } else {
                while inner.needs_trim(&s) {
                    let (g, ok) = inner.trim_one(s);
                    s = g;
                    if !ok {
                        break;
                    }
                }
            }
        }
        n
    }

    /// Takes pages out of the pool for good, for [`Backend::detach`]: drops one reference per
    /// handle as [`PagePool::give_back`] does, and returns the pages whose last reference this
    /// was instead of putting them on the free list (they stop counting as live and against the
    /// budget; the caller owns them).
    pub(crate) fn take_out(&self, pages: Vec<PageHandle>) -> Vec<PageHandle> {
        if pages.is_empty() || self.fork.inherited() {
            return Vec::new();
        }
        let inner = &*self.inner;
        let mut s = inner.lock();
        let last = s.drop_references(pages);
        let n = last.len();
        s.in_use = s.in_use.saturating_sub(n);
        s.live = s.live.saturating_sub(n);
        s.released += n as u64;
        inner.created.notify_all();
        last
    }

    /// Releases free pages until at most `keep` remain.
    ///
    /// # Errors
    /// The backend's error if a release fails; that page stays free in the pool.
    pub fn trim(&self, keep: usize) -> Result<usize> {
        self.fork.check("page pool")?;
        let inner = &*self.inner;
        let mut released = 0;
        let mut s = inner.lock();
        while s.free.len() > keep {
            let Some(page) = s.free.pop() else { break };
            // Counted as live until released (see `trim_one`).
            s.releasing += 1;
            drop(s);
            let r = inner.backend.release_page(page);
            s = inner.lock();
            s.releasing -= 1;
            match r {
                Ok(()) => {
                    s.live -= 1;
                    s.released += 1;
                    released += 1;
                    inner.created.notify_all();
                }
                Err((page, e)) => {
                    s.free.push(page);
                    s.failures += 1;
                    return Err(e);
                }
            }
        }
        Ok(released)
    }
}

impl Drop for PagePool {
    fn drop(&mut self) {
        if self.fork.inherited() {
            // The free pages are the parent's too (shared memfd): a child releases nothing.
            return;
        }
        self.inner.lock().shutdown = true;
        self.inner.work.notify_all();
        if let Some(mut w) = self.worker.take() {
            w.join();
        }
        let _ = self.trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::host::{HostBackend, HostConfig};

    #[test]
    fn budget_bounds_acquire_and_pages_are_reused() -> Result<()> {
        let backend = Arc::new(HostBackend::new(HostConfig::default())?);
        let pool = PagePool::new(backend, PoolConfig::with_budget(2 << 20, 8 << 20))?;
        let pages = pool.acquire(3)?;
        assert_eq!(pool.stats().in_use, 3);
        assert!(pool.acquire(2).is_err(), "only 4 pages fit the budget");
        pool.give_back(pages);
        assert_eq!(pool.stats().in_use, 0);
        Ok(())
    }

    #[test]
    fn shared_pages_return_with_their_last_owner() {
        let backend = Arc::new(HostBackend::new(HostConfig::default()).unwrap());
        let pool = PagePool::new(backend, PoolConfig::with_budget(2 << 20, 8 << 20)).unwrap();
        let first = pool.acquire(1).unwrap();
        let second = pool.share(&first[0]);
        let third = pool.share(&second);
        assert_eq!(pool.owners(&first[0]), 3);
        let s = pool.stats();
        assert_eq!((s.in_use, s.references, s.shared), (1, 3, 1));
        assert_eq!(pool.give_back(first), 0);
        assert_eq!(pool.give_back(vec![third]), 0);
        assert_eq!(pool.owners(&second), 1);
        assert_eq!(pool.give_back(vec![second]), 1);
        let s = pool.stats();
        assert_eq!((s.in_use, s.references, s.shared, s.free), (0, 0, 0, 1));
    }
}

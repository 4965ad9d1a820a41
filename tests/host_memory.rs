//! Host memory limits (issue 16, item 2): on the host backend a page budget or a page larger
//! than the memory the process may use (physical memory, and the memory cgroup's limit) is
//! refused with a typed error when the cache or pool is made, instead of being accepted and
//! later killed by the OOM killer; the pool's free list is bounded by default.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvvm::pool::{PagePool, PoolConfig};
use kvvm::vmm::host::{os_page_size, HostBackend, HostConfig};
use kvvm::vmm::{
    Backend, BackendChoice, BackendConfig, BackendInfo, BackendKind, Completion, CopyKind,
    CopyRegion, HostBuffer, PageHandle, VaRange,
};
use kvvm::Error;
use kvvm::{CacheConfig, DType, KvCache, Layout};

/// `MemTotal` from /proc/meminfo, in bytes.
fn mem_total() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let line = s
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .expect("MemTotal");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("MemTotal value");
    kib * 1024
}

fn host() -> Arc<HostBackend> {
    Arc::new(
        HostBackend::new(HostConfig {
            granularity: os_page_size(),
            copy_threads: 1,
            ..HostConfig::default()
        })
        .expect("host backend"),
    )
}

fn config(budget_bytes: u64) -> CacheConfig {
    CacheConfig::new(2, 2, 8)
        .with_dtype(DType::F32)
        .with_max_slots(4)
        .with_max_tokens(256)
        .with_layout(Layout::Interleaved)
        .with_budget_bytes(budget_bytes)
        .with_backend(BackendConfig {
            choice: BackendChoice::Host,
            host_granularity: os_page_size(),
            copy_threads: 1,
            ..BackendConfig::default()
        })
        .with_lookahead_steps(0)
}

fn assert_memory_refusal<T>(r: Result<T, Error>, what: &str) {
    match r {
        Err(Error::InvalidConfig(m)) => assert!(
            m.contains("memory"),
            "{what}: the refusal should say it is about memory: {m}"
        ),
        Err(e) => panic!("{what}: expected InvalidConfig about memory, got {e:?}"),
        Ok(_) => panic!("{what}: expected InvalidConfig about memory, the call succeeded"),
    }
}

#[test]
fn budget_above_physical_memory_is_refused() {
    let budget = 2 * mem_total();
    assert_memory_refusal(KvCache::new(config(budget)), "KvCache::new");
    assert_memory_refusal(
        KvCache::with_backend(config(budget), host() as Arc<dyn Backend>),
        "KvCache::with_backend",
    );
    assert_memory_refusal(
        PagePool::new(host(), PoolConfig::with_budget(os_page_size(), budget)),
        "PagePool::new",
    );
}

/// Passes every call to the host backend, but refuses `create_page` after a few pages: if the
/// budget check did not happen before creating pages, this test fails quickly instead of filling
/// the machine's memory.
#[derive(Debug)]
struct Capped {
    inner: Arc<HostBackend>,
    created: AtomicUsize,
    cap: usize,
}

impl Backend for Capped {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }
    fn granularity(&self) -> usize {
        self.inner.granularity()
    }
    fn reserve(&self, len: usize) -> kvvm::Result<VaRange> {
        self.inner.reserve(len)
    }
    fn free_reservation(&self, range: VaRange) -> kvvm::Result<()> {
        self.inner.free_reservation(range)
    }
    fn create_page(&self, size: usize) -> kvvm::Result<PageHandle> {
        if self.created.fetch_add(1, Ordering::SeqCst) >= self.cap {
            return Err(Error::Unsupported(format!("test cap: {} pages", self.cap)));
        }
        self.inner.create_page(size)
    }
    fn release_page(&self, page: PageHandle) -> Result<(), (PageHandle, Error)> {
        self.inner.release_page(page)
    }
    fn map(&self, va: u64, pages: &[&PageHandle]) -> kvvm::Result<()> {
        self.inner.map(va, pages)
    }
    fn unmap(&self, va: u64, len: usize) -> kvvm::Result<()> {
        self.inner.unmap(va, len)
    }
    fn alloc_host(&self, len: usize) -> kvvm::Result<HostBuffer> {
        self.inner.alloc_host(len)
    }
    fn free_host(&self, buf: HostBuffer) -> Result<(), (HostBuffer, Error)> {
        self.inner.free_host(buf)
    }
    unsafe fn copy_async(
        &self,
        kind: CopyKind,
        regions: &[CopyRegion],
    ) -> kvvm::Result<Box<dyn Completion>> {
        // SAFETY: the caller upholds `copy_async`'s contract; it is passed on unchanged.
        unsafe { self.inner.copy_async(kind, regions) }
    }
    fn synchronize(&self) -> kvvm::Result<()> {
        self.inner.synchronize()
    }
}

#[test]
fn create_all_with_a_large_budget_is_refused_before_creating() {
    let budget = 2 * mem_total();
    let h = host();
    let capped = Arc::new(Capped {
        inner: h.clone(),
        created: AtomicUsize::new(0),
        cap: 64,
    });
    let r = KvCache::with_backend(
        config(budget).with_create_all_pages(true),
        capped.clone() as Arc<dyn Backend>,
    );
    assert_memory_refusal(r, "create_all");
    assert_eq!(
        capped.created.load(Ordering::SeqCst),
        0,
        "pages were created before the refusal"
    );
    assert_eq!(h.live_pages(), 0);
}

#[test]
fn page_above_physical_memory_is_refused() {
    // One page of 1 TiB (or twice the machine's memory if that is more): the reservation fits,
    // the page cannot.
    let page = (2 * mem_total()).max(1 << 40).next_multiple_of(2 << 20) as usize;
    let c = config(page as u64)
        .with_max_slots(1)
        .with_max_tokens(1)
        .with_page_size(Some(page))
        .with_backend(BackendConfig {
            host_granularity: 2 << 20,
            ..config(0).backend
        });
    // Without the check the pool would create that page in the background and fill the
    // machine's memory: a capped backend refuses every page instead.
    let h = Arc::new(
        HostBackend::new(HostConfig {
            granularity: 2 << 20,
            copy_threads: 1,
            ..HostConfig::default()
        })
        .expect("host backend"),
    );
    let capped = Arc::new(Capped {
        inner: h,
        created: AtomicUsize::new(0),
        cap: 0,
    });
    assert_memory_refusal(
        KvCache::with_backend(c, capped.clone() as Arc<dyn Backend>),
        "1 TiB page",
    );
    assert_eq!(capped.created.load(Ordering::SeqCst), 0);
}

#[test]
fn modest_budget_is_accepted() {
    let cache = KvCache::new(config(64 << 20)).expect("a 64 MiB budget fits any test machine");
    let s = cache.alloc_slot().unwrap();
    cache.ensure(s, 256).unwrap();
}

#[test]
fn pool_free_list_is_bounded_by_default() {
    let page = os_page_size();
    let cfg = PoolConfig::with_budget(page, 4096 * page as u64);
    assert_ne!(
        cfg.high_watermark,
        usize::MAX,
        "the default pool keeps every free page forever"
    );
    let high = cfg.high_watermark;
    assert!(high >= cfg.low_watermark);
    let h = host();
    let pool = PagePool::new(h.clone(), cfg).expect("pool");
    let n = (high + 64).min(4096);
    let pages = pool.acquire(n).expect("acquire");
    pool.give_back(pages);
    // The background thread trims the surplus.
    let t0 = Instant::now();
    while pool.stats().free > high {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "free list not trimmed: {:?}",
            pool.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(h.live_pages() <= high);
}

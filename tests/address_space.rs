//! `KvCache::address_space` (issue 16, item 8): what an exported tensor holds keeps the cache's
//! mapped pages, with their bytes, after the cache is dropped, but none of its threads or files;
//! the ranges go when the last address space goes, and a backend that outlives the cache gets
//! the pages back then.

use std::sync::Arc;

use kvvm::testing::process::{arena_fds, is_mapped, kvvm_threads, settles};
use kvvm::vmm::host::{os_page_size, HostBackend, HostConfig};
use kvvm::vmm::{Backend, BackendChoice, BackendConfig};
use kvvm::{CacheConfig, DType, Kv, KvCache, Layout, SlotId};

fn config(layout: Layout) -> CacheConfig {
    CacheConfig::new(2, 2, 16)
        .with_dtype(DType::F32)
        .with_max_slots(4)
        .with_max_tokens(256)
        .with_layout(layout)
        .with_budget_bytes((64 * os_page_size()) as u64)
}

/// Writes a pattern into `tokens` tokens of `slot` (every layer, K and V) and returns the rows'
/// addresses with their patterns.
fn stamp(cache: &KvCache, slot: SlotId, tokens: usize) -> Vec<(u64, Vec<u8>)> {
    let row = cache.geometry().row_bytes();
    let mut rows = Vec::new();
    for layer in 0..cache.geometry().layers {
        for kv in [Kv::K, Kv::V] {
            let view = cache.layer_view(layer, kv).unwrap();
            for t in 0..tokens {
                let addr = view.row_addr(slot.as_usize(), t, 0);
                let bytes: Vec<u8> = (0..row)
                    .map(|i| (i as u64 * 31 + t as u64 * 7 + layer as u64 + kv as u64) as u8)
                    .collect();
                // SAFETY: token `t` of the slot is live, so its row is mapped and writable.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as usize as *mut u8, row)
                };
                rows.push((addr, bytes));
            }
        }
    }
    rows
}

fn check(rows: &[(u64, Vec<u8>)]) {
    for (addr, bytes) in rows {
        // SAFETY: the caller keeps the rows mapped (an address space holds them).
        let got = unsafe { std::slice::from_raw_parts(*addr as usize as *const u8, bytes.len()) };
        assert_eq!(got, &bytes[..], "row at {addr:#x} changed");
    }
}

/// One test, so that no other test's threads or files are counted.
#[test]
fn an_address_space_keeps_the_pages_and_bytes_but_no_thread_or_file() {
    let threads0 = kvvm_threads();
    let fds0 = arena_fds();
    for layout in [Layout::Interleaved, Layout::PerLayer] {
        let cache = KvCache::new(config(layout).with_backend(BackendConfig {
            choice: BackendChoice::Host,
            host_granularity: os_page_size(),
            ..Default::default()
        }))
        .unwrap();
        let a = cache.alloc_slot_for(100).unwrap();
        let b = cache.alloc_slot_for(40).unwrap();
        cache.ensure(a, 100).unwrap();
        cache.ensure(b, 40).unwrap();
        let mut rows = stamp(&cache, a, 100);
        rows.extend(stamp(&cache, b, 40));
        assert!(
            settles(|| kvvm_threads() > threads0),
            "the cache runs threads"
        );
        assert!(arena_fds() > fds0, "the cache holds its arena");

        let space = cache.address_space();
        let second = space.clone();
        assert!(!space.holds_ranges());
        drop(cache);
        assert!(space.holds_ranges());
        assert!(
            settles(|| kvvm_threads() == threads0),
            "{layout:?}: {} thread(s) outlived the cache",
            kvvm_threads() - threads0
        );
        assert_eq!(
            arena_fds(),
            fds0,
            "{layout:?}: the arena's file stayed open"
        );
        check(&rows);
        // Still writable.
        let (addr, bytes) = &mut rows[3];
        bytes.iter_mut().for_each(|x| *x = !*x);
        // SAFETY: the address space keeps the row mapped read/write.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), *addr as usize as *mut u8, bytes.len())
        };
        drop(space);
        check(&rows);
        assert!(
            is_mapped(rows[0].0),
            "the ranges went with the first of two holders"
        );
        drop(second);
        assert!(
            !rows.iter().any(|(addr, _)| is_mapped(*addr)),
            "{layout:?}: the ranges stayed after the last holder"
        );
    }
}

/// A backend shared with other caches outlives the cache: the pages the address space kept
/// return to it when the address space goes, and none leaks.
#[test]
fn a_backend_that_outlives_the_cache_gets_the_pages_back() {
    let host = Arc::new(
        HostBackend::new(HostConfig {
            granularity: os_page_size(),
            ..HostConfig::default()
        })
        .unwrap(),
    );
    let cache =
        KvCache::with_backend(config(Layout::PerLayer), host.clone() as Arc<dyn Backend>).unwrap();
    let a = cache.alloc_slot_for(64).unwrap();
    cache.ensure(a, 64).unwrap();
    let rows = stamp(&cache, a, 64);
    let mapped_pages = cache.stats().pool.in_use;
    assert!(mapped_pages > 0);
    let space = cache.address_space();
    drop(cache);
    check(&rows);
    assert_eq!(
        host.live_pages(),
        mapped_pages,
        "exactly the mapped pages stay live for the address space"
    );
    drop(space);
    assert_eq!(host.live_pages(), 0, "pages leaked");
    assert!(!is_mapped(rows[0].0));
    // The backend reuses the extents for a new cache.
    let again =
        KvCache::with_backend(config(Layout::PerLayer), host.clone() as Arc<dyn Backend>).unwrap();
    let s = again.alloc_slot_for(64).unwrap();
    again.ensure(s, 64).unwrap();
    let fresh = stamp(&again, s, 64);
    check(&fresh);
}

/// A backend that cannot detach (a wrapper that does not forward [`Backend::detach`]): the cache
/// unmaps and releases its pages at the drop as usual, and the ranges stay reserved (reading
/// zeros) until the last address space goes; nothing leaks.
#[test]
fn without_detach_the_ranges_stay_reserved_and_nothing_leaks() {
    use kvvm::vmm::faulty::FaultyBackend;
    let host = Arc::new(
        HostBackend::new(HostConfig {
            granularity: os_page_size(),
            ..HostConfig::default()
        })
        .unwrap(),
    );
    let faulty = Arc::new(FaultyBackend::new(host.clone() as Arc<dyn Backend>));
    faulty.refuse_detach(true);
    let cache =
        KvCache::with_backend(config(Layout::Interleaved), faulty as Arc<dyn Backend>).unwrap();
    let a = cache.alloc_slot_for(64).unwrap();
    cache.ensure(a, 64).unwrap();
    let rows = stamp(&cache, a, 64);
    let space = cache.address_space();
    drop(cache);
    assert!(space.holds_ranges());
    assert_eq!(host.live_pages(), 0, "the pages were not released");
    let (addr, bytes) = &rows[0];
    // SAFETY: the range stays reserved (read-only zeros) while `space` lives.
    let got = unsafe { std::slice::from_raw_parts(*addr as usize as *const u8, bytes.len()) };
    assert!(
        got.iter().all(|&b| b == 0),
        "an unmapped page did not read zeros"
    );
    drop(space);
    assert!(!is_mapped(*addr), "the ranges stayed after the last holder");
}

//! Configurations that pass the old validation but would abort the process in an allocation
//! (issue 16, item 5): every size derived from the configuration is bounded before anything is
//! allocated, and refused with `InvalidConfig`.

use std::sync::Arc;

use kvvm::vmm::host::{os_page_size, HostBackend, HostConfig};
use kvvm::vmm::Backend;
use kvvm::Error;
use kvvm::{CacheConfig, DType, Geometry, KvCache, Layout};

fn config(layers: usize, max_slots: usize, budget_bytes: u64) -> CacheConfig {
    CacheConfig::new(layers, 1, 1)
        .with_dtype(DType::F16)
        .with_max_slots(max_slots)
        .with_max_tokens(1)
        .with_layout(Layout::PerLayer)
        .with_page_size(Some(4096))
        .with_budget_bytes(budget_bytes)
        .with_lookahead_steps(0)
}

fn assert_invalid<T>(r: Result<T, Error>, what: &str) {
    match r {
        Err(Error::InvalidConfig(m)) => eprintln!("{what}: {m}"),
        Err(e) => panic!("{what}: expected InvalidConfig, got {e:?}"),
        Ok(_) => panic!("{what}: accepted"),
    }
}

/// 2^30 layers per-layer: 2^31 buffers of one page each fit the 32 TiB reservation limit, and
/// the reservation list alone would need 32 GiB.
#[test]
fn a_billion_layers_is_refused_by_validation() {
    let layers = 1 << 30;
    let budget = 4096u64 * 2 * layers as u64;
    assert_invalid(Geometry::new(&config(layers, 1, budget), 4096), "Geometry");
}

/// The same configuration through the cache constructor: an error, not an abort.
#[test]
fn a_billion_layers_is_refused_by_the_cache() {
    if os_page_size() != 4096 {
        return;
    }
    let layers = 1 << 30;
    let budget = 4096u64 * 2 * layers as u64;
    let host = Arc::new(
        HostBackend::new(HostConfig {
            granularity: 4096,
            copy_threads: 1,
            ..HostConfig::default()
        })
        .expect("host backend"),
    );
    assert_invalid(
        KvCache::with_backend(config(layers, 1, budget), host as Arc<dyn Backend>),
        "KvCache",
    );
}

/// 2^20 slots × 8192 buffers: the per-slot page tables alone would take 200 GiB.
#[test]
fn slot_tables_are_bounded() {
    let budget = 4096u64 * 8192;
    assert_invalid(
        Geometry::new(&config(4096, 1 << 20, budget), 4096),
        "Geometry",
    );
}

/// More buffers than the process may map (each is one reservation, one mapping at least).
#[test]
fn more_buffers_than_the_map_count_allows_are_refused() {
    let host = Arc::new(
        HostBackend::new(HostConfig {
            granularity: os_page_size(),
            copy_threads: 1,
            max_map_count: Some(4096),
            map_count_reserve: 0,
            ..HostConfig::default()
        })
        .expect("host backend"),
    );
    let page = os_page_size() as u64;
    // 3000 layers: 6000 buffers, above the 4096 mappings this backend allows.
    let mut c = config(3000, 1, page * 6000);
    c.page_size = None;
    assert_invalid(
        KvCache::with_backend(c, host.clone() as Arc<dyn Backend>),
        "KvCache",
    );
    assert!(host.map_headroom().unwrap() > 0);
}

/// Ordinary models still pass.
#[test]
fn ordinary_configs_still_pass() {
    let c = CacheConfig::for_model("llama-3-70b", 256, 8192, 1 << 30)
        .expect("preset")
        .with_layout(Layout::PerLayer);
    Geometry::new(&c, 2 << 20).expect("llama-3-70b per-layer, 256 slots");
}

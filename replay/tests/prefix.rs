//! The kvvm replay allocator shares the KV of prompts that start with the same Mooncake hash
//! blocks: the later request maps the earlier one's pages instead of prefilling them (they are
//! its cached tokens), and every token, shared ones included, reads back as stamped through
//! swap-out, swap-in and finish.

use std::sync::Arc;

use kvvm::vmm::host::os_page_size;
use kvvm::vmm::{BackendChoice, BackendConfig};
use kvvm::{CacheConfig, DType, KvCache, Layout};
use kvvm_replay::sched::Job;
use kvvm_replay::{KvAllocator, KvvmAllocator, Preempted};

fn host() -> BackendConfig {
    BackendConfig {
        choice: BackendChoice::Host,
        host_granularity: os_page_size(),
        ..BackendConfig::default()
    }
}

fn job(id: u64, context: usize, blocks: &[u64]) -> Job {
    Job {
        hash_ids: Arc::from(blocks),
        ..Job::new(id, 0.0, context, 8)
    }
}

#[test]
fn kvvm_rows_share_prefixes_named_by_hash_ids() {
    for layout in [Layout::Interleaved, Layout::PerLayer] {
        let cache = KvCache::new(
            CacheConfig::new(2, 2, 16)
                .with_dtype(DType::F16)
                .with_max_slots(4)
                .with_max_tokens(2048)
                .with_layout(layout)
                .with_budget_bytes(16 << 20)
                .with_backend(host())
                .with_lookahead_steps(0),
        )
        .unwrap();
        let tpp = cache.tokens_per_page().unwrap();
        let cache = Arc::new(cache);
        let mut a = KvvmAllocator::new(cache.clone(), 16 << 20).unwrap();
        let (j1, j2, j3) = (
            job(1, 1100, &[10, 11, 12]),
            job(2, 1300, &[10, 11, 99]),
            job(3, 1030, &[77, 78]),
        );
        // Request 1: blocks 10 and 11 whole (1024 tokens), 12 partial; nothing cached yet.
        assert_eq!(a.admit(&j1, 1100).unwrap().unwrap().cached_tokens, 0);
        // Request 2 starts with the same two blocks: it maps their pages.
        let shared = 1024 / tpp * tpp;
        let out = a.admit(&j2, 1300).unwrap().unwrap();
        assert_eq!(out.cached_tokens, shared, "{layout:?}");
        assert!(out.transfers.is_empty());
        let s2 = a.slot_of(2).unwrap();
        assert_eq!(cache.read_only_tokens(s2).unwrap(), shared);
        // Both decode; 2 is swapped out and back while 1 keeps decoding.
        assert!(a.grow(&[(1, 1101), (2, 1301)]).unwrap());
        let (how, _) = a.preempt(2).unwrap();
        assert_eq!(how, Preempted::Swapped);
        assert!(a.grow(&[(1, 1102)]).unwrap());
        assert!(a.resume(&j2, 1301).unwrap().is_some());
        assert!(a.grow(&[(1, 1103), (2, 1302)]).unwrap());
        // Other blocks share nothing.
        assert_eq!(a.admit(&j3, 1030).unwrap().unwrap().cached_tokens, 0);
        for id in [1, 2, 3] {
            a.finish(id).unwrap();
        }
        assert_eq!(a.counters().integrity_errors, 0, "{layout:?}");
        // A later request with request 1's blocks finds them cached after 1 finished.
        let j4 = job(4, 1100, &[10, 11, 12]);
        assert_eq!(a.admit(&j4, 1100).unwrap().unwrap().cached_tokens, shared);
        a.finish(4).unwrap();
        assert_eq!(a.counters().integrity_errors, 0);
    }
}

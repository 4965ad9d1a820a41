//! Copy-free prefix sharing on the host backend with small pages, in both layouts: published
//! pages are mapped (not copied) behind new requests, read back as their writer stamped them,
//! are read-only for every slot (a write faults, checked in a child process), survive the other
//! sharers' decode, shrink, free and swap, are evicted least recently used and never while a
//! live slot maps them, and every reference goes back to the pool.

use std::sync::Arc;

use kvvm::testing::stamp;
use kvvm::vmm::host::{os_page_size, HostBackend, HostConfig};
use kvvm::vmm::{Backend, BackendConfig, BackendOp};
use kvvm::Error;
use kvvm::{CacheConfig, DType, Kv, KvCache, Layout, SlotId};
use kvvm::{SwapConfig, SwapEngine};

const LAYOUTS: [Layout; 2] = [Layout::Interleaved, Layout::PerLayer];
const NS: u64 = 42;

/// 2 layers, 2 KV heads, head_dim 8, f32 (interleaved: 16 tokens a page; per-layer: 64 tokens a
/// page in each of 4 buffers), OS-page pages, 4 slots of 400 tokens.
fn cache(layout: Layout, budget_pages: usize) -> (Arc<HostBackend>, Arc<KvCache>) {
    let host = host_backend();
    (host.clone(), cache_on(layout, budget_pages, host))
}

/// A host backend with OS-page pages and 2 copy threads.
fn host_backend() -> Arc<HostBackend> {
    Arc::new(
        HostBackend::new(HostConfig {
            granularity: os_page_size(),
            copy_threads: 2,
            ..HostConfig::default()
        })
        .unwrap(),
    )
}

/// As [`cache`], on `backend` (a host backend or a wrapper of one).
fn cache_on(layout: Layout, budget_pages: usize, backend: Arc<dyn Backend>) -> Arc<KvCache> {
    let cache = KvCache::with_backend(
        CacheConfig::new(2, 2, 8)
            .with_dtype(DType::F32)
            .with_max_slots(4)
            .with_max_tokens(400)
            .with_layout(layout)
            .with_budget_bytes((budget_pages * os_page_size()) as u64)
            .with_backend(BackendConfig::default())
            .with_lookahead_steps(0),
        backend,
    )
    .unwrap();
    Arc::new(cache)
}

/// A swap engine on `cache` with `chunk_bytes` chunks and a 1 MiB host budget.
fn engine(cache: &Arc<KvCache>, chunk_bytes: usize) -> SwapEngine {
    SwapEngine::new(
        cache.clone(),
        SwapConfig {
            host_budget_bytes: 1 << 20,
            chunk_bytes,
            max_in_flight: 2,
            keep_pages: false,
        },
    )
    .unwrap()
}

/// A publisher A of `2 * tpp + 7` stamped tokens (generation 1) and a sharer B of its first two
/// pages followed by `own` tokens of its own (generation 2). Returns A, A's length, B, B's
/// shared tokens and B's length.
fn publisher_and_sharer(cache: &KvCache, own: usize) -> (SlotId, usize, SlotId, usize, usize) {
    let tpp = cache.tokens_per_page().unwrap();
    let prompt = ids(2 * tpp + 7, 0);
    let a = cache.alloc_slot().unwrap();
    cache.ensure(a, prompt.len()).unwrap();
    write(cache, a, 1, 0, prompt.len());
    cache.publish(a, &prompt, NS).unwrap();
    let mut b_ids = prompt[..2 * tpp].to_vec();
    b_ids.extend(ids(own, 5000));
    let hit = cache.alloc_slot_with_prefix(&b_ids, NS).unwrap();
    assert_eq!(hit.tokens, 2 * tpp);
    let b_len = b_ids.len();
    cache.ensure(hit.slot, b_len).unwrap();
    write(cache, hit.slot, 2, hit.tokens, b_len);
    (a, prompt.len(), hit.slot, hit.tokens, b_len)
}

/// Stamps tokens `from..to` of `slot` with `generation`'s pattern.
fn write(cache: &KvCache, slot: SlotId, generation: u32, from: usize, to: usize) {
    // SAFETY: host backend; the test thread is the only one touching this slot's rows, the slot
    // holds at least `to` tokens and `from..to` lies beyond its read-only pages.
    unsafe { kvvm::testing::stamp_tokens(cache, slot, generation, from, to) }.unwrap();
}

/// Checks tokens `from..to` of `slot` against `generation`'s pattern.
fn check(cache: &KvCache, slot: SlotId, generation: u32, from: usize, to: usize) {
    let g = cache.geometry();
    for t in from..to {
        for layer in 0..g.layers {
            for kv in [Kv::K, Kv::V] {
                let r = cache.row(slot, t, layer, kv).unwrap();
                for w in 0..g.row_bytes() / 4 {
                    // SAFETY: `row` checked that the token is live (mapped, readable); rows are
                    // u32-aligned; nothing writes them meanwhile.
                    let got = unsafe { (r.addr as usize as *const u32).add(w).read_volatile() };
                    assert_eq!(
                        got,
                        stamp(generation, t, layer, kv, w),
                        "slot {slot} token {t} layer {layer} {kv:?} word {w}"
                    );
                }
            }
        }
    }
}

fn calls(cache: &KvCache, op: BackendOp) -> u64 {
    cache.stats().calls(op).calls
}

/// Calls of `op` made on the caller's threads (not the pool's background refill, which may
/// create pages at any moment).
fn foreground(cache: &KvCache, op: BackendOp) -> u64 {
    let c = cache.stats().calls(op);
    c.calls.saturating_sub(c.background_calls)
}

/// Pool pages and references equal what slots and the index hold.
fn census_ok(cache: &KvCache) {
    let s = cache.stats();
    assert_eq!(
        (s.pool.in_use, s.pool.references),
        cache.debug_page_census()
    );
}

fn ids(n: usize, base: u32) -> Vec<u32> {
    (0..n as u32).map(|i| base + i).collect()
}

#[test]
fn published_pages_are_mapped_not_copied() {
    for layout in LAYOUTS {
        let (host, cache) = cache(layout, 64);
        let g = *cache.geometry();
        let tpp = cache.tokens_per_page().unwrap();
        let prompt = ids(100, 0);
        let a = cache.alloc_slot().unwrap();
        cache.ensure(a, 100).unwrap();
        write(&cache, a, 1, 0, 100);
        let full = cache.publish(a, &prompt, NS).unwrap();
        assert_eq!(full, 100 / tpp);
        assert_eq!(cache.read_only_tokens(a).unwrap(), full * tpp);

        let mut b_ids = prompt.clone();
        b_ids.extend(ids(30, 1000));
        let (maps, creates) = (
            calls(&cache, BackendOp::Map),
            foreground(&cache, BackendOp::CreatePage),
        );
        let hit = cache.alloc_slot_with_prefix(&b_ids, NS).unwrap();
        assert_eq!(hit.tokens, full * tpp, "{layout:?}");
        assert_ne!(hit.slot, a);
        // One map call per buffer, no page created: the pages are A's.
        assert_eq!(calls(&cache, BackendOp::Map) - maps, g.buffers as u64);
        assert_eq!(foreground(&cache, BackendOp::CreatePage) - creates, 0);
        let (pa, pb) = (cache.debug_page_ids(a), cache.debug_page_ids(hit.slot));
        for b in 0..g.buffers {
            assert_eq!(pa[b][..full], pb[b][..full], "buffer {b}");
        }
        assert_eq!(cache.tokens(hit.slot).unwrap(), hit.tokens);
        assert_eq!(cache.read_only_tokens(hit.slot).unwrap(), hit.tokens);
        // B reads A's KV, then prefills only its own tokens.
        check(&cache, hit.slot, 1, 0, hit.tokens);
        cache.ensure(hit.slot, 130).unwrap();
        write(&cache, hit.slot, 2, hit.tokens, 130);
        check(&cache, a, 1, 0, 100);
        check(&cache, hit.slot, 2, hit.tokens, 130);

        let s = cache.stats();
        let private_b = g.pages_for(130) - full;
        assert_eq!(
            s.pool.in_use,
            (g.pages_for(100) + private_b) * g.buffers,
            "shared pages are held once"
        );
        assert_eq!(
            s.mapped_bytes - s.distinct_mapped_bytes,
            (full * g.buffers * g.page_size) as u64
        );
        assert_eq!(s.prefix.hits, 1);
        assert_eq!(s.prefix.hit_tokens, hit.tokens as u64);
        assert_eq!(
            s.prefix.bytes_saved,
            (full * g.buffers * g.page_size) as u64
        );
        assert_eq!(s.prefix.cached_pages, full);
        assert_eq!(s.prefix.reclaimable_pages, 0);
        census_ok(&cache);

        // Both finish: their pages stay cached, reclaimable.
        cache.free_slot(a).unwrap();
        cache.free_slot(hit.slot).unwrap();
        assert_eq!(cache.stats().prefix.reclaimable_pages, full);
        // The next turn of the conversation finds A's slot still mapping the chain: no call.
        let maps = calls(&cache, BackendOp::Map) + calls(&cache, BackendOp::Unmap);
        let c = cache.alloc_slot_with_prefix(&prompt, NS).unwrap();
        assert_eq!(c.tokens, full * tpp);
        assert_eq!(
            calls(&cache, BackendOp::Map) + calls(&cache, BackendOp::Unmap),
            maps
        );
        check(&cache, c.slot, 1, 0, c.tokens);
        // A plain allocation never gets read-only pages at its start.
        let d = cache.alloc_slot().unwrap();
        assert_eq!(cache.read_only_tokens(d).unwrap(), 0);
        cache.ensure(d, 50).unwrap();
        write(&cache, d, 3, 0, 50);
        check(&cache, c.slot, 1, 0, c.tokens);
        census_ok(&cache);

        // Everything let go of: every page goes back to the free list.
        cache.free_slot(c.slot).unwrap();
        cache.free_slot(d).unwrap();
        cache.reclaim_free_slots().unwrap();
        assert_eq!(cache.evict_prefixes(usize::MAX), full * g.buffers);
        let s = cache.stats();
        assert_eq!((s.pool.in_use, s.pool.references), (0, 0));
        assert_eq!(s.prefix.cached_pages, 0);
        drop(cache);
        assert_eq!(host.live_pages(), 0);
    }
}

/// The permissions `/proc/self/maps` lists for the mapping holding `addr` (e.g. `r--s`).
fn prot_at(addr: u64) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let (a, b) = it.next()?.split_once('-')?;
        let perms = it.next()?;
        let (a, b) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        (a <= addr && addr < b).then(|| perms.to_string())
    })
}

/// A publisher with 200 stamped tokens and a sharer of its pages.
fn shared_pair(layout: Layout) -> (Arc<KvCache>, SlotId, SlotId, usize) {
    let (_host, cache) = cache(layout, 64);
    let prompt = ids(200, 0);
    let a = cache.alloc_slot().unwrap();
    cache.ensure(a, 200).unwrap();
    write(&cache, a, 1, 0, 200);
    cache.publish(a, &prompt, NS).unwrap();
    let hit = cache.alloc_slot_with_prefix(&prompt, NS).unwrap();
    assert!(hit.tokens > 0);
    (cache, a, hit.slot, hit.tokens)
}

/// Runs only in the child processes `writes_into_shared_pages_fault` starts: builds a publisher
/// and a sharer and writes one byte of the row `KVVM_PREFIX_CHILD` names, then exits 0.
#[test]
#[ignore = "run in a child process by writes_into_shared_pages_fault"]
fn child_writes_one_row() {
    let Ok(what) = std::env::var("KVVM_PREFIX_CHILD") else {
        return;
    };
    let layout = if std::env::var("KVVM_PREFIX_LAYOUT").as_deref() == Ok("per-layer") {
        Layout::PerLayer
    } else {
        Layout::Interleaved
    };
    let (cache, a, b, shared) = shared_pair(layout);
    let ro = cache.read_only_tokens(a).unwrap();
    let (slot, token) = match what.as_str() {
        "sharer-first" => (b, 0),
        "sharer-last" => (b, shared - 1),
        "publisher" => (a, 0),
        _ => (a, ro),
    };
    let addr = cache.row(slot, token, 1, Kv::V).unwrap().addr;
    // SAFETY: deliberately writing a row that may be mapped read-only, in a throwaway process.
    unsafe { std::ptr::write_volatile(addr as usize as *mut u8, 0xab) };
    std::process::exit(0);
}

/// Runs `child_writes_one_row` in a new process; returns the signal that killed it, if any.
fn write_in_child(what: &str, layout: Layout) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_writes_one_row",
            "--test-threads=1",
        ])
        .env("KVVM_PREFIX_CHILD", what)
        .env(
            "KVVM_PREFIX_LAYOUT",
            if layout == Layout::PerLayer {
                "per-layer"
            } else {
                "interleaved"
            },
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(
        status.signal().is_some() || status.success(),
        "{what}: {status}"
    );
    status.signal()
}

#[test]
fn writes_into_shared_pages_fault() {
    for layout in LAYOUTS {
        let segv = Some(libc::SIGSEGV);
        // The sharer's aliases and the publisher's own published pages are read-only.
        assert_eq!(write_in_child("sharer-first", layout), segv, "{layout:?}");
        assert_eq!(write_in_child("sharer-last", layout), segv, "{layout:?}");
        assert_eq!(write_in_child("publisher", layout), segv, "{layout:?}");
        // Past the shared pages the publisher's page is its own: the write goes through.
        assert_eq!(write_in_child("private", layout), None, "{layout:?}");
        // And here, in this process: the mappings say so.
        let (cache, a, b, shared) = shared_pair(layout);
        let row = |slot, t| cache.row(slot, t, 1, Kv::V).unwrap().addr;
        assert_eq!(prot_at(row(b, 0)).as_deref(), Some("r--s"));
        assert_eq!(prot_at(row(b, shared - 1)).as_deref(), Some("r--s"));
        assert_eq!(prot_at(row(a, 0)).as_deref(), Some("r--s"));
        let ro = cache.read_only_tokens(a).unwrap();
        assert_eq!(prot_at(row(a, ro)).as_deref(), Some("rw-s"));
        check(&cache, a, 1, 0, 200);
        check(&cache, b, 1, 0, shared);
    }
}

#[test]
fn shrinking_into_shared_pages_drops_references_only() {
    for layout in LAYOUTS {
        let (_host, cache) = cache(layout, 64);
        let g = *cache.geometry();
        let tpp = cache.tokens_per_page().unwrap();
        let prompt = ids(3 * tpp, 0);
        let a = cache.alloc_slot().unwrap();
        cache.ensure(a, prompt.len()).unwrap();
        write(&cache, a, 1, 0, prompt.len());
        cache.publish(a, &prompt, NS).unwrap();
        let hit = cache.alloc_slot_with_prefix(&prompt, NS).unwrap();
        assert_eq!(hit.tokens, 3 * tpp);
        let before = cache.stats().pool;
        // Inside a shared page, off its boundary: refused, nothing changed.
        let e = cache.shrink(hit.slot, tpp + 1).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert_eq!(cache.tokens(hit.slot).unwrap(), 3 * tpp);
        assert_eq!(cache.stats().pool, before);
        // On a boundary: the slot lets go of its last two shared pages; nothing is freed.
        cache.shrink(hit.slot, tpp).unwrap();
        let after = cache.stats().pool;
        assert_eq!(after.in_use, before.in_use);
        assert_eq!(after.references, before.references - 2 * g.buffers);
        assert_eq!(cache.read_only_tokens(hit.slot).unwrap(), tpp);
        // It grows again with pages of its own.
        cache.ensure(hit.slot, 3 * tpp + 5).unwrap();
        write(&cache, hit.slot, 2, tpp, 3 * tpp + 5);
        check(&cache, hit.slot, 1, 0, tpp);
        check(&cache, hit.slot, 2, tpp, 3 * tpp + 5);
        check(&cache, a, 1, 0, prompt.len());
        census_ok(&cache);
    }
}

#[test]
fn swapping_a_sharer_leaves_the_others_intact() {
    for layout in LAYOUTS {
        let (host, cache) = cache(layout, 64);
        let swap = engine(&cache, 1 << 20);
        let tpp = cache.tokens_per_page().unwrap();
        let (a, mut a_len, b, _, b_len) = publisher_and_sharer(&cache, 20);
        let refs = cache.stats().pool.references;

        // B goes to host while A keeps decoding.
        let out = swap.swap_out(b).unwrap();
        for _ in 0..3 {
            a_len += 1;
            cache.step(&[(a, a_len)]).unwrap();
            write(&cache, a, 1, a_len - 1, a_len);
        }
        out.wait().unwrap();
        swap.quiesce();
        assert!(!cache.is_allocated(b));
        assert!(
            cache.stats().pool.references < refs,
            "B's references dropped"
        );
        check(&cache, a, 1, 0, a_len);
        // A decodes more, then B comes back into a slot of its own pages.
        for _ in 0..tpp {
            a_len += 1;
            cache.step(&[(a, a_len)]).unwrap();
            write(&cache, a, 1, a_len - 1, a_len);
        }
        let slot = cache.alloc_slot_for(b_len).unwrap();
        swap.swap_in(out.copy(), slot).unwrap().wait().unwrap();
        assert_eq!(cache.tokens(slot).unwrap(), b_len);
        assert_eq!(cache.read_only_tokens(slot).unwrap(), 0);
        check(&cache, slot, 1, 0, 2 * tpp);
        check(&cache, slot, 2, 2 * tpp, b_len);
        check(&cache, a, 1, 0, a_len);
        // B decodes into its own pages; A is untouched.
        cache.ensure(slot, b_len + 3).unwrap();
        write(&cache, slot, 2, b_len, b_len + 3);
        check(&cache, a, 1, 0, a_len);
        census_ok(&cache);
        drop(swap);
        drop(cache);
        assert_eq!(host.live_pages(), 0);
    }
}

#[test]
fn eviction_takes_lru_tails_and_never_live_pages() {
    for layout in LAYOUTS {
        let g_probe = cache(layout, 64).1;
        let tpp = g_probe.tokens_per_page().unwrap();
        let buffers = g_probe.geometry().buffers;
        drop(g_probe);
        // Room for 8 page indices.
        let (_host, cache) = cache(layout, 8 * buffers);
        let x = ids(3 * tpp, 0);
        let y = ids(3 * tpp, 10_000);
        for (seq, generation) in [(&x, 1), (&y, 2)] {
            let s = cache.alloc_slot().unwrap();
            cache.ensure(s, seq.len()).unwrap();
            write(&cache, s, generation, 0, seq.len());
            cache.publish(s, seq, NS).unwrap();
            cache.free_slot(s).unwrap();
        }
        cache.reclaim_free_slots().unwrap();
        let s = cache.stats();
        assert_eq!((s.prefix.cached_pages, s.prefix.reclaimable_pages), (6, 6));
        assert_eq!(s.pool.in_use, 6 * buffers);
        // X was used longest ago: its tail goes first.
        assert_eq!(cache.evict_prefixes(1), buffers);
        let hx = cache.alloc_slot_with_prefix(&x, NS).unwrap();
        assert_eq!(hx.tokens, 2 * tpp, "X lost its last page only");
        check(&cache, hx.slot, 1, 0, hx.tokens);
        // X is live now; Y is not. A request that needs more pages than are free takes Y's
        // pages, never X's.
        let z = cache.alloc_slot().unwrap();
        let free_now = 8 - 5;
        cache.ensure(z, (free_now + 2) * tpp).unwrap();
        write(&cache, z, 3, 0, (free_now + 2) * tpp);
        check(&cache, hx.slot, 1, 0, hx.tokens);
        let s = cache.stats();
        assert_eq!(s.prefix.cached_pages, 3, "Y's two tail pages were evicted");
        assert_eq!(cache.alloc_slot_with_prefix(&y, NS).unwrap().tokens, tpp);
        // Asking for more than evicting could ever give fails and changes nothing.
        let before = cache.stats().pool;
        let e = cache.ensure(z, (8 * tpp).min(400)).unwrap_err();
        assert!(matches!(e, Error::Grow { .. }), "{e}");
        assert_eq!(cache.stats().pool.in_use, before.in_use);
        check(&cache, hx.slot, 1, 0, hx.tokens);
        census_ok(&cache);
    }
}

/// A sharer's swap-out that fails after its first pages were released early maps them back as
/// they were: the shared prefix read-only (mapped back writable, a write through the sharer
/// would change the publisher's KV).
#[test]
fn a_failed_swap_out_maps_shared_pages_back_read_only() {
    use kvvm::vmm::faulty::{CopyFault, FaultyBackend};
    for layout in LAYOUTS {
        let page = os_page_size();
        let host = host_backend();
        let faulty = Arc::new(FaultyBackend::new(host.clone()));
        let cache = cache_on(layout, 64, faulty.clone());
        let swap = engine(&cache, page);
        let tpp = cache.tokens_per_page().unwrap();
        let (a, a_len, b, _, b_len) = publisher_and_sharer(&cache, 3 * tpp);
        let prefix_addr = cache.slot_ranges(b, b_len).unwrap()[0].addr;
        assert_eq!(prot_at(prefix_addr).as_deref().map(|p| &p[..2]), Some("r-"));
        // The last chunk of the swap-out fails, after the pages under the first ones went.
        let chunks = cache
            .slot_ranges(b, b_len)
            .unwrap()
            .iter()
            .map(|r| r.len.div_ceil(page))
            .sum::<usize>() as u64;
        let unmaps = faulty.calls(BackendOp::Unmap);
        faulty.fail_nth_copy(chunks, CopyFault::AtCompletion);
        assert!(swap.swap_out(b).unwrap().wait().is_err(), "{layout:?}");
        assert!(
            faulty.calls(BackendOp::Unmap) > unmaps,
            "{layout:?}: nothing was released before the failure"
        );
        assert_eq!(cache.read_only_tokens(b).unwrap(), 2 * tpp, "{layout:?}");
        let prot = prot_at(prefix_addr).unwrap_or_default();
        assert!(
            prot.starts_with("r-"),
            "{layout:?}: the shared prefix came back as {prot}"
        );
        check(&cache, b, 1, 0, 2 * tpp);
        check(&cache, b, 2, 2 * tpp, b_len);
        check(&cache, a, 1, 0, a_len);
        drop(swap);
        drop(cache);
        assert_eq!(host.live_pages(), 0);
    }
}

//! The stream-ordering contract (`docs/ordering.md`) and the zero page on a real CUDA device:
//! `cargo test --test cuda_gpu -- --ignored` on a machine with a GPU (they also run against the
//! fake driver with `KVVM_LIBCUDA` pointing at a build of `tests/fixtures/fakecuda.c`).
//! `scripts/gpu-prepare.sh` bundles them for `scripts/gpu-check.sh`.

use std::sync::Arc;

use kvvm::vmm::cuda::CudaBackend;
use kvvm::vmm::Backend;
use kvvm::{CacheConfig, DType, KvCache, Layout, SwapConfig, SwapEngine};
use kvvm_sys::{result, CU_STREAM_NON_BLOCKING};

fn cache(b: &Arc<CudaBackend>, layout: Layout) -> Arc<KvCache> {
    let g = b.granularity();
    let config = CacheConfig::new(4, 8, 128)
        .with_dtype(DType::F16)
        .with_max_slots(4)
        .with_max_tokens(4096)
        .with_layout(layout)
        .with_budget_bytes((64 * g) as u64)
        .with_lookahead_steps(0);
    Arc::new(KvCache::with_backend(config, b.clone() as Arc<dyn Backend>).unwrap())
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn unmapped_ranges_read_zeros_on_the_device() {
    let b = CudaBackend::new(0).expect("a CUDA device");
    let g = b.granularity();
    let r = b.reserve(2 * g).unwrap();
    let mut host = vec![0x5au8; g];
    // SAFETY: `host` is writable for `g` bytes; the source is reserved and backed by zeros.
    unsafe { result::mem::memcpy_dtoh(host.as_mut_ptr().cast(), r.addr + g as u64, g) }.unwrap();
    assert!(host.iter().all(|&x| x == 0));
    let p = b.create_page(g).unwrap();
    b.map(r.addr, &[&p]).unwrap();
    b.unmap(r.addr, g).unwrap();
    host.fill(0x5a);
    // SAFETY: as above; the page was unmapped again.
    unsafe { result::mem::memcpy_dtoh(host.as_mut_ptr().cast(), r.addr, g) }.unwrap();
    assert!(host.iter().all(|&x| x == 0));
    b.release_page(p).map_err(|(_, e)| e).unwrap();
    b.free_reservation(r).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn swaps_are_ordered_after_the_compute_stream() {
    for layout in [Layout::Interleaved, Layout::PerLayer] {
        let b = Arc::new(CudaBackend::new(0).expect("a CUDA device"));
        let cache = cache(&b, layout);
        let stream = result::stream::create(CU_STREAM_NON_BLOCKING).unwrap();
        cache.set_compute_stream(Some(stream.expose_provenance() as u64));
        let swap = SwapEngine::new(cache.clone(), SwapConfig::default()).unwrap();
        swap.reserve_host(256 << 20).unwrap();
        let tokens = 1000;
        let slot = cache.alloc_slot_for(tokens).unwrap();
        cache.ensure(slot, tokens).unwrap();
        let ranges = cache.slot_ranges(slot, tokens).unwrap();
        // The "kernel" writing the KV: asynchronous copies on the compute stream, queued behind a
        // large device-to-device copy that keeps the stream busy.
        let big = 256 << 20;
        let (d0, d1) = (
            result::mem::alloc(big).unwrap(),
            result::mem::alloc(big).unwrap(),
        );
        let pattern: Vec<Vec<u8>> = ranges
            .iter()
            .enumerate()
            .map(|(k, r)| {
                (0..r.len)
                    .map(|j| (j as u8) ^ (k as u8).wrapping_mul(37))
                    .collect()
            })
            .collect();
        let pinned = b.alloc_host(ranges.iter().map(|r| r.len).sum()).unwrap();
        // SAFETY: `pinned` holds the bytes of every range; the stream is ours; the device ranges
        // are the slot's mapped tokens, and everything stays alive until the synchronization.
        unsafe {
            let mut at = pinned.addr() as usize;
            for p in &pattern {
                std::ptr::copy_nonoverlapping(p.as_ptr(), at as *mut u8, p.len());
                at += p.len();
            }
            result::mem::memcpy_dtod_async(d1, d0, big, stream).unwrap();
            let mut at = pinned.addr() as usize;
            for r in &ranges {
                result::mem::memcpy_htod_async(
                    r.addr,
                    std::ptr::with_exposed_provenance(at),
                    r.len,
                    stream,
                )
                .unwrap();
                at += r.len;
            }
        }
        // Swapped out at once: the copy waits for the writes on the device.
        let out = swap.swap_out(slot).unwrap();
        out.wait().unwrap();
        let back = cache.alloc_slot_for(tokens).unwrap();
        let t = swap.swap_in(out.copy(), back).unwrap();
        t.stream_wait(stream.expose_provenance() as u64).unwrap();
        let ranges = cache.slot_ranges(back, tokens).unwrap();
        // SAFETY: as above; read back in stream order after the ticket.
        unsafe {
            let mut at = pinned.addr() as usize;
            for r in &ranges {
                result::mem::memcpy_dtoh_async(
                    std::ptr::with_exposed_provenance_mut(at),
                    r.addr,
                    r.len,
                    stream,
                )
                .unwrap();
                at += r.len;
            }
            result::stream::synchronize(stream).unwrap();
            let mut at = pinned.addr() as usize;
            for (k, p) in pattern.iter().enumerate() {
                let got = std::slice::from_raw_parts(at as *const u8, p.len());
                assert!(
                    got == &p[..],
                    "{layout:?}: range {k} differs after the round trip"
                );
                at += p.len();
            }
        }
        t.wait().unwrap();
        // SAFETY: idle after the synchronization; freed once.
        unsafe {
            result::stream::synchronize(stream).unwrap();
            result::mem::free(d0).unwrap();
            result::mem::free(d1).unwrap();
        }
        b.free_host(pinned).map_err(|(_, e)| e).unwrap();
        swap.release(out.copy()).unwrap();
        drop(swap);
        drop(cache);
        // SAFETY: idle, not used again.
        unsafe { result::stream::destroy(stream) }.unwrap();
    }
}

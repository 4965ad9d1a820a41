//! The C ABI driven from Rust: the fuzz driver with fixed inputs, DLPack lifetimes, handles
//! destroyed while other threads use them, versioned structs.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use kvvm_capi::dlpack::*;

use kvvm_capi::*;

mod support;
use support::{last_error, small_config};

fn create(c: &kvvm_config) -> kvvm_cache {
    let mut h = kvvm_cache::default();
    // SAFETY: valid locals.
    let s = unsafe { kvvm_cache_create(c, &mut h) };
    assert_eq!(s, kvvm_status::KVVM_STATUS_OK, "{}", last_error());
    h
}

/// A deterministic pseudo-random byte string (xorshift).
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn fuzz_driver_fixed_inputs() {
    let inputs: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        // create (sane: 1 layer, 2 kv heads, head_dim 16, 2 slots, 40 tokens, interleaved, f16,
        // 2 MiB budget), alloc a slot for 0 tokens, ensure it to 20 tokens, export its layer 0 K,
        // destroy the cache with the tensor alive, then free the tensor.
        vec![
            0, 1, 0, 1, 1, 1, 40, 0, 0, 0, 24, 0, 0, 1, //
            2, 0, 1, 0, 0, //
            4, 0, 0, 0, 20, 0, //
            12, 0, 1, 0, 20, 0, 0, 0, 0, //
            1, 0, 13,
        ],
        // calls on null and made-up handles only.
        (1..=21u8).flat_map(|op| [op, 6, 6, 6, 6, 6, 6]).collect(),
    ];
    let per: Vec<usize> = inputs
        .iter()
        .map(|i| kvvm_capi::fuzz::run_calls(i))
        .collect();
    eprintln!("successful calls per fixed input: {per:?}");
    let fixed: usize = per.iter().sum();
    assert!(fixed >= 5, "only {fixed} calls succeeded");
    let random: Vec<usize> = (1..=12)
        .map(|seed| kvvm_capi::fuzz::run_calls(&bytes(seed, 3000)))
        .collect();
    eprintln!("successful calls per random input: {random:?}");
    // The inputs reach past argument checking (created caches, allocated slots...).
    assert!(random.iter().sum::<usize>() > 100, "{random:?}");
}

#[test]
fn tensors_stay_usable_after_destroy() {
    let cache = create(&small_config());
    let mut slot = 0;
    // SAFETY: valid locals throughout; the tensors are used within their lifetimes.
    unsafe {
        assert_eq!(
            kvvm_cache_alloc_slot(cache, &mut slot),
            kvvm_status::KVVM_STATUS_OK
        );
        assert_eq!(
            kvvm_cache_ensure(cache, slot, 30),
            kvvm_status::KVVM_STATUS_OK
        );
        let mut t = std::ptr::null_mut();
        assert_eq!(
            kvvm_cache_export_dlpack(cache, 1, kvvm_kv::KVVM_V as u32, slot, 30, &mut t),
            kvvm_status::KVVM_STATUS_OK
        );
        let mut whole = std::ptr::null_mut();
        assert_eq!(
            kvvm_cache_export_dlpack_legacy(
                cache,
                1,
                kvvm_kv::KVVM_V as u32,
                KVVM_ALL_SLOTS,
                0,
                &mut whole
            ),
            kvvm_status::KVVM_STATUS_OK
        );
        let tt = &(*t).dl_tensor;
        assert_eq!((*t).version.major, 1);
        assert_eq!(tt.ndim, 3);
        let shape = std::slice::from_raw_parts(tt.shape, 3);
        let strides = std::slice::from_raw_parts(tt.strides, 3);
        assert_eq!(shape, &[30, 2, 32]);
        assert_eq!(strides[1..], [32, 1]);
        assert_eq!(
            tt.device.device_type,
            kvvm_device_type::KVVM_DEVICE_CPU as i32
        );
        assert_eq!((tt.dtype.code, tt.dtype.bits, tt.dtype.lanes), (2, 32, 1));
        let data = tt.data.cast::<f32>();
        for tok in 0..30 {
            for e in 0..64 {
                *data.add(tok * strides[0] as usize + e) = (tok * 1000 + e) as f32;
            }
        }
        assert_eq!(kvvm_cache_free(cache), kvvm_status::KVVM_STATUS_OK);
        assert_eq!(
            kvvm_cache_free(cache),
            kvvm_status::KVVM_STATUS_INVALID_HANDLE
        );
        assert!(last_error().contains("not valid"), "{}", last_error());
        // Still readable through the other tensor after the handle is gone.
        let w = &(*whole).dl_tensor;
        let ws = std::slice::from_raw_parts(w.strides, 4);
        let wdata = w.data.cast::<f32>();
        for tok in [0usize, 17, 29] {
            let row = wdata.add(slot as usize * ws[0] as usize + tok * ws[1] as usize);
            assert_eq!(*row.add(5), (tok * 1000 + 5) as f32);
        }
        kvvm_dlpack_free(t);
        kvvm_dlpack_free_legacy(whole);
    }
}

#[test]
fn destroy_while_other_threads_use_the_handle() {
    let cache = create(&small_config());
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU32::new(0));
    let workers: Vec<_> = (0..3)
        .map(|i| {
            let stop = stop.clone();
            let progress = progress.clone();
            std::thread::spawn(move || {
                let mut ok = 0u32;
                let mut rounds = 0u32;
                // Runs until the handle is gone (and at least a few rounds, so that calls
                // overlap the destroy).
                while !stop.load(Ordering::Relaxed) || rounds < 5 {
                    rounds += 1;
                    let mut slot = 0;
                    // SAFETY: valid local.
                    let s = unsafe { kvvm_cache_alloc_slot(cache, &mut slot) };
                    match s {
                        kvvm_status::KVVM_STATUS_OK => {
                            let e = kvvm_cache_ensure(cache, slot, 10 + i * 50);
                            assert!(
                                matches!(
                                    e,
                                    kvvm_status::KVVM_STATUS_OK
                                        | kvvm_status::KVVM_STATUS_INVALID_HANDLE
                                        | kvvm_status::KVVM_STATUS_BUDGET_EXHAUSTED
                                ),
                                "{e:?}"
                            );
                            let f = kvvm_cache_free_slot(cache, slot);
                            assert!(
                                matches!(
                                    f,
                                    kvvm_status::KVVM_STATUS_OK
                                        | kvvm_status::KVVM_STATUS_INVALID_HANDLE
                                ),
                                "{f:?}"
                            );
                            ok += 1;
                            progress.fetch_add(1, Ordering::Relaxed);
                        }
                        kvvm_status::KVVM_STATUS_INVALID_HANDLE => {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                        }
                        kvvm_status::KVVM_STATUS_SLOTS_EXHAUSTED => {}
                        other => panic!("unexpected {other:?}"),
                    }
                }
                ok
            })
        })
        .collect();
    // Destroy once the workers are busy with the handle (no timing involved).
    while progress.load(Ordering::Relaxed) < 6 && !workers.iter().all(|w| w.is_finished()) {
        std::thread::yield_now();
    }
    assert_eq!(kvvm_cache_free(cache), kvvm_status::KVVM_STATUS_OK);
    stop.store(true, Ordering::Relaxed);
    let ok: u32 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(ok > 0);
    assert_eq!(
        kvvm_cache_quiesce(cache),
        kvvm_status::KVVM_STATUS_INVALID_HANDLE
    );
}

#[test]
fn versioned_struct_sizes() {
    #[repr(C)]
    struct Newer {
        base: kvvm_config,
        extra: u64,
    }
    let mut n = Newer {
        base: small_config(),
        extra: 7,
    };
    n.base.struct_size = std::mem::size_of::<Newer>() as u32;
    let mut h = kvvm_cache::default();
    // SAFETY: `n` is valid for `struct_size` bytes.
    let s = unsafe { kvvm_cache_create(&n.base, &mut h) };
    assert_eq!(s, kvvm_status::KVVM_STATUS_INVALID_CONFIG);
    assert!(last_error().contains("newer"), "{}", last_error());
    n.extra = 0;
    // SAFETY: as above.
    let s = unsafe { kvvm_cache_create(&n.base, &mut h) };
    assert_eq!(s, kvvm_status::KVVM_STATUS_OK);
    let mut old = small_config();
    old.struct_size = KVVM_CONFIG_SIZE_V1 - 8;
    let mut h2 = kvvm_cache::default();
    // SAFETY: valid local.
    let s = unsafe { kvvm_cache_create(&old, &mut h2) };
    assert_eq!(s, kvvm_status::KVVM_STATUS_INVALID_CONFIG);
    assert_eq!(h2.id, 0);

    // Stats: a larger caller struct gets the known prefix, the tail untouched.
    #[repr(C)]
    struct BigStats {
        base: kvvm_stats,
        extra: u64,
    }
    let mut st = BigStats {
        base: kvvm_stats {
            struct_size: std::mem::size_of::<BigStats>() as u32,
            ..Default::default()
        },
        extra: 0xabcd,
    };
    // SAFETY: valid for `struct_size` bytes.
    let s = unsafe { kvvm_cache_stats(h, &mut st.base) };
    assert_eq!(s, kvvm_status::KVVM_STATUS_OK);
    assert_eq!(st.extra, 0xabcd);
    assert!(st.base.page_size > 0 && st.base.budget_pages > 0);

    let mut sc = kvvm_swap_config::default();
    // SAFETY: valid local.
    unsafe { kvvm_swap_config_init(&mut sc) };
    assert_eq!(sc.struct_size, KVVM_SWAP_CONFIG_SIZE_V1);
    assert_eq!(kvvm_cache_free(h), kvvm_status::KVVM_STATUS_OK);
}

#[test]
fn stream_ordering_calls_on_the_host_backend() {
    // Streams and events are plain integers; the host backend has none, so the calls succeed
    // and order nothing (a stream wait waits for the copies), and the bytes make the round trip.
    let c = small_config();
    let cache = create(&c);
    assert_eq!(
        kvvm_cache_set_stream(cache, 0x1234),
        kvvm_status::KVVM_STATUS_OK
    );
    assert_eq!(
        kvvm_cache_set_stream(kvvm_cache::default(), 0),
        kvvm_status::KVVM_STATUS_INVALID_HANDLE
    );
    let mut slot = 0u32;
    // SAFETY: valid locals.
    let st = unsafe { kvvm_cache_alloc_slot(cache, &mut slot) };
    assert_eq!(st, kvvm_status::KVVM_STATUS_OK);
    assert_eq!(
        kvvm_cache_ensure(cache, slot, 40),
        kvvm_status::KVVM_STATUS_OK
    );
    let row = bytes(7, 2 * 32 * 4);
    // SAFETY: `row` holds a whole row (2 heads of 32 f32).
    let st = unsafe { kvvm_cache_write_row(cache, slot, 39, 1, 1, row.as_ptr(), row.len()) };
    assert_eq!(st, kvvm_status::KVVM_STATUS_OK, "{}", last_error());
    let mut sc = kvvm_swap_config::default();
    let mut swap = kvvm_swap::default();
    let mut t = kvvm_ticket::default();
    let mut copy = 0u64;
    // SAFETY: valid locals.
    unsafe {
        kvvm_swap_config_init(&mut sc);
        assert_eq!(
            kvvm_swap_create(cache, &sc, &mut swap),
            kvvm_status::KVVM_STATUS_OK
        );
        let st = kvvm_swap_out_after(swap, slot, 0xdead, &mut t);
        assert_eq!(st, kvvm_status::KVVM_STATUS_OK, "{}", last_error());
        assert_eq!(kvvm_ticket_copy(t, &mut copy), kvvm_status::KVVM_STATUS_OK);
    }
    assert_eq!(kvvm_ticket_wait(t), kvvm_status::KVVM_STATUS_OK);
    assert_eq!(kvvm_ticket_free(t), kvvm_status::KVVM_STATUS_OK);
    // SAFETY: valid locals.
    unsafe {
        assert_eq!(
            kvvm_cache_alloc_slot(cache, &mut slot),
            kvvm_status::KVVM_STATUS_OK
        );
        assert_eq!(
            kvvm_swap_in(swap, copy, slot, &mut t),
            kvvm_status::KVVM_STATUS_OK
        );
    }
    assert_eq!(kvvm_ticket_stream_wait(t, 0), kvvm_status::KVVM_STATUS_OK);
    // The slot's bookkeeping completes with the ticket (calls on the slot wait for it).
    assert_eq!(kvvm_ticket_wait(t), kvvm_status::KVVM_STATUS_OK);
    let mut back = vec![0u8; row.len()];
    // SAFETY: `back` holds a whole row.
    let st = unsafe { kvvm_cache_read_row(cache, slot, 39, 1, 1, back.as_mut_ptr(), back.len()) };
    assert_eq!(st, kvvm_status::KVVM_STATUS_OK, "{}", last_error());
    assert_eq!(back, row);
    assert_eq!(
        kvvm_ticket_stream_wait(kvvm_ticket::default(), 0),
        kvvm_status::KVVM_STATUS_INVALID_HANDLE
    );
    assert_eq!(kvvm_ticket_wait(t), kvvm_status::KVVM_STATUS_OK);
    assert_eq!(kvvm_ticket_free(t), kvvm_status::KVVM_STATUS_OK);
    assert_eq!(kvvm_swap_free(swap), kvvm_status::KVVM_STATUS_OK);
    assert_eq!(kvvm_cache_free(cache), kvvm_status::KVVM_STATUS_OK);
}

#[test]
fn a_swap_engine_can_keep_the_pages_of_its_swap_outs() {
    let c = small_config();
    let cache = create(&c);
    let mut swap = kvvm_swap::default();
    // SAFETY: valid locals; a null config is the defaults.
    unsafe {
        assert_eq!(
            kvvm_swap_create(cache, std::ptr::null(), &mut swap),
            kvvm_status::KVVM_STATUS_OK
        );
    }
    assert_eq!(
        kvvm_swap_set_keep_pages(kvvm_swap::default(), 1),
        kvvm_status::KVVM_STATUS_INVALID_HANDLE
    );
    let mut capacity = [0u64; 2];
    for (keep, cap) in [1, 0].into_iter().zip(&mut capacity) {
        assert_eq!(
            kvvm_swap_set_keep_pages(swap, keep),
            kvvm_status::KVVM_STATUS_OK
        );
        let mut slot = 0u32;
        let mut t = kvvm_ticket::default();
        // SAFETY: valid locals.
        unsafe {
            assert_eq!(
                kvvm_cache_alloc_slot_for(cache, 40, &mut slot),
                kvvm_status::KVVM_STATUS_OK
            );
            assert_eq!(
                kvvm_cache_ensure(cache, slot, 40),
                kvvm_status::KVVM_STATUS_OK
            );
            assert_eq!(
                kvvm_swap_out(swap, slot, &mut t),
                kvvm_status::KVVM_STATUS_OK
            );
            assert_eq!(kvvm_ticket_wait(t), kvvm_status::KVVM_STATUS_OK);
            assert_eq!(kvvm_ticket_free(t), kvvm_status::KVVM_STATUS_OK);
            assert_eq!(
                kvvm_cache_capacity(cache, slot, cap),
                kvvm_status::KVVM_STATUS_OK
            );
        }
    }
    // Kept: the freed slot still holds 40 tokens' pages; released: none.
    assert!(capacity[0] >= 40, "{capacity:?}");
    assert_eq!(capacity[1], 0, "{capacity:?}");
    assert_eq!(kvvm_swap_free(swap), kvvm_status::KVVM_STATUS_OK);
    assert_eq!(kvvm_cache_free(cache), kvvm_status::KVVM_STATUS_OK);
}

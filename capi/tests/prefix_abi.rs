//! Prefix sharing through the C ABI: publish, admit with a prefix (tokens and keys), read the
//! shared rows, refuse writes into them, null and bad arguments, statistics, eviction.

use kvvm_capi::*;

mod support;
use support::{last_error, small_config as config};

fn ok(s: kvvm_status) {
    assert_eq!(s, kvvm_status::KVVM_STATUS_OK, "{}", last_error());
}

const ROW: usize = 32 * 2 * 4; // kv_heads × head_dim × f32

fn row_bytes(token: u64) -> Vec<u8> {
    (0..ROW).map(|i| (token as usize * 31 + i) as u8).collect()
}

#[test]
fn publish_and_admit_through_the_c_abi() {
    let c = config();
    let mut h = kvvm_cache::default();
    // SAFETY: valid locals.
    ok(unsafe { kvvm_cache_create(&c, &mut h) });
    let mut tpp = 0u64;
    // SAFETY: valid out-pointer.
    ok(unsafe { kvvm_cache_tokens_per_page(h, &mut tpp) });
    assert_eq!(tpp, 64, "64 KiB pages of 1 KiB tokens");
    let tokens: Vec<u32> = (0..200).collect();

    let mut a = 0u32;
    // SAFETY: valid out-pointer.
    ok(unsafe { kvvm_cache_alloc_slot(h, &mut a) });
    ok(kvvm_cache_ensure(h, a, 200));
    for t in 0..200u64 {
        let r = row_bytes(t);
        // SAFETY: `r` holds one row.
        ok(unsafe { kvvm_cache_write_row(h, a, t, 1, 1, r.as_ptr(), r.len()) });
    }
    let mut pages = 0u64;
    // SAFETY: `tokens` holds 200 values.
    ok(unsafe { kvvm_cache_publish(h, a, tokens.as_ptr(), 200, 9, &mut pages) });
    assert_eq!(pages, 3);

    let (mut b, mut reused) = (0u32, 0u64);
    // SAFETY: `tokens` holds 200 values; valid out-pointers.
    ok(unsafe {
        kvvm_cache_alloc_slot_with_prefix(h, tokens.as_ptr(), 200, 9, &mut b, &mut reused)
    });
    assert_ne!(a, b);
    assert_eq!(reused, 192);
    let mut ro = 0u64;
    // SAFETY: valid out-pointer.
    ok(unsafe { kvvm_cache_read_only_tokens(h, b, &mut ro) });
    assert_eq!(ro, 192);
    // B reads A's rows.
    let mut got = vec![0u8; ROW];
    for t in [0u64, 63, 64, 191] {
        // SAFETY: `got` holds one row.
        ok(unsafe { kvvm_cache_read_row(h, b, t, 1, 1, got.as_mut_ptr(), got.len()) });
        assert_eq!(got, row_bytes(t), "token {t}");
    }
    // Writing a shared row is refused (it would fault), and nothing changed.
    let junk = vec![0xffu8; ROW];
    // SAFETY: `junk` holds one row.
    let s = unsafe { kvvm_cache_write_row(h, b, 5, 1, 1, junk.as_ptr(), junk.len()) };
    assert_eq!(s, kvvm_status::KVVM_STATUS_INVALID_ARGUMENT);
    // SAFETY: `got` holds one row.
    ok(unsafe { kvvm_cache_read_row(h, a, 5, 1, 1, got.as_mut_ptr(), got.len()) });
    assert_eq!(got, row_bytes(5));
    // B grows past the prefix and writes its own rows.
    ok(kvvm_cache_ensure(h, b, 250));
    let r = row_bytes(1000);
    // SAFETY: `r` holds one row.
    ok(unsafe { kvvm_cache_write_row(h, b, 192, 1, 1, r.as_ptr(), r.len()) });

    // The same prefix by keys: publish B's chain under its own keys, admit by keys.
    let keys = [11u64, 12, 13];
    // SAFETY: `keys` holds 3 values.
    ok(unsafe { kvvm_cache_publish_keys(h, b, keys.as_ptr(), 3, &mut pages) });
    assert_eq!(pages, 3);
    let (mut d, mut reused_d) = (0u32, 0u64);
    // SAFETY: `keys` holds 3 values; valid out-pointers.
    ok(unsafe {
        kvvm_cache_alloc_slot_with_prefix_keys(h, keys.as_ptr(), 3, 300, &mut d, &mut reused_d)
    });
    assert_eq!(reused_d, 192);
    // SAFETY: `got` holds one row.
    ok(unsafe { kvvm_cache_read_row(h, d, 100, 1, 1, got.as_mut_ptr(), got.len()) });
    assert_eq!(got, row_bytes(100));

    let mut st = kvvm_prefix_stats::default();
    // SAFETY: valid out-pointer.
    ok(unsafe { kvvm_cache_prefix_stats(h, &mut st) });
    assert_eq!((st.lookups, st.hits, st.hit_tokens), (2, 2, 384));
    // Two names (token keys and the caller's keys) for the same three pages.
    assert_eq!(st.cached_pages, 6);

    // Bad arguments: errors, never a crash.
    let (mut e, mut r2) = (0u32, 0u64);
    // SAFETY: null arrays with a non-zero length, null out-pointers.
    unsafe {
        assert_eq!(
            kvvm_cache_alloc_slot_with_prefix(h, std::ptr::null(), 5, 0, &mut e, &mut r2),
            kvvm_status::KVVM_STATUS_NULL_POINTER
        );
        assert_eq!(
            kvvm_cache_alloc_slot_with_prefix(
                h,
                tokens.as_ptr(),
                5,
                0,
                std::ptr::null_mut(),
                &mut r2
            ),
            kvvm_status::KVVM_STATUS_NULL_POINTER
        );
        assert_eq!(
            kvvm_cache_publish(h, 77, tokens.as_ptr(), 5, 0, std::ptr::null_mut()),
            kvvm_status::KVVM_STATUS_INVALID_ARGUMENT
        );
        assert_eq!(
            kvvm_cache_publish_keys(kvvm_cache::default(), 0, keys.as_ptr(), 3, &mut pages),
            kvvm_status::KVVM_STATUS_INVALID_HANDLE
        );
        assert_eq!(
            kvvm_cache_prefix_stats(h, std::ptr::null_mut()),
            kvvm_status::KVVM_STATUS_NULL_POINTER
        );
    }
    // Everyone done: free slots still map the pages, so eviction frees pool pages only after
    // reclamation.
    for s in [a, b, d] {
        ok(kvvm_cache_free_slot(h, s));
    }
    let mut freed = 0u64;
    // SAFETY: valid out-pointer.
    ok(unsafe { kvvm_cache_evict_prefixes(h, 100, &mut freed) });
    assert_eq!(freed, 0);
    ok(kvvm_cache_free(h));
}

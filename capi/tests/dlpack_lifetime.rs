//! An exported DLPack tensor outlives its cache handle holding only the mappings (issue 16, item
//! 8): after `kvvm_cache_free` the cache's threads have stopped and its arena file is closed, the
//! tensor still reads the bytes it was made over, and its deleter unmaps them.

use kvvm::testing::process::{arena_fds, is_mapped, kvvm_threads, settles};
use kvvm_capi::dlpack::*;
use kvvm_capi::*;

mod support;
use support::{last_error, small_config};

#[test]
fn a_tensor_keeps_the_mappings_not_the_cache() {
    let threads0 = kvvm_threads();
    let fds0 = arena_fds();
    let c = small_config();
    let mut h = kvvm_cache::default();
    // SAFETY: valid locals.
    let st = unsafe { kvvm_cache_create(&c, &mut h) };
    assert_eq!(st, kvvm_status::KVVM_STATUS_OK, "{}", last_error());
    let mut slot = 0u32;
    // SAFETY: valid out-pointer.
    let st = unsafe { kvvm_cache_alloc_slot(h, &mut slot) };
    assert_eq!(st, kvvm_status::KVVM_STATUS_OK);
    assert_eq!(kvvm_cache_ensure(h, slot, 100), kvvm_status::KVVM_STATUS_OK);
    let row: Vec<u8> = (0..256u32).map(|i| (i * 13 + 5) as u8).collect();
    // SAFETY: `row` holds one row (2 heads × 32 × f32).
    let st =
        unsafe { kvvm_cache_write_row(h, slot, 7, 1, kvvm_kv::KVVM_K as u32, row.as_ptr(), 256) };
    assert_eq!(st, kvvm_status::KVVM_STATUS_OK, "{}", last_error());

    let mut t: *mut kvvm_dl_managed_tensor_versioned = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    let st = unsafe { kvvm_cache_export_dlpack(h, 1, kvvm_kv::KVVM_K as u32, slot, 100, &mut t) };
    assert_eq!(st, kvvm_status::KVVM_STATUS_OK, "{}", last_error());
    let mut legacy: *mut kvvm_dl_managed_tensor = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    let st = unsafe {
        kvvm_cache_export_dlpack_legacy(h, 1, kvvm_kv::KVVM_K as u32, slot, 100, &mut legacy)
    };
    assert_eq!(st, kvvm_status::KVVM_STATUS_OK, "{}", last_error());
    // SAFETY: a live export.
    let (data, stride0) = unsafe { ((*t).dl_tensor.data as u64, *(*t).dl_tensor.strides) };
    let token7 = data + 7 * stride0 as u64 * 4;
    assert!(settles(|| kvvm_threads() > threads0));
    assert!(arena_fds() > fds0);

    assert_eq!(kvvm_cache_free(h), kvvm_status::KVVM_STATUS_OK);
    assert!(
        settles(|| kvvm_threads() == threads0),
        "{} kvvm thread(s) still run after kvvm_cache_free with a tensor alive",
        kvvm_threads() - threads0
    );
    assert_eq!(arena_fds(), fds0, "the arena file stayed open");
    // SAFETY: the tensor keeps token 7's row mapped.
    let got = unsafe { std::slice::from_raw_parts(token7 as usize as *const u8, 256) };
    assert_eq!(got, &row[..], "the tensor's bytes changed");

    // SAFETY: live export, freed once.
    unsafe { kvvm_dlpack_free(t) };
    assert!(
        is_mapped(token7),
        "the range went with the first of two tensors"
    );
    // SAFETY: live export, freed once.
    unsafe { kvvm_dlpack_free_legacy(legacy) };
    assert!(!is_mapped(token7), "the range stayed after the last tensor");
}

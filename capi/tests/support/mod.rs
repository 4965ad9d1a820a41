//! Setup shared by the C ABI tests.

#![allow(dead_code)]

use std::ffi::CStr;

use kvvm_capi::*;

/// A small host cache: 2 layers, 2 KV heads, head dim 32, f32 (256-byte rows), 4 slots of 512
/// tokens, a 4 MiB budget, 64 KiB pages.
pub fn small_config() -> kvvm_config {
    let mut c = kvvm_config::default();
    // SAFETY: valid local.
    let st = unsafe { kvvm_config_init(&mut c) };
    assert_eq!(st, kvvm_status::KVVM_STATUS_OK);
    c.layers = 2;
    c.kv_heads = 2;
    c.head_dim = 32;
    c.max_slots = 4;
    c.max_tokens = 512;
    c.budget_bytes = 4 << 20;
    c.backend = kvvm_backend::KVVM_BACKEND_HOST as u32;
    c.host_granularity = 64 << 10;
    c.dtype = kvvm_dtype::KVVM_DTYPE_F32 as u32;
    c
}

/// This thread's last error message.
pub fn last_error() -> String {
    let mut buf = vec![0u8; 512];
    // SAFETY: `buf` holds 512 bytes.
    unsafe { kvvm_last_error(buf.as_mut_ptr().cast(), buf.len()) };
    CStr::from_bytes_until_nul(&buf)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

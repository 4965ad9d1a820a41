//! Calls kvvm's C ABI with arbitrary arguments: live, destroyed, null and made-up handles,
//! arbitrary integers, null pointers, versioned structs of the wrong size. Every call must return
//! a documented status, never crash or leak; see `kvvm_capi::fuzz::run_calls`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kvvm_capi::fuzz::run_calls(data);
});

//! Fuzzes `KvCache` with operation sequences: the input decodes (see
//! `kvvm::testing::FuzzInput`) to a harness configuration (layout, small pages, budget, mapper
//! lookahead, fault injection) and a list of operations, each applied to the cache and to the
//! harness's shadow model, with the invariants and every live token's bytes checked after each.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = kvvm::testing::fuzz_cache_ops(data) {
        panic!("{e}");
    }
});

//! kvvm's C library: `libkvvm.so` and `libkvvm.a`, exporting every `kvvm_*` function of
//! [`kvvm_capi`] (the header is `include/kvvm.h`).
pub use kvvm_capi::*;

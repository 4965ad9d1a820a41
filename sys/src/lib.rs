//! `kvvm-sys`: the subset of the CUDA driver API (and NVRTC) that kvvm uses, resolved at run
//! time.
//!
//! Nothing links `libcuda` at build time. [`driver()`] opens the driver with `libloading` on
//! first use, trying the file named by `KVVM_LIBCUDA`, then `libcuda.so.1`, then `libcuda.so`;
//! a missing library or entry point is a [`DriverError`] value, never a panic, so every binary
//! builds and starts on machines without a GPU.
//!
//! Layers (after cudarc):
//! - [`types`]: `cuda.h` types, constants and `#[repr(C)]` structs, with their sizes and
//!   alignments pinned at compile time;
//! - [`Driver`]: the table of raw entry points (`unsafe extern "C" fn` pointers), obtained with
//!   [`driver()`];
//! - [`result`]: one thin wrapper per entry point returning `Result<T, DriverError>`;
//! - [`nvrtc`](mod@nvrtc): the run-time compiler, loaded the same way, for the CUDA kernels.

#![warn(missing_docs)]

mod context;
mod driver;
mod error;
pub mod nvrtc;
pub mod result;
pub mod types;

pub use context::{Bound, PrimaryContext};
pub use driver::{driver, libcuda_candidates, Driver, LIBCUDA_ENV, LIBCUDA_NAMES};
pub use error::{error_name, DriverError};
pub use nvrtc::{nvrtc, Nvrtc};
pub use types::*;

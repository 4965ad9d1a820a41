//! Decode attention kernels over kvvm's KV views.
//!
//! - [`decode_attention_strided`]: one decode token per sequence, grouped-query attention over a
//!   strided 4-D view ([`KvView`]) of one layer's K and V, which is what kvvm's per-layer and
//!   interleaved layouts give.
//! - [`decode_attention_paged`]: the same over a vLLM-style paged pool ([`PagedPool`]) with a block
//!   table ([`BlockTable`]) — the baseline the contiguous layouts are compared with.
//! - [`reference_decode_attention`]: a plain `f64` reference.
//! - [`data`]: random KV sets and the helper that lays one set out in all three arrangements.
//! - [`bench_attention`]: times the three arrangements (`kvvm bench attention`).
//! - [`cuda`]: the CUDA C versions (embedded sources, compiled to PTX with NVRTC), and [`gpu`]: the
//!   launch path through `kvvm-sys`.
//!
//! Element types are `f32`, [`half::f16`] and [`half::bf16`]; arithmetic is in `f32`.

#[cfg(feature = "bench")]
pub mod bench;
pub mod cpu;
pub mod cuda;
#[cfg(feature = "bench")]
pub mod data;
mod element;
mod error;
pub mod gpu;
#[cfg(feature = "bench")]
pub mod reference;
pub mod view;

#[cfg(feature = "bench")]
pub use bench::{bench_attention, bench_inputs, BenchConfig, BenchInputs, BenchReport};
pub use cpu::{decode_attention_paged, decode_attention_strided, DecodeParams};
pub use element::{DType, KvElement};
pub use error::KernelError;
pub use half::{bf16, f16};
#[cfg(feature = "bench")]
pub use reference::reference_decode_attention;
pub use view::{BlockTable, KvView, PagedPool};

//! # kvvm — KV-cache virtual memory for LLM serving
//!
//! kvvm gives each request of a serving engine a **contiguous virtual KV tensor** and maps
//! physical pages behind it **on demand** (the vAttention design: unmodified attention kernels, no
//! block tables), and moves whole requests' KV between device memory and pinned host memory
//! asynchronously, in large transfers (the FastSwitch design).
//!
//! The types a serving engine needs are at the crate root:
//! - [`KvCache`] with its [`CacheConfig`] ([`Layout`], [`DType`], [`ModelShape`]): slots
//!   ([`SlotId`]), on-demand growth (`ensure`, `step`, `shrink`), views ([`TensorView`] per layer
//!   and [`Kv`]), statistics ([`CacheStats`]);
//! - [`SwapEngine`] with its [`SwapConfig`]: asynchronous swap-out and swap-in
//!   ([`SwapTicket`]) of whole slots to host copies ([`HostCopyId`]) with KV reuse;
//! - [`Error`] and [`Result`].
//!
//! [`vmm`] holds the backend contract ([`vmm::Backend`]) and its implementations (CUDA driver
//! virtual-memory management loaded at run time, and Linux memfd pages), for callers that pick
//! or wrap a backend themselves. With the `testing` feature, [`testing`] has a shadow-model
//! harness and `vmm::faulty` a fault-injecting backend.
//!
//! ```
//! use kvvm::{CacheConfig, KvCache, Kv};
//! use kvvm::vmm::{BackendChoice, BackendConfig};
//!
//! let config = CacheConfig::for_model("llama-3-8b", 4, 1024, 64 << 20)?
//!     .with_layers(2) // keep the example small
//!     .with_backend(BackendConfig { choice: BackendChoice::Host, host_granularity: 64 << 10, ..Default::default() });
//! let cache = KvCache::new(config)?;
//! let slot = cache.alloc_slot()?;
//! cache.ensure(slot, 100)?;                 // prefill: pages for 100 tokens
//! cache.step(&[(slot, 101)])?;              // one decode step
//! let k0 = cache.layer_view(0, Kv::K)?;     // pointer, shape, strides, dtype, device
//! assert_eq!(k0.shape[0], 4);
//! # Ok::<(), kvvm::Error>(())
//! ```
//!
//! See `ARCHITECTURE.md` in the repository for the whole picture.
#![warn(missing_docs)]

mod cache;
mod error;
mod fork;
mod kind;
// The page pool is internal; the `testing` feature opens it for the backend-contract tests.
#[cfg(feature = "testing")]
pub mod pool;
#[cfg(not(feature = "testing"))]
mod pool;
mod swap;
#[cfg(feature = "testing")]
pub mod testing;
pub mod vmm;
mod worker;

pub use cache::{
    page_key, prefix_keys, AddressSpace, ByteRange, CacheConfig, CacheStats, DType, Device,
    Geometry, Kv, KvCache, Layout, ModelShape, PrefixHit, PrefixStats, SlotId, TensorView,
    MAX_LAYERS, MAX_PAGE_LISTS, MAX_SLOTS, MAX_VIRTUAL_BYTES, PRESETS,
};
pub use error::{Error, Result};
pub use pool::PoolStats;
pub use swap::{HostCopyId, SwapConfig, SwapEngine, SwapStats, SwapTicket};

/// The fork generation of this process: 0 in the process that first used kvvm, one more in the
/// child of every `fork()` after that. kvvm objects made in an older generation were inherited
/// from a parent process: in the child their calls fail with [`Error::InvalidArgument`] and
/// dropping them only forgets them (the parent's pages are never touched).
pub fn fork_generation() -> u64 {
    fork::generation()
}

/// The Rust examples of `README.md`, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

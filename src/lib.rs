//! # kvvm — KV-cache virtual memory for LLM serving
//!
//! kvvm gives each request of a serving engine a **contiguous virtual KV tensor** and maps
//! physical pages behind it **on demand** (the vAttention design: unmodified attention kernels, no
//! block tables), and moves whole requests' KV between device memory and pinned host memory
//! asynchronously, in large transfers (the FastSwitch design).
//!
//! Layers, bottom up (each calls only the one below):
//! - [`vmm`]: the [`vmm::Backend`] trait and its implementations: [`vmm::cuda`] (CUDA driver
//!   virtual-memory management, loaded at run time) and [`vmm::host`] (Linux memfd pages), plus
//!   [`vmm::faulty`] for fault injection in tests.
//! - [`pool`]: the physical page pool (budget, reuse, watermarks).
//! - [`cache`]: [`cache::KvCache`], contiguous virtual KV tensors with on-demand pages.
//!
//! See `ARCHITECTURE.md` in the repository for the whole picture.
#![warn(missing_docs)]

pub mod cache;
pub mod error;
pub mod ffi;
pub mod pool;
pub mod replay;
pub mod swap;
pub mod testing;
pub mod vmm;

pub use error::{Error, Result};

/// The Rust examples of `README.md`, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

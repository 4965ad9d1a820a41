//! `kvvm_config`: the configuration of a cache, its defaults and model presets.

use std::ffi::c_char;

use static_assertions::{assert_eq_align, assert_eq_size, const_assert_eq};

use kvvm::vmm::{BackendChoice, BackendConfig};
use kvvm::{CacheConfig, Layout, ModelShape};

use crate::*;

/// Configuration of a cache. Fill it with `kvvm_config_init` or `kvvm_config_preset`, then
/// change fields.
///
/// `struct_size` must hold `sizeof(kvvm_config)` as the caller compiled it. A size below
/// `KVVM_CONFIG_SIZE_V1` is rejected with `KVVM_STATUS_INVALID_CONFIG`. A larger size (a caller built
/// against a newer header) is accepted when every byte past the fields this library knows is
/// zero, and rejected with `KVVM_STATUS_INVALID_CONFIG` otherwise (a newer option this library cannot
/// honour was set).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct kvvm_config {
    /// `sizeof(kvvm_config)`.
    pub struct_size: u32,
    /// Element type (`kvvm_dtype`).
    pub dtype: u32,
    /// Transformer layers.
    pub layers: u32,
    /// KV heads (per rank).
    pub kv_heads: u32,
    /// Head dimension.
    pub head_dim: u32,
    /// Most requests held at once.
    pub max_slots: u32,
    /// Most tokens per request.
    pub max_tokens: u64,
    /// Memory layout (`kvvm_layout`).
    pub layout: u32,
    /// Backend (`kvvm_backend`).
    pub backend: u32,
    /// Physical page size in bytes; 0 = the backend's granularity.
    pub page_size: u64,
    /// Budget for physical pages in bytes.
    pub budget_bytes: u64,
    /// Host backend: mapping granularity in bytes; 0 = 2 MiB.
    pub host_granularity: u64,
    /// CUDA device ordinal.
    pub device: i32,
    /// Decode steps the background mapper maps ahead; 0 disables it.
    pub lookahead_steps: u32,
    /// Host backend: copy worker threads; 0 = default (4).
    pub copy_threads: u32,
    /// Nonzero: create every page of the budget when the cache is made.
    pub create_all_pages: u32,
}

/// Size of the first published `kvvm_config`; smaller `struct_size` values are rejected.
pub const KVVM_CONFIG_SIZE_V1: u32 = 80;
assert_eq_size!(kvvm_config, [u8; 80]);
assert_eq_align!(kvvm_config, u64);
const_assert_eq!(
    std::mem::size_of::<kvvm_config>(),
    KVVM_CONFIG_SIZE_V1 as usize
);
pub(crate) fn default_config() -> kvvm_config {
    kvvm_config {
        struct_size: KVVM_CONFIG_SIZE_V1,
        dtype: kvvm_dtype::KVVM_DTYPE_F16 as u32,
        layers: 0,
        kv_heads: 0,
        head_dim: 0,
        max_slots: 0,
        max_tokens: 0,
        layout: kvvm_layout::KVVM_LAYOUT_INTERLEAVED as u32,
        backend: kvvm_backend::KVVM_BACKEND_AUTO as u32,
        page_size: 0,
        budget_bytes: 0,
        host_granularity: 0,
        device: 0,
        lookahead_steps: 8,
        copy_threads: 0,
        create_all_pages: 0,
    }
}

/// Fills `*config` with defaults: f16, interleaved layout, automatic backend, the backend's page
/// size, a lookahead of 8 steps, and zero shapes and budget (to be set by the caller);
/// `struct_size` is set to the size this library knows.
///
/// Thread-safe.
///
/// # Safety
/// `config` is null or points to a writable `kvvm_config`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_config_init(config: *mut kvvm_config) -> kvvm_status {
    guard(|| {
        // SAFETY: per this function's contract.
        *unsafe { out(config, "config") }? = default_config();
        Ok(())
    })
}

/// Fills `*config` like `kvvm_config_init` with the shapes of a model preset (`"llama-3-8b"`,
/// `"llama-3-70b@tp4"`, ...; see `kvvm info`) and the given sizes.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_NULL_POINTER`, `KVVM_STATUS_INVALID_CONFIG` for an unknown preset, `KVVM_STATUS_INVALID_ARGUMENT`
/// for a name that is not UTF-8.
///
/// # Safety
/// `name` is null or NUL-terminated; `config` is null or points to a writable `kvvm_config`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_config_preset(
    name: *const c_char,
    max_slots: u32,
    max_tokens: u64,
    budget_bytes: u64,
    config: *mut kvvm_config,
) -> kvvm_status {
    guard(|| {
        // SAFETY: per this function's contract.
        let name = unsafe { cstr(name, "name") }?;
        // SAFETY: per this function's contract.
        let config = unsafe { out(config, "config") }?;
        let m = ModelShape::preset(name)?;
        let to_u32 =
            |v: usize| u32::try_from(v).map_err(|_| FfiError::arg("preset dimension too large"));
        *config = kvvm_config {
            layers: to_u32(m.layers)?,
            kv_heads: to_u32(m.kv_heads)?,
            head_dim: to_u32(m.head_dim)?,
            max_slots,
            max_tokens,
            budget_bytes,
            ..default_config()
        };
        Ok(())
    })
}

/// Reads a versioned config struct: `struct_size` first, then at most what this library knows.
///
/// # Safety
/// `p` is null or valid for reads of `(*p).struct_size` bytes.
pub(crate) unsafe fn read_config(p: *const kvvm_config) -> FfiResult<kvvm_config> {
    if p.is_null() {
        return Err(FfiError::null("config"));
    }
    // SAFETY: `p` is valid for at least the first field (every version has `struct_size`).
    let size = unsafe { std::ptr::read_unaligned(p.cast::<u32>()) } as usize;
    let known = std::mem::size_of::<kvvm_config>();
    // SAFETY: `p` is valid for `size` bytes per the contract.
    let bytes = unsafe { versioned_bytes(p.cast(), size, KVVM_CONFIG_SIZE_V1 as usize, known) }?;
    let mut c = kvvm_config::default();
    // SAFETY: `bytes.len() == known == size_of::<kvvm_config>()`, and every bit pattern is a
    // valid `kvvm_config` (integers only).
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&raw mut c).cast::<u8>(), known);
    }
    Ok(c)
}

/// Copies a caller's versioned struct of `size` bytes into a buffer of `known` bytes, checking
/// that `size >= min` and that any bytes past `known` are zero.
///
/// # Safety
/// `p` is valid for reads of `size` bytes.
pub(crate) unsafe fn versioned_bytes(
    p: *const u8,
    size: usize,
    min: usize,
    known: usize,
) -> FfiResult<Vec<u8>> {
    if size < min {
        return Err(FfiError::new(
            kvvm_status::KVVM_STATUS_INVALID_CONFIG,
            format!("struct_size {size} is below the smallest accepted size {min}"),
        ));
    }
    if size > (1 << 20) {
        return Err(FfiError::new(
            kvvm_status::KVVM_STATUS_INVALID_CONFIG,
            format!("struct_size {size} is implausibly large"),
        ));
    }
    // SAFETY: `p` is valid for `size` bytes per the contract.
    let given = unsafe { std::slice::from_raw_parts(p, size) };
    if given.len() > known && given[known..].iter().any(|&b| b != 0) {
        return Err(FfiError::new(
            kvvm_status::KVVM_STATUS_INVALID_CONFIG,
            format!(
                "struct_size {size}: fields past the {known} bytes this library knows are set \
                 (the caller was built against a newer kvvm.h)"
            ),
        ));
    }
    let mut v = vec![0u8; known];
    let n = size.min(known);
    v[..n].copy_from_slice(&given[..n]);
    Ok(v)
}

/// Converts a C config to the Rust one.
pub fn config_from_c(c: &kvvm_config) -> FfiResult<CacheConfig> {
    let layout = match c.layout {
        0 => Layout::Interleaved,
        1 => Layout::PerLayer,
        v => {
            return Err(FfiError::new(
                kvvm_status::KVVM_STATUS_INVALID_CONFIG,
                format!("unknown layout code {v}"),
            ))
        }
    };
    let choice = match c.backend {
        0 => BackendChoice::Auto,
        1 => BackendChoice::Host,
        2 => BackendChoice::Cuda,
        v => {
            return Err(FfiError::new(
                kvvm_status::KVVM_STATUS_INVALID_CONFIG,
                format!("unknown backend code {v}"),
            ))
        }
    };
    let defaults = BackendConfig::default();
    Ok(
        CacheConfig::new(c.layers as usize, c.kv_heads as usize, c.head_dim as usize)
            .with_dtype(dtype_from(c.dtype)?)
            .with_max_slots(c.max_slots as usize)
            .with_max_tokens(to_usize(c.max_tokens, "max_tokens")?)
            .with_layout(layout)
            .with_page_size(match c.page_size {
                0 => None,
                p => Some(to_usize(p, "page_size")?),
            })
            .with_budget_bytes(c.budget_bytes)
            .with_backend(BackendConfig {
                choice,
                host_granularity: match c.host_granularity {
                    0 => defaults.host_granularity,
                    g => to_usize(g, "host_granularity")?,
                },
                device: c.device,
                copy_threads: match c.copy_threads {
                    0 => defaults.copy_threads,
                    t => t as usize,
                },
                ..defaults
            })
            .with_lookahead_steps(c.lookahead_steps as usize)
            .with_create_all_pages(c.create_all_pages != 0),
    )
}

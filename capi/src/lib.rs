//! The C ABI: `extern "C"` functions over [`KvCache`] (and the swap engine), DLPack export.
//!
//! The header `include/kvvm.h` is generated from this module by cbindgen (see `cbindgen.toml`
//! and `scripts/c-tests.sh`); the doc comments here are the header's documentation.
//!
//! # Conventions (after rustls-ffi)
//!
//! - **Handles** (`kvvm_cache`, `kvvm_swap`, `kvvm_ticket`) are small structs holding an id into a
//!   process-wide registry, not pointers. A null (id 0), destroyed or made-up handle gives
//!   [`kvvm_status::KVVM_INVALID_HANDLE`], never undefined behaviour. Ids are never reused.
//! - Every function returns a [`kvvm_status`] (a `uint32_t` in C with stable values) and writes
//!   its results through out-pointers. Enumerations passed in (dtype, layout, backend, K/V) are
//!   plain integers, checked on input.
//! - A failing call stores a message in a thread-local buffer, read with [`kvvm_last_error`].
//! - Every export runs inside `catch_unwind`: a panic becomes [`kvvm_status::KVVM_PANIC`].
//! - Structs that may grow (`kvvm_config`, `kvvm_stats`, `kvvm_swap_config`) start with a
//!   `struct_size` field that the caller sets to `sizeof` the struct it was compiled with.
#![allow(non_camel_case_types)]

pub mod dlpack;
#[cfg(feature = "testing")]
pub mod fuzz;
mod registry;
pub mod swap;

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use static_assertions::{assert_eq_align, assert_eq_size, const_assert_eq};

use kvvm::vmm::{BackendChoice, BackendConfig, BackendKind};
use kvvm::Error;
use kvvm::{CacheConfig, DType, Kv, KvCache, Layout, ModelShape, SlotId};

use registry::Object;

/// Major version of the library (matches `Cargo.toml`).
pub const KVVM_VERSION_MAJOR: u32 = 0;
/// Minor version of the library (matches `Cargo.toml`).
pub const KVVM_VERSION_MINOR: u32 = 1;
/// Patch version of the library (matches `Cargo.toml`).
pub const KVVM_VERSION_PATCH: u32 = 0;

/// Pass as `slot` to `kvvm_cache_export_dlpack` to export the whole batch
/// `[max_slots, max_tokens, kv_heads, head_dim]`.
pub const KVVM_ALL_SLOTS: u32 = u32::MAX;

/// Status of a call. Values are stable; new ones may be added. In C this is a `uint32_t`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum kvvm_status {
    /// Success.
    KVVM_OK = 0,
    /// A required pointer argument was null.
    KVVM_NULL_POINTER = 1,
    /// A handle was null, already destroyed, of another kind, or never issued.
    KVVM_INVALID_HANDLE = 2,
    /// An argument was out of range or the object was in the wrong state for the call.
    KVVM_INVALID_ARGUMENT = 3,
    /// A configuration that cannot work (including a `struct_size` that is not accepted).
    KVVM_INVALID_CONFIG = 4,
    /// The physical page budget cannot supply the pages needed; nothing was changed.
    KVVM_BUDGET_EXHAUSTED = 5,
    /// Every slot is allocated.
    KVVM_SLOTS_EXHAUSTED = 6,
    /// The host (swap) memory budget cannot hold what was asked.
    KVVM_HOST_BUDGET_EXHAUSTED = 7,
    /// The process ran out of memory mappings (`vm.max_map_count`, host backend).
    KVVM_MAP_COUNT_EXHAUSTED = 8,
    /// A system or driver call failed.
    KVVM_BACKEND_ERROR = 9,
    /// The CUDA driver could not be loaded or used.
    KVVM_DRIVER_ERROR = 10,
    /// Not supported by this backend or build.
    KVVM_UNSUPPORTED = 11,
    /// An output buffer was too small; the needed size was reported.
    KVVM_BUFFER_TOO_SMALL = 12,
    /// A Rust panic was caught at the boundary; the object may be unusable.
    KVVM_PANIC = 13,
    /// Any other error.
    KVVM_INTERNAL = 14,
}

impl kvvm_status {
    /// The status with the numeric value `v`, if there is one.
    pub fn from_raw(v: u32) -> Option<Self> {
        use kvvm_status::*;
        Some(match v {
            0 => KVVM_OK,
            1 => KVVM_NULL_POINTER,
            2 => KVVM_INVALID_HANDLE,
            3 => KVVM_INVALID_ARGUMENT,
            4 => KVVM_INVALID_CONFIG,
            5 => KVVM_BUDGET_EXHAUSTED,
            6 => KVVM_SLOTS_EXHAUSTED,
            7 => KVVM_HOST_BUDGET_EXHAUSTED,
            8 => KVVM_MAP_COUNT_EXHAUSTED,
            9 => KVVM_BACKEND_ERROR,
            10 => KVVM_DRIVER_ERROR,
            11 => KVVM_UNSUPPORTED,
            12 => KVVM_BUFFER_TOO_SMALL,
            13 => KVVM_PANIC,
            14 => KVVM_INTERNAL,
            _ => return None,
        })
    }

    /// The status name as a NUL-terminated string (`"KVVM_OK"`, ...).
    fn name_cstr(self) -> &'static CStr {
        use kvvm_status::*;
        match self {
            KVVM_OK => c"KVVM_OK",
            KVVM_NULL_POINTER => c"KVVM_NULL_POINTER",
            KVVM_INVALID_HANDLE => c"KVVM_INVALID_HANDLE",
            KVVM_INVALID_ARGUMENT => c"KVVM_INVALID_ARGUMENT",
            KVVM_INVALID_CONFIG => c"KVVM_INVALID_CONFIG",
            KVVM_BUDGET_EXHAUSTED => c"KVVM_BUDGET_EXHAUSTED",
            KVVM_SLOTS_EXHAUSTED => c"KVVM_SLOTS_EXHAUSTED",
            KVVM_HOST_BUDGET_EXHAUSTED => c"KVVM_HOST_BUDGET_EXHAUSTED",
            KVVM_MAP_COUNT_EXHAUSTED => c"KVVM_MAP_COUNT_EXHAUSTED",
            KVVM_BACKEND_ERROR => c"KVVM_BACKEND_ERROR",
            KVVM_DRIVER_ERROR => c"KVVM_DRIVER_ERROR",
            KVVM_UNSUPPORTED => c"KVVM_UNSUPPORTED",
            KVVM_BUFFER_TOO_SMALL => c"KVVM_BUFFER_TOO_SMALL",
            KVVM_PANIC => c"KVVM_PANIC",
            KVVM_INTERNAL => c"KVVM_INTERNAL",
        }
    }

    /// The status a kvvm error maps to.
    pub fn from_error(e: &Error) -> Self {
        use kvvm_status::*;
        match e {
            Error::Backend { .. } => KVVM_BACKEND_ERROR,
            #[cfg(feature = "testing")]
            Error::Injected { .. } => KVVM_BACKEND_ERROR,
            Error::Driver(_) => KVVM_DRIVER_ERROR,
            Error::BudgetExhausted { .. } => KVVM_BUDGET_EXHAUSTED,
            Error::MapCountExhausted { .. } => KVVM_MAP_COUNT_EXHAUSTED,
            Error::HostBudgetExhausted { .. } => KVVM_HOST_BUDGET_EXHAUSTED,
            Error::Grow { source, .. } => Self::from_error(source),
            Error::SlotsExhausted { .. } => KVVM_SLOTS_EXHAUSTED,
            Error::InvalidConfig(_) => KVVM_INVALID_CONFIG,
            Error::InvalidArgument(_) => KVVM_INVALID_ARGUMENT,
            Error::Unsupported(_) => KVVM_UNSUPPORTED,
            Error::Internal(_) => KVVM_INTERNAL,
            #[allow(unreachable_patterns)]
            _ => KVVM_INTERNAL,
        }
    }
}

/// Element type codes for `kvvm_config::dtype` and `kvvm_view::dtype`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvvm_dtype {
    /// IEEE half precision.
    KVVM_DTYPE_F16 = 0,
    /// bfloat16.
    KVVM_DTYPE_BF16 = 1,
    /// IEEE single precision.
    KVVM_DTYPE_F32 = 2,
    /// 8-bit float E4M3 (finite, no infinities).
    KVVM_DTYPE_FP8_E4M3 = 3,
    /// 8-bit float E5M2.
    KVVM_DTYPE_FP8_E5M2 = 4,
}

/// Layout codes for `kvvm_config::layout`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvvm_layout {
    /// One buffer `[max_slots, max_tokens, layers, 2, kv_heads, head_dim]`.
    KVVM_LAYOUT_INTERLEAVED = 0,
    /// `2 × layers` buffers `[max_slots, max_tokens, kv_heads, head_dim]`.
    KVVM_LAYOUT_PER_LAYER = 1,
}

/// Backend codes for `kvvm_config::backend`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvvm_backend {
    /// CUDA if usable, else host (`KVVM_BACKEND=host|cuda` in the environment overrides it).
    KVVM_BACKEND_AUTO = 0,
    /// Linux host memory (memfd pages).
    KVVM_BACKEND_HOST = 1,
    /// CUDA virtual-memory management.
    KVVM_BACKEND_CUDA = 2,
}

/// Key/value selector codes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvvm_kv {
    /// Keys.
    KVVM_K = 0,
    /// Values.
    KVVM_V = 1,
}

/// Device type codes of `kvvm_view::device_type` (the DLPack values).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvvm_device_type {
    /// Host memory (`kDLCPU`).
    KVVM_DEVICE_CPU = 1,
    /// CUDA device memory (`kDLCUDA`).
    KVVM_DEVICE_CUDA = 2,
}

/// Handle of a cache. `{0}` is the null handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct kvvm_cache {
    /// Registry id (opaque).
    pub id: u64,
}

/// Handle of a swap engine. `{0}` is the null handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct kvvm_swap {
    /// Registry id (opaque).
    pub id: u64,
}

/// Handle of a swap ticket (one swap-out or swap-in in flight). `{0}` is the null handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct kvvm_ticket {
    /// Registry id (opaque).
    pub id: u64,
}

/// Configuration of a cache. Fill it with `kvvm_config_init` or `kvvm_config_preset`, then
/// change fields.
///
/// `struct_size` must hold `sizeof(kvvm_config)` as the caller compiled it. A size below
/// `KVVM_CONFIG_SIZE_V1` is rejected with `KVVM_INVALID_CONFIG`. A larger size (a caller built
/// against a newer header) is accepted when every byte past the fields this library knows is
/// zero, and rejected with `KVVM_INVALID_CONFIG` otherwise (a newer option this library cannot
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
assert_eq_size!(kvvm_cache, u64);
assert_eq_size!(kvvm_swap, u64);
assert_eq_size!(kvvm_ticket, u64);

/// A strided view of one layer's K or V: what a kernel needs to address it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct kvvm_view {
    /// Address of element 0 (host or device address).
    pub data: *mut c_void,
    /// Number of dimensions used in `shape`/`strides` (4: slots, tokens, kv_heads, head_dim).
    pub ndim: i32,
    /// Element type (`kvvm_dtype`).
    pub dtype: u32,
    /// Sizes; entries past `ndim` are 0.
    pub shape: [i64; 6],
    /// Strides in elements; entries past `ndim` are 0.
    pub strides: [i64; 6],
    /// `kvvm_device_type` (DLPack device type).
    pub device_type: i32,
    /// Device ordinal (0 on host).
    pub device_id: i32,
    /// Bytes per element.
    pub itemsize: u32,
    /// Reserved, 0.
    pub reserved: u32,
}
assert_eq_size!(kvvm_view, [u8; 128]);
assert_eq_align!(kvvm_view, u64);

/// One entry of a `kvvm_cache_step` batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct kvvm_slot_tokens {
    /// The slot.
    pub slot: u32,
    /// Reserved, ignored.
    pub reserved: u32,
    /// Tokens the slot must hold.
    pub tokens: u64,
}
assert_eq_size!(kvvm_slot_tokens, [u8; 16]);
assert_eq_align!(kvvm_slot_tokens, u64);

/// A contiguous byte range in the cache's address space.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct kvvm_range {
    /// First byte (host or device address).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}
assert_eq_size!(kvvm_range, [u8; 16]);
assert_eq_align!(kvvm_range, u64);

/// Statistics of a cache. Set `struct_size` to `sizeof(kvvm_stats)` before the call; the library
/// writes at most that many bytes (and at least `KVVM_STATS_SIZE_V1` must be given).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct kvvm_stats {
    /// `sizeof(kvvm_stats)`, set by the caller.
    pub struct_size: u32,
    /// Allocated slots.
    pub allocated_slots: u32,
    /// Bytes of pages mapped into the cache.
    pub mapped_bytes: u64,
    /// Bytes holding live tokens of allocated slots.
    pub live_bytes: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Pages the budget allows.
    pub budget_pages: u64,
    /// Pages that exist (mapped or free).
    pub pool_live_pages: u64,
    /// Pages on the pool's free list.
    pub pool_free_pages: u64,
    /// Pages handed out by the pool.
    pub pool_in_use_pages: u64,
    /// Pages created over the cache's life.
    pub pages_created: u64,
    /// Pages released over the cache's life.
    pub pages_released: u64,
    /// Backend calls of every kind.
    pub backend_calls: u64,
    /// Backend calls made on the caller's threads.
    pub foreground_calls: u64,
    /// Times the background mapper mapped ahead.
    pub mapper_batches: u64,
    /// Pages the background mapper mapped.
    pub mapper_pages: u64,
    /// Pages taken back from free slots under pressure.
    pub reclaimed_pages: u64,
}
/// Size of the first published `kvvm_stats`.
pub const KVVM_STATS_SIZE_V1: u32 = 120;
assert_eq_size!(kvvm_stats, [u8; 120]);
assert_eq_align!(kvvm_stats, u64);

// ---------------------------------------------------------------------------------------------
// Errors, the panic boundary, pointer helpers.

/// An error at the boundary: a status and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FfiError {
    /// The status returned.
    pub status: kvvm_status,
    /// The message stored for `kvvm_last_error`.
    pub message: String,
}

impl FfiError {
    fn new(status: kvvm_status, message: impl Into<String>) -> Self {
        FfiError {
            status,
            message: message.into(),
        }
    }
    fn null(what: &str) -> Self {
        Self::new(
            kvvm_status::KVVM_NULL_POINTER,
            format!("{what} must not be null"),
        )
    }
    fn arg(message: impl Into<String>) -> Self {
        Self::new(kvvm_status::KVVM_INVALID_ARGUMENT, message)
    }
}

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        FfiError::new(kvvm_status::from_error(&e), e.to_string())
    }
}

type FfiResult<T = ()> = std::result::Result<T, FfiError>;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_last_error(message: String) {
    LAST_ERROR.with(|l| *l.borrow_mut() = message);
}

/// Runs `f` inside the panic boundary, storing the message of a failure.
fn guard(f: impl FnOnce() -> FfiResult) -> kvvm_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => kvvm_status::KVVM_OK,
        Ok(Err(e)) => {
            set_last_error(e.message);
            e.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(format!("internal panic: {what}"));
            kvvm_status::KVVM_PANIC
        }
    }
}

/// A mutable reference from an out-pointer.
///
/// # Safety
/// `p` is null or valid for writes of a `T` for `'a`.
unsafe fn out<'a, T>(p: *mut T, what: &str) -> FfiResult<&'a mut T> {
    // SAFETY: the caller guarantees `p` is null or valid and aligned for writes.
    unsafe { p.as_mut() }.ok_or_else(|| FfiError::null(what))
}

/// A string argument.
///
/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn cstr<'a>(p: *const c_char, what: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(FfiError::null(what));
    }
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| FfiError::arg(format!("{what} is not valid UTF-8")))
}

fn to_usize(v: u64, what: &str) -> FfiResult<usize> {
    usize::try_from(v).map_err(|_| FfiError::arg(format!("{what} {v} is too large")))
}

fn kv_from(kv: u32) -> FfiResult<Kv> {
    match kv {
        0 => Ok(Kv::K),
        1 => Ok(Kv::V),
        v => Err(FfiError::arg(format!(
            "kv must be KVVM_K (0) or KVVM_V (1), got {v}"
        ))),
    }
}

fn dtype_from(v: u32) -> FfiResult<DType> {
    Ok(match v {
        0 => DType::F16,
        1 => DType::Bf16,
        2 => DType::F32,
        3 => DType::Fp8E4M3,
        4 => DType::Fp8E5M2,
        v => {
            return Err(FfiError::new(
                kvvm_status::KVVM_INVALID_CONFIG,
                format!("unknown dtype code {v}"),
            ))
        }
    })
}

/// The `kvvm_dtype` code of a dtype.
pub fn dtype_code(d: DType) -> u32 {
    match d {
        DType::F16 => 0,
        DType::Bf16 => 1,
        DType::F32 => 2,
        DType::Fp8E4M3 => 3,
        DType::Fp8E5M2 => 4,
    }
}

fn cache_of(h: kvvm_cache) -> FfiResult<Arc<KvCache>> {
    registry::get_cache(h.id)
}

// ---------------------------------------------------------------------------------------------
// Version, status names, last error.

/// The library version as a NUL-terminated string (`"0.1.0"`), static storage.
///
/// Thread-safe.
#[no_mangle]
pub extern "C" fn kvvm_version() -> *const c_char {
    const V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr().cast()
}

/// The name of a status value (`"KVVM_OK"`, ...), or `"KVVM_UNKNOWN_STATUS"` for a value this
/// library does not know. Static storage.
///
/// Thread-safe.
#[no_mangle]
pub extern "C" fn kvvm_status_name(status: u32) -> *const c_char {
    match kvvm_status::from_raw(status) {
        Some(s) => s.name_cstr().as_ptr(),
        None => c"KVVM_UNKNOWN_STATUS".as_ptr(),
    }
}

/// Copies the message of the last failed call on this thread into `buf` (NUL-terminated,
/// truncated to `len - 1` bytes) and returns the full message length in bytes, without the NUL.
/// Call with `buf = NULL, len = 0` to learn the size. Returns 0 if no call on this thread
/// has failed yet. Successful calls do not clear the message.
///
/// Thread-safe (the message is per thread).
///
/// # Safety
/// `buf` is null or valid for writes of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvvm_last_error(buf: *mut c_char, len: usize) -> usize {
    catch_unwind(|| {
        LAST_ERROR.with(|l| {
            let msg = l.borrow();
            if !buf.is_null() && len > 0 {
                let n = msg.len().min(len - 1);
                // SAFETY: `buf` is valid for `len` bytes and `n + 1 <= len`; the message is a
                // separate allocation, so the ranges do not overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), n);
                    *buf.add(n) = 0;
                }
            }
            msg.len()
        })
    })
    .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Configuration.

fn default_config() -> kvvm_config {
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
/// `KVVM_NULL_POINTER`, `KVVM_INVALID_CONFIG` for an unknown preset, `KVVM_INVALID_ARGUMENT`
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
unsafe fn read_config(p: *const kvvm_config) -> FfiResult<kvvm_config> {
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
unsafe fn versioned_bytes(
    p: *const u8,
    size: usize,
    min: usize,
    known: usize,
) -> FfiResult<Vec<u8>> {
    if size < min {
        return Err(FfiError::new(
            kvvm_status::KVVM_INVALID_CONFIG,
            format!("struct_size {size} is below the smallest accepted size {min}"),
        ));
    }
    if size > (1 << 20) {
        return Err(FfiError::new(
            kvvm_status::KVVM_INVALID_CONFIG,
            format!("struct_size {size} is implausibly large"),
        ));
    }
    // SAFETY: `p` is valid for `size` bytes per the contract.
    let given = unsafe { std::slice::from_raw_parts(p, size) };
    if given.len() > known && given[known..].iter().any(|&b| b != 0) {
        return Err(FfiError::new(
            kvvm_status::KVVM_INVALID_CONFIG,
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
                kvvm_status::KVVM_INVALID_CONFIG,
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
                kvvm_status::KVVM_INVALID_CONFIG,
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
            })
            .with_lookahead_steps(c.lookahead_steps as usize)
            .with_create_all_pages(c.create_all_pages != 0),
    )
}

// ---------------------------------------------------------------------------------------------
// Cache.

/// Creates a cache and writes its handle to `*out`.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_NULL_POINTER`; `KVVM_INVALID_CONFIG` for a bad configuration or `struct_size` (see
/// `kvvm_config`); backend and driver errors. `*out` is written only on success.
///
/// # Safety
/// `config` is null or valid for reads of `config->struct_size` bytes; `out` is null or points
/// to a writable `kvvm_cache`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_create(
    config: *const kvvm_config,
    out_cache: *mut kvvm_cache,
) -> kvvm_status {
    guard(|| {
        // SAFETY: per this function's contract.
        let c = unsafe { read_config(config) }?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(out_cache, "out_cache") }?;
        let cache = KvCache::new(config_from_c(&c)?)?;
        o.id = registry::insert(Object::Cache(Arc::new(cache)));
        Ok(())
    })
}

/// Destroys a cache handle. The cache itself lives on while swap engines or exported DLPack
/// tensors still use it, and is freed with the last of them. The handle becomes invalid.
///
/// Thread-safe; calls still running on the cache from other threads finish normally.
///
/// # Errors
/// `KVVM_INVALID_HANDLE` for a null, destroyed or unknown handle.
#[no_mangle]
pub extern "C" fn kvvm_cache_destroy(cache: kvvm_cache) -> kvvm_status {
    guard(|| registry::remove_cache(cache.id))
}

/// Allocates a free slot (preferring one whose pages are still mapped) and writes it to `*slot`.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_INVALID_HANDLE`, `KVVM_NULL_POINTER`, `KVVM_SLOTS_EXHAUSTED`.
///
/// # Safety
/// `slot` is null or points to a writable `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_alloc_slot(cache: kvvm_cache, slot: *mut u32) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(slot, "slot") }?;
        *o = c.alloc_slot()?.index();
        Ok(())
    })
}

/// Allocates a free slot for a request expected to need `tokens` tokens (the free slot whose
/// mapped pages best fit) and writes it to `*slot`.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_INVALID_HANDLE`, `KVVM_NULL_POINTER`, `KVVM_SLOTS_EXHAUSTED`.
///
/// # Safety
/// `slot` is null or points to a writable `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_alloc_slot_for(
    cache: kvvm_cache,
    tokens: u64,
    slot: *mut u32,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(slot, "slot") }?;
        *o = c.alloc_slot_for(to_usize(tokens, "tokens")?)?.index();
        Ok(())
    })
}

/// Frees an allocated slot. Its pages stay mapped for a later request until reclaimed.
///
/// Thread-safe; serialized with other calls changing the same slot.
///
/// # Errors
/// `KVVM_INVALID_HANDLE`; `KVVM_INVALID_ARGUMENT` for a slot out of range or not allocated.
#[no_mangle]
pub extern "C" fn kvvm_cache_free_slot(cache: kvvm_cache, slot: u32) -> kvvm_status {
    guard(|| Ok(cache_of(cache)?.free_slot(SlotId::new(slot))?))
}

/// Makes `slot` hold `tokens` tokens, mapping missing pages; all or nothing: on failure the slot
/// is as it was.
///
/// Thread-safe; serialized with other calls changing the same slot.
///
/// # Errors
/// `KVVM_INVALID_HANDLE`; `KVVM_INVALID_ARGUMENT` (bad slot, `tokens > max_tokens`);
/// `KVVM_BUDGET_EXHAUSTED`, `KVVM_MAP_COUNT_EXHAUSTED`, backend errors.
#[no_mangle]
pub extern "C" fn kvvm_cache_ensure(cache: kvvm_cache, slot: u32, tokens: u64) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        Ok(c.ensure(SlotId::new(slot), to_usize(tokens, "tokens")?)?)
    })
}

/// `kvvm_cache_ensure` for a batch of `n` (slot, tokens) pairs, then hints the background mapper.
/// All or nothing over the whole batch.
///
/// Thread-safe.
///
/// # Errors
/// As `kvvm_cache_ensure`; `KVVM_NULL_POINTER` if `batch` is null and `n > 0`.
///
/// # Safety
/// `batch` is null or valid for reads of `n` entries.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_step(
    cache: kvvm_cache,
    batch: *const kvvm_slot_tokens,
    n: usize,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        let entries: &[kvvm_slot_tokens] = if n == 0 {
            &[]
        } else if batch.is_null() {
            return Err(FfiError::null("batch"));
        } else {
            // SAFETY: non-null and valid for `n` entries per the contract.
            unsafe { std::slice::from_raw_parts(batch, n) }
        };
        let v = entries
            .iter()
            .map(|e| Ok((SlotId::new(e.slot), to_usize(e.tokens, "tokens")?)))
            .collect::<FfiResult<Vec<_>>>()?;
        Ok(c.step(&v)?)
    })
}

/// Cuts `slot` to `min(tokens, current)` live tokens and unmaps its pages beyond `tokens`.
///
/// Thread-safe; serialized with other calls changing the same slot.
///
/// # Errors
/// `KVVM_INVALID_HANDLE`; `KVVM_INVALID_ARGUMENT` for a bad slot; a backend error if unmapping
/// fails (the slot then holds `min(tokens, current)` tokens, nothing leaks).
#[no_mangle]
pub extern "C" fn kvvm_cache_shrink(cache: kvvm_cache, slot: u32, tokens: u64) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        Ok(c.shrink(SlotId::new(slot), to_usize(tokens, "tokens")?)?)
    })
}

/// Writes the live tokens of an allocated slot to `*tokens`.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_INVALID_HANDLE`, `KVVM_NULL_POINTER`, `KVVM_INVALID_ARGUMENT`.
///
/// # Safety
/// `tokens` is null or points to a writable `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_tokens(
    cache: kvvm_cache,
    slot: u32,
    tokens: *mut u64,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(tokens, "tokens") }?;
        *o = c.tokens(SlotId::new(slot))? as u64;
        Ok(())
    })
}

/// Writes the tokens the slot's mapped pages can hold now to `*capacity`.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_INVALID_HANDLE`, `KVVM_NULL_POINTER`, `KVVM_INVALID_ARGUMENT`.
///
/// # Safety
/// `capacity` is null or points to a writable `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_capacity(
    cache: kvvm_cache,
    slot: u32,
    capacity: *mut u64,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(capacity, "capacity") }?;
        *o = c.capacity(SlotId::new(slot))? as u64;
        Ok(())
    })
}

/// Writes the 4-D view `[max_slots, max_tokens, kv_heads, head_dim]` of layer `layer`'s K or V
/// (`kv`: `kvvm_kv`) to `*view`. Only the tokens a slot has mapped may be accessed.
///
/// Thread-safe. The view does not keep the cache alive.
///
/// # Errors
/// `KVVM_INVALID_HANDLE`, `KVVM_NULL_POINTER`, `KVVM_INVALID_ARGUMENT`.
///
/// # Safety
/// `view` is null or points to a writable `kvvm_view`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_layer_view(
    cache: kvvm_cache,
    layer: u32,
    kv: u32,
    view: *mut kvvm_view,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(view, "view") }?;
        let v = c.layer_view(layer as usize, kv_from(kv)?)?;
        let mut shape = [0i64; 6];
        let mut strides = [0i64; 6];
        for i in 0..4 {
            shape[i] = v.shape[i] as i64;
            strides[i] = v.strides[i] as i64;
        }
        let (device_type, device_id) = device_code(v.device.kind, v.device.ordinal);
        *o = kvvm_view {
            data: v.addr as usize as *mut c_void,
            ndim: 4,
            dtype: dtype_code(v.dtype),
            shape,
            strides,
            device_type,
            device_id,
            itemsize: v.dtype.size() as u32,
            reserved: 0,
        };
        Ok(())
    })
}

/// DLPack device type and id of a backend.
pub(crate) fn device_code(kind: BackendKind, ordinal: i32) -> (i32, i32) {
    match kind {
        BackendKind::Host => (kvvm_device_type::KVVM_DEVICE_CPU as i32, 0),
        BackendKind::Cuda => (kvvm_device_type::KVVM_DEVICE_CUDA as i32, ordinal),
    }
}

/// Writes the byte ranges holding the first `tokens` tokens of `slot` (one per buffer: 1 for the
/// interleaved layout, `2 × layers` per-layer) to `ranges[0..]`, and their count to `*count`.
/// If `capacity` is too small (or `ranges` is null), only `*count` is written and
/// `KVVM_BUFFER_TOO_SMALL` is returned.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_INVALID_HANDLE`, `KVVM_NULL_POINTER` (`count`), `KVVM_INVALID_ARGUMENT`,
/// `KVVM_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `ranges` is null or valid for writes of `capacity` entries; `count` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_slot_ranges(
    cache: kvvm_cache,
    slot: u32,
    tokens: u64,
    ranges: *mut kvvm_range,
    capacity: usize,
    count: *mut usize,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let n = unsafe { out(count, "count") }?;
        let r = c.slot_ranges(SlotId::new(slot), to_usize(tokens, "tokens")?)?;
        *n = r.len();
        if ranges.is_null() || capacity < r.len() {
            return Err(FfiError::new(
                kvvm_status::KVVM_BUFFER_TOO_SMALL,
                format!("{} ranges needed, room for {capacity}", r.len()),
            ));
        }
        // SAFETY: `ranges` is valid for `capacity >= r.len()` entries per the contract.
        let dst = unsafe { std::slice::from_raw_parts_mut(ranges, r.len()) };
        for (d, s) in dst.iter_mut().zip(&r) {
            *d = kvvm_range {
                addr: s.addr,
                len: s.len as u64,
            };
        }
        Ok(())
    })
}

/// Writes the address and length of the `[kv_heads, head_dim]` row of `token` in layer `layer`'s
/// K or V of `slot` to `*row`, checking that the slot is allocated and `token` is one of its live
/// tokens (below `kvvm_cache_tokens`; pages beyond them may be reclaimed at any time).
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_INVALID_HANDLE`, `KVVM_NULL_POINTER`, `KVVM_INVALID_ARGUMENT` (anything out of range,
/// a free slot, a token that is not live).
///
/// # Safety
/// `row` is null or points to a writable `kvvm_range`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_row(
    cache: kvvm_cache,
    slot: u32,
    token: u64,
    layer: u32,
    kv: u32,
    row: *mut kvvm_range,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(row, "row") }?;
        let r = c.row(
            SlotId::new(slot),
            to_usize(token, "token")?,
            layer as usize,
            kv_from(kv)?,
        )?;
        *o = kvvm_range {
            addr: r.addr,
            len: r.len as u64,
        };
        Ok(())
    })
}

/// Checks the row exists and the backend is the host one; returns (address, length).
fn host_row(
    c: &KvCache,
    slot: u32,
    token: u64,
    layer: u32,
    kv: u32,
    len: usize,
) -> FfiResult<(u64, usize)> {
    let r = c.row(
        SlotId::new(slot),
        to_usize(token, "token")?,
        layer as usize,
        kv_from(kv)?,
    )?;
    if c.layer_view(0, Kv::K)?.device.kind != BackendKind::Host {
        return Err(FfiError::new(
            kvvm_status::KVVM_UNSUPPORTED,
            "row copies are supported on the host backend only (use the view on a device)",
        ));
    }
    if len != r.len {
        return Err(FfiError::arg(format!(
            "buffer of {len} bytes given, a row is {} bytes",
            r.len
        )));
    }
    Ok((r.addr, r.len))
}

/// Copies the bytes of one `[kv_heads, head_dim]` row (see `kvvm_cache_row`) into `buf`;
/// `len` must equal the row's size. Host backend only. Meant for tests and debugging.
///
/// Thread-safe with respect to the cache; the caller must not write the row, nor change the
/// slot's mapping (shrink, free, swap out), concurrently.
///
/// # Errors
/// `KVVM_INVALID_HANDLE`, `KVVM_NULL_POINTER`, `KVVM_INVALID_ARGUMENT`, `KVVM_UNSUPPORTED` on
/// a device backend.
///
/// # Safety
/// `buf` is null or valid for writes of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_read_row(
    cache: kvvm_cache,
    slot: u32,
    token: u64,
    layer: u32,
    kv: u32,
    buf: *mut u8,
    len: usize,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        if buf.is_null() {
            return Err(FfiError::null("buf"));
        }
        let (addr, n) = host_row(&c, slot, token, layer, kv, len)?;
        // SAFETY: `addr..addr+n` is mapped host memory of the cache (checked by `row`, and the
        // `Arc` keeps the cache alive); `buf` is valid for `n == len` bytes per the contract.
        unsafe { std::ptr::copy(addr as usize as *const u8, buf, n) };
        Ok(())
    })
}

/// Copies `len` bytes from `buf` into one `[kv_heads, head_dim]` row (see `kvvm_cache_row`);
/// `len` must equal the row's size. Host backend only. Meant for tests and debugging.
///
/// Thread-safe with respect to the cache; the caller must not access the row, nor change the
/// slot's mapping (shrink, free, swap out), concurrently.
///
/// # Errors
/// As `kvvm_cache_read_row`.
///
/// # Safety
/// `buf` is null or valid for reads of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_write_row(
    cache: kvvm_cache,
    slot: u32,
    token: u64,
    layer: u32,
    kv: u32,
    buf: *const u8,
    len: usize,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        if buf.is_null() {
            return Err(FfiError::null("buf"));
        }
        let (addr, n) = host_row(&c, slot, token, layer, kv, len)?;
        // SAFETY: as in `kvvm_cache_read_row`, with the roles swapped.
        unsafe { std::ptr::copy(buf, addr as usize as *mut u8, n) };
        Ok(())
    })
}

/// Writes a snapshot of the cache's statistics to `*stats`. The caller sets
/// `stats->struct_size` to `sizeof(kvvm_stats)`; at most that many bytes are written.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_INVALID_HANDLE`, `KVVM_NULL_POINTER`, `KVVM_INVALID_ARGUMENT` for a `struct_size`
/// below `KVVM_STATS_SIZE_V1`.
///
/// # Safety
/// `stats` is null or valid for writes of `stats->struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_stats(
    cache: kvvm_cache,
    stats: *mut kvvm_stats,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        if stats.is_null() {
            return Err(FfiError::null("stats"));
        }
        // SAFETY: `stats` is valid for at least its first field.
        let size = unsafe { std::ptr::read_unaligned(stats.cast::<u32>()) };
        if size < KVVM_STATS_SIZE_V1 {
            return Err(FfiError::arg(format!(
                "stats->struct_size {size} is below {KVVM_STATS_SIZE_V1}"
            )));
        }
        let s = c.stats();
        let known = kvvm_stats {
            struct_size: size,
            allocated_slots: s.allocated_slots as u32,
            mapped_bytes: s.mapped_bytes,
            live_bytes: s.live_bytes,
            page_size: s.pool.page_size as u64,
            budget_pages: s.pool.budget_pages as u64,
            pool_live_pages: s.pool.live as u64,
            pool_free_pages: s.pool.free as u64,
            pool_in_use_pages: s.pool.in_use as u64,
            pages_created: s.pool.created,
            pages_released: s.pool.released,
            backend_calls: s.total_backend_calls(),
            foreground_calls: s.foreground_calls,
            mapper_batches: s.mapper_batches,
            mapper_pages: s.mapper_pages,
            reclaimed_pages: s.reclaimed_pages,
        };
        let n = (size as usize).min(std::mem::size_of::<kvvm_stats>());
        // SAFETY: `stats` is valid for `size >= n` bytes; `known` is a plain-integer struct.
        unsafe {
            std::ptr::copy_nonoverlapping((&raw const known).cast::<u8>(), stats.cast::<u8>(), n)
        };
        Ok(())
    })
}

/// Waits until the background mapper is idle (for tests and benchmarks).
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn kvvm_cache_quiesce(cache: kvvm_cache) -> kvvm_status {
    guard(|| {
        cache_of(cache)?.quiesce();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_constants_match_the_manifest() {
        assert_eq!(
            KVVM_VERSION_MAJOR.to_string(),
            env!("CARGO_PKG_VERSION_MAJOR")
        );
        assert_eq!(
            KVVM_VERSION_MINOR.to_string(),
            env!("CARGO_PKG_VERSION_MINOR")
        );
        assert_eq!(
            KVVM_VERSION_PATCH.to_string(),
            env!("CARGO_PKG_VERSION_PATCH")
        );
        // SAFETY: kvvm_version returns a static NUL-terminated string.
        let v = unsafe { CStr::from_ptr(kvvm_version()) };
        assert_eq!(v.to_str().ok(), Some(env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn panics_become_a_status_with_the_message() {
        let s = guard(|| panic!("boom {}", 42));
        assert_eq!(s, kvvm_status::KVVM_PANIC);
        let mut buf = [0 as c_char; 64];
        // SAFETY: `buf` holds 64 bytes.
        let n = unsafe { kvvm_last_error(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: NUL-terminated by kvvm_last_error.
        let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
        assert_eq!(msg, "internal panic: boom 42");
        assert_eq!(n, msg.len());
    }

    #[test]
    fn errors_map_to_their_status() {
        let grow = Error::Grow {
            slot: kvvm::SlotId::new(1),
            missing_pages: 2,
            source: Box::new(Error::BudgetExhausted {
                needed: 2,
                available: 0,
                budget_bytes: 0,
                page_size: 1,
            }),
        };
        assert_eq!(
            kvvm_status::from_error(&grow),
            kvvm_status::KVVM_BUDGET_EXHAUSTED
        );
        assert_eq!(
            kvvm_status::from_error(&Error::SlotsExhausted { max_slots: 1 }),
            kvvm_status::KVVM_SLOTS_EXHAUSTED
        );
        assert_eq!(
            kvvm_status::from_error(&Error::Unsupported("x".into())),
            kvvm_status::KVVM_UNSUPPORTED
        );
    }

    #[test]
    fn status_values_round_trip() {
        for v in 0..20u32 {
            if let Some(s) = kvvm_status::from_raw(v) {
                assert_eq!(s as u32, v);
            }
        }
        assert!(kvvm_status::from_raw(15).is_none());
    }
}

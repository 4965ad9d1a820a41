//! DLPack export of the cache's views.
//!
//! The structs here have the layout of DLPack's (`dlpack.h`, version 1.1) under kvvm-prefixed
//! names so that `kvvm.h` can be included next to `dlpack.h`: a `kvvm_dl_managed_tensor_versioned *`
//! may be cast to a `DLManagedTensorVersioned *` and a `kvvm_dl_managed_tensor *` to a
//! `DLManagedTensor *`. Every exported tensor owns the cache's address space (`kvvm::AddressSpace`),
//! dropped by the tensor's deleter: destroying the cache handle while tensors are alive stops the
//! cache's threads and closes its files as usual, but its reserved ranges and the pages mapped in
//! them stay mapped until the last tensor is deleted.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use static_assertions::{assert_eq_align, assert_eq_size};

use super::{
    cache_of, device_code, guard, kv_from, kvvm_cache, kvvm_status, out, to_usize, FfiError,
    FfiResult, KVVM_ALL_SLOTS,
};
use kvvm::{AddressSpace, DType, KvCache};

/// DLPack major version of the exported tensors.
pub const KVVM_DLPACK_MAJOR: u32 = 1;
/// DLPack minor version of the exported tensors.
pub const KVVM_DLPACK_MINOR: u32 = 1;

/// `DLDevice`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct kvvm_dl_device {
    /// `DLDeviceType`: 1 = CPU, 2 = CUDA.
    pub device_type: i32,
    /// Device ordinal.
    pub device_id: i32,
}

/// `DLDataType`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct kvvm_dl_data_type {
    /// `DLDataTypeCode`: 2 = float, 4 = bfloat, 10 = float8_e4m3fn, 12 = float8_e5m2.
    pub code: u8,
    /// Bits per element.
    pub bits: u8,
    /// Vector lanes (1).
    pub lanes: u16,
}

/// `DLTensor`.
#[repr(C)]
#[derive(Debug)]
pub struct kvvm_dl_tensor {
    /// Address of the first element.
    pub data: *mut c_void,
    /// Where the memory is.
    pub device: kvvm_dl_device,
    /// Number of dimensions.
    pub ndim: i32,
    /// Element type.
    pub dtype: kvvm_dl_data_type,
    /// `ndim` sizes.
    pub shape: *mut i64,
    /// `ndim` strides, in elements.
    pub strides: *mut i64,
    /// Byte offset added to `data` (always 0 here).
    pub byte_offset: u64,
}

/// `DLPackVersion`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct kvvm_dl_version {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

/// `DLManagedTensorVersioned` (DLPack >= 1.0).
#[repr(C)]
#[derive(Debug)]
pub struct kvvm_dl_managed_tensor_versioned {
    /// The DLPack version of this struct.
    pub version: kvvm_dl_version,
    /// Owned by the producer (kvvm).
    pub manager_ctx: *mut c_void,
    /// Call once when done with the tensor (releases its hold on the cache's address range).
    pub deleter: Option<unsafe extern "C" fn(*mut kvvm_dl_managed_tensor_versioned)>,
    /// `DLPACK_FLAG_BITMASK_*` (0: writable, not a copy).
    pub flags: u64,
    /// The tensor.
    pub dl_tensor: kvvm_dl_tensor,
}

/// `DLManagedTensor` (the unversioned, pre-1.0 struct, for consumers that ask for it).
#[repr(C)]
#[derive(Debug)]
pub struct kvvm_dl_managed_tensor {
    /// The tensor.
    pub dl_tensor: kvvm_dl_tensor,
    /// Owned by the producer (kvvm).
    pub manager_ctx: *mut c_void,
    /// Call once when done with the tensor (releases its hold on the cache's address range).
    pub deleter: Option<unsafe extern "C" fn(*mut kvvm_dl_managed_tensor)>,
}

assert_eq_size!(kvvm_dl_device, [u8; 8]);
assert_eq_align!(kvvm_dl_device, u32);
assert_eq_size!(kvvm_dl_data_type, [u8; 4]);
assert_eq_align!(kvvm_dl_data_type, u16);
assert_eq_size!(kvvm_dl_tensor, [u8; 48]);
assert_eq_align!(kvvm_dl_tensor, u64);
assert_eq_size!(kvvm_dl_version, [u8; 8]);
assert_eq_size!(kvvm_dl_managed_tensor_versioned, [u8; 80]);
assert_eq_align!(kvvm_dl_managed_tensor_versioned, u64);
assert_eq_size!(kvvm_dl_managed_tensor, [u8; 64]);
assert_eq_align!(kvvm_dl_managed_tensor, u64);

/// The DLPack type of a dtype.
pub fn dl_dtype(d: DType) -> kvvm_dl_data_type {
    let (code, bits) = match d {
        DType::F16 => (2, 16),
        DType::Bf16 => (4, 16),
        DType::F32 => (2, 32),
        DType::Fp8E4M3 => (10, 8),
        DType::Fp8E5M2 => (12, 8),
    };
    kvvm_dl_data_type {
        code,
        bits,
        lanes: 1,
    }
}

/// What an exported tensor describes, before it is boxed.
#[derive(Debug)]
struct Described {
    data: u64,
    device: kvvm_dl_device,
    dtype: kvvm_dl_data_type,
    ndim: usize,
    shape: [i64; 4],
    strides: [i64; 4],
}

/// Describes layer `layer`'s K or V: the whole batch (`slot == KVVM_ALL_SLOTS`, 4-D) or the
/// first `tokens` tokens of one slot (3-D `[tokens, kv_heads, head_dim]`, all mapped).
fn describe(c: &KvCache, layer: u32, kv: u32, slot: u32, tokens: u64) -> FfiResult<Described> {
    let v = c.layer_view(layer as usize, kv_from(kv)?)?;
    let (device_type, device_id) = device_code(v.device.kind, v.device.ordinal);
    let device = kvvm_dl_device {
        device_type,
        device_id,
    };
    let dtype = dl_dtype(v.dtype);
    if slot == KVVM_ALL_SLOTS {
        return Ok(Described {
            data: v.addr,
            device,
            dtype,
            ndim: 4,
            shape: v.shape.map(|x| x as i64),
            strides: v.strides.map(|x| x as i64),
        });
    }
    let tokens = to_usize(tokens, "tokens")?;
    // Only live tokens: pages beyond them may be reclaimed by any other call at any time.
    // (`tokens` checks that the slot is in range and allocated.)
    let live = c.tokens(kvvm::SlotId::new(slot))?;
    if tokens > live {
        return Err(FfiError::arg(format!(
            "slot {slot} holds {live} tokens, cannot export {tokens}"
        )));
    }
    Ok(Described {
        data: v.row_addr(slot as usize, 0, 0),
        device,
        dtype,
        ndim: 3,
        shape: [tokens as i64, v.shape[2] as i64, v.shape[3] as i64, 0],
        strides: [
            v.strides[1] as i64,
            v.strides[2] as i64,
            v.strides[3] as i64,
            0,
        ],
    })
}

/// A versioned export: the managed tensor first, so its address is the allocation's.
#[repr(C)]
#[derive(Debug)]
struct VersionedExport {
    managed: kvvm_dl_managed_tensor_versioned,
    shape: [i64; 4],
    strides: [i64; 4],
    space: AddressSpace,
}

/// A legacy export, laid out like [`VersionedExport`].
#[repr(C)]
#[derive(Debug)]
struct LegacyExport {
    managed: kvvm_dl_managed_tensor,
    shape: [i64; 4],
    strides: [i64; 4],
    space: AddressSpace,
}

fn empty_tensor(d: &Described) -> kvvm_dl_tensor {
    kvvm_dl_tensor {
        data: d.data as usize as *mut c_void,
        device: d.device,
        ndim: d.ndim as i32,
        dtype: d.dtype,
        shape: std::ptr::null_mut(),
        strides: std::ptr::null_mut(),
        byte_offset: 0,
    }
}

unsafe extern "C" fn versioned_deleter(p: *mut kvvm_dl_managed_tensor_versioned) {
    if p.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `p` came from `Box::into_raw` of a `VersionedExport` in
        // `kvvm_cache_export_dlpack` (its first field, same address), and DLPack's contract is
        // that the deleter runs once.
        drop(unsafe { Box::from_raw(p.cast::<VersionedExport>()) });
    }));
}

unsafe extern "C" fn legacy_deleter(p: *mut kvvm_dl_managed_tensor) {
    if p.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as in `versioned_deleter`, for a `LegacyExport`.
        drop(unsafe { Box::from_raw(p.cast::<LegacyExport>()) });
    }));
}

/// Exports layer `layer`'s K or V (`kv`: `kvvm_kv`) as a DLPack 1.1 versioned tensor:
/// with `slot == KVVM_ALL_SLOTS`, the whole batch `[max_slots, max_tokens, kv_heads, head_dim]`
/// (`tokens` is ignored; only mapped tokens may be accessed); otherwise the first `tokens` tokens
/// of `slot`, `[tokens, kv_heads, head_dim]`, which must be live tokens (`tokens <=
/// kvvm_cache_tokens`: pages beyond them may be reclaimed by any call at any time). Strides are
/// in elements; the tensor is writable.
///
/// Until its deleter runs (call `(*out)->deleter(*out)` or `kvvm_dlpack_free`, once) the tensor
/// keeps the cache's address range reserved: after `kvvm_cache_free` the cache's threads stop and
/// its files close, but the pages mapped at that moment stay mapped, with their contents, until
/// the last tensor is deleted (on CUDA, the deleter then synchronizes the context before
/// unmapping). While the cache lives the tensor does not keep pages mapped: shrinking, freeing or
/// swapping the slot out makes the memory behind the tokens concerned read as zeros or reused,
/// as for a view.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`, `KVVM_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
/// `out` is null or points to a writable pointer.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_export_dlpack(
    cache: kvvm_cache,
    layer: u32,
    kv: u32,
    slot: u32,
    tokens: u64,
    out_tensor: *mut *mut kvvm_dl_managed_tensor_versioned,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(out_tensor, "out_tensor") }?;
        let d = describe(&c, layer, kv, slot, tokens)?;
        let mut b = Box::new(VersionedExport {
            managed: kvvm_dl_managed_tensor_versioned {
                version: kvvm_dl_version {
                    major: KVVM_DLPACK_MAJOR,
                    minor: KVVM_DLPACK_MINOR,
                },
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(versioned_deleter),
                flags: 0,
                dl_tensor: empty_tensor(&d),
            },
            shape: d.shape,
            strides: d.strides,
            space: c.address_space(),
        });
        b.managed.dl_tensor.shape = b.shape.as_mut_ptr();
        b.managed.dl_tensor.strides = b.strides.as_mut_ptr();
        let p = Box::into_raw(b);
        // SAFETY: `p` is a valid, uniquely owned allocation just made.
        unsafe { (*p).managed.manager_ctx = p.cast() };
        *o = p.cast();
        Ok(())
    })
}

/// As `kvvm_cache_export_dlpack`, as an unversioned `DLManagedTensor` (for consumers that do
/// not support DLPack 1.0).
///
/// Thread-safe.
///
/// # Errors
/// As `kvvm_cache_export_dlpack`.
///
/// # Safety
/// `out` is null or points to a writable pointer.
#[no_mangle]
pub unsafe extern "C" fn kvvm_cache_export_dlpack_legacy(
    cache: kvvm_cache,
    layer: u32,
    kv: u32,
    slot: u32,
    tokens: u64,
    out_tensor: *mut *mut kvvm_dl_managed_tensor,
) -> kvvm_status {
    guard(|| {
        let c = cache_of(cache)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(out_tensor, "out_tensor") }?;
        let d = describe(&c, layer, kv, slot, tokens)?;
        let mut b = Box::new(LegacyExport {
            managed: kvvm_dl_managed_tensor {
                dl_tensor: empty_tensor(&d),
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(legacy_deleter),
            },
            shape: d.shape,
            strides: d.strides,
            space: c.address_space(),
        });
        b.managed.dl_tensor.shape = b.shape.as_mut_ptr();
        b.managed.dl_tensor.strides = b.strides.as_mut_ptr();
        let p = Box::into_raw(b);
        // SAFETY: `p` is a valid, uniquely owned allocation just made.
        unsafe { (*p).managed.manager_ctx = p.cast() };
        *o = p.cast();
        Ok(())
    })
}

/// Calls a versioned tensor's deleter (does nothing for null). Use once per tensor.
///
/// Thread-safe.
///
/// # Safety
/// `tensor` is null or a tensor from `kvvm_cache_export_dlpack` whose deleter has not run.
#[no_mangle]
pub unsafe extern "C" fn kvvm_dlpack_free(tensor: *mut kvvm_dl_managed_tensor_versioned) {
    // SAFETY: per this function's contract the pointer is null or a live export.
    if let Some(t) = unsafe { tensor.as_ref() } {
        if let Some(d) = t.deleter {
            // SAFETY: the deleter of a live export, called once.
            unsafe { d(tensor) };
        }
    }
}

/// Calls an unversioned tensor's deleter (does nothing for null). Use once per tensor.
///
/// Thread-safe.
///
/// # Safety
/// `tensor` is null or a tensor from `kvvm_cache_export_dlpack_legacy` whose deleter has not run.
#[no_mangle]
pub unsafe extern "C" fn kvvm_dlpack_free_legacy(tensor: *mut kvvm_dl_managed_tensor) {
    // SAFETY: per this function's contract the pointer is null or a live export.
    if let Some(t) = unsafe { tensor.as_ref() } {
        if let Some(d) = t.deleter {
            // SAFETY: the deleter of a live export, called once.
            unsafe { d(tensor) };
        }
    }
}

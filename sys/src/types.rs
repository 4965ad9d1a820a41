//! The CUDA driver API types and constants kvvm uses, transcribed from `cuda.h` (CUDA 12.6).
//!
//! Names follow `cuda.h` exactly (including its non-Rust casing) so that code can be checked
//! against the header by eye. C enums are `int`-sized on every platform CUDA supports, so enum
//! typedefs are `c_int` here, except [`CUresult`], whose values are all non-negative and which is
//! declared `c_uint` (the same size and ABI class).
//!
//! Every FFI struct has its size and alignment pinned at compile time with `static_assertions`
//! against the values the C compiler gives on LP64 Linux.

#![allow(non_camel_case_types, non_snake_case)]

use std::ffi::{c_int, c_uint, c_void};

use static_assertions::{assert_eq_size, const_assert_eq};

/// Result code of every driver call (`CUresult`, the `cudaError_enum` of `cuda.h`).
pub type CUresult = c_uint;
/// A device ordinal resolved by `cuDeviceGet` (`CUdevice`, an `int`).
pub type CUdevice = c_int;
/// A device address (`CUdeviceptr`, `unsigned long long` on 64-bit platforms).
pub type CUdeviceptr = u64;
/// A physical allocation made by `cuMemCreate` (`CUmemGenericAllocationHandle`).
pub type CUmemGenericAllocationHandle = u64;
/// `CUdevice_attribute`, an argument of `cuDeviceGetAttribute`.
pub type CUdevice_attribute = c_int;
/// `CUmemAllocationType`.
pub type CUmemAllocationType = c_int;
/// `CUmemAllocationHandleType`.
pub type CUmemAllocationHandleType = c_int;
/// `CUmemLocationType`.
pub type CUmemLocationType = c_int;
/// `CUmemAccess_flags`.
pub type CUmemAccess_flags = c_int;
/// `CUmemAllocationGranularity_flags`, an argument of `cuMemGetAllocationGranularity`.
pub type CUmemAllocationGranularity_flags = c_int;

macro_rules! opaque {
    ($(#[$doc:meta])* $st:ident => $handle:ident) => {
        /// Opaque driver object; only ever used behind a pointer.
        #[repr(C)]
        #[derive(Debug)]
        pub struct $st {
            _private: [u8; 0],
        }
        $(#[$doc])*
        pub type $handle = *mut $st;
    };
}

opaque!(
    /// A CUDA context (`CUcontext`).
    CUctx_st => CUcontext
);
opaque!(
    /// A CUDA stream (`CUstream`); null is the legacy default stream.
    CUstream_st => CUstream
);
opaque!(
    /// A CUDA event (`CUevent`).
    CUevent_st => CUevent
);
opaque!(
    /// A loaded module (`CUmodule`).
    CUmod_st => CUmodule
);
opaque!(
    /// A kernel function of a module (`CUfunction`).
    CUfunc_st => CUfunction
);

/// `CUmemLocation`: where an allocation lives or who is granted access.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CUmemLocation {
    /// `type`: a `CU_MEM_LOCATION_TYPE_*` value.
    pub type_: CUmemLocationType,
    /// `id`: the device ordinal for [`CU_MEM_LOCATION_TYPE_DEVICE`].
    pub id: c_int,
}

/// The `allocFlags` member of [`CUmemAllocationProp`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CUmemAllocationProp_allocFlags {
    /// `compressionType`: a `CU_MEM_ALLOCATION_COMP_*` value (0: not compressible).
    pub compressionType: u8,
    /// `gpuDirectRDMACapable`: non-zero to request GPUDirect RDMA capability.
    pub gpuDirectRDMACapable: u8,
    /// `usage`: bitmask of intended usage (`CU_MEM_CREATE_USAGE_*`).
    pub usage: u16,
    /// `reserved`: must be zero.
    pub reserved: [u8; 4],
}

/// `CUmemAllocationProp`: properties of a `cuMemCreate` allocation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CUmemAllocationProp {
    /// `type`: a `CU_MEM_ALLOCATION_TYPE_*` value.
    pub type_: CUmemAllocationType,
    /// `requestedHandleTypes`: bitmask of exportable handle types (0: none).
    pub requestedHandleTypes: CUmemAllocationHandleType,
    /// `location`: where the memory lives.
    pub location: CUmemLocation,
    /// `win32HandleMetaData`: Windows only, must be null elsewhere.
    pub win32HandleMetaData: *mut c_void,
    /// `allocFlags`.
    pub allocFlags: CUmemAllocationProp_allocFlags,
}

impl Default for CUmemAllocationProp {
    fn default() -> Self {
        CUmemAllocationProp {
            type_: 0,
            requestedHandleTypes: 0,
            location: CUmemLocation::default(),
            win32HandleMetaData: std::ptr::null_mut(),
            allocFlags: CUmemAllocationProp_allocFlags::default(),
        }
    }
}

impl CUmemAllocationProp {
    /// Pinned (non-migratable) device memory on device `ordinal`, not exportable: what kvvm's
    /// pages use.
    pub fn pinned_device(ordinal: c_int) -> Self {
        CUmemAllocationProp {
            type_: CU_MEM_ALLOCATION_TYPE_PINNED,
            requestedHandleTypes: CU_MEM_HANDLE_TYPE_NONE,
            location: CUmemLocation {
                type_: CU_MEM_LOCATION_TYPE_DEVICE,
                id: ordinal,
            },
            ..CUmemAllocationProp::default()
        }
    }
}

/// `CUmemAccessDesc`: an access grant for `cuMemSetAccess`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CUmemAccessDesc {
    /// `location`: who is granted access.
    pub location: CUmemLocation,
    /// `flags`: a `CU_MEM_ACCESS_FLAGS_PROT_*` value.
    pub flags: CUmemAccess_flags,
}

impl CUmemAccessDesc {
    /// Read/write access for device `ordinal`.
    pub fn read_write_device(ordinal: c_int) -> Self {
        CUmemAccessDesc {
            location: CUmemLocation {
                type_: CU_MEM_LOCATION_TYPE_DEVICE,
                id: ordinal,
            },
            flags: CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        }
    }

    /// Read-only access for device `ordinal` (a write faults).
    pub fn read_only_device(ordinal: c_int) -> Self {
        CUmemAccessDesc {
            flags: CU_MEM_ACCESS_FLAGS_PROT_READ,
            ..Self::read_write_device(ordinal)
        }
    }
}

// Layouts on LP64 (the only data model kvvm supports), as `cuda.h` gives them.
#[cfg(target_pointer_width = "64")]
mod layout {
    use super::*;
    assert_eq_size!(CUmemLocation, [u8; 8]);
    const_assert_eq!(std::mem::align_of::<CUmemLocation>(), 4);
    assert_eq_size!(CUmemAllocationProp_allocFlags, [u8; 8]);
    const_assert_eq!(std::mem::align_of::<CUmemAllocationProp_allocFlags>(), 2);
    assert_eq_size!(CUmemAllocationProp, [u8; 32]);
    const_assert_eq!(std::mem::align_of::<CUmemAllocationProp>(), 8);
    const_assert_eq!(std::mem::offset_of!(CUmemAllocationProp, location), 8);
    const_assert_eq!(
        std::mem::offset_of!(CUmemAllocationProp, win32HandleMetaData),
        16
    );
    const_assert_eq!(std::mem::offset_of!(CUmemAllocationProp, allocFlags), 24);
    assert_eq_size!(CUmemAccessDesc, [u8; 12]);
    const_assert_eq!(std::mem::align_of::<CUmemAccessDesc>(), 4);
    const_assert_eq!(std::mem::offset_of!(CUmemAccessDesc, flags), 8);
    assert_eq_size!(CUresult, i32);
    assert_eq_size!(CUdeviceptr, u64);
    assert_eq_size!(CUcontext, usize);
}

#[cfg(not(target_pointer_width = "64"))]
compile_error!("kvvm-sys supports 64-bit targets only (CUdeviceptr is 64 bits wide there)");

// ---- CUresult values (cudaError_enum) ----

/// The call succeeded (also: the queried work is complete).
pub const CUDA_SUCCESS: CUresult = 0;
/// An argument is out of range.
pub const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
/// The driver could not allocate enough memory or other resources.
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
/// `cuInit` has not been called or failed.
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
/// The driver is shutting down.
pub const CUDA_ERROR_DEINITIALIZED: CUresult = 4;
/// The loaded `libcuda` is the toolkit's link stub, not a real driver.
pub const CUDA_ERROR_STUB_LIBRARY: CUresult = 34;
/// No CUDA-capable device was found.
pub const CUDA_ERROR_NO_DEVICE: CUresult = 100;
/// The device ordinal is invalid.
pub const CUDA_ERROR_INVALID_DEVICE: CUresult = 101;
/// No context is current, or the context handle is invalid.
pub const CUDA_ERROR_INVALID_CONTEXT: CUresult = 201;
/// A PTX JIT compilation failed.
pub const CUDA_ERROR_INVALID_PTX: CUresult = 218;
/// A handle (stream, event, ...) is invalid.
pub const CUDA_ERROR_INVALID_HANDLE: CUresult = 400;
/// A named symbol (e.g. a kernel) was not found.
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;
/// Queried asynchronous work has not completed yet (not an error for `cuEventQuery` and
/// `cuStreamQuery`).
pub const CUDA_ERROR_NOT_READY: CUresult = 600;
/// A kernel accessed an invalid address; the context is unusable afterwards.
pub const CUDA_ERROR_ILLEGAL_ADDRESS: CUresult = 700;
/// The operation is not permitted.
pub const CUDA_ERROR_NOT_PERMITTED: CUresult = 800;
/// The operation is not supported on this system or device.
pub const CUDA_ERROR_NOT_SUPPORTED: CUresult = 801;
/// An unknown internal error.
pub const CUDA_ERROR_UNKNOWN: CUresult = 999;

// ---- CUdevice_attribute ----

/// Number of multiprocessors on the device.
pub const CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: CUdevice_attribute = 16;
/// Major compute capability.
pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: CUdevice_attribute = 75;
/// Minor compute capability.
pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: CUdevice_attribute = 76;
/// Non-zero when the device supports `cuMemAddressReserve`, `cuMemCreate`, `cuMemMap` and
/// related calls.
pub const CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: CUdevice_attribute = 102;

// ---- virtual memory management ----

/// `CU_MEM_ALLOCATION_TYPE_PINNED`: memory that cannot migrate while in use.
pub const CU_MEM_ALLOCATION_TYPE_PINNED: CUmemAllocationType = 1;
/// `CU_MEM_HANDLE_TYPE_NONE`: the allocation cannot be exported.
pub const CU_MEM_HANDLE_TYPE_NONE: CUmemAllocationHandleType = 0;
/// `CU_MEM_LOCATION_TYPE_DEVICE`: the location id is a device ordinal.
pub const CU_MEM_LOCATION_TYPE_DEVICE: CUmemLocationType = 1;
/// `CU_MEM_ACCESS_FLAGS_PROT_NONE`: no access.
pub const CU_MEM_ACCESS_FLAGS_PROT_NONE: CUmemAccess_flags = 0;
/// `CU_MEM_ACCESS_FLAGS_PROT_READ`: read-only access.
pub const CU_MEM_ACCESS_FLAGS_PROT_READ: CUmemAccess_flags = 1;
/// `CU_MEM_ACCESS_FLAGS_PROT_READWRITE`: read and write access.
pub const CU_MEM_ACCESS_FLAGS_PROT_READWRITE: CUmemAccess_flags = 3;
/// The minimum granularity an allocation and mapping must be a multiple of.
pub const CU_MEM_ALLOC_GRANULARITY_MINIMUM: CUmemAllocationGranularity_flags = 0;
/// The granularity recommended for performance.
pub const CU_MEM_ALLOC_GRANULARITY_RECOMMENDED: CUmemAllocationGranularity_flags = 1;

// ---- streams, events, host memory ----

/// `CU_STREAM_DEFAULT`: a stream that synchronizes with the legacy default stream.
pub const CU_STREAM_DEFAULT: c_uint = 0;
/// `CU_STREAM_NON_BLOCKING`: a stream that does not synchronize with the legacy default stream.
pub const CU_STREAM_NON_BLOCKING: c_uint = 1;
/// `CU_EVENT_DEFAULT`.
pub const CU_EVENT_DEFAULT: c_uint = 0;
/// `CU_EVENT_BLOCKING_SYNC`: `cuEventSynchronize` blocks the thread instead of spinning.
pub const CU_EVENT_BLOCKING_SYNC: c_uint = 1;
/// `CU_EVENT_DISABLE_TIMING`: the event records no timestamp (cheapest kind).
pub const CU_EVENT_DISABLE_TIMING: c_uint = 2;
/// `CU_MEMHOSTALLOC_PORTABLE`: the pinned allocation is usable from every context.
pub const CU_MEMHOSTALLOC_PORTABLE: c_uint = 0x01;
/// `CU_MEMHOSTALLOC_DEVICEMAP`: the pinned allocation is mapped into the device address space.
pub const CU_MEMHOSTALLOC_DEVICEMAP: c_uint = 0x02;
/// `CU_MEMHOSTALLOC_WRITECOMBINED`: write-combined pinned memory.
pub const CU_MEMHOSTALLOC_WRITECOMBINED: c_uint = 0x04;

/// `CUstreamCaptureMode`: how a thread's driver calls interact with stream captures.
pub type CUstreamCaptureMode = std::ffi::c_int;
/// `CU_STREAM_CAPTURE_MODE_GLOBAL`: unsafe calls are refused while any capture is under way.
pub const CU_STREAM_CAPTURE_MODE_GLOBAL: CUstreamCaptureMode = 0;
/// `CU_STREAM_CAPTURE_MODE_THREAD_LOCAL`: only captures begun by this thread restrict it.
pub const CU_STREAM_CAPTURE_MODE_THREAD_LOCAL: CUstreamCaptureMode = 1;
/// `CU_STREAM_CAPTURE_MODE_RELAXED`: this thread's calls are never refused because of captures.
pub const CU_STREAM_CAPTURE_MODE_RELAXED: CUstreamCaptureMode = 2;

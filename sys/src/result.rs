//! Thin wrappers over the driver entry points: Rust types in, `Result<T, DriverError>` out.
//!
//! Each wrapper loads the driver through [`crate::driver`] (once per process), makes one driver
//! call and turns a non-success `CUresult` into a [`DriverError`] naming the entry point.
//!
//! Wrappers that only create objects or query state are safe. Wrappers that take raw handles or
//! addresses are `unsafe`: the driver validates some handles but not all, and a stale address
//! or handle can corrupt memory that someone else owns. Most calls also need a current context
//! on the calling thread ([`ctx_set_current`]); without one they return
//! `CUDA_ERROR_INVALID_CONTEXT`, which is an error value, not undefined behaviour.

use std::ffi::{c_char, c_int, c_uint, c_void, CString};

use crate::driver::driver;
use crate::error::DriverError;
use crate::types::*;

/// `cuInit(0)`: initialises the driver API. Cheap after the first call.
///
/// # Errors
/// Loading errors of [`crate::driver`]; `CUDA_ERROR_NO_DEVICE`, `CUDA_ERROR_STUB_LIBRARY`, ...
pub fn init() -> Result<(), DriverError> {
    let d = driver()?;
    // SAFETY: cuInit takes a flags word (must be 0) and no pointers.
    d.check(unsafe { (d.cuInit)(0) }, "cuInit")
}

/// `cuDriverGetVersion`: the CUDA version the driver supports, e.g. `12060` for 12.6.
///
/// # Errors
/// A loading or driver error.
pub fn driver_version() -> Result<i32, DriverError> {
    let d = driver()?;
    let mut v: c_int = 0;
    d.check(
        // SAFETY: `v` is a valid out-pointer for the duration of the call.
        unsafe { (d.cuDriverGetVersion)(&mut v) },
        "cuDriverGetVersion",
    )?;
    Ok(v)
}

/// `cuDeviceGetCount`: the number of visible devices.
///
/// # Errors
/// A loading or driver error (`CUDA_ERROR_NOT_INITIALIZED` before [`init`]).
pub fn device_count() -> Result<i32, DriverError> {
    let d = driver()?;
    let mut n: c_int = 0;
    // SAFETY: `n` is a valid out-pointer for the duration of the call.
    d.check(unsafe { (d.cuDeviceGetCount)(&mut n) }, "cuDeviceGetCount")?;
    Ok(n)
}

/// `cuDeviceGet`: the device handle of ordinal `ordinal`.
///
/// # Errors
/// `CUDA_ERROR_INVALID_DEVICE` for an ordinal out of range.
pub fn device_get(ordinal: i32) -> Result<CUdevice, DriverError> {
    let d = driver()?;
    let mut dev: CUdevice = 0;
    // SAFETY: `dev` is a valid out-pointer; any ordinal is accepted (and validated).
    d.check(unsafe { (d.cuDeviceGet)(&mut dev, ordinal) }, "cuDeviceGet")?;
    Ok(dev)
}

/// `cuDeviceGetName`: the device's product name.
///
/// # Errors
/// A driver error for an invalid device.
pub fn device_name(dev: CUdevice) -> Result<String, DriverError> {
    let d = driver()?;
    let mut buf = [0 as c_char; 256];
    let len = buf.len() as c_int;
    d.check(
        // SAFETY: `buf` is writable for `len` bytes; the driver writes at most `len` bytes including
        // the terminating NUL.
        unsafe { (d.cuDeviceGetName)(buf.as_mut_ptr(), len, dev) },
        "cuDeviceGetName",
    )?;
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `cuDeviceGetAttribute`.
///
/// # Errors
/// A driver error for an invalid device or an attribute the driver does not know.
pub fn device_attribute(dev: CUdevice, attribute: CUdevice_attribute) -> Result<i32, DriverError> {
    let d = driver()?;
    let mut v: c_int = 0;
    d.check(
        // SAFETY: `v` is a valid out-pointer; device and attribute are validated by the driver.
        unsafe { (d.cuDeviceGetAttribute)(&mut v, attribute, dev) },
        "cuDeviceGetAttribute",
    )?;
    Ok(v)
}

/// `cuDeviceTotalMem_v2`: the device's memory in bytes.
///
/// # Errors
/// A driver error for an invalid device.
pub fn device_total_mem(dev: CUdevice) -> Result<usize, DriverError> {
    let d = driver()?;
    let mut bytes: usize = 0;
    d.check(
        // SAFETY: `bytes` is a valid out-pointer; the device is validated by the driver.
        unsafe { (d.cuDeviceTotalMem_v2)(&mut bytes, dev) },
        "cuDeviceTotalMem_v2",
    )?;
    Ok(bytes)
}

/// `cuDevicePrimaryCtxRetain`: retains (and if needed creates) the device's primary context.
/// Every successful call must be balanced by one [`primary_ctx_release`].
///
/// # Errors
/// A driver error.
pub fn primary_ctx_retain(dev: CUdevice) -> Result<CUcontext, DriverError> {
    let d = driver()?;
    let mut ctx: CUcontext = std::ptr::null_mut();
    d.check(
        // SAFETY: `ctx` is a valid out-pointer; the device is validated by the driver.
        unsafe { (d.cuDevicePrimaryCtxRetain)(&mut ctx, dev) },
        "cuDevicePrimaryCtxRetain",
    )?;
    Ok(ctx)
}

/// `cuDevicePrimaryCtxRelease_v2`: releases one retain of the device's primary context.
///
/// # Safety
/// Must balance an earlier [`primary_ctx_retain`] by the caller; releasing more often than
/// retaining can destroy a context that other code still uses.
///
/// # Errors
/// A driver error.
pub unsafe fn primary_ctx_release(dev: CUdevice) -> Result<(), DriverError> {
    let d = driver()?;
    d.check(
        // SAFETY: the caller guarantees this balances one of its own retains.
        unsafe { (d.cuDevicePrimaryCtxRelease_v2)(dev) },
        "cuDevicePrimaryCtxRelease_v2",
    )
}

/// `cuCtxSetCurrent`: binds `ctx` (or nothing, for null) to the calling thread.
///
/// # Safety
/// `ctx` must be null or a live context.
///
/// # Errors
/// A driver error.
pub unsafe fn ctx_set_current(ctx: CUcontext) -> Result<(), DriverError> {
    let d = driver()?;
    // SAFETY: the caller guarantees `ctx` is null or live.
    d.check(unsafe { (d.cuCtxSetCurrent)(ctx) }, "cuCtxSetCurrent")
}

/// `cuCtxGetCurrent`: the context bound to the calling thread (null if none).
///
/// # Errors
/// A driver error.
pub fn ctx_get_current() -> Result<CUcontext, DriverError> {
    let d = driver()?;
    let mut ctx: CUcontext = std::ptr::null_mut();
    // SAFETY: `ctx` is a valid out-pointer.
    d.check(unsafe { (d.cuCtxGetCurrent)(&mut ctx) }, "cuCtxGetCurrent")?;
    Ok(ctx)
}

/// `cuCtxSynchronize`: waits for all work in the current context.
///
/// # Errors
/// A driver error, including asynchronous errors of earlier work.
pub fn ctx_synchronize() -> Result<(), DriverError> {
    let d = driver()?;
    // SAFETY: no arguments; acts on the current context.
    d.check(unsafe { (d.cuCtxSynchronize)() }, "cuCtxSynchronize")
}

/// `cuMemGetAllocationGranularity`.
///
/// # Errors
/// A driver error (e.g. for a device without virtual memory management).
pub fn mem_get_allocation_granularity(
    prop: &CUmemAllocationProp,
    option: CUmemAllocationGranularity_flags,
) -> Result<usize, DriverError> {
    let d = driver()?;
    let mut g: usize = 0;
    d.check(
        // SAFETY: `g` is a valid out-pointer and `prop` a valid, initialised struct with the cuda.h
        // layout (pinned by static assertions).
        unsafe { (d.cuMemGetAllocationGranularity)(&mut g, prop, option) },
        "cuMemGetAllocationGranularity",
    )?;
    Ok(g)
}

/// `cuMemAddressReserve`: reserves `size` bytes of device virtual address space, aligned to
/// `alignment` (0: the granularity), preferably at `addr` (0: anywhere).
///
/// # Errors
/// A driver error, e.g. `CUDA_ERROR_OUT_OF_MEMORY` when the address space is exhausted.
pub fn mem_address_reserve(
    size: usize,
    alignment: usize,
    addr: CUdeviceptr,
    flags: u64,
) -> Result<CUdeviceptr, DriverError> {
    let d = driver()?;
    let mut ptr: CUdeviceptr = 0;
    d.check(
        // SAFETY: `ptr` is a valid out-pointer; reserving address space touches no existing memory.
        unsafe { (d.cuMemAddressReserve)(&mut ptr, size, alignment, addr, flags) },
        "cuMemAddressReserve",
    )?;
    Ok(ptr)
}

/// `cuMemAddressFree`: gives back a reservation.
///
/// # Safety
/// `[ptr, ptr+size)` must be a whole reservation from [`mem_address_reserve`] owned by the
/// caller, with nothing mapped in it and no one using addresses in it.
///
/// # Errors
/// A driver error.
pub unsafe fn mem_address_free(ptr: CUdeviceptr, size: usize) -> Result<(), DriverError> {
    let d = driver()?;
    d.check(
        // SAFETY: the caller owns the reservation and no one uses it.
        unsafe { (d.cuMemAddressFree)(ptr, size) },
        "cuMemAddressFree",
    )
}

/// `cuMemCreate`: creates a physical allocation of `size` bytes (a multiple of the
/// granularity).
///
/// # Errors
/// A driver error, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
pub fn mem_create(
    size: usize,
    prop: &CUmemAllocationProp,
    flags: u64,
) -> Result<CUmemGenericAllocationHandle, DriverError> {
    let d = driver()?;
    let mut h: CUmemGenericAllocationHandle = 0;
    d.check(
        // SAFETY: `h` is a valid out-pointer and `prop` a valid struct with the cuda.h layout.
        unsafe { (d.cuMemCreate)(&mut h, size, prop, flags) },
        "cuMemCreate",
    )?;
    Ok(h)
}

/// `cuMemRelease`: releases a physical allocation; its memory is freed once it is unmapped
/// everywhere.
///
/// # Safety
/// `handle` must come from [`mem_create`], be owned by the caller and not be released twice
/// (handle values may be reused by later allocations).
///
/// # Errors
/// A driver error.
pub unsafe fn mem_release(handle: CUmemGenericAllocationHandle) -> Result<(), DriverError> {
    let d = driver()?;
    // SAFETY: the caller owns `handle` and releases it once.
    d.check(unsafe { (d.cuMemRelease)(handle) }, "cuMemRelease")
}

/// `cuMemMap`: maps `size` bytes of `handle`, from `offset`, at `ptr`. The range has no access
/// until [`mem_set_access`].
///
/// # Safety
/// `[ptr, ptr+size)` must lie in a reservation owned by the caller and be unmapped; `handle`
/// must be a live allocation of at least `offset + size` bytes.
///
/// # Errors
/// A driver error.
pub unsafe fn mem_map(
    ptr: CUdeviceptr,
    size: usize,
    offset: usize,
    handle: CUmemGenericAllocationHandle,
    flags: u64,
) -> Result<(), DriverError> {
    let d = driver()?;
    d.check(
        // SAFETY: the caller owns the reserved, unmapped range and the allocation.
        unsafe { (d.cuMemMap)(ptr, size, offset, handle, flags) },
        "cuMemMap",
    )
}

/// `cuMemUnmap`: unmaps `[ptr, ptr+size)`, which must consist of whole mappings.
///
/// # Safety
/// The range must be mapped by the caller, and no device work or host code may still access it.
///
/// # Errors
/// A driver error.
pub unsafe fn mem_unmap(ptr: CUdeviceptr, size: usize) -> Result<(), DriverError> {
    let d = driver()?;
    // SAFETY: the caller owns the mappings and nothing uses them any more.
    d.check(unsafe { (d.cuMemUnmap)(ptr, size) }, "cuMemUnmap")
}

/// `cuMemSetAccess`: sets the access of every location in `desc` over `[ptr, ptr+size)`.
///
/// # Safety
/// The range must be mapped by the caller; removing access from memory in use is the caller's
/// responsibility.
///
/// # Errors
/// A driver error.
pub unsafe fn mem_set_access(
    ptr: CUdeviceptr,
    size: usize,
    desc: &[CUmemAccessDesc],
) -> Result<(), DriverError> {
    let d = driver()?;
    d.check(
        // SAFETY: `desc` is valid for `desc.len()` elements with the cuda.h layout; the caller owns
        // the mapped range.
        unsafe { (d.cuMemSetAccess)(ptr, size, desc.as_ptr(), desc.len()) },
        "cuMemSetAccess",
    )
}

/// `cuMemHostAlloc`: allocates `size` bytes of page-locked host memory (`flags`:
/// `CU_MEMHOSTALLOC_*`). Needs a current context.
///
/// # Errors
/// A driver error, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
pub fn mem_host_alloc(size: usize, flags: c_uint) -> Result<*mut c_void, DriverError> {
    let d = driver()?;
    let mut p: *mut c_void = std::ptr::null_mut();
    d.check(
        // SAFETY: `p` is a valid out-pointer; the allocation is new memory.
        unsafe { (d.cuMemHostAlloc)(&mut p, size, flags) },
        "cuMemHostAlloc",
    )?;
    Ok(p)
}

/// `cuMemFreeHost`.
///
/// # Safety
/// `p` must come from [`mem_host_alloc`], not be freed twice, and no copy may still use it.
///
/// # Errors
/// A driver error.
pub unsafe fn mem_free_host(p: *mut c_void) -> Result<(), DriverError> {
    let d = driver()?;
    // SAFETY: the caller owns `p` and nothing uses it any more.
    d.check(unsafe { (d.cuMemFreeHost)(p) }, "cuMemFreeHost")
}

/// `cuMemGetInfo_v2`: `(free, total)` device memory in bytes for the current context's device.
///
/// # Errors
/// A driver error.
pub fn mem_get_info() -> Result<(usize, usize), DriverError> {
    let d = driver()?;
    let (mut free, mut total) = (0usize, 0usize);
    d.check(
        // SAFETY: both are valid out-pointers.
        unsafe { (d.cuMemGetInfo_v2)(&mut free, &mut total) },
        "cuMemGetInfo_v2",
    )?;
    Ok((free, total))
}

/// `cuMemAlloc_v2`: an ordinary (non-VMM) device allocation.
///
/// # Errors
/// A driver error.
pub fn mem_alloc(size: usize) -> Result<CUdeviceptr, DriverError> {
    let d = driver()?;
    let mut p: CUdeviceptr = 0;
    // SAFETY: `p` is a valid out-pointer.
    d.check(unsafe { (d.cuMemAlloc_v2)(&mut p, size) }, "cuMemAlloc_v2")?;
    Ok(p)
}

/// `cuMemFree_v2`.
///
/// # Safety
/// `ptr` must come from [`mem_alloc`], not be freed twice, and no work may still use it.
///
/// # Errors
/// A driver error.
pub unsafe fn mem_free(ptr: CUdeviceptr) -> Result<(), DriverError> {
    let d = driver()?;
    // SAFETY: the caller owns `ptr` and nothing uses it any more.
    d.check(unsafe { (d.cuMemFree_v2)(ptr) }, "cuMemFree_v2")
}

/// `cuMemcpyHtoD_v2`: synchronous copy of `bytes` bytes from host `src` to device `dst`.
///
/// # Safety
/// `src` must be readable for `bytes` bytes; `[dst, dst+bytes)` must be mapped, writable device
/// memory that no one else uses during the copy.
///
/// # Errors
/// A driver error.
pub unsafe fn memcpy_htod(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
) -> Result<(), DriverError> {
    let d = driver()?;
    d.check(
        // SAFETY: the caller guarantees both ranges.
        unsafe { (d.cuMemcpyHtoD_v2)(dst, src, bytes) },
        "cuMemcpyHtoD_v2",
    )
}

/// `cuMemcpyDtoH_v2`: synchronous copy of `bytes` bytes from device `src` to host `dst`.
///
/// # Safety
/// `dst` must be writable for `bytes` bytes and not otherwise accessed during the copy;
/// `[src, src+bytes)` must be mapped, readable device memory.
///
/// # Errors
/// A driver error.
pub unsafe fn memcpy_dtoh(
    dst: *mut c_void,
    src: CUdeviceptr,
    bytes: usize,
) -> Result<(), DriverError> {
    let d = driver()?;
    d.check(
        // SAFETY: the caller guarantees both ranges.
        unsafe { (d.cuMemcpyDtoH_v2)(dst, src, bytes) },
        "cuMemcpyDtoH_v2",
    )
}

/// `cuMemcpyDtoD_v2`: copy of `bytes` bytes between device ranges.
///
/// # Safety
/// Both ranges must be mapped device memory (source readable, destination writable and not used
/// by anyone else during the copy).
///
/// # Errors
/// A driver error.
pub unsafe fn memcpy_dtod(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    bytes: usize,
) -> Result<(), DriverError> {
    let d = driver()?;
    d.check(
        // SAFETY: the caller guarantees both ranges.
        unsafe { (d.cuMemcpyDtoD_v2)(dst, src, bytes) },
        "cuMemcpyDtoD_v2",
    )
}

/// `cuMemcpyHtoDAsync_v2`: enqueues a host-to-device copy on `stream`.
///
/// # Safety
/// As [`memcpy_htod`], for as long as the copy is in flight (until the stream or an event
/// recorded after it reports completion); `src` should be page-locked for the copy to be
/// asynchronous. `stream` must be a live stream of the current context, or null.
///
/// # Errors
/// A driver error at submission.
pub unsafe fn memcpy_htod_async(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
    stream: CUstream,
) -> Result<(), DriverError> {
    let d = driver()?;
    d.check(
        // SAFETY: the caller guarantees both ranges for the copy's lifetime and a live stream.
        unsafe { (d.cuMemcpyHtoDAsync_v2)(dst, src, bytes, stream) },
        "cuMemcpyHtoDAsync_v2",
    )
}

/// `cuMemcpyDtoHAsync_v2`: enqueues a device-to-host copy on `stream`.
///
/// # Safety
/// As [`memcpy_dtoh`], for as long as the copy is in flight. `stream` must be a live stream of
/// the current context, or null.
///
/// # Errors
/// A driver error at submission.
pub unsafe fn memcpy_dtoh_async(
    dst: *mut c_void,
    src: CUdeviceptr,
    bytes: usize,
    stream: CUstream,
) -> Result<(), DriverError> {
    let d = driver()?;
    d.check(
        // SAFETY: the caller guarantees both ranges for the copy's lifetime and a live stream.
        unsafe { (d.cuMemcpyDtoHAsync_v2)(dst, src, bytes, stream) },
        "cuMemcpyDtoHAsync_v2",
    )
}

/// `cuMemcpyDtoDAsync_v2`: enqueues a device-to-device copy on `stream`.
///
/// # Safety
/// As [`memcpy_dtod`], for as long as the copy is in flight. `stream` must be a live stream of
/// the current context, or null.
///
/// # Errors
/// A driver error at submission.
pub unsafe fn memcpy_dtod_async(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    bytes: usize,
    stream: CUstream,
) -> Result<(), DriverError> {
    let d = driver()?;
    d.check(
        // SAFETY: the caller guarantees both ranges for the copy's lifetime and a live stream.
        unsafe { (d.cuMemcpyDtoDAsync_v2)(dst, src, bytes, stream) },
        "cuMemcpyDtoDAsync_v2",
    )
}

/// `cuStreamCreate` in the current context (`flags`: `CU_STREAM_*`).
///
/// # Errors
/// A driver error.
pub fn stream_create(flags: c_uint) -> Result<CUstream, DriverError> {
    let d = driver()?;
    let mut s: CUstream = std::ptr::null_mut();
    d.check(
        // SAFETY: `s` is a valid out-pointer.
        unsafe { (d.cuStreamCreate)(&mut s, flags) },
        "cuStreamCreate",
    )?;
    Ok(s)
}

/// `cuStreamDestroy_v2`. Work still queued on the stream completes first.
///
/// # Safety
/// `stream` must be a live stream owned by the caller and not used afterwards.
///
/// # Errors
/// A driver error.
pub unsafe fn stream_destroy(stream: CUstream) -> Result<(), DriverError> {
    let d = driver()?;
    d.check(
        // SAFETY: the caller owns the live stream.
        unsafe { (d.cuStreamDestroy_v2)(stream) },
        "cuStreamDestroy_v2",
    )
}

/// `cuStreamSynchronize`.
///
/// # Safety
/// `stream` must be a live stream, or null.
///
/// # Errors
/// A driver error, including asynchronous errors of the stream's work.
pub unsafe fn stream_synchronize(stream: CUstream) -> Result<(), DriverError> {
    let d = driver()?;
    d.check(
        // SAFETY: the caller guarantees a live stream.
        unsafe { (d.cuStreamSynchronize)(stream) },
        "cuStreamSynchronize",
    )
}

/// `cuStreamQuery`: `Ok(true)` when all work on the stream is complete, `Ok(false)` while some
/// is pending.
///
/// # Safety
/// `stream` must be a live stream, or null.
///
/// # Errors
/// A driver error other than `CUDA_ERROR_NOT_READY`.
pub unsafe fn stream_query(stream: CUstream) -> Result<bool, DriverError> {
    let d = driver()?;
    // SAFETY: the caller guarantees a live stream.
    match unsafe { (d.cuStreamQuery)(stream) } {
        CUDA_SUCCESS => Ok(true),
        CUDA_ERROR_NOT_READY => Ok(false),
        rc => Err(d.call_error(rc, "cuStreamQuery")),
    }
}

/// `cuStreamWaitEvent`: work submitted to `stream` later waits for `event`.
///
/// # Safety
/// `stream` (or null) and `event` must be live.
///
/// # Errors
/// A driver error.
pub unsafe fn stream_wait_event(
    stream: CUstream,
    event: CUevent,
    flags: c_uint,
) -> Result<(), DriverError> {
    let d = driver()?;
    d.check(
        // SAFETY: the caller guarantees both handles are live.
        unsafe { (d.cuStreamWaitEvent)(stream, event, flags) },
        "cuStreamWaitEvent",
    )
}

/// `cuEventCreate` in the current context (`flags`: `CU_EVENT_*`).
///
/// # Errors
/// A driver error.
pub fn event_create(flags: c_uint) -> Result<CUevent, DriverError> {
    let d = driver()?;
    let mut e: CUevent = std::ptr::null_mut();
    // SAFETY: `e` is a valid out-pointer.
    d.check(unsafe { (d.cuEventCreate)(&mut e, flags) }, "cuEventCreate")?;
    Ok(e)
}

/// `cuEventDestroy_v2`. Safe to call while the event's recorded work is still pending.
///
/// # Safety
/// `event` must be a live event owned by the caller and not used afterwards.
///
/// # Errors
/// A driver error.
pub unsafe fn event_destroy(event: CUevent) -> Result<(), DriverError> {
    let d = driver()?;
    d.check(
        // SAFETY: the caller owns the live event.
        unsafe { (d.cuEventDestroy_v2)(event) },
        "cuEventDestroy_v2",
    )
}

/// `cuEventRecord`: the event completes when all work submitted to `stream` so far completes.
///
/// # Safety
/// `event` must be live; `stream` live or null, in the event's context.
///
/// # Errors
/// A driver error.
pub unsafe fn event_record(event: CUevent, stream: CUstream) -> Result<(), DriverError> {
    let d = driver()?;
    // SAFETY: the caller guarantees both handles are live.
    d.check(unsafe { (d.cuEventRecord)(event, stream) }, "cuEventRecord")
}

/// `cuEventQuery`: `Ok(true)` once the recorded work is complete, `Ok(false)` while pending.
///
/// # Safety
/// `event` must be live.
///
/// # Errors
/// A driver error other than `CUDA_ERROR_NOT_READY` (e.g. an asynchronous error of the work).
pub unsafe fn event_query(event: CUevent) -> Result<bool, DriverError> {
    let d = driver()?;
    // SAFETY: the caller guarantees a live event.
    match unsafe { (d.cuEventQuery)(event) } {
        CUDA_SUCCESS => Ok(true),
        CUDA_ERROR_NOT_READY => Ok(false),
        rc => Err(d.call_error(rc, "cuEventQuery")),
    }
}

/// `cuEventSynchronize`: blocks until the recorded work is complete.
///
/// # Safety
/// `event` must be live.
///
/// # Errors
/// A driver error, including asynchronous errors of the recorded work.
pub unsafe fn event_synchronize(event: CUevent) -> Result<(), DriverError> {
    let d = driver()?;
    d.check(
        // SAFETY: the caller guarantees a live event.
        unsafe { (d.cuEventSynchronize)(event) },
        "cuEventSynchronize",
    )
}

/// `cuEventElapsedTime`: milliseconds between two completed events created with timing.
///
/// # Safety
/// Both events must be live.
///
/// # Errors
/// A driver error (e.g. `CUDA_ERROR_NOT_READY`, or events created with
/// `CU_EVENT_DISABLE_TIMING`).
pub unsafe fn event_elapsed_time(start: CUevent, end: CUevent) -> Result<f32, DriverError> {
    let d = driver()?;
    let mut ms: f32 = 0.0;
    d.check(
        // SAFETY: `ms` is a valid out-pointer; the caller guarantees live events.
        unsafe { (d.cuEventElapsedTime)(&mut ms, start, end) },
        "cuEventElapsedTime",
    )?;
    Ok(ms)
}

/// `cuModuleLoadData` for PTX text (the NUL terminator is added here).
///
/// # Errors
/// [`DriverError::InvalidArgument`] for PTX with an interior NUL; a driver error such as
/// `CUDA_ERROR_INVALID_PTX` or `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`.
pub fn module_load_ptx(ptx: &str) -> Result<CUmodule, DriverError> {
    let image = CString::new(ptx).map_err(|e| DriverError::InvalidArgument {
        function: "cuModuleLoadData",
        message: format!("PTX contains a NUL byte at offset {}", e.nul_position()),
    })?;
    // SAFETY: `image` is NUL-terminated PTX text, alive for the call.
    unsafe { module_load_data(image.as_ptr().cast()) }
}

/// `cuModuleLoadData` for any image the driver accepts (PTX, cubin, fatbin).
///
/// # Safety
/// `image` must point to a complete image: NUL-terminated PTX, or a cubin/fatbin whose headers
/// describe its own size.
///
/// # Errors
/// A driver error.
pub unsafe fn module_load_data(image: *const c_void) -> Result<CUmodule, DriverError> {
    let d = driver()?;
    let mut m: CUmodule = std::ptr::null_mut();
    d.check(
        // SAFETY: `m` is a valid out-pointer; the caller guarantees a complete image.
        unsafe { (d.cuModuleLoadData)(&mut m, image) },
        "cuModuleLoadData",
    )?;
    Ok(m)
}

/// `cuModuleUnload`.
///
/// # Safety
/// `module` must be live, owned by the caller, and no kernel of it may be running or be
/// launched afterwards.
///
/// # Errors
/// A driver error.
pub unsafe fn module_unload(module: CUmodule) -> Result<(), DriverError> {
    let d = driver()?;
    // SAFETY: the caller owns the live module and no longer uses its functions.
    d.check(unsafe { (d.cuModuleUnload)(module) }, "cuModuleUnload")
}

/// `cuModuleGetFunction`: the kernel named `name` (its mangled name unless `extern "C"`).
///
/// # Safety
/// `module` must be live; the function handle is valid only as long as the module.
///
/// # Errors
/// [`DriverError::InvalidArgument`] for a name with a NUL; `CUDA_ERROR_NOT_FOUND`.
pub unsafe fn module_get_function(module: CUmodule, name: &str) -> Result<CUfunction, DriverError> {
    let d = driver()?;
    let cname = CString::new(name).map_err(|_| DriverError::InvalidArgument {
        function: "cuModuleGetFunction",
        message: format!("function name {name:?} contains a NUL byte"),
    })?;
    let mut f: CUfunction = std::ptr::null_mut();
    d.check(
        // SAFETY: `f` is a valid out-pointer, `cname` is NUL-terminated, the caller guarantees a
        // live module.
        unsafe { (d.cuModuleGetFunction)(&mut f, module, cname.as_ptr()) },
        "cuModuleGetFunction",
    )?;
    Ok(f)
}

/// Launch geometry for [`launch_kernel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LaunchConfig {
    /// Grid size in blocks (x, y, z).
    pub grid: (u32, u32, u32),
    /// Block size in threads (x, y, z).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block in bytes.
    pub shared_mem_bytes: u32,
}

/// `cuLaunchKernel`: enqueues `function` on `stream` with `params`, one pointer per kernel
/// parameter, each pointing to the argument's value.
///
/// # Safety
/// `function` must be live; `stream` live or null; `params` must have exactly one entry per
/// kernel parameter, each pointing to a value of the parameter's type, alive until this call
/// returns; every memory the kernel accesses must stay valid until it completes.
///
/// # Errors
/// A driver error at submission (e.g. `CUDA_ERROR_INVALID_VALUE` for a bad geometry); errors
/// during execution surface at the next synchronisation.
pub unsafe fn launch_kernel(
    function: CUfunction,
    config: LaunchConfig,
    stream: CUstream,
    params: &mut [*mut c_void],
) -> Result<(), DriverError> {
    let d = driver()?;
    let p = if params.is_empty() {
        std::ptr::null_mut()
    } else {
        params.as_mut_ptr()
    };
    d.check(
        // SAFETY: the caller guarantees the function, stream and parameter pointers; `extra` is null.
        unsafe {
            (d.cuLaunchKernel)(
                function,
                config.grid.0,
                config.grid.1,
                config.grid.2,
                config.block.0,
                config.block.1,
                config.block.2,
                config.shared_mem_bytes,
                stream,
                p,
                std::ptr::null_mut(),
            )
        },
        "cuLaunchKernel",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrappers_return_the_loading_error_without_a_driver() {
        if crate::driver().is_ok() {
            eprintln!("skipped: a CUDA driver is present");
            return;
        }
        let e = init().unwrap_err();
        assert!(matches!(e, DriverError::LibraryNotFound { .. }), "{e:?}");
        assert!(device_count().is_err());
        assert!(ctx_get_current().is_err());
        let prop = CUmemAllocationProp::pinned_device(0);
        assert!(mem_get_allocation_granularity(&prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM).is_err());
    }

    #[test]
    fn ptx_with_nul_is_rejected_before_the_driver() {
        // Fails either on the NUL check or on loading; both are error values.
        assert!(module_load_ptx("a\0b").is_err());
    }
}

/// Tests that need a CUDA GPU with virtual memory management: `cargo test -p kvvm-sys --
/// --ignored` on a GPU machine.
#[cfg(test)]
mod gpu_tests {
    use super::*;

    fn setup() -> (CUdevice, CUcontext) {
        init().expect("cuInit");
        let dev = device_get(0).expect("cuDeviceGet");
        let ctx = primary_ctx_retain(dev).expect("retain");
        // SAFETY: `ctx` was just retained and is live.
        unsafe { ctx_set_current(ctx) }.expect("set current");
        (dev, ctx)
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn vmm_alias_round_trip() {
        let (dev, _ctx) = setup();
        assert_eq!(
            device_attribute(dev, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED).unwrap(),
            1
        );
        let prop = CUmemAllocationProp::pinned_device(0);
        let g = mem_get_allocation_granularity(&prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM).unwrap();
        assert!(g >= 4096 && g.is_power_of_two(), "granularity {g}");
        let va = mem_address_reserve(2 * g, g, 0, 0).unwrap();
        let h = mem_create(g, &prop, 0).unwrap();
        let access = [CUmemAccessDesc::read_write_device(0)];
        let src: Vec<u8> = (0..g).map(|i| (i * 7 + 3) as u8).collect();
        let mut dst = vec![0u8; g];
        // SAFETY: the reservation and allocation are ours, each half is mapped once, and the
        // host buffers are valid for `g` bytes.
        unsafe {
            mem_map(va, g, 0, h, 0).unwrap();
            mem_map(va + g as u64, g, 0, h, 0).unwrap();
            mem_set_access(va, 2 * g, &access).unwrap();
            memcpy_htod(va, src.as_ptr().cast(), g).unwrap();
            memcpy_dtoh(dst.as_mut_ptr().cast(), va + g as u64, g).unwrap();
            mem_unmap(va, 2 * g).unwrap();
            mem_release(h).unwrap();
            mem_address_free(va, 2 * g).unwrap();
        }
        assert!(src == dst, "alias read back differs");
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn async_copy_and_event() {
        let _ = setup();
        let n = 1 << 20;
        let host = mem_host_alloc(n, CU_MEMHOSTALLOC_PORTABLE).unwrap();
        let dev = mem_alloc(n).unwrap();
        let stream = stream_create(CU_STREAM_NON_BLOCKING).unwrap();
        let ev = event_create(CU_EVENT_DISABLE_TIMING).unwrap();
        // SAFETY: all handles are live and ours; `host` is valid for `n` bytes and only accessed
        // after the stream is synchronized.
        unsafe {
            std::ptr::write_bytes(host.cast::<u8>(), 0x5a, n);
            memcpy_htod_async(dev, host, n, stream).unwrap();
            event_record(ev, stream).unwrap();
            event_synchronize(ev).unwrap();
            assert!(event_query(ev).unwrap());
            std::ptr::write_bytes(host.cast::<u8>(), 0, n);
            memcpy_dtoh_async(host, dev, n, stream).unwrap();
            stream_synchronize(stream).unwrap();
            assert!(stream_query(stream).unwrap());
            let s = std::slice::from_raw_parts(host.cast::<u8>(), n);
            assert!(s.iter().all(|&b| b == 0x5a));
            event_destroy(ev).unwrap();
            stream_destroy(stream).unwrap();
            mem_free(dev).unwrap();
            mem_free_host(host).unwrap();
        }
        let (free, total) = mem_get_info().unwrap();
        assert!(free <= total && total > 0);
        assert!(driver_version().unwrap() >= 11000);
        assert!(!device_name(0).unwrap().is_empty());
    }
}

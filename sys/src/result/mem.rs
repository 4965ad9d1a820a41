//! Memory: virtual-memory management (reserve, create, map, set access, unmap, release), host and device allocations, copies.

#[allow(unused_imports)]
use super::*;

/// `cuMemGetAllocationGranularity`.
///
/// # Errors
/// A driver error (e.g. for a device without virtual memory management).
pub fn get_allocation_granularity(
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
pub fn address_reserve(
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
/// `[ptr, ptr+size)` must be a whole reservation from [`address_reserve`] owned by the
/// caller, with nothing mapped in it and no one using addresses in it.
///
/// # Errors
/// A driver error.
pub unsafe fn address_free(ptr: CUdeviceptr, size: usize) -> Result<(), DriverError> {
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
pub fn create(
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
/// `handle` must come from [`create`], be owned by the caller and not be released twice
/// (handle values may be reused by later allocations).
///
/// # Errors
/// A driver error.
pub unsafe fn release(handle: CUmemGenericAllocationHandle) -> Result<(), DriverError> {
    let d = driver()?;
    // SAFETY: the caller owns `handle` and releases it once.
    d.check(unsafe { (d.cuMemRelease)(handle) }, "cuMemRelease")
}

/// `cuMemMap`: maps `size` bytes of `handle`, from `offset`, at `ptr`. The range has no access
/// until [`set_access`].
///
/// # Safety
/// `[ptr, ptr+size)` must lie in a reservation owned by the caller and be unmapped; `handle`
/// must be a live allocation of at least `offset + size` bytes.
///
/// # Errors
/// A driver error.
pub unsafe fn map(
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
pub unsafe fn unmap(ptr: CUdeviceptr, size: usize) -> Result<(), DriverError> {
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
pub unsafe fn set_access(
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
pub fn host_alloc(size: usize, flags: c_uint) -> Result<*mut c_void, DriverError> {
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
/// `p` must come from [`host_alloc`], not be freed twice, and no copy may still use it.
///
/// # Errors
/// A driver error.
pub unsafe fn free_host(p: *mut c_void) -> Result<(), DriverError> {
    let d = driver()?;
    // SAFETY: the caller owns `p` and nothing uses it any more.
    d.check(unsafe { (d.cuMemFreeHost)(p) }, "cuMemFreeHost")
}

/// `cuMemGetInfo_v2`: `(free, total)` device memory in bytes for the current context's device.
///
/// # Errors
/// A driver error.
pub fn get_info() -> Result<(usize, usize), DriverError> {
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
pub fn alloc(size: usize) -> Result<CUdeviceptr, DriverError> {
    let d = driver()?;
    let mut p: CUdeviceptr = 0;
    // SAFETY: `p` is a valid out-pointer.
    d.check(unsafe { (d.cuMemAlloc_v2)(&mut p, size) }, "cuMemAlloc_v2")?;
    Ok(p)
}

/// `cuMemFree_v2`.
///
/// # Safety
/// `ptr` must come from [`alloc`], not be freed twice, and no work may still use it.
///
/// # Errors
/// A driver error.
pub unsafe fn free(ptr: CUdeviceptr) -> Result<(), DriverError> {
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

//! Streams: creation, synchronization, queries, waits on events.

#[allow(unused_imports)]
use super::*;

/// `cuStreamCreate` in the current context (`flags`: `CU_STREAM_*`).
///
/// # Errors
/// A driver error.
pub fn create(flags: c_uint) -> Result<CUstream, DriverError> {
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
pub unsafe fn destroy(stream: CUstream) -> Result<(), DriverError> {
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
pub unsafe fn synchronize(stream: CUstream) -> Result<(), DriverError> {
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
pub unsafe fn query(stream: CUstream) -> Result<bool, DriverError> {
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
pub unsafe fn wait_event(
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

//! Events: creation, recording, queries, synchronization, timing.

#[allow(unused_imports)]
use super::*;

/// `cuEventCreate` in the current context (`flags`: `CU_EVENT_*`).
///
/// # Errors
/// A driver error.
pub fn create(flags: c_uint) -> Result<CUevent, DriverError> {
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
pub unsafe fn destroy(event: CUevent) -> Result<(), DriverError> {
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
pub unsafe fn record(event: CUevent, stream: CUstream) -> Result<(), DriverError> {
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
pub unsafe fn query(event: CUevent) -> Result<bool, DriverError> {
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
pub unsafe fn synchronize(event: CUevent) -> Result<(), DriverError> {
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
pub unsafe fn elapsed_time(start: CUevent, end: CUevent) -> Result<f32, DriverError> {
    let d = driver()?;
    let mut ms: f32 = 0.0;
    d.check(
        // SAFETY: `ms` is a valid out-pointer; the caller guarantees live events.
        unsafe { (d.cuEventElapsedTime)(&mut ms, start, end) },
        "cuEventElapsedTime",
    )?;
    Ok(ms)
}

//! Contexts: the primary context of a device, the current context of a thread, synchronization.

#[allow(unused_imports)]
use super::*;

/// `cuDevicePrimaryCtxRetain`: retains (and if needed creates) the device's primary context.
/// Every successful call must be balanced by one [`primary_release`].
///
/// # Errors
/// A driver error.
pub fn primary_retain(dev: CUdevice) -> Result<CUcontext, DriverError> {
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
/// Must balance an earlier [`primary_retain`] by the caller; releasing more often than
/// retaining can destroy a context that other code still uses.
///
/// # Errors
/// A driver error.
pub unsafe fn primary_release(dev: CUdevice) -> Result<(), DriverError> {
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
pub unsafe fn set_current(ctx: CUcontext) -> Result<(), DriverError> {
    let d = driver()?;
    // SAFETY: the caller guarantees `ctx` is null or live.
    d.check(unsafe { (d.cuCtxSetCurrent)(ctx) }, "cuCtxSetCurrent")
}

/// `cuCtxGetCurrent`: the context bound to the calling thread (null if none).
///
/// # Errors
/// A driver error.
pub fn get_current() -> Result<CUcontext, DriverError> {
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
pub fn synchronize() -> Result<(), DriverError> {
    let d = driver()?;
    // SAFETY: no arguments; acts on the current context.
    d.check(unsafe { (d.cuCtxSynchronize)() }, "cuCtxSynchronize")
}

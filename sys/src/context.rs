//! [`PrimaryContext`]: the one safe, shared handle on a device's primary context that every
//! kvvm user of the driver (the CUDA backend, the kernels) holds.
//!
//! kvvm works in the device's *primary* context, the one the CUDA runtime and PyTorch use, so
//! that addresses kvvm maps are valid in the engine's kernels. A `PrimaryContext` retains it once
//! and releases it when dropped; share it with `Arc` so that the release happens after the last
//! user. [`PrimaryContext::bind`] makes it current on the calling thread for the lifetime of a
//! guard and then restores whatever context the thread had.

use crate::error::DriverError;
use crate::result;
use crate::types::{CUcontext, CUdevice};

/// A retained primary context of one device. `Drop` releases it (and never panics).
#[derive(Debug)]
pub struct PrimaryContext {
    device: CUdevice,
    ordinal: i32,
    ctx: CUcontext,
}

// SAFETY: a CUcontext is a driver handle, not thread-affine data; the driver API may be called
// with it from any thread (it is made current per call by `bind`).
unsafe impl Send for PrimaryContext {}
// SAFETY: as above; `PrimaryContext` has no interior mutability of its own.
unsafe impl Sync for PrimaryContext {}

impl PrimaryContext {
    /// Initializes the driver and retains the primary context of device `ordinal`.
    ///
    /// # Errors
    /// Loading errors; `CUDA_ERROR_INVALID_DEVICE` for an ordinal out of range; the driver's
    /// errors when the context cannot be created.
    pub fn retain(ordinal: i32) -> Result<Self, DriverError> {
        result::init()?;
        let device = result::device::get(ordinal)?;
        let ctx = result::ctx::primary_retain(device)?;
        Ok(PrimaryContext {
            device,
            ordinal,
            ctx,
        })
    }

    /// The device handle.
    pub fn device(&self) -> CUdevice {
        self.device
    }

    /// The device ordinal it was retained for.
    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    /// The raw context handle (valid while `self` lives).
    pub fn raw(&self) -> CUcontext {
        self.ctx
    }

    /// Makes the context current on the calling thread until the returned guard drops; the
    /// guard then restores the thread's previous context (a thread that had none keeps this one,
    /// which is harmless and saves the next call).
    ///
    /// # Errors
    /// A driver error.
    pub fn bind(&self) -> Result<Bound, DriverError> {
        let current = result::ctx::get_current()?;
        if current == self.ctx {
            return Ok(Bound { restore: None });
        }
        // SAFETY: `self.ctx` is retained for as long as `self` lives.
        unsafe { result::ctx::set_current(self.ctx)? };
        Ok(Bound {
            restore: (!current.is_null()).then_some(current),
        })
    }

    /// Makes the context current on the calling thread, for good.
    ///
    /// # Errors
    /// A driver error.
    pub fn make_current(&self) -> Result<(), DriverError> {
        // SAFETY: `self.ctx` is retained for as long as `self` lives.
        unsafe { result::ctx::set_current(self.ctx) }
    }
}

impl Drop for PrimaryContext {
    fn drop(&mut self) {
        // SAFETY: this balances the one cuDevicePrimaryCtxRetain made in `retain`; users share
        // the context through the value being dropped, so none is left.
        let _ = unsafe { result::ctx::primary_release(self.device) };
    }
}

/// Restores the calling thread's previous context when dropped (see [`PrimaryContext::bind`]).
#[derive(Debug)]
#[must_use = "the context stays current only while the guard lives"]
pub struct Bound {
    restore: Option<CUcontext>,
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Some(prev) = self.restore.take() {
            // SAFETY: `prev` was current on this thread when `bind` ran and this thread did not
            // destroy it since (only kvvm calls ran in between).
            let _ = unsafe { result::ctx::set_current(prev) };
        }
    }
}

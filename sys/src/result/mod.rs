//! Thin wrappers over the driver entry points: Rust types in, `Result<T, DriverError>` out.
//!
//! Each wrapper loads the driver through [`crate::driver`] (once per process), makes one driver
//! call and turns a non-success `CUresult` into a [`DriverError`] naming the entry point.
//!
//! Wrappers that only create objects or query state are safe. Wrappers that take raw handles or
//! addresses are `unsafe`: the driver validates some handles but not all, and a stale address
//! or handle can corrupt memory that someone else owns. Most calls also need a current context
//! on the calling thread ([`ctx::set_current`]); without one they return
//! `CUDA_ERROR_INVALID_CONTEXT`, which is an error value, not undefined behaviour.

pub mod ctx;
pub mod device;
pub mod event;
pub mod mem;
pub mod module;
pub mod stream;

#[allow(unused_imports)]
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
        assert!(device::count().is_err());
        assert!(ctx::get_current().is_err());
        let prop = CUmemAllocationProp::pinned_device(0);
        assert!(mem::get_allocation_granularity(&prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM).is_err());
    }

    #[test]
    fn ptx_with_nul_is_rejected_before_the_driver() {
        // Fails either on the NUL check or on loading; both are error values.
        assert!(module::load_ptx("a\0b").is_err());
    }
}

/// Tests that need a CUDA GPU with virtual memory management: `cargo test -p kvvm-sys --
/// --ignored` on a GPU machine.
#[cfg(test)]
mod gpu_tests {
    use super::*;

    fn setup() -> (CUdevice, CUcontext) {
        init().expect("cuInit");
        let dev = device::get(0).expect("cuDeviceGet");
        let ctx = ctx::primary_retain(dev).expect("retain");
        // SAFETY: `ctx` was just retained and is live.
        unsafe { ctx::set_current(ctx) }.expect("set current");
        (dev, ctx)
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn vmm_alias_round_trip() {
        let (dev, _ctx) = setup();
        assert_eq!(
            device::attribute(dev, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)
                .unwrap(),
            1
        );
        let prop = CUmemAllocationProp::pinned_device(0);
        let g = mem::get_allocation_granularity(&prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM).unwrap();
        assert!(g >= 4096 && g.is_power_of_two(), "granularity {g}");
        let va = mem::address_reserve(2 * g, g, 0, 0).unwrap();
        let h = mem::create(g, &prop, 0).unwrap();
        let access = [CUmemAccessDesc::read_write_device(0)];
        let src: Vec<u8> = (0..g).map(|i| (i * 7 + 3) as u8).collect();
        let mut dst = vec![0u8; g];
        // SAFETY: the reservation and allocation are ours, each half is mapped once, and the
        // host buffers are valid for `g` bytes.
        unsafe {
            mem::map(va, g, 0, h, 0).unwrap();
            mem::map(va + g as u64, g, 0, h, 0).unwrap();
            mem::set_access(va, 2 * g, &access).unwrap();
            mem::memcpy_htod(va, src.as_ptr().cast(), g).unwrap();
            mem::memcpy_dtoh(dst.as_mut_ptr().cast(), va + g as u64, g).unwrap();
            mem::unmap(va, 2 * g).unwrap();
            mem::release(h).unwrap();
            mem::address_free(va, 2 * g).unwrap();
        }
        assert!(src == dst, "alias read back differs");
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn async_copy_and_event() {
        let _ = setup();
        let n = 1 << 20;
        let host = mem::host_alloc(n, CU_MEMHOSTALLOC_PORTABLE).unwrap();
        let dev = mem::alloc(n).unwrap();
        let stream = stream::create(CU_STREAM_NON_BLOCKING).unwrap();
        let ev = event::create(CU_EVENT_DISABLE_TIMING).unwrap();
        // SAFETY: all handles are live and ours; `host` is valid for `n` bytes and only accessed
        // after the stream is synchronized.
        unsafe {
            std::ptr::write_bytes(host.cast::<u8>(), 0x5a, n);
            mem::memcpy_htod_async(dev, host, n, stream).unwrap();
            event::record(ev, stream).unwrap();
            event::synchronize(ev).unwrap();
            assert!(event::query(ev).unwrap());
            std::ptr::write_bytes(host.cast::<u8>(), 0, n);
            mem::memcpy_dtoh_async(host, dev, n, stream).unwrap();
            stream::synchronize(stream).unwrap();
            assert!(stream::query(stream).unwrap());
            let s = std::slice::from_raw_parts(host.cast::<u8>(), n);
            assert!(s.iter().all(|&b| b == 0x5a));
            event::destroy(ev).unwrap();
            stream::destroy(stream).unwrap();
            mem::free(dev).unwrap();
            mem::free_host(host).unwrap();
        }
        let (free, total) = mem::get_info().unwrap();
        assert!(free <= total && total > 0);
        assert!(driver_version().unwrap() >= 11000);
        assert!(!device::name(0).unwrap().is_empty());
    }
}

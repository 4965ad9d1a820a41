//! Modules and kernels: loading code, looking up functions, launching.

#[allow(unused_imports)]
use super::*;

/// `cuModuleLoadData` for PTX text (the NUL terminator is added here).
///
/// # Errors
/// [`DriverError::InvalidArgument`] for PTX with an interior NUL; a driver error such as
/// `CUDA_ERROR_INVALID_PTX` or `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`.
pub fn load_ptx(ptx: &str) -> Result<CUmodule, DriverError> {
    let image = CString::new(ptx).map_err(|e| DriverError::InvalidArgument {
        function: "cuModuleLoadData",
        message: format!("PTX contains a NUL byte at offset {}", e.nul_position()),
    })?;
    // SAFETY: `image` is NUL-terminated PTX text, alive for the call.
    unsafe { load_data(image.as_ptr().cast()) }
}

/// `cuModuleLoadData` for any image the driver accepts (PTX, cubin, fatbin).
///
/// # Safety
/// `image` must point to a complete image: NUL-terminated PTX, or a cubin/fatbin whose headers
/// describe its own size.
///
/// # Errors
/// A driver error.
pub unsafe fn load_data(image: *const c_void) -> Result<CUmodule, DriverError> {
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
pub unsafe fn unload(module: CUmodule) -> Result<(), DriverError> {
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
pub unsafe fn get_function(module: CUmodule, name: &str) -> Result<CUfunction, DriverError> {
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

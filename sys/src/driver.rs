//! Run-time loading of the CUDA driver library and its table of entry points.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::fmt;
use std::sync::OnceLock;

use libloading::Library;

use crate::error::{error_name, DriverError};
use crate::types::*;

/// Environment variable naming a driver library file to try before the default names.
pub const LIBCUDA_ENV: &str = "KVVM_LIBCUDA";

/// The file names tried, in order, after [`LIBCUDA_ENV`].
#[cfg(not(windows))]
pub const LIBCUDA_NAMES: &[&str] = &["libcuda.so.1", "libcuda.so"];
/// The file names tried, in order, after [`LIBCUDA_ENV`].
#[cfg(windows)]
pub const LIBCUDA_NAMES: &[&str] = &["nvcuda.dll"];

/// Opens the first of `candidates` that the dynamic loader accepts.
///
/// # Safety
/// Loading a library runs its initialisers: every candidate must be a library whose
/// initialisers are safe to run in this process.
pub(crate) unsafe fn open_first(
    library: &'static str,
    candidates: &[String],
) -> Result<(Library, String), DriverError> {
    let mut errors = Vec::with_capacity(candidates.len());
    for name in candidates {
        // SAFETY: the caller guarantees that the candidate's initialisers are safe to run.
        match unsafe { Library::new(name) } {
            Ok(lib) => return Ok((lib, name.clone())),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if errors.is_empty() {
        errors.push("no candidate file names".to_string());
    }
    Err(DriverError::LibraryNotFound {
        library,
        tried: candidates.to_vec(),
        message: errors.join("; "),
    })
}

/// Looks `symbol` up in `lib` and copies the function pointer out.
///
/// # Safety
/// `T` must be the function pointer type that matches the symbol's C declaration.
pub(crate) unsafe fn symbol<T: Copy>(
    lib: &Library,
    path: &str,
    symbol: &'static str,
) -> Result<T, DriverError> {
    // SAFETY: the caller guarantees that `T` is the symbol's true type; the pointer copied out
    // stays valid as long as `lib` stays loaded, which the callers ensure by keeping the
    // `Library` next to the pointers.
    match unsafe { lib.get::<T>(symbol.as_bytes()) } {
        Ok(sym) => Ok(*sym),
        Err(e) => Err(DriverError::SymbolMissing {
            symbol,
            path: path.to_string(),
            message: e.to_string(),
        }),
    }
}

macro_rules! driver_api {
    ($(
        $(#[$meta:meta])*
        fn $name:ident($($arg:ident: $ty:ty),* $(,)?);
    )*) => {
        /// The CUDA driver entry points kvvm uses, resolved from one loaded library.
        ///
        /// Every field is the raw function pointer of the driver symbol of the same name (the
        /// versioned `_v2` symbols where `cuda.h` maps the plain name to one). Calling one is
        /// `unsafe`: the arguments must satisfy the driver API's documented contract. The safe(r)
        /// wrappers are in [`crate::result`].
        ///
        /// The library stays loaded for as long as the `Driver` lives; the one returned by
        /// [`driver`] lives for the whole process.
        #[allow(non_snake_case)]
        pub struct Driver {
            path: String,
            $(
                $(#[$meta])*
                pub $name: unsafe extern "C" fn($($arg: $ty),*) -> CUresult,
            )*
            _lib: Library,
        }

        impl Driver {
            /// Resolves every entry point from `lib`, loaded from `path`.
            ///
            /// # Safety
            /// `lib` must be a CUDA driver library: its symbols with these names must have the
            /// `cuda.h` signatures.
            #[allow(non_snake_case)]
            unsafe fn from_library(lib: Library, path: String) -> Result<Self, DriverError> {
                $(
                    // SAFETY: the caller guarantees `lib` is a CUDA driver, whose symbol of this
                    // name has exactly this signature (transcribed from cuda.h 12.6).
                    let $name = unsafe {
                        symbol::<unsafe extern "C" fn($($arg: $ty),*) -> CUresult>(
                            &lib,
                            &path,
                            stringify!($name),
                        )?
                    };
                )*
                Ok(Driver { path, $($name,)* _lib: lib })
            }
        }
    };
}

driver_api! {
    /// `cuInit(unsigned int Flags)`.
    fn cuInit(flags: c_uint);
    /// `cuDriverGetVersion(int *driverVersion)`.
    fn cuDriverGetVersion(version: *mut c_int);
    /// `cuDeviceGetCount(int *count)`.
    fn cuDeviceGetCount(count: *mut c_int);
    /// `cuDeviceGet(CUdevice *device, int ordinal)`.
    fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int);
    /// `cuDeviceGetName(char *name, int len, CUdevice dev)`.
    fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice);
    /// `cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev)`.
    fn cuDeviceGetAttribute(pi: *mut c_int, attrib: CUdevice_attribute, dev: CUdevice);
    /// `cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)` (`cuDeviceTotalMem`).
    fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice);
    /// `cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)`.
    fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice);
    /// `cuDevicePrimaryCtxRelease_v2(CUdevice dev)` (`cuDevicePrimaryCtxRelease`).
    fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice);
    /// `cuCtxSetCurrent(CUcontext ctx)`.
    fn cuCtxSetCurrent(ctx: CUcontext);
    /// `cuCtxGetCurrent(CUcontext *pctx)`.
    fn cuCtxGetCurrent(pctx: *mut CUcontext);
    /// `cuCtxSynchronize(void)`.
    fn cuCtxSynchronize();
    /// `cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop,
    /// CUmemAllocationGranularity_flags option)`.
    fn cuMemGetAllocationGranularity(
        granularity: *mut usize,
        prop: *const CUmemAllocationProp,
        option: CUmemAllocationGranularity_flags,
    );
    /// `cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
    /// unsigned long long flags)`.
    fn cuMemAddressReserve(
        ptr: *mut CUdeviceptr,
        size: usize,
        alignment: usize,
        addr: CUdeviceptr,
        flags: u64,
    );
    /// `cuMemAddressFree(CUdeviceptr ptr, size_t size)`.
    fn cuMemAddressFree(ptr: CUdeviceptr, size: usize);
    /// `cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
    /// const CUmemAllocationProp *prop, unsigned long long flags)`.
    fn cuMemCreate(
        handle: *mut CUmemGenericAllocationHandle,
        size: usize,
        prop: *const CUmemAllocationProp,
        flags: u64,
    );
    /// `cuMemRelease(CUmemGenericAllocationHandle handle)`.
    fn cuMemRelease(handle: CUmemGenericAllocationHandle);
    /// `cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
    /// unsigned long long flags)`.
    fn cuMemMap(
        ptr: CUdeviceptr,
        size: usize,
        offset: usize,
        handle: CUmemGenericAllocationHandle,
        flags: u64,
    );
    /// `cuMemUnmap(CUdeviceptr ptr, size_t size)`.
    fn cuMemUnmap(ptr: CUdeviceptr, size: usize);
    /// `cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count)`.
    fn cuMemSetAccess(ptr: CUdeviceptr, size: usize, desc: *const CUmemAccessDesc, count: usize);
    /// `cuMemHostAlloc(void **pp, size_t bytesize, unsigned int Flags)`.
    fn cuMemHostAlloc(pp: *mut *mut c_void, bytesize: usize, flags: c_uint);
    /// `cuMemFreeHost(void *p)`.
    fn cuMemFreeHost(p: *mut c_void);
    /// `cuMemGetInfo_v2(size_t *free, size_t *total)` (`cuMemGetInfo`).
    fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize);
    /// `cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)` (`cuMemAlloc`).
    fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize);
    /// `cuMemFree_v2(CUdeviceptr dptr)` (`cuMemFree`).
    fn cuMemFree_v2(dptr: CUdeviceptr);
    /// `cuMemcpyHtoD_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount)`.
    fn cuMemcpyHtoD_v2(dst: CUdeviceptr, src: *const c_void, bytes: usize);
    /// `cuMemcpyDtoH_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount)`.
    fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, bytes: usize);
    /// `cuMemcpyDtoD_v2(CUdeviceptr dstDevice, CUdeviceptr srcDevice, size_t ByteCount)`.
    fn cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize);
    /// `cuMemcpyHtoDAsync_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount,
    /// CUstream hStream)`.
    fn cuMemcpyHtoDAsync_v2(dst: CUdeviceptr, src: *const c_void, bytes: usize, stream: CUstream);
    /// `cuMemcpyDtoHAsync_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount,
    /// CUstream hStream)`.
    fn cuMemcpyDtoHAsync_v2(dst: *mut c_void, src: CUdeviceptr, bytes: usize, stream: CUstream);
    /// `cuMemcpyDtoDAsync_v2(CUdeviceptr dstDevice, CUdeviceptr srcDevice, size_t ByteCount,
    /// CUstream hStream)`.
    fn cuMemcpyDtoDAsync_v2(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize, stream: CUstream);
    /// `cuStreamCreate(CUstream *phStream, unsigned int Flags)`.
    fn cuStreamCreate(stream: *mut CUstream, flags: c_uint);
    /// `cuStreamDestroy_v2(CUstream hStream)` (`cuStreamDestroy`).
    fn cuStreamDestroy_v2(stream: CUstream);
    /// `cuStreamSynchronize(CUstream hStream)`.
    fn cuStreamSynchronize(stream: CUstream);
    /// `cuStreamQuery(CUstream hStream)`.
    fn cuStreamQuery(stream: CUstream);
    /// `cuStreamWaitEvent(CUstream hStream, CUevent hEvent, unsigned int Flags)`.
    fn cuStreamWaitEvent(stream: CUstream, event: CUevent, flags: c_uint);
    /// `cuEventCreate(CUevent *phEvent, unsigned int Flags)`.
    fn cuEventCreate(event: *mut CUevent, flags: c_uint);
    /// `cuEventDestroy_v2(CUevent hEvent)` (`cuEventDestroy`).
    fn cuEventDestroy_v2(event: CUevent);
    /// `cuEventRecord(CUevent hEvent, CUstream hStream)`.
    fn cuEventRecord(event: CUevent, stream: CUstream);
    /// `cuEventQuery(CUevent hEvent)`.
    fn cuEventQuery(event: CUevent);
    /// `cuEventSynchronize(CUevent hEvent)`.
    fn cuEventSynchronize(event: CUevent);
    /// `cuEventElapsedTime(float *pMilliseconds, CUevent hStart, CUevent hEnd)`.
    fn cuEventElapsedTime(ms: *mut f32, start: CUevent, end: CUevent);
    /// `cuGetErrorName(CUresult error, const char **pStr)`.
    fn cuGetErrorName(error: CUresult, pstr: *mut *const c_char);
    /// `cuGetErrorString(CUresult error, const char **pStr)`.
    fn cuGetErrorString(error: CUresult, pstr: *mut *const c_char);
    /// `cuModuleLoadData(CUmodule *module, const void *image)`.
    fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void);
    /// `cuModuleUnload(CUmodule hmod)`.
    fn cuModuleUnload(module: CUmodule);
    /// `cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name)`.
    fn cuModuleGetFunction(function: *mut CUfunction, module: CUmodule, name: *const c_char);
    /// `cuLaunchKernel(CUfunction f, unsigned int gridDimX, gridDimY, gridDimZ,
    /// unsigned int blockDimX, blockDimY, blockDimZ, unsigned int sharedMemBytes,
    /// CUstream hStream, void **kernelParams, void **extra)`.
    fn cuLaunchKernel(
        function: CUfunction,
        grid_x: c_uint,
        grid_y: c_uint,
        grid_z: c_uint,
        block_x: c_uint,
        block_y: c_uint,
        block_z: c_uint,
        shared_mem_bytes: c_uint,
        stream: CUstream,
        kernel_params: *mut *mut c_void,
        extra: *mut *mut c_void,
    );
    /// `cuThreadExchangeStreamCaptureMode(CUstreamCaptureMode *mode)`.
    fn cuThreadExchangeStreamCaptureMode(mode: *mut c_int);
}

impl fmt::Debug for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Driver")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// Loads the first of `candidates` (file names or paths) that the dynamic loader accepts
    /// and resolves every entry point from it.
    ///
    /// # Errors
    /// [`DriverError::LibraryNotFound`] naming every candidate and the loader's error for each;
    /// [`DriverError::SymbolMissing`] when the first library that loads lacks an entry point.
    ///
    /// # Safety
    /// Loading a library runs its initialisers, and its symbols are then called through the
    /// `cuda.h` signatures: every candidate must be a CUDA driver library, or a library whose
    /// initialisers are harmless and that exports none of these names with another signature.
    pub unsafe fn load_from(candidates: &[String]) -> Result<Driver, DriverError> {
        // SAFETY: forwarded from this function's contract.
        let (lib, path) = unsafe { open_first("CUDA driver", candidates)? };
        // SAFETY: forwarded from this function's contract.
        unsafe { Driver::from_library(lib, path) }
    }

    /// The file name or path the library was loaded from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The driver's name for `code` (`cuGetErrorName`), else the `cuda.h` name from a static
    /// table, else `CUDA_ERROR_<code>`.
    pub fn error_name(&self, code: CUresult) -> String {
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: `p` is a valid out-pointer; cuGetErrorName accepts any code value.
        let rc = unsafe { (self.cuGetErrorName)(code, &mut p) };
        // SAFETY: on success the driver stores a pointer to a static NUL-terminated string.
        if let Some(s) = unsafe { static_cstr(rc, p) } {
            return s;
        }
        match error_name(code) {
            Some(name) => name.to_string(),
            None => format!("CUDA_ERROR_{code}"),
        }
    }

    /// The driver's description of `code` (`cuGetErrorString`), or a placeholder.
    pub fn error_description(&self, code: CUresult) -> String {
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: `p` is a valid out-pointer; cuGetErrorString accepts any code value.
        let rc = unsafe { (self.cuGetErrorString)(code, &mut p) };
        // SAFETY: on success the driver stores a pointer to a static NUL-terminated string.
        match unsafe { static_cstr(rc, p) } {
            Some(s) => s,
            None => "no description available from the driver".to_string(),
        }
    }

    /// The error value for a call to `function` that returned `code`.
    pub fn call_error(&self, code: CUresult, function: &'static str) -> DriverError {
        DriverError::Call {
            code,
            name: self.error_name(code),
            description: self.error_description(code),
            function,
        }
    }

    /// `Ok(())` for `CUDA_SUCCESS`, else [`Driver::call_error`].
    pub fn check(&self, code: CUresult, function: &'static str) -> Result<(), DriverError> {
        if code == CUDA_SUCCESS {
            Ok(())
        } else {
            Err(self.call_error(code, function))
        }
    }
}

/// Copies a string the driver returned through an out-pointer.
///
/// # Safety
/// When `rc` is `CUDA_SUCCESS` and `p` is not null, `p` must point to a NUL-terminated string.
unsafe fn static_cstr(rc: CUresult, p: *const c_char) -> Option<String> {
    if rc != CUDA_SUCCESS || p.is_null() {
        return None;
    }
    // SAFETY: guaranteed by the caller for a successful call with a non-null pointer.
    let s = unsafe { CStr::from_ptr(p) };
    Some(s.to_string_lossy().into_owned())
}

/// The candidate file names [`driver`] tries, in order: the value of [`LIBCUDA_ENV`] when set
/// and not empty, then [`LIBCUDA_NAMES`].
pub fn libcuda_candidates() -> Vec<String> {
    let mut names = Vec::with_capacity(LIBCUDA_NAMES.len() + 1);
    if let Some(v) = std::env::var_os(LIBCUDA_ENV) {
        if !v.is_empty() {
            names.push(v.to_string_lossy().into_owned());
        }
    }
    names.extend(LIBCUDA_NAMES.iter().map(|s| s.to_string()));
    names
}

static DRIVER: OnceLock<Result<Driver, DriverError>> = OnceLock::new();

/// The process-wide CUDA driver, loaded on first use from [`libcuda_candidates`].
///
/// The outcome of the first call (the loaded library, or the error) is kept for the life of
/// the process; setting [`LIBCUDA_ENV`] afterwards has no effect. This does not call `cuInit`
/// (see [`crate::result::init`]).
///
/// The path in [`LIBCUDA_ENV`] is trusted like `LD_LIBRARY_PATH`: whatever it names is loaded
/// and used as the CUDA driver.
///
/// # Errors
/// [`DriverError::LibraryNotFound`] when no candidate loads (the usual case on a machine without
/// the NVIDIA driver), [`DriverError::SymbolMissing`] when the driver is too old for an entry
/// point kvvm needs.
pub fn driver() -> Result<&'static Driver, DriverError> {
    DRIVER
        .get_or_init(|| {
            let candidates = libcuda_candidates();
            // SAFETY: the candidates are the system's CUDA driver (whose initialisers are made to
            // run in any process) or the file the user named in KVVM_LIBCUDA for this purpose.
            unsafe { Driver::load_from(&candidates) }
        })
        .as_ref()
        .map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_is_an_error_naming_the_candidates() {
        let candidates = vec![
            "/nonexistent/kvvm-test/libcuda.so.1".to_string(),
            "libkvvm-test-does-not-exist.so".to_string(),
        ];
        // SAFETY: neither candidate exists, so nothing is loaded.
        let err = unsafe { Driver::load_from(&candidates) }.unwrap_err();
        match &err {
            DriverError::LibraryNotFound {
                library,
                tried,
                message,
            } => {
                assert_eq!(*library, "CUDA driver");
                assert_eq!(tried, &candidates);
                assert!(
                    message.contains("/nonexistent/kvvm-test/libcuda.so.1"),
                    "{message}"
                );
            }
            other => panic!("unexpected error {other:?}"),
        }
        let s = err.to_string();
        assert!(s.contains("libkvvm-test-does-not-exist.so"), "{s}");
    }

    #[test]
    fn wrong_library_reports_the_missing_symbol() {
        // libc loads everywhere and certainly has no cuInit.
        let candidates = vec!["libc.so.6".to_string()];
        // SAFETY: libc is already loaded in this process; opening it again runs nothing new, and
        // it exports none of the driver's names.
        let err = unsafe { Driver::load_from(&candidates) }.unwrap_err();
        match &err {
            DriverError::SymbolMissing { symbol, path, .. } => {
                assert_eq!(*symbol, "cuInit");
                assert_eq!(path, "libc.so.6");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn candidates_end_with_the_default_names() {
        let c = libcuda_candidates();
        assert!(c.ends_with(&["libcuda.so.1".to_string(), "libcuda.so".to_string()]));
    }

    /// On a machine without the NVIDIA driver (like CI), `driver()` is an error, not a panic,
    /// and the error names `libcuda.so.1`. On a GPU machine it loads.
    #[test]
    fn driver_is_an_error_value_without_a_gpu() {
        match driver() {
            Ok(d) => {
                eprintln!("CUDA driver loaded from {}", d.path());
                assert!(!d.path().is_empty());
            }
            Err(e) => {
                let s = e.to_string();
                assert!(s.contains("libcuda.so.1"), "{s}");
                assert!(matches!(e, DriverError::LibraryNotFound { .. }), "{e:?}");
                // The outcome is cached and stable.
                assert_eq!(driver().unwrap_err(), e);
            }
        }
    }
}

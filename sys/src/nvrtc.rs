//! NVRTC, the CUDA run-time compiler, loaded at run time like the driver.
//!
//! [`nvrtc`] tries, in order:
//! 1. the environment variable [`NVRTC_ENV`] (`KVVM_NVRTC_PATH`): a library file, or a directory
//!    that contains `libnvrtc.so.12` (or `libnvrtc.so`);
//! 2. `libnvrtc.so.12`, then `libnvrtc.so`, through the dynamic loader's normal search
//!    (`LD_LIBRARY_PATH`, the ld.so cache: a CUDA toolkit installation).
//!
//! A library never starts subprocesses, so the Python wheel `nvidia-cuda-nvrtc-cu12` is not
//! searched for automatically. To use it (e.g. in CI), point the variable at the wheel's library
//! directory:
//!
//! ```text
//! KVVM_NVRTC_PATH=$(python3 -c 'import nvidia.cuda_nvrtc, os; print(os.path.join(nvidia.cuda_nvrtc.__path__[0], "lib"))')
//! ```
//!
//! The wheel's `libnvrtc.so.12` carries `RUNPATH=$ORIGIN`, so when it is loaded by absolute path
//! it finds its `libnvrtc-builtins.so.12.*` in the same directory without further setup.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt;
use std::path::Path;
use std::sync::OnceLock;

use libloading::Library;

use crate::driver::{open_first, symbol};
use crate::error::DriverError;

/// Environment variable naming the NVRTC library file, or a directory containing it.
pub const NVRTC_ENV: &str = "KVVM_NVRTC_PATH";

/// The file names tried, in order, after [`NVRTC_ENV`].
#[cfg(not(windows))]
pub const NVRTC_NAMES: &[&str] = &["libnvrtc.so.12", "libnvrtc.so"];
/// The file names tried, in order, after [`NVRTC_ENV`].
#[cfg(windows)]
pub const NVRTC_NAMES: &[&str] = &["nvrtc64_120_0.dll"];

/// Result code of NVRTC calls (`nvrtcResult`, a C enum).
pub type nvrtcResult = c_int;
/// `NVRTC_SUCCESS`.
pub const NVRTC_SUCCESS: nvrtcResult = 0;
/// `NVRTC_ERROR_INVALID_OPTION`: a compile option was not recognised.
pub const NVRTC_ERROR_INVALID_OPTION: nvrtcResult = 5;
/// `NVRTC_ERROR_COMPILATION`: the source did not compile; see the program log.
pub const NVRTC_ERROR_COMPILATION: nvrtcResult = 6;

/// Opaque NVRTC program object.
#[repr(C)]
#[derive(Debug)]
pub struct _nvrtcProgram {
    _private: [u8; 0],
}
/// An NVRTC program handle (`nvrtcProgram`).
pub type nvrtcProgram = *mut _nvrtcProgram;

type VersionFn = unsafe extern "C" fn(major: *mut c_int, minor: *mut c_int) -> nvrtcResult;
type CreateProgramFn = unsafe extern "C" fn(
    prog: *mut nvrtcProgram,
    src: *const c_char,
    name: *const c_char,
    num_headers: c_int,
    headers: *const *const c_char,
    include_names: *const *const c_char,
) -> nvrtcResult;
type CompileProgramFn = unsafe extern "C" fn(
    prog: nvrtcProgram,
    num_options: c_int,
    options: *const *const c_char,
) -> nvrtcResult;
type GetSizeFn = unsafe extern "C" fn(prog: nvrtcProgram, size: *mut usize) -> nvrtcResult;
type GetTextFn = unsafe extern "C" fn(prog: nvrtcProgram, out: *mut c_char) -> nvrtcResult;
type DestroyProgramFn = unsafe extern "C" fn(prog: *mut nvrtcProgram) -> nvrtcResult;
type GetErrorStringFn = unsafe extern "C" fn(result: nvrtcResult) -> *const c_char;

/// The NVRTC entry points kvvm uses, resolved from one loaded library.
///
/// Obtain the process-wide instance with [`nvrtc`].
pub struct Nvrtc {
    path: String,
    nvrtc_version: VersionFn,
    nvrtc_create_program: CreateProgramFn,
    nvrtc_compile_program: CompileProgramFn,
    nvrtc_get_ptx_size: GetSizeFn,
    nvrtc_get_ptx: GetTextFn,
    nvrtc_get_program_log_size: GetSizeFn,
    nvrtc_get_program_log: GetTextFn,
    nvrtc_destroy_program: DestroyProgramFn,
    nvrtc_get_error_string: GetErrorStringFn,
    _lib: Library,
}

impl fmt::Debug for Nvrtc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nvrtc")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Destroys an NVRTC program when dropped.
struct Program<'a> {
    nvrtc: &'a Nvrtc,
    prog: nvrtcProgram,
}

impl Drop for Program<'_> {
    fn drop(&mut self) {
        // SAFETY: `prog` was created by nvrtcCreateProgram and is destroyed exactly once, here.
        // An error cannot be reported from drop and leaves only a leak.
        let _ = unsafe { (self.nvrtc.nvrtc_destroy_program)(&mut self.prog) };
    }
}

fn cstring(function: &'static str, what: &str, s: &str) -> Result<CString, DriverError> {
    CString::new(s).map_err(|e| DriverError::InvalidArgument {
        function,
        message: format!("{what} contains a NUL byte at offset {}", e.nul_position()),
    })
}

impl Nvrtc {
    /// Loads the first of `candidates` that the dynamic loader accepts and resolves the NVRTC
    /// entry points from it.
    ///
    /// # Errors
    /// [`DriverError::LibraryNotFound`] or [`DriverError::SymbolMissing`].
    ///
    /// # Safety
    /// Every candidate must be an NVRTC library, or a library whose initialisers are harmless
    /// and that exports none of the NVRTC names with another signature.
    pub unsafe fn load_from(candidates: &[String]) -> Result<Nvrtc, DriverError> {
        // SAFETY: forwarded from this function's contract.
        let (lib, path) = unsafe { open_first("NVRTC", candidates)? };
        // SAFETY: the contract guarantees that these symbols, when present, have the nvrtc.h
        // signatures declared by the types above.
        unsafe {
            Ok(Nvrtc {
                nvrtc_version: symbol(&lib, &path, "nvrtcVersion")?,
                nvrtc_create_program: symbol(&lib, &path, "nvrtcCreateProgram")?,
                nvrtc_compile_program: symbol(&lib, &path, "nvrtcCompileProgram")?,
                nvrtc_get_ptx_size: symbol(&lib, &path, "nvrtcGetPTXSize")?,
                nvrtc_get_ptx: symbol(&lib, &path, "nvrtcGetPTX")?,
                nvrtc_get_program_log_size: symbol(&lib, &path, "nvrtcGetProgramLogSize")?,
                nvrtc_get_program_log: symbol(&lib, &path, "nvrtcGetProgramLog")?,
                nvrtc_destroy_program: symbol(&lib, &path, "nvrtcDestroyProgram")?,
                nvrtc_get_error_string: symbol(&lib, &path, "nvrtcGetErrorString")?,
                path,
                _lib: lib,
            })
        }
    }

    /// The file name or path the library was loaded from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// NVRTC's name for `code` (`nvrtcGetErrorString`).
    pub fn error_name(&self, code: nvrtcResult) -> String {
        // SAFETY: nvrtcGetErrorString accepts any value and returns a static string or null.
        let p = unsafe { (self.nvrtc_get_error_string)(code) };
        if p.is_null() {
            return format!("NVRTC_ERROR_{code}");
        }
        // SAFETY: a non-null result points to a static NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn check(&self, code: nvrtcResult, function: &'static str) -> Result<(), DriverError> {
        if code == NVRTC_SUCCESS {
            Ok(())
        } else {
            Err(DriverError::Nvrtc {
                code,
                name: self.error_name(code),
                function,
            })
        }
    }

    /// `nvrtcVersion`: the NVRTC version as `(major, minor)`, e.g. `(12, 9)`.
    ///
    /// # Errors
    /// An NVRTC error.
    pub fn version(&self) -> Result<(i32, i32), DriverError> {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: both are valid out-pointers.
        let rc = unsafe { (self.nvrtc_version)(&mut major, &mut minor) };
        self.check(rc, "nvrtcVersion")?;
        Ok((major, minor))
    }

    /// Reads a program's log or PTX (size query, then copy; the trailing NUL is dropped).
    fn read_text(
        &self,
        prog: nvrtcProgram,
        size_fn: GetSizeFn,
        text_fn: GetTextFn,
        names: (&'static str, &'static str),
    ) -> Result<String, DriverError> {
        let mut size = 0usize;
        // SAFETY: `prog` is a live program and `size` a valid out-pointer.
        self.check(unsafe { size_fn(prog, &mut size) }, names.0)?;
        let mut buf = vec![0u8; size.max(1)];
        // SAFETY: `buf` is writable for `size` bytes (at least 1), which is what NVRTC writes,
        // including the NUL terminator.
        self.check(unsafe { text_fn(prog, buf.as_mut_ptr().cast()) }, names.1)?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        buf.truncate(end);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Compiles CUDA C++ `src` (program name `name`, used in diagnostics) to PTX with
    /// `options` (e.g. `--gpu-architecture=compute_80`, `-default-device`).
    ///
    /// # Errors
    /// [`DriverError::Compile`] with the program log when the source or an option is rejected;
    /// [`DriverError::InvalidArgument`] for strings with NUL bytes; [`DriverError::Nvrtc`] for
    /// other NVRTC failures.
    pub fn compile_ptx(
        &self,
        src: &str,
        name: &str,
        options: &[&str],
    ) -> Result<String, DriverError> {
        let c_src = cstring("nvrtcCreateProgram", "source", src)?;
        let c_name = cstring("nvrtcCreateProgram", "program name", name)?;
        let c_opts = options
            .iter()
            .map(|o| cstring("nvrtcCompileProgram", "option", o))
            .collect::<Result<Vec<_>, _>>()?;
        let opt_ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();
        let num_options =
            c_int::try_from(opt_ptrs.len()).map_err(|_| DriverError::InvalidArgument {
                function: "nvrtcCompileProgram",
                message: format!("{} options are too many", opt_ptrs.len()),
            })?;

        let mut prog: nvrtcProgram = std::ptr::null_mut();
        // SAFETY: `prog` is a valid out-pointer; source and name are NUL-terminated and alive for
        // the call; no headers are passed (count 0, null arrays).
        let rc = unsafe {
            (self.nvrtc_create_program)(
                &mut prog,
                c_src.as_ptr(),
                c_name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        self.check(rc, "nvrtcCreateProgram")?;
        let program = Program { nvrtc: self, prog };

        let opts = if opt_ptrs.is_empty() {
            std::ptr::null()
        } else {
            opt_ptrs.as_ptr()
        };
        // SAFETY: the program is live; `opts` points to `num_options` NUL-terminated strings that
        // outlive the call (owned by `c_opts`).
        let rc = unsafe { (self.nvrtc_compile_program)(program.prog, num_options, opts) };
        if rc != NVRTC_SUCCESS {
            let log = self
                .read_text(
                    program.prog,
                    self.nvrtc_get_program_log_size,
                    self.nvrtc_get_program_log,
                    ("nvrtcGetProgramLogSize", "nvrtcGetProgramLog"),
                )
                .unwrap_or_else(|e| format!("(the program log could not be read: {e})"));
            return Err(DriverError::Compile {
                program: name.to_string(),
                code: rc,
                name: self.error_name(rc),
                log,
            });
        }
        self.read_text(
            program.prog,
            self.nvrtc_get_ptx_size,
            self.nvrtc_get_ptx,
            ("nvrtcGetPTXSize", "nvrtcGetPTX"),
        )
    }
}

/// The candidate files [`nvrtc`] tries, in order (see the [module documentation](self)).
pub fn nvrtc_candidates() -> Vec<String> {
    let mut names = Vec::with_capacity(NVRTC_NAMES.len() + 2);
    if let Some(v) = std::env::var_os(NVRTC_ENV) {
        if !v.is_empty() {
            let p = Path::new(&v);
            if p.is_dir() {
                for n in NVRTC_NAMES {
                    names.push(p.join(n).to_string_lossy().into_owned());
                }
            } else {
                names.push(p.to_string_lossy().into_owned());
            }
        }
    }
    names.extend(NVRTC_NAMES.iter().map(|s| s.to_string()));
    names
}

static NVRTC: OnceLock<Result<Nvrtc, DriverError>> = OnceLock::new();

/// The process-wide NVRTC, loaded on first use from [`nvrtc_candidates`]; the outcome is kept
/// for the life of the process.
///
/// The path in [`NVRTC_ENV`] is trusted like `LD_LIBRARY_PATH`.
///
/// # Errors
/// [`DriverError::LibraryNotFound`] naming every candidate, or [`DriverError::SymbolMissing`].
pub fn nvrtc() -> Result<&'static Nvrtc, DriverError> {
    NVRTC
        .get_or_init(|| {
            let candidates = nvrtc_candidates();
            // SAFETY: the candidates are NVRTC from the CUDA toolkit or wheel, or the file the
            // user named in KVVM_NVRTC_PATH for this purpose.
            unsafe { Nvrtc::load_from(&candidates) }
        })
        .as_ref()
        .map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KERNEL: &str = r#"
extern "C" __global__ void kvvm_fill(float* out, float value, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = value;
}
"#;

    fn loaded() -> Option<&'static Nvrtc> {
        match nvrtc() {
            Ok(n) => Some(n),
            Err(e) => {
                eprintln!("skipped: NVRTC cannot be loaded ({e}); set {NVRTC_ENV}");
                None
            }
        }
    }

    #[test]
    fn compiles_a_kernel_to_ptx() {
        let Some(n) = loaded() else { return };
        let (major, minor) = n.version().unwrap();
        eprintln!("NVRTC {major}.{minor} from {}", n.path());
        assert!(major >= 11);
        let ptx = n
            .compile_ptx(KERNEL, "kvvm_fill.cu", &["--gpu-architecture=compute_80"])
            .unwrap();
        assert!(ptx.contains(".visible .entry kvvm_fill"), "{ptx}");
        assert!(ptx.contains(".target sm_80"), "{ptx}");
        assert!(!ptx.contains('\0'));
    }

    #[test]
    fn compile_error_carries_the_log() {
        let Some(n) = loaded() else { return };
        let err = n
            .compile_ptx(
                "__global__ void broken() { undeclared_thing = 1; }",
                "broken.cu",
                &["--gpu-architecture=compute_80"],
            )
            .unwrap_err();
        match &err {
            DriverError::Compile {
                program, code, log, ..
            } => {
                assert_eq!(program, "broken.cu");
                assert_eq!(*code, NVRTC_ERROR_COMPILATION);
                assert!(log.contains("undeclared_thing"), "{log}");
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err.to_string().contains("undeclared_thing"));
    }

    #[test]
    fn bad_option_is_an_error() {
        let Some(n) = loaded() else { return };
        let err = n
            .compile_ptx(KERNEL, "k.cu", &["--no-such-option-kvvm"])
            .unwrap_err();
        assert!(
            matches!(
                err,
                DriverError::Compile {
                    code: NVRTC_ERROR_INVALID_OPTION,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn nul_in_source_is_rejected() {
        let Some(n) = loaded() else { return };
        assert!(matches!(
            n.compile_ptx("a\0b", "x.cu", &[]),
            Err(DriverError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn missing_library_names_the_candidates() {
        let c = vec!["/nonexistent/kvvm/libnvrtc.so.12".to_string()];
        // SAFETY: the candidate does not exist; nothing is loaded.
        let err = unsafe { Nvrtc::load_from(&c) }.unwrap_err();
        let s = err.to_string();
        assert!(s.contains("NVRTC"), "{s}");
        assert!(s.contains("/nonexistent/kvvm/libnvrtc.so.12"), "{s}");
    }

    #[test]
    fn candidates_end_with_the_default_names() {
        let c = nvrtc_candidates();
        assert!(c.ends_with(&["libnvrtc.so.12".to_string(), "libnvrtc.so".to_string()]));
    }
}

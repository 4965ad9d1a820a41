//! NVRTC, the CUDA run-time compiler, loaded at run time like the driver.
//!
//! NVRTC 12 and 13 are both accepted (CUDA 13 machines, e.g. driver 580 with PyTorch cu130,
//! ship only `libnvrtc.so.13`). [`nvrtc`] tries, in order:
//! 1. the environment variable [`NVRTC_ENV`] (`KVVM_NVRTC_PATH`): a library file, or a directory
//!    that contains one of [`NVRTC_NAMES`];
//! 2. the library folders of NVIDIA's Python wheels that are already loaded in the process (for
//!    example by `import torch`): for a mapped file under `.../site-packages/nvidia/`, the
//!    folders `nvidia/cu13/lib` (CUDA 13 wheels) and `nvidia/cuda_nvrtc/lib` (CUDA 12 wheels);
//! 3. the CUDA toolkit's `lib64` folder: `$CUDA_HOME`, `$CUDA_PATH`, then `/usr/local/cuda`;
//! 4. [`NVRTC_NAMES`] through the dynamic loader's normal search (`LD_LIBRARY_PATH`, the ld.so
//!    cache).
//!
//! Folders are only tried when the file exists in them, so the error of a failed search lists
//! the places that were really tried. A library never starts subprocesses, so a wheel that is
//! installed but not loaded is found only through the variable:
//!
//! ```text
//! KVVM_NVRTC_PATH=$(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))')
//! ```
//!
//! The wheels' `libnvrtc.so.1x` carry `RUNPATH=$ORIGIN`, so when one is loaded by absolute path
//! it finds its `libnvrtc-builtins.so.1x.*` in the same directory without further setup.
//!
//! [`Nvrtc::compile_cubin`] produces machine code (SASS) for one real architecture through
//! `nvrtcGetCUBIN`; it is preferred to PTX, which a driver older than the compiler cannot load
//! (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`). [`Nvrtc::compile_ptx`] remains as the fallback.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libloading::Library;

use crate::driver::{open_first, symbol};
use crate::error::DriverError;

/// Environment variable naming the NVRTC library file, or a directory containing it.
pub const NVRTC_ENV: &str = "KVVM_NVRTC_PATH";

/// The file names tried, in order, in every folder and through the dynamic loader.
#[cfg(not(windows))]
pub const NVRTC_NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];
/// The file names tried, in order, in every folder and through the dynamic loader.
#[cfg(windows)]
pub const NVRTC_NAMES: &[&str] = &["nvrtc64_130_0.dll", "nvrtc64_120_0.dll"];

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
    /// `nvrtcGetCUBINSize` / `nvrtcGetCUBIN` (NVRTC 11.1 and later).
    nvrtc_get_cubin: Option<(GetSizeFn, GetTextFn)>,
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
                nvrtc_get_cubin: symbol(&lib, &path, "nvrtcGetCUBINSize")
                    .and_then(|size| Ok((size, symbol(&lib, &path, "nvrtcGetCUBIN")?)))
                    .ok(),
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

    /// Whether this NVRTC can produce machine code ([`Nvrtc::compile_cubin`]).
    pub fn has_cubin(&self) -> bool {
        self.nvrtc_get_cubin.is_some()
    }

    /// Reads a program's log, PTX or cubin (size query, then copy).
    fn read_bytes(
        &self,
        prog: nvrtcProgram,
        size_fn: GetSizeFn,
        data_fn: GetTextFn,
        names: (&'static str, &'static str),
    ) -> Result<Vec<u8>, DriverError> {
        let mut size = 0usize;
        // SAFETY: `prog` is a live program and `size` a valid out-pointer.
        self.check(unsafe { size_fn(prog, &mut size) }, names.0)?;
        let mut buf = vec![0u8; size.max(1)];
        // SAFETY: `buf` is writable for `size` bytes (at least 1), which is what NVRTC writes
        // (for text, including the NUL terminator).
        self.check(unsafe { data_fn(prog, buf.as_mut_ptr().cast()) }, names.1)?;
        buf.truncate(size);
        Ok(buf)
    }

    /// Reads a program's log or PTX (the trailing NUL is dropped).
    fn read_text(
        &self,
        prog: nvrtcProgram,
        size_fn: GetSizeFn,
        text_fn: GetTextFn,
        names: (&'static str, &'static str),
    ) -> Result<String, DriverError> {
        let mut buf = self.read_bytes(prog, size_fn, text_fn, names)?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        buf.truncate(end);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Creates and compiles a program; on success returns it for its outputs to be read.
    fn compile_program(
        &self,
        src: &str,
        name: &str,
        options: &[&str],
    ) -> Result<Program<'_>, DriverError> {
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
        Ok(program)
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
        let program = self.compile_program(src, name, options)?;
        self.read_text(
            program.prog,
            self.nvrtc_get_ptx_size,
            self.nvrtc_get_ptx,
            ("nvrtcGetPTXSize", "nvrtcGetPTX"),
        )
    }

    /// Compiles CUDA C++ `src` to machine code (a cubin, SASS) with `options`, which must name a
    /// real architecture (`--gpu-architecture=sm_90`).
    ///
    /// # Errors
    /// As [`Nvrtc::compile_ptx`]; [`DriverError::SymbolMissing`] when this NVRTC has no
    /// `nvrtcGetCUBIN` (older than 11.1); [`DriverError::Nvrtc`] when the options name a virtual
    /// architecture (no machine code was generated).
    pub fn compile_cubin(
        &self,
        src: &str,
        name: &str,
        options: &[&str],
    ) -> Result<Vec<u8>, DriverError> {
        let Some((size_fn, data_fn)) = self.nvrtc_get_cubin else {
            return Err(DriverError::SymbolMissing {
                symbol: "nvrtcGetCUBIN",
                path: self.path.clone(),
                message: "this NVRTC cannot produce machine code (NVRTC 11.1 or later can)".into(),
            });
        };
        let program = self.compile_program(src, name, options)?;
        let cubin = self.read_bytes(
            program.prog,
            size_fn,
            data_fn,
            ("nvrtcGetCUBINSize", "nvrtcGetCUBIN"),
        )?;
        // A compilation for a virtual architecture has no cubin (size 0, or NVRTC's error).
        if cubin.len() < 4 || cubin[..4] != [0x7f, b'E', b'L', b'F'] {
            return Err(DriverError::Nvrtc {
                code: NVRTC_ERROR_INVALID_OPTION,
                name: "no machine code: the options name no real architecture (sm_NN)".into(),
                function: "nvrtcGetCUBIN",
            });
        }
        Ok(cubin)
    }
}

/// Library folders of NVIDIA's Python wheels loaded in this process: for every file mapped
/// from `<prefix>/nvidia/...`, `<prefix>/nvidia/cu13/lib` and `<prefix>/nvidia/cuda_nvrtc/lib`.
#[cfg(target_os = "linux")]
fn loaded_wheel_dirs() -> Vec<PathBuf> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let Some(at) = path.find("/nvidia/") else {
            continue;
        };
        let root = Path::new(&path[..at + "/nvidia".len()]);
        for sub in ["cu13/lib", "cuda_nvrtc/lib"] {
            let d = root.join(sub);
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    dirs
}

#[cfg(not(target_os = "linux"))]
fn loaded_wheel_dirs() -> Vec<PathBuf> {
    Vec::new()
}

/// The CUDA toolkit's library folders: `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`,
/// `/usr/local/cuda/lib64`.
fn toolkit_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .filter(|v| !v.is_empty())
        .map(|v| PathBuf::from(v).join("lib64"))
        .collect();
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs.dedup();
    dirs
}

/// The candidate files [`nvrtc`] tries, in order (see the [module documentation](self)).
pub fn nvrtc_candidates() -> Vec<String> {
    let mut names = Vec::new();
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
    for dir in loaded_wheel_dirs().into_iter().chain(toolkit_dirs()) {
        for n in NVRTC_NAMES {
            let f = dir.join(n);
            let f = f.to_string_lossy().into_owned();
            if Path::new(&f).is_file() && !names.contains(&f) {
                names.push(f);
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
            let loaded = unsafe { Nvrtc::load_from(&candidates) };
            if let Ok(n) = &loaded {
                match n.version() {
                    Ok((major, minor)) => tracing::info!(
                        "NVRTC {major}.{minor} loaded from {} (machine code: {})",
                        n.path(),
                        if n.has_cubin() { "yes" } else { "no, PTX only" }
                    ),
                    Err(e) => {
                        tracing::warn!("NVRTC loaded from {}: version unknown: {e}", n.path())
                    }
                }
            }
            loaded
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
        assert!(c.ends_with(&[
            "libnvrtc.so.13".to_string(),
            "libnvrtc.so.12".to_string(),
            "libnvrtc.so".to_string()
        ]));
        // Folder candidates are only listed when the file is there.
        for f in &c[..c.len() - NVRTC_NAMES.len()] {
            if std::env::var_os(NVRTC_ENV).is_none() {
                assert!(Path::new(f).is_file(), "{f}");
            }
        }
    }

    #[test]
    fn compiles_a_kernel_to_machine_code() {
        let Some(n) = loaded() else { return };
        if !n.has_cubin() {
            eprintln!("skipped: NVRTC {} has no nvrtcGetCUBIN", n.path());
            return;
        }
        let cubin = n
            .compile_cubin(KERNEL, "kvvm_fill.cu", &["--gpu-architecture=sm_80"])
            .unwrap();
        assert_eq!(&cubin[..4], b"\x7fELF");
        assert!(
            cubin.windows(9).any(|w| w == b"kvvm_fill"),
            "the entry point's name is in the cubin"
        );
        // A virtual architecture gives PTX only: no machine code, an error.
        assert!(n
            .compile_cubin(KERNEL, "kvvm_fill.cu", &["--gpu-architecture=compute_80"])
            .is_err());
    }
}

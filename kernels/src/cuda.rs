//! The CUDA C versions of the decode attention kernels, embedded in the crate and compiled to PTX
//! at run time with NVRTC (through `kvvm-sys`, which loads `libnvrtc` dynamically).
//!
//! - `decode_strided.cu`: `kvvm_decode_strided_{f16,bf16,f32}` over strided K/V views, with the same
//!   shape and stride parameters as [`KvView`](crate::KvView);
//! - `decode_paged.cu`: `kvvm_decode_paged_{f16,bf16,f32}` over a paged pool and block table.
//!
//! Both are prefixed with `common.cuh` (dtype loads, reductions and the per-group kernel body)
//! before compilation; no header is included, so NVRTC needs no include path. One thread block of
//! [`THREADS`] threads handles one (sequence, KV head) pair: grid `(kv_heads, batch)`.
//!
//! NVRTC (12 or 13) is found as `kvvm-sys` documents: `KVVM_NVRTC_PATH` (a file or a directory,
//! such as the `nvidia/cu13/lib` folder of the CUDA 13 wheels), NVIDIA wheels already loaded in
//! the process, the toolkit's `lib64`, then `libnvrtc.so.13` / `libnvrtc.so.12` / `libnvrtc.so`.
//!
//! [`compile_for_device`] prefers machine code (SASS, `nvrtcGetCUBIN`) for the device's exact
//! architecture, which loads on any driver of the same CUDA major version, and falls back to PTX
//! (which the driver compiles when loading) when NVRTC cannot produce machine code for it.

use crate::{DType, KernelError};

/// Device code shared by every source (prepended before compilation).
pub const COMMON: &str = include_str!("../cuda/common.cuh");

/// The CUDA sources: `(file name, text without the common prefix)`.
pub const SOURCES: &[(&str, &str)] = &[
    (
        "decode_strided.cu",
        include_str!("../cuda/decode_strided.cu"),
    ),
    ("decode_paged.cu", include_str!("../cuda/decode_paged.cu")),
];

/// The virtual architectures the sources are checked for: Ampere (A100) and Hopper (H100).
pub const ARCHS: &[&str] = &["compute_80", "compute_90"];

/// Threads per block the kernels are written for (`KVVM_THREADS`).
pub const THREADS: u32 = 128;
/// Largest GQA group (`q_heads / kv_heads`) the kernels support (`KVVM_MAX_GROUP`).
pub const MAX_GROUP: usize = 8;
/// Head dimensions the kernels support.
pub const HEAD_DIMS: &[usize] = &[32, 64, 128, 256];

/// Name of the strided entry point for `dtype`, e.g. `kvvm_decode_strided_f16`.
pub fn strided_entry(dtype: DType) -> String {
    format!("kvvm_decode_strided_{}", dtype.name())
}

/// Name of the paged entry point for `dtype`, e.g. `kvvm_decode_paged_bf16`.
pub fn paged_entry(dtype: DType) -> String {
    format!("kvvm_decode_paged_{}", dtype.name())
}

/// The full text NVRTC compiles for source `name` (common prefix + file), or `None` if unknown.
pub fn full_source(name: &str) -> Option<String> {
    SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, text)| format!("{COMMON}\n#line 1 \"{n}\"\n{text}"))
}

/// Normalizes `arch` (`compute_80`, `sm_80` or `80`) to a virtual architecture `compute_NN`.
///
/// # Errors
///
/// [`KernelError::InvalidParameter`] for anything else.
pub fn virtual_arch(arch: &str) -> Result<String, KernelError> {
    let digits = arch
        .strip_prefix("compute_")
        .or_else(|| arch.strip_prefix("sm_"))
        .unwrap_or(arch);
    let ok = !digits.is_empty()
        && digits.len() <= 4
        && digits
            .chars()
            .enumerate()
            .all(|(i, c)| c.is_ascii_digit() || (i > 0 && c == 'a'));
    if ok {
        Ok(format!("compute_{digits}"))
    } else {
        Err(KernelError::InvalidParameter(format!(
            "architecture {arch:?} is not compute_NN, sm_NN or NN"
        )))
    }
}

/// NVRTC options used for `arch` (a virtual architecture as [`virtual_arch`] returns).
pub fn compile_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
    ]
}

/// Compiles source `name` (one of [`SOURCES`]) to PTX for `arch`.
///
/// # Errors
///
/// [`KernelError::InvalidParameter`] for an unknown source or architecture;
/// [`KernelError::Nvrtc`] if NVRTC cannot be loaded or the compilation fails (with the log).
pub fn compile(name: &str, arch: &str) -> Result<String, KernelError> {
    let arch = virtual_arch(arch)?;
    let src = full_source(name)
        .ok_or_else(|| KernelError::InvalidParameter(format!("unknown CUDA source {name:?}")))?;
    let nvrtc = kvvm_sys::nvrtc::nvrtc().map_err(|source| KernelError::Nvrtc {
        program: "-".into(),
        arch: arch.clone(),
        source: Box::new(source),
    })?;
    let opts = compile_options(&arch);
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    nvrtc
        .compile_ptx(&src, name, &opts)
        .map_err(|source| KernelError::Nvrtc {
            program: name.to_string(),
            arch,
            source: Box::new(source),
        })
}

/// What [`compile_for_device`] produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CodeKind {
    /// Machine code (a cubin) for one real architecture.
    Sass,
    /// PTX, compiled by the driver when loaded.
    Ptx,
}

impl CodeKind {
    /// `"SASS"` or `"PTX"`.
    pub fn name(self) -> &'static str {
        match self {
            CodeKind::Sass => "SASS",
            CodeKind::Ptx => "PTX",
        }
    }
}

/// A module image for `cuModuleLoadData`.
#[derive(Clone, Debug)]
pub struct DeviceImage {
    /// Machine code or PTX.
    pub kind: CodeKind,
    /// The architecture compiled for: `sm_NN` (SASS) or `compute_NN` (PTX).
    pub target: String,
    /// The cubin, or the PTX text followed by a NUL byte.
    pub bytes: Vec<u8>,
}

/// Compiles source `name` (one of [`SOURCES`]) for a device of compute capability
/// `major.minor`: machine code for `sm_{major}{minor}` when NVRTC supports it, else PTX for
/// `compute_{major}{minor}`.
///
/// # Errors
///
/// [`KernelError::InvalidParameter`] for an unknown source; [`KernelError::Nvrtc`] if NVRTC
/// cannot be loaded or neither form compiles (the PTX attempt's error, with its log).
pub fn compile_for_device(name: &str, major: i32, minor: i32) -> Result<DeviceImage, KernelError> {
    let src = full_source(name)
        .ok_or_else(|| KernelError::InvalidParameter(format!("unknown CUDA source {name:?}")))?;
    let wrap = |arch: &str, source| KernelError::Nvrtc {
        program: name.to_string(),
        arch: arch.to_string(),
        source: Box::new(source),
    };
    let real = format!("sm_{major}{minor}");
    let nvrtc = kvvm_sys::nvrtc::nvrtc().map_err(|e| wrap(&real, e))?;
    if nvrtc.has_cubin() {
        let opts = compile_options(&real);
        let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
        match nvrtc.compile_cubin(&src, name, &opts) {
            Ok(bytes) => {
                return Ok(DeviceImage {
                    kind: CodeKind::Sass,
                    target: real,
                    bytes,
                })
            }
            Err(e) => tracing::warn!("{name}: no machine code for {real} ({e}); using PTX"),
        }
    }
    let virt = format!("compute_{major}{minor}");
    let ptx = compile(name, &virt)?;
    let mut bytes = ptx.into_bytes();
    bytes.push(0);
    Ok(DeviceImage {
        kind: CodeKind::Ptx,
        target: virt,
        bytes,
    })
}

/// Compiles every source in [`SOURCES`] to PTX for `arch` (`compute_80`, `compute_90`, `sm_90`,
/// `90`, ...); returns `(file name, PTX)` pairs in the order of [`SOURCES`].
///
/// # Errors
///
/// As [`compile`], for the first source that fails.
pub fn compile_all(arch: &str) -> Result<Vec<(String, String)>, KernelError> {
    SOURCES
        .iter()
        .map(|(name, _)| Ok((name.to_string(), compile(name, arch)?)))
        .collect()
}

/// Whether NVRTC can be loaded (for tests and tools that skip without it).
///
/// # Errors
///
/// The loading error, as a [`KernelError::Nvrtc`].
pub fn nvrtc_available() -> Result<(i32, i32), KernelError> {
    let wrap = |source| KernelError::Nvrtc {
        program: "-".into(),
        arch: "-".into(),
        source: Box::new(source),
    };
    kvvm_sys::nvrtc::nvrtc()
        .map_err(wrap)?
        .version()
        .map_err(wrap)
}

//! The enumerations passed as plain integers: element type, layout, backend, K/V, device type.

use kvvm::vmm::BackendKind;
use kvvm::{DType, Kv};

use crate::{kvvm_status, FfiError, FfiResult};

/// Element type codes for `kvvm_config::dtype` and `kvvm_view::dtype`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvvm_dtype {
    /// IEEE half precision.
    KVVM_DTYPE_F16 = 0,
    /// bfloat16.
    KVVM_DTYPE_BF16 = 1,
    /// IEEE single precision.
    KVVM_DTYPE_F32 = 2,
    /// 8-bit float E4M3 (finite, no infinities).
    KVVM_DTYPE_FP8_E4M3 = 3,
    /// 8-bit float E5M2.
    KVVM_DTYPE_FP8_E5M2 = 4,
}

/// Layout codes for `kvvm_config::layout`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvvm_layout {
    /// One buffer `[max_slots, max_tokens, layers, 2, kv_heads, head_dim]`.
    KVVM_LAYOUT_INTERLEAVED = 0,
    /// `2 × layers` buffers `[max_slots, max_tokens, kv_heads, head_dim]`.
    KVVM_LAYOUT_PER_LAYER = 1,
}

/// Backend codes for `kvvm_config::backend`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvvm_backend {
    /// CUDA if usable, else host (`KVVM_BACKEND=host|cuda` in the environment overrides it).
    KVVM_BACKEND_AUTO = 0,
    /// Linux host memory (memfd pages).
    KVVM_BACKEND_HOST = 1,
    /// CUDA virtual-memory management.
    KVVM_BACKEND_CUDA = 2,
}

/// Key/value selector codes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvvm_kv {
    /// Keys.
    KVVM_K = 0,
    /// Values.
    KVVM_V = 1,
}

/// Device type codes of `kvvm_view::device_type` (the DLPack values).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvvm_device_type {
    /// Host memory (`kDLCPU`).
    KVVM_DEVICE_CPU = 1,
    /// CUDA device memory (`kDLCUDA`).
    KVVM_DEVICE_CUDA = 2,
}

pub(crate) fn kv_from(kv: u32) -> FfiResult<Kv> {
    match kv {
        0 => Ok(Kv::K),
        1 => Ok(Kv::V),
        v => Err(FfiError::arg(format!(
            "kv must be KVVM_K (0) or KVVM_V (1), got {v}"
        ))),
    }
}

pub(crate) fn dtype_from(v: u32) -> FfiResult<DType> {
    Ok(match v {
        0 => DType::F16,
        1 => DType::Bf16,
        2 => DType::F32,
        3 => DType::Fp8E4M3,
        4 => DType::Fp8E5M2,
        v => {
            return Err(FfiError::new(
                kvvm_status::KVVM_STATUS_INVALID_CONFIG,
                format!("unknown dtype code {v}"),
            ))
        }
    })
}

/// The `kvvm_dtype` code of a dtype.
pub fn dtype_code(d: DType) -> u32 {
    match d {
        DType::F16 => 0,
        DType::Bf16 => 1,
        DType::F32 => 2,
        DType::Fp8E4M3 => 3,
        DType::Fp8E5M2 => 4,
    }
}

/// DLPack device type and id of a backend.
pub(crate) fn device_code(kind: BackendKind, ordinal: i32) -> (i32, i32) {
    match kind {
        BackendKind::Host => (kvvm_device_type::KVVM_DEVICE_CPU as i32, 0),
        BackendKind::Cuda => (kvvm_device_type::KVVM_DEVICE_CUDA as i32, ordinal),
    }
}

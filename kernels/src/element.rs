//! Element types of the KV cache: `f32`, `f16` and `bf16`.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// The element types of a KV cache, as a runtime value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE binary32.
    F32,
}

impl DType {
    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    /// Lower-case name: `f16`, `bf16` or `f32` (the suffix of the CUDA entry points).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = crate::KernelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "half" | "float16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f32" | "fp32" | "float" | "float32" => Ok(DType::F32),
            other => Err(crate::KernelError::InvalidParameter(format!(
                "unknown dtype {other:?} (expected f16, bf16 or f32)"
            ))),
        }
    }
}

/// An element type of the KV cache (sealed: `f32`, [`half::f16`], [`half::bf16`]).
///
/// Every bit pattern of these types is a valid value, and they have no padding, so buffers of them
/// may be viewed from raw (for example zero-filled, mapped) memory.
pub trait KvElement:
    Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + 'static + sealed::Sealed
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// A NaN of this type (used to poison unused parts of test buffers).
    const NAN: Self;

    /// Converts to `f32` (exact for all three types).
    fn to_f32(self) -> f32;

    /// Converts from `f32`, rounding to nearest even.
    fn from_f32(x: f32) -> Self;

    /// Converts to `f64` (exact).
    fn to_f64(self) -> f64 {
        f64::from(self.to_f32())
    }

    /// Returns `src` as `f32` values: `src` itself for `f32`, otherwise `src` converted into
    /// `buf[..src.len()]`.
    ///
    /// # Panics
    ///
    /// Panics if `buf` is shorter than `src` (internal use only; callers size `buf` by head_dim).
    fn row_to_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
}

impl KvElement for f32 {
    const DTYPE: DType = DType::F32;
    const NAN: Self = f32::NAN;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }

    #[inline(always)]
    fn row_to_f32<'a>(src: &'a [Self], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElement for f16 {
    const DTYPE: DType = DType::F16;
    const NAN: Self = f16::NAN;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }

    #[inline(always)]
    fn row_to_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        let dst = &mut buf[..src.len()];
        src.convert_to_f32_slice(dst);
        dst
    }
}

impl KvElement for bf16 {
    const DTYPE: DType = DType::BF16;
    const NAN: Self = bf16::NAN;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }

    #[inline(always)]
    fn row_to_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        let dst = &mut buf[..src.len()];
        // bf16 -> f32 is a 16-bit shift; this loop vectorizes.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
        dst
    }
}

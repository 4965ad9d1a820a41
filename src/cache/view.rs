//! Views of the cache: what a kernel, DLPack or the swap engine needs to address the KV.

use super::config::DType;
use crate::vmm::BackendKind;

/// Key or value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Kv {
    /// Keys.
    K,
    /// Values.
    V,
}

impl Kv {
    /// True for values.
    pub fn is_v(self) -> bool {
        self == Kv::V
    }
}

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Device {
    /// Host memory or a CUDA device.
    pub kind: BackendKind,
    /// CUDA device ordinal (0 on host).
    pub ordinal: i32,
}

/// A strided 4-D view `[max_slots, max_tokens, kv_heads, head_dim]` of one layer's K or V.
///
/// Strides are in elements. Only the tokens a slot has mapped may be read or written; the rest
/// of the range is reserved address space without memory behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct TensorView {
    /// Address of element `[0, 0, 0, 0]`.
    pub addr: u64,
    /// `[max_slots, max_tokens, kv_heads, head_dim]`.
    pub shape: [usize; 4],
    /// Element strides of each dimension.
    pub strides: [usize; 4],
    /// Element type.
    pub dtype: DType,
    /// Where the memory is.
    pub device: Device,
}

impl TensorView {
    /// Address of element `[slot, token, head, 0]`.
    pub fn row_addr(&self, slot: usize, token: usize, head: usize) -> u64 {
        self.addr
            + ((slot * self.strides[0] + token * self.strides[1] + head * self.strides[2])
                * self.dtype.size()) as u64
    }
}

/// A contiguous range of bytes in the cache's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ByteRange {
    /// First byte.
    pub addr: u64,
    /// Length.
    pub len: usize,
}

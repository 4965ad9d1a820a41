//! The crate's error type.

use thiserror::Error;

/// Everything that can go wrong in this crate. Bad input to a safe function is reported with one of
/// these values; no safe function panics on bad input.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KernelError {
    /// A buffer or argument does not have the length its shape implies.
    #[error("{what}: expected length {expected}, got {got}")]
    LengthMismatch {
        /// Which argument.
        what: &'static str,
        /// The length implied by the other arguments.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// Two shapes that must agree do not.
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// A dimension that must be positive is zero, or a parameter is out of its domain.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// The number of query heads is not a positive multiple of the number of KV heads.
    #[error("q_heads ({q_heads}) must be a positive multiple of kv_heads ({kv_heads})")]
    HeadsNotDivisible {
        /// Query heads.
        q_heads: usize,
        /// KV heads.
        kv_heads: usize,
    },
    /// The innermost (head_dim) stride of a view is not 1.
    #[error("the innermost stride must be 1, got {0}")]
    NonUnitInnerStride(usize),
    /// A view reaches past the end of its slice, or its offsets overflow `isize`.
    #[error("view out of bounds: needs {needed} elements, slice has {available}")]
    ViewOutOfBounds {
        /// Elements the view reaches (largest offset + 1), saturated on overflow.
        needed: usize,
        /// Elements available.
        available: usize,
    },
    /// A batch entry names a slot outside the view.
    #[error("batch entry {index}: slot {slot} out of range (max_slots {max_slots})")]
    SlotOutOfRange {
        /// Index in the batch.
        index: usize,
        /// The slot given.
        slot: usize,
        /// Slots in the view.
        max_slots: usize,
    },
    /// A batch entry's length is zero or larger than the view or block table allows.
    #[error("batch entry {index}: length {len} out of range 1..={max}")]
    LengthOutOfRange {
        /// Index in the batch.
        index: usize,
        /// The length given.
        len: usize,
        /// The largest length allowed.
        max: usize,
    },
    /// A block table entry names a block outside the pool.
    #[error("sequence {seq}, logical block {logical}: block id {block} out of range (num_blocks {num_blocks})")]
    BlockOutOfRange {
        /// Sequence (row of the block table).
        seq: usize,
        /// Logical block index within the sequence.
        logical: usize,
        /// The block id found.
        block: u32,
        /// Blocks in the pool.
        num_blocks: usize,
    },
    /// Allocating a buffer failed (for example an anonymous mapping).
    #[error("allocation of {bytes} bytes failed: {source}")]
    Alloc {
        /// Bytes requested.
        bytes: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// NVRTC could not be loaded or failed to compile a source.
    #[error("NVRTC, {program} for {arch}: {source}")]
    Nvrtc {
        /// The source file (e.g. `decode_strided.cu`), or `-` when loading failed.
        program: String,
        /// The virtual architecture (e.g. `compute_80`).
        arch: String,
        /// The error from `kvvm-sys` (with the compiler log for compile errors).
        #[source]
        source: Box<kvvm_sys::DriverError>,
    },
    /// A CUDA driver call failed (GPU launch path).
    #[error("CUDA: {0}")]
    Cuda(#[source] Box<kvvm_sys::DriverError>),
}

impl From<kvvm_sys::DriverError> for KernelError {
    fn from(e: kvvm_sys::DriverError) -> Self {
        KernelError::Cuda(Box::new(e))
    }
}

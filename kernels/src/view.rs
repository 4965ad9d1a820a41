//! Views of KV memory: strided 4-D tensor views (kvvm's contiguous layouts) and a vLLM-style paged
//! pool with a block table (the baseline).

use std::marker::PhantomData;

use crate::{KernelError, KvElement};

/// Largest offset + 1 reached by a view of `shape` through `strides`, or `None` on overflow.
/// An empty view (some dimension 0) reaches nothing and returns `Some(0)`.
fn extent(shape: [usize; 4], strides: [usize; 4]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    let mut last = 0usize;
    for (n, s) in shape.iter().zip(strides) {
        last = last.checked_add((n - 1).checked_mul(s)?)?;
    }
    let end = last.checked_add(1)?;
    // Offsets become pointer offsets: they must fit in isize.
    (end <= isize::MAX as usize).then_some(end)
}

/// A read-only 4-D view of one layer's K or V: shape `[max_slots, max_tokens, kv_heads, head_dim]`,
/// strides in elements `[s_slot, s_token, s_head, 1]`.
///
/// kvvm's per-layer layout gives strides `[max_tokens*H*D, H*D, D, 1]`; the interleaved layout
/// (`[max_slots, max_tokens, layers, 2, H, D]`) gives layer `l`'s K at `base + (2l)*H*D` and V at
/// `base + (2l+1)*H*D`, both with strides `[max_tokens*layers*2*H*D, layers*2*H*D, D, 1]`.
///
/// The lifetime `'a` ties a view made by [`KvView::from_slice`] to its slice; views made with the
/// unsafe [`KvView::new`] get whatever lifetime the caller promises.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a, T> {
    ptr: *const T,
    shape: [usize; 4],
    strides: [usize; 4],
    _marker: PhantomData<&'a [T]>,
}

// SAFETY: a KvView is a shared, read-only borrow of `T`s (like `&'a [T]`), so it may be sent to and
// shared between threads whenever `&[T]` may, i.e. when `T: Sync`.
unsafe impl<T: Sync> Send for KvView<'_, T> {}
// SAFETY: as above; the view never writes through its pointer.
unsafe impl<T: Sync> Sync for KvView<'_, T> {}

impl<'a, T: KvElement> KvView<'a, T> {
    /// Makes a view from a raw pointer (for example a kvvm cache view or device-mirrored host memory).
    ///
    /// # Errors
    ///
    /// [`KernelError::NonUnitInnerStride`] if `strides[3] != 1`; [`KernelError::ViewOutOfBounds`] if
    /// the largest offset overflows `isize`; [`KernelError::InvalidParameter`] if `ptr` is null or
    /// misaligned while the view is not empty.
    ///
    /// # Safety
    ///
    /// For the whole lifetime `'a`, every element at offset
    /// `i0*strides[0] + i1*strides[1] + i2*strides[2] + i3` from `ptr`, for every index `i < shape`,
    /// must lie in one allocation, be initialized, be valid for reads, and not be written by anyone
    /// (no other thread, no device, and not the output buffer of a kernel this view is passed to).
    pub unsafe fn new(
        ptr: *const T,
        shape: [usize; 4],
        strides: [usize; 4],
    ) -> Result<Self, KernelError> {
        if strides[3] != 1 {
            return Err(KernelError::NonUnitInnerStride(strides[3]));
        }
        let needed = extent(shape, strides).ok_or(KernelError::ViewOutOfBounds {
            needed: usize::MAX,
            available: isize::MAX as usize,
        })?;
        if needed > 0 && (ptr.is_null() || !ptr.is_aligned()) {
            return Err(KernelError::InvalidParameter(
                "view pointer is null or misaligned".into(),
            ));
        }
        Ok(Self {
            ptr,
            shape,
            strides,
            _marker: PhantomData,
        })
    }

    /// Makes a view of `data`, checking that every index in `shape` lands inside the slice.
    ///
    /// # Errors
    ///
    /// [`KernelError::NonUnitInnerStride`] if `strides[3] != 1`; [`KernelError::ViewOutOfBounds`] if
    /// the view reaches past the end of `data` or its offsets overflow.
    pub fn from_slice(
        data: &'a [T],
        shape: [usize; 4],
        strides: [usize; 4],
    ) -> Result<Self, KernelError> {
        if strides[3] != 1 {
            return Err(KernelError::NonUnitInnerStride(strides[3]));
        }
        let needed = extent(shape, strides).unwrap_or(usize::MAX);
        if needed > data.len() {
            return Err(KernelError::ViewOutOfBounds {
                needed,
                available: data.len(),
            });
        }
        // SAFETY: every in-bounds index lands inside `data` (checked above: largest offset + 1 <=
        // len), which is borrowed immutably for 'a, so it is valid for reads and not written.
        unsafe { Self::new(data.as_ptr(), shape, strides) }
    }

    /// K and V views of a per-layer buffer `[max_slots, max_tokens, kv_heads, head_dim]` each.
    ///
    /// # Errors
    ///
    /// As [`KvView::from_slice`], if either slice is too short.
    pub fn per_layer(
        k: &'a [T],
        v: &'a [T],
        max_slots: usize,
        max_tokens: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<(Self, Self), KernelError> {
        let shape = [max_slots, max_tokens, kv_heads, head_dim];
        let strides = per_layer_strides(max_tokens, kv_heads, head_dim)?;
        Ok((
            Self::from_slice(k, shape, strides)?,
            Self::from_slice(v, shape, strides)?,
        ))
    }

    /// K and V views of layer `layer` in an interleaved buffer
    /// `[max_slots, max_tokens, layers, 2, kv_heads, head_dim]`.
    ///
    /// # Errors
    ///
    /// [`KernelError::InvalidParameter`] if `layer >= layers`; as [`KvView::from_slice`] if the
    /// buffer is too short.
    pub fn interleaved(
        buf: &'a [T],
        max_slots: usize,
        max_tokens: usize,
        layers: usize,
        layer: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<(Self, Self), KernelError> {
        if layer >= layers {
            return Err(KernelError::InvalidParameter(format!(
                "layer {layer} out of range (layers {layers})"
            )));
        }
        let shape = [max_slots, max_tokens, kv_heads, head_dim];
        let strides = interleaved_strides(max_tokens, layers, kv_heads, head_dim)?;
        let hd = kv_heads * head_dim; // cannot overflow: interleaved_strides checked a multiple of it
        let k_off = 2 * layer * hd;
        let v_off = k_off + hd;
        let k = buf.get(k_off..).unwrap_or(&[]);
        let v = buf.get(v_off..).unwrap_or(&[]);
        Ok((
            Self::from_slice(k, shape, strides)?,
            Self::from_slice(v, shape, strides)?,
        ))
    }

    /// The shape `[max_slots, max_tokens, kv_heads, head_dim]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// The strides in elements `[s_slot, s_token, s_head, 1]`.
    pub fn strides(&self) -> [usize; 4] {
        self.strides
    }

    /// The base pointer.
    pub fn as_ptr(&self) -> *const T {
        self.ptr
    }

    /// The `head_dim` elements of (slot, token, head).
    ///
    /// # Panics
    ///
    /// Panics if an index is out of range (kernels validate their batch before calling this).
    #[inline(always)]
    pub fn row(&self, slot: usize, token: usize, head: usize) -> &'a [T] {
        assert!(
            slot < self.shape[0] && token < self.shape[1] && head < self.shape[2],
            "KvView::row index out of range"
        );
        let off = slot * self.strides[0] + token * self.strides[1] + head * self.strides[2];
        // SAFETY: the indices are in range (asserted above), so by the contract of `new` (checked
        // by `from_slice`) the `head_dim` elements starting at `off` lie in one allocation, are
        // initialized, and are not written during 'a; `off` fits in isize (checked by `new`).
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), self.shape[3]) }
    }

    /// The `head_dim` elements of (slot, token, head), without the range check.
    ///
    /// # Safety
    ///
    /// `slot < shape[0]`, `token < shape[1]` and `head < shape[2]`.
    #[inline(always)]
    pub(crate) unsafe fn row_unchecked(&self, slot: usize, token: usize, head: usize) -> &'a [T] {
        let off = slot * self.strides[0] + token * self.strides[1] + head * self.strides[2];
        // SAFETY: the caller guarantees the indices are in range, so by the contract of `new` the
        // `head_dim` elements at `off` are in one allocation, initialized and unwritten during 'a.
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), self.shape[3]) }
    }
}

/// Strides of kvvm's per-layer layout: `[max_tokens*H*D, H*D, D, 1]`.
///
/// # Errors
///
/// [`KernelError::InvalidParameter`] on overflow.
pub fn per_layer_strides(
    max_tokens: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<[usize; 4], KernelError> {
    let hd = kv_heads.checked_mul(head_dim);
    let tok = hd.and_then(|hd| hd.checked_mul(max_tokens));
    match (hd, tok) {
        (Some(hd), Some(tok)) => Ok([tok, hd, head_dim, 1]),
        _ => Err(KernelError::InvalidParameter(
            "per-layer strides overflow".into(),
        )),
    }
}

/// Strides of one layer's K (or V) in kvvm's interleaved layout:
/// `[max_tokens*layers*2*H*D, layers*2*H*D, D, 1]`.
///
/// # Errors
///
/// [`KernelError::InvalidParameter`] on overflow.
pub fn interleaved_strides(
    max_tokens: usize,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<[usize; 4], KernelError> {
    let tok = kv_heads
        .checked_mul(head_dim)
        .and_then(|x| x.checked_mul(2))
        .and_then(|x| x.checked_mul(layers));
    let slot = tok.and_then(|t| t.checked_mul(max_tokens));
    match (tok, slot) {
        (Some(tok), Some(slot)) => Ok([slot, tok, head_dim, 1]),
        _ => Err(KernelError::InvalidParameter(
            "interleaved strides overflow".into(),
        )),
    }
}

/// A vLLM-style paged KV pool for one layer: K and V each `[num_blocks, block_size, kv_heads,
/// head_dim]`, contiguous.
#[derive(Clone, Copy, Debug)]
pub struct PagedPool<'a, T> {
    k: &'a [T],
    v: &'a [T],
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    num_blocks: usize,
}

impl<'a, T: KvElement> PagedPool<'a, T> {
    /// Makes a pool view; `num_blocks` is `k.len() / (block_size*kv_heads*head_dim)`.
    ///
    /// # Errors
    ///
    /// [`KernelError::InvalidParameter`] if a dimension is zero or overflows;
    /// [`KernelError::LengthMismatch`] if the pools are not a whole number of blocks or differ in
    /// length.
    pub fn new(
        k: &'a [T],
        v: &'a [T],
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self, KernelError> {
        if block_size == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(KernelError::InvalidParameter(
                "block_size, kv_heads and head_dim must be positive".into(),
            ));
        }
        let block_elems = block_size
            .checked_mul(kv_heads)
            .and_then(|x| x.checked_mul(head_dim))
            .ok_or_else(|| KernelError::InvalidParameter("block size overflows".into()))?;
        let num_blocks = k.len() / block_elems;
        if k.len() != num_blocks * block_elems {
            return Err(KernelError::LengthMismatch {
                what: "paged K pool (whole blocks)",
                expected: num_blocks * block_elems,
                got: k.len(),
            });
        }
        if v.len() != k.len() {
            return Err(KernelError::LengthMismatch {
                what: "paged V pool",
                expected: k.len(),
                got: v.len(),
            });
        }
        Ok(Self {
            k,
            v,
            block_size,
            kv_heads,
            head_dim,
            num_blocks,
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// KV heads.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }
    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    /// The K pool.
    pub fn k(&self) -> &'a [T] {
        self.k
    }
    /// The V pool.
    pub fn v(&self) -> &'a [T] {
        self.v
    }

    #[inline(always)]
    fn offset(&self, block: usize, in_block: usize, head: usize) -> usize {
        ((block * self.block_size + in_block) * self.kv_heads + head) * self.head_dim
    }

    /// The K row of (block, position in block, head).
    ///
    /// # Panics
    ///
    /// Panics if out of range.
    #[inline(always)]
    pub fn k_row(&self, block: usize, in_block: usize, head: usize) -> &'a [T] {
        let o = self.offset(block, in_block, head);
        &self.k[o..o + self.head_dim]
    }

    /// The V row of (block, position in block, head).
    ///
    /// # Panics
    ///
    /// Panics if out of range.
    #[inline(always)]
    pub fn v_row(&self, block: usize, in_block: usize, head: usize) -> &'a [T] {
        let o = self.offset(block, in_block, head);
        &self.v[o..o + self.head_dim]
    }
}

/// A block table `[batch, max_blocks_per_seq]` of block ids, row-major.
#[derive(Clone, Copy, Debug)]
pub struct BlockTable<'a> {
    ids: &'a [u32],
    max_blocks_per_seq: usize,
}

impl<'a> BlockTable<'a> {
    /// Wraps a row-major table with `max_blocks_per_seq` entries per sequence.
    ///
    /// # Errors
    ///
    /// [`KernelError::InvalidParameter`] if `max_blocks_per_seq` is zero;
    /// [`KernelError::LengthMismatch`] if `ids` is not a whole number of rows.
    pub fn new(ids: &'a [u32], max_blocks_per_seq: usize) -> Result<Self, KernelError> {
        if max_blocks_per_seq == 0 {
            return Err(KernelError::InvalidParameter(
                "max_blocks_per_seq must be positive".into(),
            ));
        }
        let rows = ids.len() / max_blocks_per_seq;
        if rows * max_blocks_per_seq != ids.len() {
            return Err(KernelError::LengthMismatch {
                what: "block table (whole rows)",
                expected: rows * max_blocks_per_seq,
                got: ids.len(),
            });
        }
        Ok(Self {
            ids,
            max_blocks_per_seq,
        })
    }

    /// Number of rows (sequences).
    pub fn rows(&self) -> usize {
        self.ids.len() / self.max_blocks_per_seq
    }

    /// Entries per row.
    pub fn max_blocks_per_seq(&self) -> usize {
        self.max_blocks_per_seq
    }

    /// The raw ids.
    pub fn ids(&self) -> &'a [u32] {
        self.ids
    }

    /// Row `seq`.
    ///
    /// # Panics
    ///
    /// Panics if `seq >= rows()`.
    pub fn row(&self, seq: usize) -> &'a [u32] {
        &self.ids[seq * self.max_blocks_per_seq..(seq + 1) * self.max_blocks_per_seq]
    }
}

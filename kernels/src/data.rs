//! Test and benchmark data: one logical KV set, and the same data laid out in kvvm's per-layer and
//! interleaved layouts and in a vLLM-style paged pool with a shuffled block table.

use std::marker::PhantomData;

use memmap2::{MmapMut, MmapOptions};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::view::{interleaved_strides, per_layer_strides, BlockTable, KvView, PagedPool};
use crate::{KernelError, KvElement};

/// vLLM's default block size (tokens per block).
pub const VLLM_BLOCK_SIZE: usize = 16;

/// A logical KV set for one layer: for each sequence `i`, K and V as `[lens[i], kv_heads, head_dim]`
/// row-major.
#[derive(Clone, Debug)]
pub struct KvData<T> {
    /// KV heads.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Tokens of each sequence.
    pub lens: Vec<usize>,
    /// K of each sequence, `[lens[i], kv_heads, head_dim]`.
    pub k: Vec<Vec<T>>,
    /// V of each sequence, `[lens[i], kv_heads, head_dim]`.
    pub v: Vec<Vec<T>>,
}

impl<T: KvElement> KvData<T> {
    /// Random K and V, uniform in (-1, 1) and rounded to `T`, from a seeded generator.
    ///
    /// # Errors
    ///
    /// [`KernelError::InvalidParameter`] if `kv_heads` or `head_dim` is zero or sizes overflow.
    pub fn random(
        lens: &[usize],
        kv_heads: usize,
        head_dim: usize,
        seed: u64,
    ) -> Result<Self, KernelError> {
        if kv_heads == 0 || head_dim == 0 {
            return Err(KernelError::InvalidParameter(
                "kv_heads and head_dim must be positive".into(),
            ));
        }
        let row = kv_heads
            .checked_mul(head_dim)
            .ok_or_else(|| KernelError::InvalidParameter("kv_heads*head_dim overflows".into()))?;
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut gen = |len: usize| -> Result<Vec<T>, KernelError> {
            let n = len
                .checked_mul(row)
                .ok_or_else(|| KernelError::InvalidParameter("sequence size overflows".into()))?;
            Ok((0..n)
                .map(|_| T::from_f32(rng.gen_range(-1.0f32..1.0)))
                .collect())
        };
        let mut k = Vec::with_capacity(lens.len());
        let mut v = Vec::with_capacity(lens.len());
        for &len in lens {
            k.push(gen(len)?);
            v.push(gen(len)?);
        }
        Ok(Self {
            kv_heads,
            head_dim,
            lens: lens.to_vec(),
            k,
            v,
        })
    }

    /// Checks that every sequence's K and V have `lens[i]*kv_heads*head_dim` elements.
    ///
    /// # Errors
    ///
    /// [`KernelError::LengthMismatch`] or [`KernelError::ShapeMismatch`].
    pub fn check(&self) -> Result<(), KernelError> {
        if self.k.len() != self.lens.len() || self.v.len() != self.lens.len() {
            return Err(KernelError::ShapeMismatch(format!(
                "{} lengths but {} K and {} V sequences",
                self.lens.len(),
                self.k.len(),
                self.v.len()
            )));
        }
        let row = self.kv_heads.saturating_mul(self.head_dim);
        for (i, &len) in self.lens.iter().enumerate() {
            let expected = len.saturating_mul(row);
            for (what, buf) in [("K sequence", &self.k[i]), ("V sequence", &self.v[i])] {
                if buf.len() != expected {
                    return Err(KernelError::LengthMismatch {
                        what,
                        expected,
                        got: buf.len(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.lens.len()
    }

    /// Bytes of K and V that one decode step reads.
    pub fn bytes(&self) -> usize {
        self.lens.iter().sum::<usize>() * self.kv_heads * self.head_dim * 2 * T::DTYPE.size()
    }
}

/// Random queries `[batch, q_heads, head_dim]`, uniform in (-1, 1).
pub fn random_queries(batch: usize, q_heads: usize, head_dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..batch * q_heads * head_dim)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect()
}

/// How [`arrange`] lays the data out.
#[derive(Clone, Copy, Debug)]
pub struct ArrangeOptions {
    /// Layers of the interleaved buffer (its token stride is `layers*2*H*D`).
    pub layers: usize,
    /// The layer that holds the data; the others stay poisoned (NaN) or, if sparse, zero.
    pub layer: usize,
    /// Slots beyond the batch (unused, poisoned); sequences go to shuffled slots.
    pub extra_slots: usize,
    /// Tokens per slot beyond the longest sequence (unused, poisoned).
    pub extra_tokens: usize,
    /// Tokens per block of the paged pool.
    pub block_size: usize,
    /// Blocks in the pool beyond those needed (unused, poisoned).
    pub extra_blocks: usize,
    /// Allocate the interleaved buffer as a lazily backed anonymous mapping (only the touched
    /// layer's pages become resident) instead of a poisoned `Vec`.
    pub sparse_interleaved: bool,
    /// Seed for the slot and block shuffles.
    pub seed: u64,
}

impl Default for ArrangeOptions {
    fn default() -> Self {
        Self {
            layers: 3,
            layer: 1,
            extra_slots: 1,
            extra_tokens: 3,
            block_size: VLLM_BLOCK_SIZE,
            extra_blocks: 3,
            sparse_interleaved: false,
            seed: 0x5eed,
        }
    }
}

/// Element storage: a `Vec`, or an anonymous mapping whose untouched pages cost nothing.
enum Storage<T> {
    Vec(Vec<T>),
    Mmap {
        map: MmapMut,
        len: usize,
        _t: PhantomData<T>,
    },
}

impl<T: KvElement> Storage<T> {
    fn poisoned(len: usize) -> Self {
        Storage::Vec(vec![T::NAN; len])
    }

    fn zeroed_sparse(len: usize) -> Result<Self, KernelError> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| KernelError::InvalidParameter("buffer size overflows".into()))?;
        if bytes == 0 {
            return Ok(Storage::Vec(Vec::new()));
        }
        let map = MmapOptions::new()
            .len(bytes)
            .no_reserve_swap()
            .map_anon()
            .map_err(|source| KernelError::Alloc { bytes, source })?;
        Ok(Storage::Mmap {
            map,
            len,
            _t: PhantomData,
        })
    }

    fn as_slice(&self) -> &[T] {
        match self {
            Storage::Vec(v) => v,
            Storage::Mmap { map, len, .. } => {
                // SAFETY: the mapping is page-aligned (so aligned for T), `len * size_of::<T>()`
                // bytes long, zero-initialized by the kernel, and borrowed immutably with `self`;
                // T is f32/f16/bf16 (sealed), for which every bit pattern is valid.
                unsafe { std::slice::from_raw_parts(map.as_ptr().cast::<T>(), *len) }
            }
        }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        match self {
            Storage::Vec(v) => v,
            Storage::Mmap { map, len, .. } => {
                // SAFETY: as in `as_slice`, borrowed mutably with `self`.
                unsafe { std::slice::from_raw_parts_mut(map.as_mut_ptr().cast::<T>(), *len) }
            }
        }
    }
}

impl<T> std::fmt::Debug for Storage<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Vec(v) => write!(f, "Vec(len {})", v.len()),
            Storage::Mmap { len, .. } => write!(f, "Mmap(len {len})"),
        }
    }
}

/// One logical KV set in three arrangements. Build it with [`arrange`].
#[derive(Debug)]
pub struct Arranged<T> {
    kv_heads: usize,
    head_dim: usize,
    lens: Vec<usize>,
    slots: Vec<usize>,
    max_slots: usize,
    max_tokens: usize,
    per_layer_k: Vec<T>,
    per_layer_v: Vec<T>,
    layers: usize,
    layer: usize,
    interleaved: Storage<T>,
    block_size: usize,
    k_pool: Vec<T>,
    v_pool: Vec<T>,
    block_table: Vec<u32>,
    max_blocks_per_seq: usize,
}

/// Lays `data` out as (1) kvvm's per-layer buffers `[max_slots, max_tokens, H, D]` for K and V,
/// (2) an interleaved buffer `[max_slots, max_tokens, layers, 2, H, D]` with the data in
/// `opts.layer`, and (3) a paged pool `[num_blocks, block_size, H, D]` for K and V with a block
/// table whose block ids are shuffled. Sequences go to shuffled slots. Unused memory holds NaN (in
/// the sparse interleaved buffer: zero), so a kernel that reads outside the data shows it.
///
/// # Errors
///
/// [`KernelError::InvalidParameter`] for `layer >= layers`, a zero block size, an empty batch,
/// zero lengths, or sizes that overflow or do not fit `u32` block ids; errors of
/// [`KvData::check`]; [`KernelError::Alloc`] if the sparse mapping fails.
pub fn arrange<T: KvElement>(
    data: &KvData<T>,
    opts: &ArrangeOptions,
) -> Result<Arranged<T>, KernelError> {
    data.check()?;
    let bad = |m: &str| KernelError::InvalidParameter(m.to_string());
    if opts.layer >= opts.layers {
        return Err(bad("layer must be < layers"));
    }
    if opts.block_size == 0 {
        return Err(bad("block_size must be positive"));
    }
    if data.lens.is_empty() || data.lens.contains(&0) {
        return Err(bad("the batch must be non-empty with positive lengths"));
    }
    let (h, d) = (data.kv_heads, data.head_dim);
    let hd = h * d; // data.check() passed with these; overflow would have shown as a mismatch
    let batch = data.batch();
    let mut rng = SmallRng::seed_from_u64(opts.seed);

    let max_slots = batch
        .checked_add(opts.extra_slots)
        .ok_or_else(|| bad("slots overflow"))?;
    let longest = data.lens.iter().copied().max().unwrap_or(0);
    let max_tokens = longest
        .checked_add(opts.extra_tokens)
        .ok_or_else(|| bad("tokens overflow"))?;
    let mut all_slots: Vec<usize> = (0..max_slots).collect();
    all_slots.shuffle(&mut rng);
    let slots = all_slots[..batch].to_vec();

    // (1) per-layer
    let pl = per_layer_strides(max_tokens, h, d)?;
    let pl_len = max_slots
        .checked_mul(pl[0])
        .ok_or_else(|| bad("per-layer size overflows"))?;
    let mut per_layer_k = vec![T::NAN; pl_len];
    let mut per_layer_v = vec![T::NAN; pl_len];
    for (i, &slot) in slots.iter().enumerate() {
        let n = data.lens[i] * hd;
        per_layer_k[slot * pl[0]..][..n].copy_from_slice(&data.k[i]);
        per_layer_v[slot * pl[0]..][..n].copy_from_slice(&data.v[i]);
    }

    // (2) interleaved
    let il = interleaved_strides(max_tokens, opts.layers, h, d)?;
    let il_len = max_slots
        .checked_mul(il[0])
        .ok_or_else(|| bad("interleaved size overflows"))?;
    let mut interleaved = if opts.sparse_interleaved {
        Storage::zeroed_sparse(il_len)?
    } else {
        Storage::poisoned(il_len)
    };
    {
        let buf = interleaved.as_mut_slice();
        for (i, &slot) in slots.iter().enumerate() {
            for t in 0..data.lens[i] {
                let base = slot * il[0] + t * il[1] + 2 * opts.layer * hd;
                buf[base..][..hd].copy_from_slice(&data.k[i][t * hd..][..hd]);
                buf[base + hd..][..hd].copy_from_slice(&data.v[i][t * hd..][..hd]);
            }
        }
    }

    // (3) paged, shuffled block ids
    let bs = opts.block_size;
    let blocks_of: Vec<usize> = data.lens.iter().map(|l| l.div_ceil(bs)).collect();
    let needed: usize = blocks_of.iter().sum();
    let num_blocks = needed
        .checked_add(opts.extra_blocks)
        .ok_or_else(|| bad("blocks overflow"))?;
    if u32::try_from(num_blocks).is_err() {
        return Err(bad("too many blocks for u32 block ids"));
    }
    let max_blocks_per_seq = longest.div_ceil(bs);
    let block_elems = bs * hd;
    let pool_len = num_blocks
        .checked_mul(block_elems)
        .ok_or_else(|| bad("pool size overflows"))?;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(&mut rng);
    let mut next = ids.into_iter();
    let mut block_table = vec![0u32; batch * max_blocks_per_seq];
    let mut k_pool = vec![T::NAN; pool_len];
    let mut v_pool = vec![T::NAN; pool_len];
    for (i, &nb) in blocks_of.iter().enumerate() {
        for b in 0..nb {
            let id = next.next().ok_or_else(|| bad("ran out of blocks"))?;
            block_table[i * max_blocks_per_seq + b] = id;
            let first = b * bs;
            let n = (data.lens[i] - first).min(bs) * hd;
            let dst = id as usize * block_elems;
            k_pool[dst..][..n].copy_from_slice(&data.k[i][first * hd..][..n]);
            v_pool[dst..][..n].copy_from_slice(&data.v[i][first * hd..][..n]);
        }
    }

    Ok(Arranged {
        kv_heads: h,
        head_dim: d,
        lens: data.lens.clone(),
        slots,
        max_slots,
        max_tokens,
        per_layer_k,
        per_layer_v,
        layers: opts.layers,
        layer: opts.layer,
        interleaved,
        block_size: bs,
        k_pool,
        v_pool,
        block_table,
        max_blocks_per_seq,
    })
}

impl<T: KvElement> Arranged<T> {
    /// `(slot, len)` of each sequence, for the strided kernels.
    pub fn batch(&self) -> Vec<(usize, usize)> {
        self.slots
            .iter()
            .copied()
            .zip(self.lens.iter().copied())
            .collect()
    }

    /// Lengths of the sequences, for the paged kernel.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// `[max_slots, max_tokens, kv_heads, head_dim]` of the strided views.
    pub fn view_shape(&self) -> [usize; 4] {
        [
            self.max_slots,
            self.max_tokens,
            self.kv_heads,
            self.head_dim,
        ]
    }

    /// Layers of the interleaved buffer and the one holding the data.
    pub fn interleaved_layers(&self) -> (usize, usize) {
        (self.layers, self.layer)
    }

    /// The per-layer K and V buffers.
    pub fn per_layer_buffers(&self) -> (&[T], &[T]) {
        (&self.per_layer_k, &self.per_layer_v)
    }

    /// The whole interleaved buffer `[max_slots, max_tokens, layers, 2, H, D]`.
    pub fn interleaved_buffer(&self) -> &[T] {
        self.interleaved.as_slice()
    }

    /// The paged K and V pools `[num_blocks, block_size, H, D]` and the block table
    /// `[batch, max_blocks_per_seq]`.
    pub fn paged_buffers(&self) -> (&[T], &[T], &[u32]) {
        (&self.k_pool, &self.v_pool, &self.block_table)
    }

    /// K and V views of the per-layer buffers.
    ///
    /// # Errors
    ///
    /// None in practice (the buffers were sized for these views); see [`KvView::per_layer`].
    pub fn per_layer_views(&self) -> Result<(KvView<'_, T>, KvView<'_, T>), KernelError> {
        KvView::per_layer(
            &self.per_layer_k,
            &self.per_layer_v,
            self.max_slots,
            self.max_tokens,
            self.kv_heads,
            self.head_dim,
        )
    }

    /// K and V views of the data layer of the interleaved buffer.
    ///
    /// # Errors
    ///
    /// None in practice; see [`KvView::interleaved`].
    pub fn interleaved_views(&self) -> Result<(KvView<'_, T>, KvView<'_, T>), KernelError> {
        KvView::interleaved(
            self.interleaved.as_slice(),
            self.max_slots,
            self.max_tokens,
            self.layers,
            self.layer,
            self.kv_heads,
            self.head_dim,
        )
    }

    /// The paged pool and block table.
    ///
    /// # Errors
    ///
    /// None in practice; see [`PagedPool::new`] and [`BlockTable::new`].
    pub fn paged(&self) -> Result<(PagedPool<'_, T>, BlockTable<'_>), KernelError> {
        Ok((
            PagedPool::new(
                &self.k_pool,
                &self.v_pool,
                self.block_size,
                self.kv_heads,
                self.head_dim,
            )?,
            BlockTable::new(&self.block_table, self.max_blocks_per_seq)?,
        ))
    }
}

//! CPU decode attention: one new query token per sequence, grouped-query attention over the first
//! `len` tokens of each sequence, softmax in `f32` with max subtraction.
//!
//! Work is split across (sequence, KV head) pairs with rayon. Each task handles the whole GQA group
//! of query heads that share one KV head, so every K and V row is read (and converted to `f32`)
//! once per group. The inner loops (dot products, axpy, exp) are written over fixed-size chunks so
//! that the compiler vectorizes them; on x86-64 CPUs with AVX2/FMA/F16C a second copy of the kernel
//! compiled for those features is chosen at run time.

use rayon::prelude::*;

use crate::view::{BlockTable, KvView, PagedPool};
use crate::{KernelError, KvElement};

/// Parameters of a decode attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeParams {
    /// Query heads; a positive multiple of the KV heads. Query head `h` reads KV head
    /// `h / (q_heads / kv_heads)`.
    pub q_heads: usize,
    /// Softmax scale; `None` means `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Use the portable code path even where a SIMD-specialized one is available (for tests).
    pub portable: bool,
}

impl DecodeParams {
    /// `q_heads` query heads, default scale, fastest code path.
    pub fn new(q_heads: usize) -> Self {
        Self {
            q_heads,
            scale: None,
            portable: false,
        }
    }

    /// The scale used for `head_dim`: the explicit one, or `1/sqrt(head_dim)`.
    pub fn scale_for(&self, head_dim: usize) -> f32 {
        self.scale
            .unwrap_or_else(|| (1.0 / (head_dim as f64).sqrt()) as f32)
    }
}

/// Checks the parts common to both kernels; returns the GQA group size.
fn check_common(
    q: &[f32],
    out_len: usize,
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
    params: &DecodeParams,
) -> Result<usize, KernelError> {
    if head_dim == 0 || kv_heads == 0 {
        return Err(KernelError::InvalidParameter(
            "kv_heads and head_dim must be positive".into(),
        ));
    }
    if params.q_heads == 0 || params.q_heads % kv_heads != 0 {
        return Err(KernelError::HeadsNotDivisible {
            q_heads: params.q_heads,
            kv_heads,
        });
    }
    if let Some(s) = params.scale {
        if !s.is_finite() {
            return Err(KernelError::InvalidParameter(format!(
                "scale must be finite, got {s}"
            )));
        }
    }
    let expected = batch
        .checked_mul(params.q_heads)
        .and_then(|x| x.checked_mul(head_dim))
        .ok_or_else(|| KernelError::InvalidParameter("batch*q_heads*head_dim overflows".into()))?;
    if q.len() != expected {
        return Err(KernelError::LengthMismatch {
            what: "q [batch, q_heads, head_dim]",
            expected,
            got: q.len(),
        });
    }
    if out_len != expected {
        return Err(KernelError::LengthMismatch {
            what: "out [batch, q_heads, head_dim]",
            expected,
            got: out_len,
        });
    }
    Ok(params.q_heads / kv_heads)
}

/// Validates a strided call; returns the GQA group size.
pub(crate) fn check_strided(
    shape: [usize; 4],
    v_shape: [usize; 4],
    batch: &[(usize, usize)],
    q: &[f32],
    out_len: usize,
    params: &DecodeParams,
) -> Result<usize, KernelError> {
    if v_shape != shape {
        return Err(KernelError::ShapeMismatch(format!(
            "K view shape {:?} != V view shape {:?}",
            shape, v_shape
        )));
    }
    let [max_slots, max_tokens, kv_heads, head_dim] = shape;
    let g = check_common(q, out_len, batch.len(), kv_heads, head_dim, params)?;
    for (index, &(slot, len)) in batch.iter().enumerate() {
        if slot >= max_slots {
            return Err(KernelError::SlotOutOfRange {
                index,
                slot,
                max_slots,
            });
        }
        if len == 0 || len > max_tokens {
            return Err(KernelError::LengthOutOfRange {
                index,
                len,
                max: max_tokens,
            });
        }
    }
    Ok(g)
}

/// Decode attention over strided K/V views (kvvm's per-layer or interleaved layout).
///
/// `batch[i] = (slot, len)`: sequence `i` lives in `slot` of the views and attends to its tokens
/// `0..len`. `q` and `out` are `[batch.len(), q_heads, head_dim]`, row-major.
///
/// # Errors
///
/// [`KernelError::ShapeMismatch`] if K and V differ in shape; [`KernelError::HeadsNotDivisible`];
/// [`KernelError::LengthMismatch`] for `q`/`out`; [`KernelError::SlotOutOfRange`];
/// [`KernelError::LengthOutOfRange`] if a length is 0 or exceeds `max_tokens`;
/// [`KernelError::InvalidParameter`] for zero dimensions or a non-finite scale. Nothing is written
/// to `out` on error.
pub fn decode_attention_strided<T: KvElement>(
    k: &KvView<'_, T>,
    v: &KvView<'_, T>,
    batch: &[(usize, usize)],
    q: &[f32],
    params: &DecodeParams,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let g = check_strided(k.shape(), v.shape(), batch, q, out.len(), params)?;
    let [_, _, kv_heads, head_dim] = k.shape();
    let src = StridedSource { k, v, batch };
    run(&src, |i| batch[i].1, kv_heads, head_dim, g, q, params, out);
    Ok(())
}

/// Validates a paged call; returns the GQA group size.
pub(crate) fn check_paged<T: KvElement>(
    pool: &PagedPool<'_, T>,
    table: &BlockTable<'_>,
    lens: &[usize],
    q: &[f32],
    out_len: usize,
    params: &DecodeParams,
) -> Result<usize, KernelError> {
    let (kv_heads, head_dim) = (pool.kv_heads(), pool.head_dim());
    let g = check_common(q, out_len, lens.len(), kv_heads, head_dim, params)?;
    if table.rows() != lens.len() {
        return Err(KernelError::ShapeMismatch(format!(
            "block table has {} rows for a batch of {}",
            table.rows(),
            lens.len()
        )));
    }
    let bs = pool.block_size();
    let max = table.max_blocks_per_seq().saturating_mul(bs);
    for (index, &len) in lens.iter().enumerate() {
        if len == 0 || len > max {
            return Err(KernelError::LengthOutOfRange { index, len, max });
        }
        let row = table.row(index);
        for (logical, &block) in row[..len.div_ceil(bs)].iter().enumerate() {
            if block as usize >= pool.num_blocks() {
                return Err(KernelError::BlockOutOfRange {
                    seq: index,
                    logical,
                    block,
                    num_blocks: pool.num_blocks(),
                });
            }
        }
    }
    Ok(g)
}

/// Decode attention over a vLLM-style paged pool with a block table (the baseline).
///
/// Sequence `i` attends to its tokens `0..lens[i]`; token `t` lives in block
/// `table.row(i)[t / block_size]` at position `t % block_size`. `q` and `out` are
/// `[lens.len(), q_heads, head_dim]`, row-major.
///
/// # Errors
///
/// [`KernelError::ShapeMismatch`] if the table's row count differs from `lens.len()`;
/// [`KernelError::LengthOutOfRange`] if a length is 0 or exceeds the table's capacity;
/// [`KernelError::BlockOutOfRange`] if a needed block id is outside the pool; otherwise as
/// [`decode_attention_strided`]. Nothing is written to `out` on error.
pub fn decode_attention_paged<T: KvElement>(
    pool: &PagedPool<'_, T>,
    table: &BlockTable<'_>,
    lens: &[usize],
    q: &[f32],
    params: &DecodeParams,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let g = check_paged(pool, table, lens, q, out.len(), params)?;
    let (kv_heads, head_dim) = (pool.kv_heads(), pool.head_dim());
    let src = PagedSource { pool, table };
    run(&src, |i| lens[i], kv_heads, head_dim, g, q, params, out);
    Ok(())
}

/// Where the K and V rows of (sequence, token, KV head) are. Implementations are only built after
/// their batch was validated.
trait RowSource<T>: Sync {
    fn k_row(&self, seq: usize, token: usize, head: usize) -> &[T];
    fn v_row(&self, seq: usize, token: usize, head: usize) -> &[T];
}

struct StridedSource<'v, 'a, T> {
    k: &'v KvView<'a, T>,
    v: &'v KvView<'a, T>,
    batch: &'v [(usize, usize)],
}

impl<T: KvElement> RowSource<T> for StridedSource<'_, '_, T> {
    #[inline(always)]
    fn k_row(&self, seq: usize, token: usize, head: usize) -> &[T] {
        // SAFETY: `decode_attention_strided` checked slot < max_slots and len <= max_tokens for every
        // batch entry before building this source; the kernel only asks for token < len and
        // head < kv_heads (= shape[2]).
        unsafe { self.k.row_unchecked(self.batch[seq].0, token, head) }
    }

    #[inline(always)]
    fn v_row(&self, seq: usize, token: usize, head: usize) -> &[T] {
        // SAFETY: as for `k_row`; V has the same shape as K (checked).
        unsafe { self.v.row_unchecked(self.batch[seq].0, token, head) }
    }
}

struct PagedSource<'v, 'a, T> {
    pool: &'v PagedPool<'a, T>,
    table: &'v BlockTable<'a>,
}

impl<T: KvElement> RowSource<T> for PagedSource<'_, '_, T> {
    #[inline(always)]
    fn k_row(&self, seq: usize, token: usize, head: usize) -> &[T] {
        let bs = self.pool.block_size();
        let block = self.table.row(seq)[token / bs] as usize;
        self.pool.k_row(block, token % bs, head)
    }

    #[inline(always)]
    fn v_row(&self, seq: usize, token: usize, head: usize) -> &[T] {
        let bs = self.pool.block_size();
        let block = self.table.row(seq)[token / bs] as usize;
        self.pool.v_row(block, token % bs, head)
    }
}

/// One task: a sequence and a range of KV heads, with the GQA groups of query heads that share
/// them.
struct Group<'s, S> {
    src: &'s S,
    seq: usize,
    /// First KV head.
    head: usize,
    /// KV heads in the range.
    heads: usize,
    len: usize,
    /// `[heads * g, head_dim]` queries of the range.
    q: &'s [f32],
    g: usize,
    d: usize,
    scale: f32,
    portable: bool,
}

/// KV heads per task: all of a sequence's heads (so that each task streams whole token rows) unless
/// the batch is too small to keep every thread busy, then the smallest split that does.
fn heads_per_task(batch: usize, kv_heads: usize) -> usize {
    let want_tasks = 4 * rayon::current_num_threads();
    let splits = want_tasks.div_ceil(batch.max(1)).clamp(1, kv_heads);
    let parts = (splits..=kv_heads)
        .find(|p| kv_heads % p == 0)
        .unwrap_or(kv_heads);
    kv_heads / parts
}

#[allow(clippy::too_many_arguments)]
fn run<T: KvElement, S: RowSource<T>>(
    src: &S,
    len_of: impl Fn(usize) -> usize + Sync,
    kv_heads: usize,
    head_dim: usize,
    g: usize,
    q: &[f32],
    params: &DecodeParams,
    out: &mut [f32],
) {
    let batch = out.len() / (kv_heads * g * head_dim);
    let nh = heads_per_task(batch, kv_heads);
    let parts = kv_heads / nh;
    let chunk = nh * g * head_dim;
    let scale = params.scale_for(head_dim);
    let portable = params.portable;
    out.par_chunks_mut(chunk)
        .zip(q.par_chunks(chunk))
        .enumerate()
        .with_max_len(1)
        .for_each(|(i, (o, qg))| {
            let seq = i / parts;
            let task = Group {
                src,
                seq,
                head: (i % parts) * nh,
                heads: nh,
                len: len_of(seq),
                q: qg,
                g,
                d: head_dim,
                scale,
                portable,
            };
            attend_group(&task, o);
        });
}

fn attend_group<T: KvElement, S: RowSource<T>>(task: &Group<'_, S>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if !task.portable {
            if let Some(ops) = x86::Avx2::detect() {
                // SAFETY: `detect` returned a token, so the CPU supports avx2, fma and f16c.
                unsafe { attend_group_avx2(task, out, ops) };
                return;
            }
        }
    }
    attend_group_body(task, out, Portable);
}

/// The same body compiled with AVX2/FMA/F16C enabled, using explicit SIMD for the inner loops.
///
/// # Safety
///
/// The CPU must support avx2, fma and f16c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_group_avx2<T: KvElement, S: RowSource<T>>(
    task: &Group<'_, S>,
    out: &mut [f32],
    ops: x86::Avx2,
) {
    attend_group_body(task, out, ops);
}

/// The inner loops, in a portable and an x86 SIMD version.
trait Ops: Copy {
    /// `a · b` over `min(len)` elements.
    fn dot(self, a: &[f32], b: &[f32]) -> f32;
    /// `y += a * x`.
    fn axpy(self, y: &mut [f32], a: f32, x: &[f32]);
    /// `src` as f32 (converted into `buf` unless `T` is f32).
    fn row_to_f32<'a, T: KvElement>(self, src: &'a [T], buf: &'a mut [f32]) -> &'a [f32];
}

#[derive(Clone, Copy)]
struct Portable;

impl Ops for Portable {
    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
    #[inline(always)]
    fn axpy(self, y: &mut [f32], a: f32, x: &[f32]) {
        axpy(y, a, x);
    }
    #[inline(always)]
    fn row_to_f32<'a, T: KvElement>(self, src: &'a [T], buf: &'a mut [f32]) -> &'a [f32] {
        T::row_to_f32(src, buf)
    }
}

#[inline(always)]
fn attend_group_body<T: KvElement, S: RowSource<T>, O: Ops>(
    task: &Group<'_, S>,
    out: &mut [f32],
    ops: O,
) {
    let Group {
        src,
        seq,
        head,
        heads,
        len,
        q,
        g,
        d,
        scale,
        ..
    } = *task;
    let qs: Vec<f32> = q.iter().map(|x| x * scale).collect();
    // scores[(hh * g + j) * len + t]: query head j of KV head `head + hh`, token t.
    let mut scores = vec![0f32; heads * g * len];
    let mut buf = vec![0f32; d];

    // Scores. The token loop is outermost so that each task streams whole token rows (all of its
    // KV heads, adjacent in memory); each K row is converted once for its GQA group.
    for t in 0..len {
        for hh in 0..heads {
            let row = ops.row_to_f32(src.k_row(seq, t, head + hh), &mut buf);
            for j in 0..g {
                let qh = hh * g + j;
                scores[qh * len + t] = ops.dot(&qs[qh * d..(qh + 1) * d], row);
            }
        }
    }

    // Softmax per query head, with max subtraction.
    let mut inv_sum = vec![0f32; heads * g];
    for (qh, s) in scores.chunks_exact_mut(len).enumerate() {
        let m = max(s);
        for x in s.iter_mut() {
            *x = exp_nonpos(*x - m);
        }
        inv_sum[qh] = 1.0 / sum(s);
    }

    // Weighted sum of V rows, each converted once for its group.
    out.fill(0.0);
    for t in 0..len {
        for hh in 0..heads {
            let row = ops.row_to_f32(src.v_row(seq, t, head + hh), &mut buf);
            for j in 0..g {
                let qh = hh * g + j;
                ops.axpy(&mut out[qh * d..(qh + 1) * d], scores[qh * len + t], row);
            }
        }
    }
    for (oh, inv) in out.chunks_exact_mut(d).zip(&inv_sum) {
        for x in oh.iter_mut() {
            *x *= inv;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Ops;
    use crate::{DType, KvElement};

    /// Proof that the CPU supports avx2, fma and f16c: only [`Avx2::detect`] makes one.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2 {
        _private: (),
    }

    impl Avx2 {
        pub(super) fn detect() -> Option<Self> {
            (is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c"))
            .then_some(Avx2 { _private: () })
        }
    }

    impl Ops for Avx2 {
        #[inline(always)]
        fn dot(self, a: &[f32], b: &[f32]) -> f32 {
            // SAFETY: an `Avx2` token exists only when the features were detected.
            unsafe { dot(a, b) }
        }

        #[inline(always)]
        fn axpy(self, y: &mut [f32], a: f32, x: &[f32]) {
            // SAFETY: as above.
            unsafe { axpy(y, a, x) }
        }

        #[inline(always)]
        fn row_to_f32<'a, T: KvElement>(self, src: &'a [T], buf: &'a mut [f32]) -> &'a [f32] {
            match T::DTYPE {
                DType::F32 => T::row_to_f32(src, buf),
                DType::F16 | DType::BF16 => {
                    let dst = &mut buf[..src.len()];
                    // SAFETY: T is f16 or bf16 (sealed KvElement with these tags), both
                    // `repr(transparent)` over u16, so the slice may be viewed as u16s.
                    let bits = unsafe {
                        std::slice::from_raw_parts(src.as_ptr().cast::<u16>(), src.len())
                    };
                    // SAFETY: the token proves avx2/f16c support.
                    unsafe {
                        if T::DTYPE == DType::F16 {
                            f16_to_f32(bits, dst);
                        } else {
                            bf16_to_f32(bits, dst);
                        }
                    }
                    dst
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads [i, i+8) with i + 8 <= n (or i + 32 <= n), inside
        // both slices.
        unsafe {
            while i + 32 <= n {
                for (j, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(pa.add(i + 8 * j));
                    let y = _mm256_loadu_ps(pb.add(i + 8 * j));
                    *acc = _mm256_fmadd_ps(x, y, *acc);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i)),
                    _mm256_loadu_ps(pb.add(i)),
                    acc[0],
                );
                i += 8;
            }
            let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
            let mut total = _mm_cvtss_f32(s1);
            while i < n {
                total += *pa.add(i) * *pb.add(i);
                i += 1;
            }
            total
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        let mut i = 0;
        // SAFETY: every access is at an index < n, inside both slices; `y` is
        // borrowed exclusively.
        unsafe {
            let va = _mm256_set1_ps(a);
            while i + 8 <= n {
                let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
                _mm256_storeu_ps(py.add(i), r);
                i += 8;
            }
            while i < n {
                *py.add(i) += a * *px.add(i);
                i += 1;
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        // SAFETY: 8-element loads and stores at i + 8 <= n, inside both slices.
        unsafe {
            while i + 8 <= n {
                let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
                i += 8;
            }
        }
        for (d, s) in dst[i..n].iter_mut().zip(&src[i..n]) {
            *d = half::f16::from_bits(*s).to_f32();
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        // SAFETY: 8-element loads and stores at i + 8 <= n, inside both slices.
        unsafe {
            while i + 8 <= n {
                let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
                let w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_castsi256_ps(w));
                i += 8;
            }
        }
        for (d, s) in dst[i..n].iter_mut().zip(&src[i..n]) {
            *d = f32::from_bits(u32::from(*s) << 16);
        }
    }
}

const LANES: usize = 32;

/// Dot product with `LANES` independent accumulators (vectorizes; order differs from a plain loop).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for j in 0..LANES {
            acc[j] += x[j] * y[j];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    reduce(acc) + tail
}

/// Sum with `LANES` independent accumulators.
#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder();
    for x in chunks {
        for j in 0..LANES {
            acc[j] += x[j];
        }
    }
    let mut tail = 0f32;
    for x in rest {
        tail += x;
    }
    reduce(acc) + tail
}

/// Maximum (NaN inputs are skipped here but propagate through `exp_nonpos`).
#[inline(always)]
fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder();
    for x in chunks {
        for j in 0..LANES {
            acc[j] = if x[j] > acc[j] { x[j] } else { acc[j] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in acc.iter().chain(rest) {
        m = if x > m { x } else { m };
    }
    m
}

#[inline(always)]
fn reduce(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for j in 0..w {
            acc[j] += acc[j + w];
        }
        w /= 2;
    }
    acc[0]
}

/// `y += a * x`.
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `exp(x)` for `x <= 0` (softmax after max subtraction), vectorizable: Cephes' `expf` polynomial
/// with round-to-nearest by the 1.5·2²³ trick. Relative error below 3e-7; inputs below -87 give
/// `exp(-87)` (≈1.6e-38) instead of a smaller value; NaN propagates.
#[inline(always)]
pub(crate) fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = if x < -87.0 { -87.0 } else { x };
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * C1 - n * C2;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * (r * r) + r + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    y * f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_nonpos_is_accurate() {
        let mut worst = 0f64;
        let mut x = 0f32;
        while x > -87.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_nonpos(x));
            worst = worst.max(((got - want) / want).abs());
            x -= 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert!(exp_nonpos(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_nonpos(f32::NAN).is_nan());
    }

    #[test]
    fn dot_sum_max_match_naive() {
        for n in [1usize, 7, 31, 32, 33, 64, 100, 128] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let d: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
            assert!((f64::from(dot(&a, &b)) - d).abs() < 1e-5);
            let s: f64 = a.iter().map(|&x| f64::from(x)).sum();
            assert!((f64::from(sum(&a)) - s).abs() < 1e-5);
            let m = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&a), m);
        }
    }
}

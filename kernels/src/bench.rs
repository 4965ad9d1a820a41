//! The decode attention benchmark: kvvm's contiguous layouts against the paged baseline.

use std::time::Instant;

use half::{bf16, f16};

use crate::data::{arrange, random_queries, ArrangeOptions, Arranged, KvData, VLLM_BLOCK_SIZE};
use crate::{
    decode_attention_paged, decode_attention_strided, DType, DecodeParams, KernelError, KvElement,
};

/// What [`bench_attention`] measures. The defaults are Llama-3-8B's attention shapes at batch 32 ×
/// context 2048 in `f16`.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct BenchConfig {
    /// Sequences per decode step.
    pub batch: usize,
    /// Context tokens per sequence.
    pub context: usize,
    /// Query heads.
    pub q_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Element type of K and V.
    pub dtype: DType,
    /// Layers of the interleaved buffer (sets its token stride); allocated sparsely.
    pub layers: usize,
    /// Untimed iterations before measuring.
    pub warmup: usize,
    /// Timed iterations; the report gives their median.
    pub iters: usize,
    /// Seed of the random data.
    pub seed: u64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            batch: 32,
            context: 2048,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            dtype: DType::F16,
            layers: 32,
            warmup: 2,
            iters: 9,
            seed: 42,
        }
    }
}

/// Result of [`bench_attention`]: median µs per decode step (one layer) for each arrangement.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    /// The configuration measured.
    pub config: BenchConfig,
    /// rayon worker threads used.
    pub threads: usize,
    /// Bytes of K and V read per step.
    pub kv_bytes: usize,
    /// kvvm per-layer layout, strided views.
    pub per_layer_us: f64,
    /// kvvm interleaved layout, strided views with token stride `layers*2*H*D`.
    pub interleaved_us: f64,
    /// vLLM-style paged pool (16-token blocks, shuffled block table).
    pub paged_us: f64,
    /// `paged_us / per_layer_us` (> 1: the contiguous layout is faster).
    pub paged_over_per_layer: f64,
    /// `paged_us / interleaved_us`.
    pub paged_over_interleaved: f64,
    /// Effective K/V read bandwidth of the per-layer kernel, GB/s.
    pub per_layer_gbps: f64,
    /// Whether the three arrangements produced bit-identical outputs (they should).
    pub outputs_identical: bool,
}

/// Runs the decode attention benchmark on the CPU: builds one random KV set in the three
/// arrangements (the interleaved one as a lazily backed mapping with `layers` layers, of which one
/// is touched) and times one decode step over each.
///
/// # Errors
///
/// [`KernelError::InvalidParameter`] for zero sizes or inconsistent heads;
/// [`KernelError::Alloc`] if the interleaved mapping cannot be made.
pub fn bench_attention(cfg: &BenchConfig) -> Result<BenchReport, KernelError> {
    match cfg.dtype {
        DType::F16 => bench_typed::<f16>(cfg),
        DType::BF16 => bench_typed::<bf16>(cfg),
        DType::F32 => bench_typed::<f32>(cfg),
    }
}

/// Times the closures round-robin: `warmup` untimed rounds, then `iters` timed rounds, each
/// running every closure once, so that drift in the machine's load (a shared machine) affects
/// every arrangement alike. Returns the median µs of each closure.
fn median_us_interleaved<const N: usize>(
    warmup: usize,
    iters: usize,
    fs: &mut [&mut dyn FnMut() -> Result<(), KernelError>; N],
) -> Result<[f64; N], KernelError> {
    for _ in 0..warmup {
        for f in fs.iter_mut() {
            f()?;
        }
    }
    let mut times: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(iters));
    for _ in 0..iters.max(1) {
        for (f, t) in fs.iter_mut().zip(times.iter_mut()) {
            let t0 = Instant::now();
            f()?;
            t.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(times.map(|mut t| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    }))
}

/// The benchmark's inputs, the same for every arrangement and every device: random K/V for
/// `batch` sequences of `context` tokens arranged per-layer, interleaved and paged, random
/// queries, and the decode parameters.
#[derive(Debug)]
pub struct BenchInputs<T: KvElement> {
    /// The K/V data in the three arrangements.
    pub arranged: Arranged<T>,
    /// Queries, `[batch, q_heads, head_dim]`, in f32.
    pub q: Vec<f32>,
    /// Decode parameters (query heads, scale).
    pub params: DecodeParams,
    /// Bytes of K and V read by one decode step.
    pub kv_bytes: usize,
}

/// Builds the inputs of [`bench_attention`] (and of its GPU counterpart in the `kvvm` CLI).
///
/// # Errors
/// [`KernelError::InvalidParameter`] for a zero batch, context or layer count, or shapes the
/// arrangement rejects.
pub fn bench_inputs<T: KvElement>(cfg: &BenchConfig) -> Result<BenchInputs<T>, KernelError> {
    if cfg.batch == 0 || cfg.context == 0 || cfg.layers == 0 {
        return Err(KernelError::InvalidParameter(
            "batch, context and layers must be positive".into(),
        ));
    }
    let lens = vec![cfg.context; cfg.batch];
    let data = KvData::<T>::random(&lens, cfg.kv_heads, cfg.head_dim, cfg.seed)?;
    let kv_bytes = data.bytes();
    let opts = ArrangeOptions {
        layers: cfg.layers,
        layer: cfg.layers / 2,
        extra_slots: 0,
        extra_tokens: 0,
        block_size: VLLM_BLOCK_SIZE,
        extra_blocks: 0,
        sparse_interleaved: true,
        seed: cfg.seed ^ 0x9e37_79b9,
    };
    let arranged = arrange(&data, &opts)?;
    let q = random_queries(
        cfg.batch,
        cfg.q_heads,
        cfg.head_dim,
        cfg.seed.wrapping_add(1),
    );
    Ok(BenchInputs {
        arranged,
        q,
        params: DecodeParams::new(cfg.q_heads),
        kv_bytes,
    })
}

fn bench_typed<T: KvElement>(cfg: &BenchConfig) -> Result<BenchReport, KernelError> {
    let BenchInputs {
        arranged,
        q,
        params,
        kv_bytes,
    } = bench_inputs::<T>(cfg)?;
    let n = q.len();
    let batch = arranged.batch();

    let (kp, vp) = arranged.per_layer_views()?;
    let (ki, vi) = arranged.interleaved_views()?;
    let (pool, table) = arranged.paged()?;
    let mut out_pl = vec![0f32; n];
    let mut out_il = vec![0f32; n];
    let mut out_pg = vec![0f32; n];
    let [per_layer_us, interleaved_us, paged_us] = median_us_interleaved(
        cfg.warmup,
        cfg.iters,
        &mut [
            &mut || decode_attention_strided(&kp, &vp, &batch, &q, &params, &mut out_pl),
            &mut || decode_attention_strided(&ki, &vi, &batch, &q, &params, &mut out_il),
            &mut || {
                decode_attention_paged(&pool, &table, arranged.lens(), &q, &params, &mut out_pg)
            },
        ],
    )?;

    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    Ok(BenchReport {
        config: *cfg,
        threads: rayon::current_num_threads(),
        kv_bytes,
        per_layer_us,
        interleaved_us,
        paged_us,
        paged_over_per_layer: paged_us / per_layer_us,
        paged_over_interleaved: paged_us / interleaved_us,
        per_layer_gbps: kv_bytes as f64 / per_layer_us / 1e3,
        outputs_identical: same(&out_pl, &out_il) && same(&out_pl, &out_pg),
    })
}

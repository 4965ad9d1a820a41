//! `kvvm bench attention`: one decode step of attention over the same KV data arranged three
//! ways — kvvm's contiguous per-layer layout, kvvm's interleaved layout (large token stride), and
//! a vLLM-style paged pool (16-token blocks behind a shuffled block table, the baseline) — on the
//! host CPU (`kvvm_kernels::bench_attention`) or, with the CUDA backend, on the GPU through the
//! NVRTC-compiled kernels of `kvvm_kernels::gpu`.

use std::time::Instant;

use clap::Args;
use kvvm::vmm::{BackendChoice, BackendKind};
use kvvm::{Error, Result};
use kvvm_kernels::gpu::{
    launch_paged, launch_strided, DeviceBuffer, DevicePod, DeviceView, GpuKernels, PagedLaunch,
    StridedLaunch,
};
use kvvm_kernels::view::{interleaved_strides, per_layer_strides};
use kvvm_kernels::{
    bench_attention, bench_inputs, BenchConfig, BenchInputs, DType, KernelError, KvElement,
};

use crate::BackendArgs;

/// Options of `kvvm bench attention`. The defaults are Llama-3-8B's attention shapes (32 query
/// heads, 8 KV heads, head_dim 128, 32 layers) at batch 32 × context 2048 in f16.
#[derive(Args, Debug)]
pub struct AttentionArgs {
    /// Sequences per decode step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Context tokens per sequence.
    #[arg(long, default_value_t = 2048)]
    context: usize,
    /// Element type of K and V: f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    dtype: String,
    /// Query heads.
    #[arg(long, default_value_t = 32)]
    q_heads: usize,
    /// KV heads.
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    /// Elements per head.
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Layers of the interleaved buffer (sets its token stride).
    #[arg(long, default_value_t = 32)]
    layers: usize,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 9)]
    iters: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Seed of the random K, V and queries.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    backend: BackendArgs,
}

/// What both paths report (the keys of the JSON output).
#[derive(Debug, serde::Serialize)]
struct Report {
    device: String,
    batch: usize,
    context: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    layers: usize,
    dtype: String,
    iters: usize,
    kv_bytes: usize,
    per_layer_us: f64,
    interleaved_us: f64,
    paged_us: f64,
    paged_over_per_layer: f64,
    paged_over_interleaved: f64,
    per_layer_gbps: f64,
    outputs_identical: bool,
}

fn kernel_error(e: KernelError) -> Error {
    match e {
        KernelError::InvalidParameter(_)
        | KernelError::HeadsNotDivisible { .. }
        | KernelError::LengthMismatch { .. }
        | KernelError::ShapeMismatch(_) => Error::InvalidArgument(e.to_string()),
        other => Error::Unsupported(format!("attention kernels: {other}")),
    }
}

pub fn run(a: AttentionArgs) -> Result<()> {
    let dtype: DType = a.dtype.parse().map_err(kernel_error)?;
    let cfg = BenchConfig {
        batch: a.batch,
        context: a.context,
        q_heads: a.q_heads,
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        dtype,
        layers: a.layers,
        warmup: a.warmup,
        iters: a.iters.max(1),
        seed: a.seed,
    };
    let report = if use_gpu(&a.backend)? {
        let kernels = GpuKernels::load(a.backend.device).map_err(|e| {
            Error::Unsupported(format!(
                "the CUDA attention kernels cannot run on device {}: {e}",
                a.backend.device
            ))
        })?;
        let name = format!("cuda:{} ({})", a.backend.device, kernels.arch());
        match dtype {
            DType::F16 => gpu_bench::<kvvm_kernels::f16>(&kernels, &cfg, name)?,
            DType::BF16 => gpu_bench::<kvvm_kernels::bf16>(&kernels, &cfg, name)?,
            DType::F32 => gpu_bench::<f32>(&kernels, &cfg, name)?,
        }
    } else {
        // K and V of every layer, in three arrangements, in host memory.
        let kv = [a.layers, a.batch, a.context, a.kv_heads, a.head_dim, 2, 3]
            .iter()
            .try_fold(dtype.size() as u64, |acc, &v| acc.checked_mul(v as u64));
        crate::check_host_memory("bench attention", kv)?;
        let r = bench_attention(&cfg).map_err(kernel_error)?;
        Report {
            device: format!("cpu ({} threads)", r.threads),
            batch: cfg.batch,
            context: cfg.context,
            q_heads: cfg.q_heads,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            layers: cfg.layers,
            dtype: dtype.to_string(),
            iters: cfg.iters,
            kv_bytes: r.kv_bytes,
            per_layer_us: r.per_layer_us,
            interleaved_us: r.interleaved_us,
            paged_us: r.paged_us,
            paged_over_per_layer: r.paged_over_per_layer,
            paged_over_interleaved: r.paged_over_interleaved,
            per_layer_gbps: r.per_layer_gbps,
            outputs_identical: r.outputs_identical,
        }
    };
    print_report(&report, a.json)
}

/// CUDA for `--backend cuda`; for `auto`, CUDA when `KVVM_BACKEND` says so or the driver opens.
fn use_gpu(b: &BackendArgs) -> Result<bool> {
    match b.backend {
        BackendChoice::Host => Ok(false),
        BackendChoice::Cuda => Ok(true),
        _ => Ok(kvvm::vmm::open(&b.config())?.kind() == BackendKind::Cuda),
    }
}

fn print_report(r: &Report, json: bool) -> Result<()> {
    if json {
        let v = serde_json::to_string(r)
            .map_err(|e| Error::InvalidArgument(format!("serializing the report: {e}")))?;
        println!("{v}");
        return Ok(());
    }
    println!(
        "bench attention: one decode step (one layer), batch {} x context {}, {} q heads / {} kv heads x {}, {}, on {}, median of {}",
        r.batch, r.context, r.q_heads, r.kv_heads, r.head_dim, r.dtype, r.device, r.iters
    );
    println!(
        "  {:<34} {:>12} {:>10} {:>14}",
        "arrangement", "us/step", "GB/s", "paged / this"
    );
    let gbps = |us: f64| r.kv_bytes as f64 / us / 1e3;
    for (name, us) in [
        ("kvvm per-layer (contiguous)", r.per_layer_us),
        ("kvvm interleaved (contiguous)", r.interleaved_us),
        ("paged, 16-token blocks (baseline)", r.paged_us),
    ] {
        println!(
            "  {name:<34} {us:>12.1} {:>10.1} {:>14.3}",
            gbps(us),
            r.paged_us / us
        );
    }
    println!(
        "  K/V read per step: {} bytes; outputs bit-identical across arrangements: {}",
        r.kv_bytes, r.outputs_identical
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Times `launch` (enqueue, then wait for the device): `warmup` untimed runs, then `iters`.
fn time_gpu(
    warmup: usize,
    iters: usize,
    mut launch: impl FnMut() -> std::result::Result<(), KernelError>,
) -> Result<f64> {
    let mut run = || -> Result<f64> {
        let t = Instant::now();
        launch().map_err(kernel_error)?;
        kvvm_sys::result::ctx::synchronize()?;
        Ok(t.elapsed().as_secs_f64() * 1e6)
    };
    for _ in 0..warmup {
        run()?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        times.push(run()?);
    }
    Ok(median(times))
}

fn upload<T: DevicePod>(data: &[T]) -> Result<DeviceBuffer> {
    DeviceBuffer::upload(data).map_err(kernel_error)
}

fn to_i32(v: impl Iterator<Item = usize>) -> Result<Vec<i32>> {
    v.map(|x| i32::try_from(x).map_err(|_| Error::InvalidArgument(format!("{x} exceeds i32"))))
        .collect()
}

/// The GPU run: the same data as the CPU benchmark, uploaded once in each arrangement, and each
/// kernel timed from launch to completion (so a launch's overhead, a few µs, is included).
fn gpu_bench<T: KvElement + DevicePod>(
    kernels: &GpuKernels,
    cfg: &BenchConfig,
    device: String,
) -> Result<Report> {
    let BenchInputs {
        arranged,
        q,
        params,
        kv_bytes,
    } = bench_inputs::<T>(cfg).map_err(kernel_error)?;
    let shape = arranged.view_shape();
    let [_, tokens, hk, d] = shape;
    let batch = arranged.batch();
    let elem = std::mem::size_of::<T>() as u64;
    let scale = params.scale_for(d);

    kernels.make_current().map_err(kernel_error)?;
    let slots_dev = upload(&to_i32(batch.iter().map(|b| b.0))?)?;
    let lens_dev = upload(&to_i32(batch.iter().map(|b| b.1))?)?;
    let q_dev = upload(&q)?;
    let out_bytes = std::mem::size_of_val(q.as_slice());
    let outs: Vec<DeviceBuffer> = (0..3)
        .map(|_| DeviceBuffer::alloc(out_bytes).map_err(kernel_error))
        .collect::<Result<_>>()?;

    // kvvm per-layer: K and V of the layer are separate [slots, tokens, H, D] buffers.
    let (kb, vb) = arranged.per_layer_buffers();
    let (k_dev, v_dev) = (upload(kb)?, upload(vb)?);
    let st = per_layer_strides(tokens, hk, d).map_err(kernel_error)?;
    let strided = |k: u64, v: u64, strides: [usize; 4], out: &DeviceBuffer| StridedLaunch {
        dtype: T::DTYPE,
        k: DeviceView {
            ptr: k,
            shape,
            strides,
        },
        v: DeviceView {
            ptr: v,
            shape,
            strides,
        },
        slots: slots_dev.ptr(),
        lens: lens_dev.ptr(),
        batch: batch.len(),
        q_heads: cfg.q_heads,
        q: q_dev.ptr(),
        out: out.ptr(),
        scale,
    };
    let pl = strided(k_dev.ptr(), v_dev.ptr(), st, &outs[0]);
    // SAFETY: the context is current; K/V were uploaded from the buffers `arrange` built for this
    // shape and these strides, slots/lens from its batch (in range by construction), q and out
    // are separate allocations of batch*q_heads*head_dim f32; `time_gpu` waits for completion and
    // every buffer outlives it.
    let per_layer_us = time_gpu(cfg.warmup, cfg.iters, || unsafe {
        launch_strided(kernels, &pl, std::ptr::null_mut())
    })?;
    drop((k_dev, v_dev));

    // kvvm interleaved: one [slots, tokens, layers, 2, H, D] buffer; layer l's K and V are
    // strided views into it.
    let (layers, layer) = arranged.interleaved_layers();
    let buf = upload(arranged.interleaved_buffer())?;
    let ist = interleaved_strides(tokens, layers, hk, d).map_err(kernel_error)?;
    let k_off = (2 * layer * hk * d) as u64 * elem;
    let v_off = ((2 * layer + 1) * hk * d) as u64 * elem;
    let il = strided(buf.ptr() + k_off, buf.ptr() + v_off, ist, &outs[1]);
    // SAFETY: as above, for the interleaved buffer with its strides and the layer's offsets.
    let interleaved_us = time_gpu(cfg.warmup, cfg.iters, || unsafe {
        launch_strided(kernels, &il, std::ptr::null_mut())
    })?;
    drop(buf);

    // Paged baseline: block pools plus a block table.
    let (pool, table) = arranged.paged().map_err(kernel_error)?;
    let (kp, vp, tb) = (upload(pool.k())?, upload(pool.v())?, upload(table.ids())?);
    let pg = PagedLaunch {
        dtype: T::DTYPE,
        k_pool: kp.ptr(),
        v_pool: vp.ptr(),
        block_table: tb.ptr(),
        max_blocks_per_seq: table.max_blocks_per_seq(),
        block_size: pool.block_size(),
        lens: lens_dev.ptr(),
        batch: batch.len(),
        q_heads: cfg.q_heads,
        kv_heads: pool.kv_heads(),
        head_dim: pool.head_dim(),
        q: q_dev.ptr(),
        out: outs[2].ptr(),
        scale,
    };
    // SAFETY: the pools and table were uploaded from `arrange`'s paged arrangement (every block
    // id a sequence needs is below the pool's block count, lengths within the table); q/out as
    // above; `time_gpu` waits for completion.
    let paged_us = time_gpu(cfg.warmup, cfg.iters, || unsafe {
        launch_paged(kernels, &pg, std::ptr::null_mut())
    })?;

    let mut got = vec![vec![0f32; q.len()]; 3];
    for (o, g) in outs.iter().zip(got.iter_mut()) {
        o.download(g).map_err(kernel_error)?;
    }
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    Ok(Report {
        device,
        batch: cfg.batch,
        context: cfg.context,
        q_heads: cfg.q_heads,
        kv_heads: cfg.kv_heads,
        head_dim: cfg.head_dim,
        layers: cfg.layers,
        dtype: T::DTYPE.to_string(),
        iters: cfg.iters,
        kv_bytes,
        per_layer_us,
        interleaved_us,
        paged_us,
        paged_over_per_layer: paged_us / per_layer_us,
        paged_over_interleaved: paged_us / interleaved_us,
        per_layer_gbps: kv_bytes as f64 / per_layer_us / 1e3,
        outputs_identical: same(&got[0], &got[1]) && same(&got[0], &got[2]),
    })
}

//! The CUDA kernels on a real GPU against the f64 reference: `cargo test -p kvvm-kernels --test gpu
//! -- --ignored` on a machine with a CUDA GPU and NVRTC (KVVM_NVRTC_PATH).

use kvvm_kernels::data::{arrange, random_queries, ArrangeOptions, KvData};
use kvvm_kernels::gpu::{
    decode_attention_paged_gpu, decode_attention_strided_gpu, DevicePod, GpuKernels, HostStrided,
};
use kvvm_kernels::view::{interleaved_strides, per_layer_strides};
use kvvm_kernels::{bf16, f16, reference_decode_attention, DecodeParams, KvElement};

fn rel_err(got: &[f32], want: &[f64], d: usize) -> f64 {
    got.chunks(d)
        .zip(want.chunks(d))
        .map(|(g, w)| {
            let s = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
            g.iter()
                .zip(w)
                .fold(0f64, |m, (a, b)| m.max((f64::from(*a) - b).abs()))
                / s
        })
        .fold(0f64, f64::max)
}

fn check<T: KvElement + DevicePod>(kernels: &GpuKernels) {
    // (lens, kv_heads, group, head_dim): len 1, lengths across tile (64) and block (16) edges,
    // GQA 1/4/8, head_dim 64/128/256.
    let cases: &[(&[usize], usize, usize, usize)] = &[
        (&[1], 2, 1, 64),
        (&[1, 17, 65, 130], 2, 4, 128),
        (&[200, 3], 1, 8, 128),
        (&[33, 64], 4, 1, 256),
        (&[70], 2, 2, 32),
    ];
    for (ci, &(lens, hk, g, d)) in cases.iter().enumerate() {
        let data = KvData::<T>::random(lens, hk, d, ci as u64).unwrap();
        let q = random_queries(lens.len(), hk * g, d, 100 + ci as u64);
        let params = DecodeParams::new(hk * g);
        let want = reference_decode_attention(&data, &q, &params).unwrap();
        let a = arrange(&data, &ArrangeOptions::default()).unwrap();
        let [slots, tokens, _, _] = a.view_shape();
        let shape = a.view_shape();
        let batch = a.batch();

        let (kb, vb) = a.per_layer_buffers();
        let st = per_layer_strides(tokens, hk, d).unwrap();
        let kv = |buf, offset| HostStrided {
            buf,
            offset,
            shape,
            strides: st,
        };
        let pl = decode_attention_strided_gpu(kernels, kv(kb, 0), kv(vb, 0), &batch, &q, &params)
            .unwrap();

        let (layers, layer) = a.interleaved_layers();
        let ist = interleaved_strides(tokens, layers, hk, d).unwrap();
        let buf = a.interleaved_buffer();
        let hv = |offset| HostStrided {
            buf,
            offset,
            shape,
            strides: ist,
        };
        let il = decode_attention_strided_gpu(
            kernels,
            hv(2 * layer * hk * d),
            hv((2 * layer + 1) * hk * d),
            &batch,
            &q,
            &params,
        )
        .unwrap();

        let (pool, table) = a.paged().unwrap();
        let pg = decode_attention_paged_gpu(kernels, &pool, &table, a.lens(), &q, &params).unwrap();
        let _ = slots;
        for (name, got) in [("per-layer", &pl), ("interleaved", &il), ("paged", &pg)] {
            let e = rel_err(got, &want, d);
            eprintln!("{} case {ci} {name}: rel err {e:e}", T::DTYPE);
            assert!(e < 2e-5, "{} case {ci} {name}: rel err {e:e}", T::DTYPE);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_kernels_match_reference() {
    let kernels = GpuKernels::load(0).expect("load kernels");
    eprintln!("compiled for {}", kernels.arch());
    check::<f32>(&kernels);
    check::<f16>(&kernels);
    check::<bf16>(&kernels);
}

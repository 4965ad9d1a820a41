//! CPU decode attention against the f64 reference, for every kernel × dtype × layout, plus the
//! error cases of the safe API.

use kvvm_kernels::data::{arrange, random_queries, ArrangeOptions, KvData};
use kvvm_kernels::{
    bf16, decode_attention_paged, decode_attention_strided, f16, reference_decode_attention,
    BlockTable, DecodeParams, KernelError, KvElement, KvView, PagedPool,
};

/// Error bound, per dtype: max |kernel - reference| over a (sequence, head) output row, divided by
/// max |reference| of that row. The reference runs in f64 on the same (already rounded) inputs, so
/// the bound only covers f32 arithmetic (dot products of up to 128 terms, softmax, weighted sums)
/// and is the same for every element type.
fn bound<T: KvElement>() -> f64 {
    match T::DTYPE {
        kvvm_kernels::DType::F32 => 1e-5,
        kvvm_kernels::DType::F16 => 1e-5,
        kvvm_kernels::DType::BF16 => 1e-5,
    }
}

struct Case {
    lens: &'static [usize],
    kv_heads: usize,
    group: usize,
    head_dim: usize,
    scale: Option<f32>,
}

const CASES: &[Case] = &[
    // len 1: the output is the single V row
    Case {
        lens: &[1],
        kv_heads: 2,
        group: 1,
        head_dim: 64,
        scale: None,
    },
    // mixed lengths, not multiples of 16, GQA 4
    Case {
        lens: &[1, 17, 33, 5],
        kv_heads: 2,
        group: 4,
        head_dim: 64,
        scale: None,
    },
    // head_dim 128, one KV head, GQA 4, a length that is a multiple of 16
    Case {
        lens: &[40, 16, 3],
        kv_heads: 1,
        group: 4,
        head_dim: 128,
        scale: None,
    },
    // GQA 1 (MHA), head_dim 128
    Case {
        lens: &[23, 7],
        kv_heads: 4,
        group: 1,
        head_dim: 128,
        scale: None,
    },
    // a large scale: peaked softmax, exercises the max subtraction
    Case {
        lens: &[50, 31],
        kv_heads: 2,
        group: 2,
        head_dim: 64,
        scale: Some(4.0),
    },
    // a batch large enough that one task covers several KV heads (on machines with few threads)
    Case {
        lens: &[5, 1, 16, 17, 3, 8, 2, 30, 11],
        kv_heads: 4,
        group: 2,
        head_dim: 64,
        scale: None,
    },
    // head_dim not a multiple of the vector width
    Case {
        lens: &[9, 2],
        kv_heads: 1,
        group: 3,
        head_dim: 40,
        scale: None,
    },
];

fn rel_err(got: &[f32], want: &[f64], head_dim: usize) -> f64 {
    let mut worst = 0f64;
    for (g, w) in got.chunks(head_dim).zip(want.chunks(head_dim)) {
        let scale = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
        let err = g
            .iter()
            .zip(w)
            .fold(0f64, |m, (a, b)| m.max((f64::from(*a) - b).abs()));
        worst = worst.max(err / scale);
    }
    worst
}

fn check_dtype<T: KvElement>() {
    for (ci, case) in CASES.iter().enumerate() {
        let q_heads = case.kv_heads * case.group;
        let data = KvData::<T>::random(case.lens, case.kv_heads, case.head_dim, 1000 + ci as u64)
            .expect("data");
        let q = random_queries(case.lens.len(), q_heads, case.head_dim, 2000 + ci as u64);
        let opts = ArrangeOptions {
            seed: 3000 + ci as u64,
            ..ArrangeOptions::default()
        };
        let arranged = arrange(&data, &opts).expect("arrange");
        let batch = arranged.batch();
        for portable in [false, true] {
            let params = DecodeParams {
                q_heads,
                scale: case.scale,
                portable,
            };
            let want = reference_decode_attention(&data, &q, &params).expect("reference");
            let n = q.len();

            let (k, v) = arranged.per_layer_views().expect("views");
            let mut per_layer = vec![f32::NAN; n];
            decode_attention_strided(&k, &v, &batch, &q, &params, &mut per_layer)
                .expect("per-layer");

            let (k, v) = arranged.interleaved_views().expect("views");
            let mut interleaved = vec![f32::NAN; n];
            decode_attention_strided(&k, &v, &batch, &q, &params, &mut interleaved)
                .expect("interleaved");

            let (pool, table) = arranged.paged().expect("paged");
            let mut paged = vec![f32::NAN; n];
            decode_attention_paged(&pool, &table, arranged.lens(), &q, &params, &mut paged)
                .expect("paged");

            for (name, got) in [
                ("per-layer", &per_layer),
                ("interleaved", &interleaved),
                ("paged", &paged),
            ] {
                let e = rel_err(got, &want, case.head_dim);
                assert!(
                    e <= bound::<T>(),
                    "{} case {ci} {name} portable={portable}: rel err {e:e} > {:e}",
                    T::DTYPE,
                    bound::<T>()
                );
            }
            // Same arithmetic in the same order: the layouts must agree bit for bit.
            assert!(per_layer
                .iter()
                .zip(&interleaved)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            assert!(per_layer
                .iter()
                .zip(&paged)
                .all(|(a, b)| a.to_bits() == b.to_bits()));

            if case.lens[0] == 1 {
                // one token: softmax weight 1, output = V row (exactly, up to the 1/sum scaling)
                let e = rel_err(
                    &per_layer[..case.head_dim],
                    &data.v[0][..case.head_dim]
                        .iter()
                        .map(|x| x.to_f64())
                        .collect::<Vec<_>>(),
                    case.head_dim,
                );
                assert!(e < 1e-6, "len 1 output is not the V row: {e:e}");
            }
        }
    }
}

#[test]
fn f32_all_layouts_match_reference() {
    check_dtype::<f32>();
}

#[test]
fn f16_all_layouts_match_reference() {
    check_dtype::<f16>();
}

#[test]
fn bf16_all_layouts_match_reference() {
    check_dtype::<bf16>();
}

#[test]
fn shorter_sequences_ignore_later_tokens() {
    // Attending over a prefix must equal attending over a set that only has that prefix.
    let full = KvData::<f32>::random(&[30], 2, 64, 7).unwrap();
    let q = random_queries(1, 4, 64, 8);
    let params = DecodeParams::new(4);
    let arranged = arrange(&full, &ArrangeOptions::default()).unwrap();
    let (k, v) = arranged.per_layer_views().unwrap();
    let slot = arranged.batch()[0].0;
    let mut out = vec![0f32; q.len()];
    decode_attention_strided(&k, &v, &[(slot, 11)], &q, &params, &mut out).unwrap();
    let prefix = KvData::<f32> {
        kv_heads: 2,
        head_dim: 64,
        lens: vec![11],
        k: vec![full.k[0][..11 * 128].to_vec()],
        v: vec![full.v[0][..11 * 128].to_vec()],
    };
    let want = reference_decode_attention(&prefix, &q, &params).unwrap();
    assert!(rel_err(&out, &want, 64) < 1e-5);
}

#[test]
fn empty_batch_is_ok() {
    let buf = vec![1.0f32; 4 * 8 * 2 * 16];
    let (k, v) = KvView::per_layer(&buf, &buf, 4, 8, 2, 16).unwrap();
    let mut out: Vec<f32> = Vec::new();
    decode_attention_strided(&k, &v, &[], &[], &DecodeParams::new(2), &mut out).unwrap();
}

fn small() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    // views [4 slots, 8 tokens, 2 heads, 16 dims]; q/out for batch 2 × 4 q heads × 16
    let data = KvData::<f32>::random(&[8; 4], 2, 16, 1).unwrap();
    let k: Vec<f32> = data.k.concat();
    let v: Vec<f32> = data.v.concat();
    (k, v, random_queries(2, 4, 16, 2))
}

fn expect_err(r: Result<(), KernelError>, out: &[f32], check: impl Fn(&KernelError) -> bool) {
    let e = r.expect_err("expected an error");
    assert!(check(&e), "unexpected error {e:?}");
    assert!(
        out.iter().all(|x| x.to_bits() == 0x7fc0_1234),
        "out was written on error"
    );
    let _ = e.to_string();
}

fn sentinel(n: usize) -> Vec<f32> {
    vec![f32::from_bits(0x7fc0_1234); n]
}

#[test]
fn strided_errors() {
    let (kb, vb, q) = small();
    let (k, v) = KvView::per_layer(&kb, &vb, 4, 8, 2, 16).unwrap();
    let ok_batch = [(0usize, 8usize), (3, 1)];
    let p = DecodeParams::new(4);
    let mut out = sentinel(q.len());

    expect_err(
        decode_attention_strided(&k, &v, &ok_batch, &q, &DecodeParams::new(3), &mut out),
        &out,
        |e| {
            matches!(
                e,
                KernelError::HeadsNotDivisible {
                    q_heads: 3,
                    kv_heads: 2
                }
            )
        },
    );
    expect_err(
        decode_attention_strided(&k, &v, &ok_batch, &q, &DecodeParams::new(0), &mut out),
        &out,
        |e| matches!(e, KernelError::HeadsNotDivisible { .. }),
    );
    expect_err(
        decode_attention_strided(&k, &v, &ok_batch, &q[1..], &p, &mut out),
        &out,
        |e| matches!(e, KernelError::LengthMismatch { .. }),
    );
    let mut short = sentinel(q.len() - 1);
    expect_err(
        decode_attention_strided(&k, &v, &ok_batch, &q, &p, &mut short),
        &short,
        |e| matches!(e, KernelError::LengthMismatch { .. }),
    );
    expect_err(
        decode_attention_strided(&k, &v, &[(0, 8), (4, 1)], &q, &p, &mut out),
        &out,
        |e| {
            matches!(
                e,
                KernelError::SlotOutOfRange {
                    index: 1,
                    slot: 4,
                    max_slots: 4
                }
            )
        },
    );
    expect_err(
        decode_attention_strided(&k, &v, &[(0, 0), (1, 1)], &q, &p, &mut out),
        &out,
        |e| {
            matches!(
                e,
                KernelError::LengthOutOfRange {
                    index: 0,
                    len: 0,
                    ..
                }
            )
        },
    );
    expect_err(
        decode_attention_strided(&k, &v, &[(0, 9), (1, 1)], &q, &p, &mut out),
        &out,
        |e| {
            matches!(
                e,
                KernelError::LengthOutOfRange {
                    index: 0,
                    len: 9,
                    max: 8
                }
            )
        },
    );
    let bad_scale = DecodeParams {
        scale: Some(f32::NAN),
        ..p
    };
    expect_err(
        decode_attention_strided(&k, &v, &ok_batch, &q, &bad_scale, &mut out),
        &out,
        |e| matches!(e, KernelError::InvalidParameter(_)),
    );
    // V with a different shape
    let v2 = KvView::from_slice(&vb, [4, 7, 2, 16], [256, 32, 16, 1]).unwrap();
    expect_err(
        decode_attention_strided(&k, &v2, &ok_batch, &q, &p, &mut out),
        &out,
        |e| matches!(e, KernelError::ShapeMismatch(_)),
    );
}

#[test]
fn view_errors() {
    let buf = vec![0.5f32; 4 * 8 * 2 * 16];
    assert!(matches!(
        KvView::from_slice(&buf, [4, 8, 2, 16], [256, 32, 16, 2]),
        Err(KernelError::NonUnitInnerStride(2))
    ));
    assert!(matches!(
        KvView::from_slice(&buf, [5, 8, 2, 16], [256, 32, 16, 1]),
        Err(KernelError::ViewOutOfBounds {
            needed: 1280,
            available: 1024
        })
    ));
    assert!(matches!(
        KvView::from_slice(&buf, [2, 2, 2, 2], [usize::MAX, 1, 1, 1]),
        Err(KernelError::ViewOutOfBounds { .. })
    ));
    assert!(KvView::per_layer(&buf[1..], &buf, 4, 8, 2, 16).is_err());
    assert!(KvView::per_layer(&buf, &buf, usize::MAX, 8, 2, 16).is_err());
    assert!(matches!(
        KvView::interleaved(&buf, 1, 8, 2, 2, 2, 16),
        Err(KernelError::InvalidParameter(_))
    ));
    // interleaved [1 slot, 8 tokens, 2 layers, 2, 2 heads, 16] = 1024 elements: layer 1 fits exactly
    let (k, v) = KvView::interleaved(&buf, 1, 8, 2, 1, 2, 16).unwrap();
    assert_eq!(k.strides(), [1024, 128, 16, 1]);
    assert_eq!(v.as_ptr() as usize - k.as_ptr() as usize, 32 * 4);
    assert!(KvView::interleaved(&buf[..1023], 1, 8, 2, 1, 2, 16).is_err());
    // empty views are fine, even of an empty slice
    let empty: [f32; 0] = [];
    assert!(KvView::from_slice(&empty, [0, 8, 2, 16], [256, 32, 16, 1]).is_ok());
    // the unsafe constructor still rejects null pointers
    // SAFETY: a null pointer is rejected before any use.
    let r = unsafe { KvView::<f32>::new(std::ptr::null(), [1, 1, 1, 1], [1, 1, 1, 1]) };
    assert!(r.is_err());
}

#[test]
fn paged_errors() {
    // pool of 4 blocks × 16 tokens × 2 heads × 16 dims
    let data = KvData::<f32>::random(&[64], 2, 16, 3).unwrap();
    let (kp, vp) = (&data.k[0], &data.v[0]);
    assert!(matches!(
        PagedPool::new(&kp[1..], &vp[1..], 16, 2, 16),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        PagedPool::new(kp, &vp[..512], 16, 2, 16),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        PagedPool::new(kp, vp, 0, 2, 16),
        Err(KernelError::InvalidParameter(_))
    ));
    assert!(matches!(
        BlockTable::new(&[0, 1, 2], 2),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        BlockTable::new(&[0, 1], 0),
        Err(KernelError::InvalidParameter(_))
    ));

    let pool = PagedPool::new(kp, vp, 16, 2, 16).unwrap();
    assert_eq!(pool.num_blocks(), 4);
    let ids = [3u32, 1, 0, 9]; // row 1 has an out-of-range block in its second entry
    let table = BlockTable::new(&ids, 2).unwrap();
    let q = random_queries(2, 4, 16, 5);
    let p = DecodeParams::new(4);
    let mut out = sentinel(q.len());
    decode_attention_paged(&pool, &table, &[20, 16], &q, &p, &mut out).unwrap(); // block 9 unused
    let mut out = sentinel(q.len());
    expect_err(
        decode_attention_paged(&pool, &table, &[20, 17], &q, &p, &mut out),
        &out,
        |e| {
            matches!(
                e,
                KernelError::BlockOutOfRange {
                    seq: 1,
                    logical: 1,
                    block: 9,
                    num_blocks: 4
                }
            )
        },
    );
    expect_err(
        decode_attention_paged(&pool, &table, &[33, 1], &q, &p, &mut out),
        &out,
        |e| {
            matches!(
                e,
                KernelError::LengthOutOfRange {
                    index: 0,
                    len: 33,
                    max: 32
                }
            )
        },
    );
    expect_err(
        decode_attention_paged(&pool, &table, &[0, 1], &q, &p, &mut out),
        &out,
        |e| {
            matches!(
                e,
                KernelError::LengthOutOfRange {
                    index: 0,
                    len: 0,
                    ..
                }
            )
        },
    );
    expect_err(
        decode_attention_paged(&pool, &table, &[1], &q[..64], &p, &mut out[..64].to_vec()),
        &out,
        |e| matches!(e, KernelError::ShapeMismatch(_)),
    );
    expect_err(
        decode_attention_paged(&pool, &table, &[1, 1], &q, &DecodeParams::new(5), &mut out),
        &out,
        |e| matches!(e, KernelError::HeadsNotDivisible { .. }),
    );
}

#[test]
fn data_and_reference_errors() {
    let mut data = KvData::<f32>::random(&[3, 2], 1, 8, 4).unwrap();
    assert!(KvData::<f32>::random(&[3], 0, 8, 4).is_err());
    let q = random_queries(2, 2, 8, 1);
    assert!(reference_decode_attention(&data, &q, &DecodeParams::new(2)).is_ok());
    assert!(matches!(
        reference_decode_attention(&data, &q[1..], &DecodeParams::new(2)),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(arrange(
        &data,
        &ArrangeOptions {
            layer: 3,
            ..ArrangeOptions::default()
        }
    )
    .is_err());
    assert!(arrange(
        &data,
        &ArrangeOptions {
            block_size: 0,
            ..ArrangeOptions::default()
        }
    )
    .is_err());
    data.k[1].pop();
    assert!(matches!(
        data.check(),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(arrange(&data, &ArrangeOptions::default()).is_err());
    assert!(reference_decode_attention(&data, &q, &DecodeParams::new(2)).is_err());
}

#[test]
fn sparse_interleaved_matches_dense() {
    let data = KvData::<f16>::random(&[19, 4], 2, 64, 11).unwrap();
    let q = random_queries(2, 8, 64, 12);
    let p = DecodeParams::new(8);
    let dense = arrange(&data, &ArrangeOptions::default()).unwrap();
    let sparse = arrange(
        &data,
        &ArrangeOptions {
            sparse_interleaved: true,
            layers: 8,
            layer: 5,
            ..ArrangeOptions::default()
        },
    )
    .unwrap();
    let mut a = vec![0f32; q.len()];
    let mut b = vec![0f32; q.len()];
    let (k, v) = dense.interleaved_views().unwrap();
    decode_attention_strided(&k, &v, &dense.batch(), &q, &p, &mut a).unwrap();
    let (k, v) = sparse.interleaved_views().unwrap();
    decode_attention_strided(&k, &v, &sparse.batch(), &q, &p, &mut b).unwrap();
    assert_eq!(a, b);
}

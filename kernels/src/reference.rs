//! A straightforward `f64` reference of decode attention over a logical KV set.

use crate::data::KvData;
use crate::{DecodeParams, KernelError, KvElement};

/// Decode attention in `f64`, directly from the definition: for sequence `i` and query head `h`
/// (KV head `h / (q_heads / kv_heads)`), `softmax(scale · q·Kᵀ) · V` over tokens `0..lens[i]`.
///
/// `q` is `[batch, q_heads, head_dim]` (batch = `data.lens.len()`); the result has the same shape.
/// The inputs are taken exactly as stored (already rounded to `T`), so comparisons with the kernels
/// measure only the kernels' arithmetic.
///
/// # Errors
///
/// [`KernelError::HeadsNotDivisible`], [`KernelError::LengthMismatch`] or
/// [`KernelError::LengthOutOfRange`] (a zero length) for inconsistent inputs.
pub fn reference_decode_attention<T: KvElement>(
    data: &KvData<T>,
    q: &[f32],
    params: &DecodeParams,
) -> Result<Vec<f64>, KernelError> {
    data.check()?;
    let (hk, d, qh) = (data.kv_heads, data.head_dim, params.q_heads);
    if qh == 0 || qh % hk != 0 {
        return Err(KernelError::HeadsNotDivisible {
            q_heads: qh,
            kv_heads: hk,
        });
    }
    let batch = data.lens.len();
    if q.len() != batch * qh * d {
        return Err(KernelError::LengthMismatch {
            what: "q [batch, q_heads, head_dim]",
            expected: batch * qh * d,
            got: q.len(),
        });
    }
    let g = qh / hk;
    let scale = params
        .scale
        .map_or_else(|| 1.0 / (d as f64).sqrt(), f64::from);
    let mut out = vec![0f64; batch * qh * d];
    for (i, &len) in data.lens.iter().enumerate() {
        if len == 0 {
            return Err(KernelError::LengthOutOfRange {
                index: i,
                len,
                max: usize::MAX,
            });
        }
        for h in 0..qh {
            let kh = h / g;
            let qv = &q[(i * qh + h) * d..][..d];
            let scores: Vec<f64> = (0..len)
                .map(|t| {
                    let k = &data.k[i][(t * hk + kh) * d..][..d];
                    scale
                        * qv.iter()
                            .zip(k)
                            .map(|(&a, &b)| f64::from(a) * b.to_f64())
                            .sum::<f64>()
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let total: f64 = w.iter().sum();
            let o = &mut out[(i * qh + h) * d..][..d];
            for (t, wt) in w.iter().enumerate() {
                let v = &data.v[i][(t * hk + kh) * d..][..d];
                for (oj, vj) in o.iter_mut().zip(v) {
                    *oj += wt / total * vj.to_f64();
                }
            }
        }
    }
    Ok(out)
}

// kvvm decode attention over strided K/V views (kvvm's per-layer and interleaved layouts).
//
// K and V are 4-D views [max_slots, max_tokens, kv_heads, head_dim] with strides in elements
// (s_slot, s_token, s_head, 1), exactly as the cache's views report them. Sequence i lives in
// slots[i] and attends to its tokens 0..lens[i]. q and out are [batch, q_heads, head_dim] f32.
//
// Launch: grid (kv_heads, batch), block (KVVM_THREADS), no dynamic shared memory.
// Entry points: kvvm_decode_strided_f16, kvvm_decode_strided_bf16, kvvm_decode_strided_f32.

template <typename T>
struct KvvmStridedRows {
    const T* k_base;  // slot and head offsets applied
    const T* v_base;
    kvvm_i64 k_tok;  // token strides
    kvvm_i64 v_tok;
    __device__ __forceinline__ const T* k(int t) const { return k_base + (kvvm_i64)t * k_tok; }
    __device__ __forceinline__ const T* v(int t) const { return v_base + (kvvm_i64)t * v_tok; }
};

template <typename Ld>
static __device__ __forceinline__ void kvvm_decode_strided(
    float* __restrict__ out, const float* __restrict__ q, const typename Ld::T* __restrict__ k,
    const typename Ld::T* __restrict__ v, const int* __restrict__ slots,
    const int* __restrict__ lens, int q_heads, int kv_heads, int head_dim, kvvm_i64 k_s0,
    kvvm_i64 k_s1, kvvm_i64 k_s2, kvvm_i64 v_s0, kvvm_i64 v_s1, kvvm_i64 v_s2, float scale) {
    typedef typename Ld::T T;
    const int kvh = blockIdx.x;
    const int seq = blockIdx.y;
    const int g = q_heads / kv_heads;
    const kvvm_i64 slot = slots[seq];
    KvvmStridedRows<T> rows;
    rows.k_base = k + slot * k_s0 + (kvvm_i64)kvh * k_s2;
    rows.v_base = v + slot * v_s0 + (kvvm_i64)kvh * v_s2;
    rows.k_tok = k_s1;
    rows.v_tok = v_s1;
    const kvvm_u64 off = ((kvvm_u64)seq * q_heads + (kvvm_u64)kvh * g) * head_dim;
    kvvm_decode_group<Ld>(out + off, q + off, rows, lens[seq], g, head_dim, scale);
}

#define KVVM_STRIDED_ENTRY(NAME, LD)                                                           \
    extern "C" __global__ void __launch_bounds__(KVVM_THREADS) NAME(                          \
        float* __restrict__ out, const float* __restrict__ q, const LD::T* __restrict__ k,     \
        const LD::T* __restrict__ v, const int* __restrict__ slots,                            \
        const int* __restrict__ lens, int q_heads, int kv_heads, int head_dim, kvvm_i64 k_s0,  \
        kvvm_i64 k_s1, kvvm_i64 k_s2, kvvm_i64 v_s0, kvvm_i64 v_s1, kvvm_i64 v_s2,             \
        float scale) {                                                                         \
        kvvm_decode_strided<LD>(out, q, k, v, slots, lens, q_heads, kv_heads, head_dim, k_s0,  \
                                k_s1, k_s2, v_s0, v_s1, v_s2, scale);                          \
    }

KVVM_STRIDED_ENTRY(kvvm_decode_strided_f16, KvvmF16)
KVVM_STRIDED_ENTRY(kvvm_decode_strided_bf16, KvvmBF16)
KVVM_STRIDED_ENTRY(kvvm_decode_strided_f32, KvvmF32)

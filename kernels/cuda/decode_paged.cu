// kvvm decode attention over a vLLM-style paged KV pool (the baseline).
//
// K and V pools are [num_blocks, block_size, kv_heads, head_dim], contiguous; the block table is
// [batch, max_blocks_per_seq] u32 block ids: token t of sequence i is at position t % block_size
// of block block_table[i * max_blocks_per_seq + t / block_size]. q and out are
// [batch, q_heads, head_dim] f32.
//
// Launch: grid (kv_heads, batch), block (KVVM_THREADS), no dynamic shared memory.
// Entry points: kvvm_decode_paged_f16, kvvm_decode_paged_bf16, kvvm_decode_paged_f32.

template <typename T>
struct KvvmPagedRows {
    const T* k_base;  // pool base + head offset
    const T* v_base;
    const unsigned int* table;  // this sequence's row of the block table
    int block_size;
    kvvm_i64 block_stride;  // block_size * kv_heads * head_dim
    kvvm_i64 tok_stride;    // kv_heads * head_dim
    __device__ __forceinline__ kvvm_i64 off(int t) const {
        return (kvvm_i64)table[t / block_size] * block_stride +
               (kvvm_i64)(t % block_size) * tok_stride;
    }
    __device__ __forceinline__ const T* k(int t) const { return k_base + off(t); }
    __device__ __forceinline__ const T* v(int t) const { return v_base + off(t); }
};

template <typename Ld>
static __device__ __forceinline__ void kvvm_decode_paged(
    float* __restrict__ out, const float* __restrict__ q, const typename Ld::T* __restrict__ k_pool,
    const typename Ld::T* __restrict__ v_pool, const unsigned int* __restrict__ block_table,
    const int* __restrict__ lens, int max_blocks_per_seq, int block_size, int q_heads,
    int kv_heads, int head_dim, float scale) {
    typedef typename Ld::T T;
    const int kvh = blockIdx.x;
    const int seq = blockIdx.y;
    const int g = q_heads / kv_heads;
    KvvmPagedRows<T> rows;
    rows.k_base = k_pool + (kvvm_i64)kvh * head_dim;
    rows.v_base = v_pool + (kvvm_i64)kvh * head_dim;
    rows.table = block_table + (kvvm_i64)seq * max_blocks_per_seq;
    rows.block_size = block_size;
    rows.tok_stride = (kvvm_i64)kv_heads * head_dim;
    rows.block_stride = (kvvm_i64)block_size * kv_heads * head_dim;
    const kvvm_u64 off = ((kvvm_u64)seq * q_heads + (kvvm_u64)kvh * g) * head_dim;
    kvvm_decode_group<Ld>(out + off, q + off, rows, lens[seq], g, head_dim, scale);
}

#define KVVM_PAGED_ENTRY(NAME, LD)                                                             \
    extern "C" __global__ void __launch_bounds__(KVVM_THREADS) NAME(                          \
        float* __restrict__ out, const float* __restrict__ q, const LD::T* __restrict__ k_pool, \
        const LD::T* __restrict__ v_pool, const unsigned int* __restrict__ block_table,        \
        const int* __restrict__ lens, int max_blocks_per_seq, int block_size, int q_heads,     \
        int kv_heads, int head_dim, float scale) {                                             \
        kvvm_decode_paged<LD>(out, q, k_pool, v_pool, block_table, lens, max_blocks_per_seq,   \
                              block_size, q_heads, kv_heads, head_dim, scale);                 \
    }

KVVM_PAGED_ENTRY(kvvm_decode_paged_f16, KvvmF16)
KVVM_PAGED_ENTRY(kvvm_decode_paged_bf16, KvvmBF16)
KVVM_PAGED_ENTRY(kvvm_decode_paged_f32, KvvmF32)

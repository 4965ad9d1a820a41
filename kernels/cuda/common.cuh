// kvvm decode attention: shared device code, prepended to every .cu file of this folder before
// NVRTC compiles it (NVRTC gets no include path, so this file is not #included).
//
// No headers are used: NVRTC ships no libc headers, and the f16/bf16 conversions below are done
// with a PTX instruction (f16) and a shift (bf16), so cuda_fp16.h / cuda_bf16.h are not needed.
//
// One thread block per (sequence, KV head); it handles the whole GQA group of query heads that
// share the KV head, so every K and V row is read once per group. Tokens are processed in tiles of
// KVVM_TILE with an online softmax (running max and sum per query head, in shared memory), so any
// context length works with a fixed amount of shared memory.
//
// Limits (checked by the host code): q_heads / kv_heads <= KVVM_MAX_GROUP, head_dim in
// {32, 64, 128, 256}, blockDim.x == KVVM_THREADS, every length >= 1.

#define KVVM_THREADS 128
#define KVVM_WARPS (KVVM_THREADS / 32)
#define KVVM_TILE 64
#define KVVM_MAX_GROUP 8
#define KVVM_MAX_HEAD_DIM 256
#define KVVM_MAX_DPT (KVVM_MAX_HEAD_DIM / KVVM_THREADS)

typedef unsigned long long kvvm_u64;
typedef long long kvvm_i64;

struct KvvmF16 {
    typedef unsigned short T;
    static __device__ __forceinline__ float load(T x) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
        return f;
    }
};

struct KvvmBF16 {
    typedef unsigned short T;
    static __device__ __forceinline__ float load(T x) {
        return __uint_as_float(((unsigned int)x) << 16);
    }
};

struct KvvmF32 {
    typedef float T;
    static __device__ __forceinline__ float load(T x) { return x; }
};

static __device__ __forceinline__ float kvvm_neg_inf() { return __int_as_float(0xff800000); }

static __device__ __forceinline__ float kvvm_warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

static __device__ __forceinline__ float kvvm_warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Attention of one group of `g` query heads over `len` tokens whose K and V rows `rows` returns.
// `q` and `out` point to the group's [g, head_dim] block (f32).
template <typename Ld, typename Rows>
static __device__ __forceinline__ void kvvm_decode_group(
    float* __restrict__ out, const float* __restrict__ q, const Rows& rows, int len, int g,
    int head_dim, float scale) {
    typedef typename Ld::T T;
    __shared__ float qs[KVVM_MAX_GROUP * KVVM_MAX_HEAD_DIM];  // scaled queries; later the reduction
    __shared__ float p[KVVM_MAX_GROUP * KVVM_TILE];           // scores, then probabilities
    __shared__ float m_s[KVVM_MAX_GROUP];                     // running max
    __shared__ float l_s[KVVM_MAX_GROUP];                     // running sum
    __shared__ float alpha_s[KVVM_MAX_GROUP];                 // rescale of this tile

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int D = head_dim;

    for (int i = tid; i < g * D; i += KVVM_THREADS) qs[i] = q[i] * scale;
    if (tid < g) {
        m_s[tid] = kvvm_neg_inf();
        l_s[tid] = 0.0f;
    }

    // V accumulation: thread owns dims (tid % DT) + j*DT, j < dpt, for tokens t ≡ grp (mod ngroups).
    const int DT = D < KVVM_THREADS ? D : KVVM_THREADS;
    const int dpt = D / DT;
    const int ngroups = KVVM_THREADS / DT;
    const int dcol = tid % DT;
    const int grp = tid / DT;
    float acc[KVVM_MAX_GROUP][KVVM_MAX_DPT];
#pragma unroll
    for (int h = 0; h < KVVM_MAX_GROUP; ++h)
#pragma unroll
        for (int j = 0; j < KVVM_MAX_DPT; ++j) acc[h][j] = 0.0f;
    __syncthreads();

    for (int t0 = 0; t0 < len; t0 += KVVM_TILE) {
        const int n = min(KVVM_TILE, len - t0);

        // 1. scores: one warp per token, lanes across head_dim, all g heads at once.
        for (int tt = warp; tt < n; tt += KVVM_WARPS) {
            const T* k = rows.k(t0 + tt);
            float part[KVVM_MAX_GROUP];
#pragma unroll
            for (int h = 0; h < KVVM_MAX_GROUP; ++h) part[h] = 0.0f;
            for (int d = lane; d < D; d += 32) {
                const float kv = Ld::load(k[d]);
#pragma unroll
                for (int h = 0; h < KVVM_MAX_GROUP; ++h)
                    if (h < g) part[h] = fmaf(qs[h * D + d], kv, part[h]);
            }
#pragma unroll
            for (int h = 0; h < KVVM_MAX_GROUP; ++h) {
                if (h < g) {
                    const float s = kvvm_warp_sum(part[h]);
                    if (lane == 0) p[h * KVVM_TILE + tt] = s;
                }
            }
        }
        __syncthreads();

        // 2. online softmax update: one warp per query head.
        for (int h = warp; h < g; h += KVVM_WARPS) {
            float mx = kvvm_neg_inf();
            for (int tt = lane; tt < n; tt += 32) mx = fmaxf(mx, p[h * KVVM_TILE + tt]);
            mx = kvvm_warp_max(mx);
            const float m_old = m_s[h];
            const float m_new = fmaxf(m_old, mx);
            float s = 0.0f;
            for (int tt = lane; tt < n; tt += 32) {
                const float e = expf(p[h * KVVM_TILE + tt] - m_new);
                p[h * KVVM_TILE + tt] = e;
                s += e;
            }
            s = kvvm_warp_sum(s);
            if (lane == 0) {
                const float a = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
                alpha_s[h] = a;
                l_s[h] = l_s[h] * a + s;
                m_s[h] = m_new;
            }
        }
        __syncthreads();

        // 3. rescale and accumulate V.
#pragma unroll
        for (int h = 0; h < KVVM_MAX_GROUP; ++h) {
            if (h < g) {
                const float a = alpha_s[h];
#pragma unroll
                for (int j = 0; j < KVVM_MAX_DPT; ++j) acc[h][j] *= a;
            }
        }
        for (int tt = grp; tt < n; tt += ngroups) {
            const T* v = rows.v(t0 + tt);
#pragma unroll
            for (int j = 0; j < KVVM_MAX_DPT; ++j) {
                if (j < dpt) {
                    const float vv = Ld::load(v[dcol + j * DT]);
#pragma unroll
                    for (int h = 0; h < KVVM_MAX_GROUP; ++h)
                        if (h < g) acc[h][j] = fmaf(p[h * KVVM_TILE + tt], vv, acc[h][j]);
                }
            }
        }
        __syncthreads();  // p is overwritten by the next tile
    }

    // 4. combine the token groups (reusing qs) and normalize.
    float* red = qs;  // [ngroups][g][D]
#pragma unroll
    for (int h = 0; h < KVVM_MAX_GROUP; ++h)
#pragma unroll
        for (int j = 0; j < KVVM_MAX_DPT; ++j)
            if (h < g && j < dpt) red[(grp * g + h) * D + dcol + j * DT] = acc[h][j];
    __syncthreads();
    for (int i = tid; i < g * D; i += KVVM_THREADS) {
        float s = 0.0f;
        for (int r = 0; r < ngroups; ++r) s += red[r * g * D + i];
        out[i] = s / l_s[i / D];
    }
}

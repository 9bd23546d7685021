// Fused attention for CuPy, FlashAttention-2 style, float32.
//
// Loaded by scratchlm/kernels/cuda.py through cupy.RawModule (NVRTC, -std=c++17); the templates are
// instantiated there with name_expressions for the padded head dim DP in {32, 64, 96, 128}.
// Compile-check alone: nvcc -std=c++17 -arch=sm_90 -ptx -DSCRATCHLM_INSTANTIATE_ALL attention.cu
//
// Shapes: q, o, do, dq are contiguous (B, H, Tq, D) float32; k, v, dk, dv (B, H, Tk, D); lse, delta
// (B, H, Tq). One (b, h) pair is a "head". Usually Tq = Tk = T; with a KV cache Tq < Tk and the causal
// mask lets query i see keys j <= i + (Tk - Tq), as in the NumPy reference.
//
// Forward, for one head, with S = scale * Q K^T (Tq x Tk), causal mask S[i, j] = -inf for j > i + Tk - Tq:
//     lse[i] = log sum_j exp(S[i, j])         P = exp(S - lse)         O = P V
// computed one query tile (BR rows) at a time, streaming key/value tiles (BC rows) through shared
// memory with the online softmax: a running row max m and running denominator l, and the output
// accumulator rescaled by exp(m_old - m_new) whenever the max grows. The T x T matrices never exist;
// only lse (one float per row) is saved for the backward.
//
// Backward, with dO given and P recomputed from lse:
//     dV = P^T dO                        dP = dO V^T
//     dS = P * (dP - delta),  delta[i] = sum_j P[i, j] dP[i, j] = sum_d dO[i, d] O[i, d]
//     dQ = scale * dS K                  dK = scale * dS^T Q
// Kernel 1 computes delta (one warp per row). Kernel 2 owns one key tile: K and V stay in shared
// memory while it loops over the query tiles that can see it, accumulating dK and dV in registers and
// adding its share of dQ into a zeroed float32 buffer with atomicAdd (so dQ's summation order, and
// its last bits, vary from run to run).
//
// Thread layout (all three tile kernels, 128 threads): tx = tid % 8, ty = tid / 8 (0..15).
//   * score tiles (BR x BC): a thread holds rows ty + 16 i (i < 4) and columns tx + 8 j (j < 8);
//     a row's 8 owners are 8 consecutive lanes of one warp, so row reductions are 3 shuffles.
//   * output tiles (rows x DP): rows ty + 16 i, columns 32 m + 4 tx + c (m < DP / 32, c < 4), so a
//     warp reads each shared row as contiguous float4s.
// Shared rows are padded (DP + 4 floats, BC + 8 floats) so those access patterns avoid bank conflicts.

#define SLM_BR 64          // query rows per tile
#define SLM_BC 64          // key rows per tile
#define SLM_THREADS 128
#define SLM_LOG2E 1.4426950408889634f
#define SLM_LN2 0.6931471805599453f
#define SLM_NEG_INF (-__int_as_float(0x7f800000))
#define SLM_FULL_MASK 0xffffffffu

namespace slm_attention {

constexpr int kLdP = SLM_BC + 8;   // padded row stride of the score tiles in shared memory

// Copy rows [row0, row0 + ROWS) of a (T, D) matrix into a (ROWS, DP + 4) shared tile, zero-filling
// rows >= T and columns >= D (zeros make padded rows and columns drop out of every dot product).
template <int ROWS, int DP>
__device__ __forceinline__ void load_rows(float* tile, const float* __restrict__ src, int row0, int T,
                                          int D, bool vec_ok) {
    constexpr int LD = DP + 4;
    constexpr int CHUNKS = DP / 4;                     // float4 chunks per row
    for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += SLM_THREADS) {
        const int r = idx / CHUNKS;
        const int c = (idx % CHUNKS) * 4;
        const int row = row0 + r;
        float4 val = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row < T) {
            const float* p = src + (size_t)row * D + c;
            if (vec_ok) {                              // D % 4 == 0: a chunk is all in or all out
                if (c < D) val = *reinterpret_cast<const float4*>(p);
            } else {
                if (c + 0 < D) val.x = p[0];
                if (c + 1 < D) val.y = p[1];
                if (c + 2 < D) val.z = p[2];
                if (c + 3 < D) val.w = p[3];
            }
        }
        *reinterpret_cast<float4*>(&tile[r * LD + c]) = val;
    }
}

__device__ __forceinline__ float component(const float4& v, int e) {
    return e == 0 ? v.x : (e == 1 ? v.y : (e == 2 ? v.z : v.w));
}

// s[i][j] = A[ty + 16 i, :] . B[tx + 8 j, :] over DP columns of two padded shared tiles.
template <int DP>
__device__ __forceinline__ void tile_dot(float (&s)[4][8], const float* A, const float* B, int tx,
                                         int ty) {
    constexpr int LD = DP + 4;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) s[i][j] = 0.f;
#pragma unroll 2
    for (int d = 0; d < DP; d += 4) {
        float4 a[4], b[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = *reinterpret_cast<const float4*>(&A[(ty + 16 * i) * LD + d]);
#pragma unroll
        for (int j = 0; j < 8; ++j) b[j] = *reinterpret_cast<const float4*>(&B[(tx + 8 * j) * LD + d]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float acc = s[i][j];
                acc = fmaf(a[i].x, b[j].x, acc);
                acc = fmaf(a[i].y, b[j].y, acc);
                acc = fmaf(a[i].z, b[j].z, acc);
                acc = fmaf(a[i].w, b[j].w, acc);
                s[i][j] = acc;
            }
    }
}

// acc[i][m][c] += sum_k W[ty + 16 i, k] * X[k, 32 m + 4 tx + c] for k < KROWS, where W is a padded
// (rows, kLdP) score tile and X a padded (KROWS, DP + 4) tile: the "probabilities times values" step.
// Only the NM column groups starting at group m0 are computed (to bound live registers).
template <int DP, int KROWS, int NM>
__device__ __forceinline__ void tile_accumulate(float (&acc)[4][NM][4], const float* W, const float* X,
                                                int m0, int tx, int ty) {
    constexpr int LD = DP + 4;
#pragma unroll 2
    for (int kk = 0; kk < KROWS; kk += 4) {
        float4 w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = *reinterpret_cast<const float4*>(&W[(ty + 16 * i) * kLdP + kk]);
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
            for (int m = 0; m < NM; ++m) {
                const float4 x = *reinterpret_cast<const float4*>(&X[(kk + e) * LD + 32 * (m0 + m) + 4 * tx]);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float we = component(w[i], e);
                    acc[i][m][0] = fmaf(we, x.x, acc[i][m][0]);
                    acc[i][m][1] = fmaf(we, x.y, acc[i][m][1]);
                    acc[i][m][2] = fmaf(we, x.z, acc[i][m][2]);
                    acc[i][m][3] = fmaf(we, x.w, acc[i][m][3]);
                }
            }
    }
}

// Store rows ty + 16 i of an output accumulator (times `factor`) to a (T, D) matrix, bounds-checked.
template <int DP>
__device__ __forceinline__ void store_rows(float* __restrict__ dst, const float (&acc)[4][DP / 32][4],
                                           const float (&factor)[4], int row0, int T, int D, bool vec_ok,
                                           int tx, int ty) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = row0 + ty + 16 * i;
        if (row >= T) continue;
#pragma unroll
        for (int m = 0; m < DP / 32; ++m) {
            const int col = 32 * m + 4 * tx;
            float* p = dst + (size_t)row * D + col;
            const float4 val = make_float4(acc[i][m][0] * factor[i], acc[i][m][1] * factor[i],
                                           acc[i][m][2] * factor[i], acc[i][m][3] * factor[i]);
            if (vec_ok) {
                if (col < D) *reinterpret_cast<float4*>(p) = val;
            } else {
                if (col + 0 < D) p[0] = val.x;
                if (col + 1 < D) p[1] = val.y;
                if (col + 2 < D) p[2] = val.z;
                if (col + 3 < D) p[3] = val.w;
            }
        }
    }
}

}  // namespace slm_attention

// ------------------------------------------------------------------------------------------ forward
// grid = (ceil(T / BR), B * H), block = 128, dynamic shared memory = attention_forward_smem(DP).
// Causal: query tile t only needs key tiles 0..t (later ones are fully masked and never loaded);
// blocks run the longest (last) query tiles first so the tail of the grid is short work.
template <int DP>
__global__ void __launch_bounds__(SLM_THREADS)
attention_forward_f32(const float* __restrict__ q, const float* __restrict__ k,
                      const float* __restrict__ v, float* __restrict__ o, float* __restrict__ lse,
                      int Tq, int Tk, int D, float scale, int causal) {
    using namespace slm_attention;
    constexpr int LD = DP + 4;
    constexpr int NM = DP / 32;
    extern __shared__ float4 smem_f4[];
    float* Qs = reinterpret_cast<float*>(smem_f4);   // (BR, LD)  this block's queries
    // The K tile's space is reused for the P tile, so it holds whichever of the two is larger.
    constexpr int K_REGION = SLM_BC * LD > SLM_BR * kLdP ? SLM_BC * LD : SLM_BR * kLdP;
    float* Ks = Qs + SLM_BR * LD;                     // (BC, LD)  current key tile
    float* Vs = Ks + K_REGION;                        // (BC, LD)  current value tile
    float* Ps = Ks;                                   // (BR, kLdP) unnormalised probabilities: reuses
                                                      // the K tile once S is computed (less shared
                                                      // memory, more blocks per SM)

    const int tid = threadIdx.x, tx = tid & 7, ty = tid >> 3;
    const int q_tile = gridDim.x - 1 - blockIdx.x;
    const int q0 = q_tile * SLM_BR;
    const size_t q_head = (size_t)blockIdx.y * Tq * D, k_head = (size_t)blockIdx.y * Tk * D;
    const int offset = Tk - Tq;                       // causal: query i sees keys j <= i + offset
    const bool vec_ok = (D & 3) == 0;
    const float scale_log2 = scale * SLM_LOG2E;      // exp(x) = exp2(x * log2 e): scores in base 2

    load_rows<SLM_BR, DP>(Qs, q + q_head, q0, Tq, D, vec_ok);

    float acc[4][NM][4];
    float m_run[4], l_run[4];                         // running max (base 2) and this lane's share of l
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        m_run[i] = SLM_NEG_INF;
        l_run[i] = 0.f;
#pragma unroll
        for (int m = 0; m < NM; ++m)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][m][c] = 0.f;
    }

    const int n_k_all = (Tk + SLM_BC - 1) / SLM_BC;
    const int last_key = q0 + SLM_BR - 1 + offset;  // the last key any row of this tile may see
    const int n_k = causal ? min(n_k_all, last_key < 0 ? 0 : last_key / SLM_BC + 1) : n_k_all;

    for (int kt = 0; kt < n_k; ++kt) {
        const int k0 = kt * SLM_BC;
        __syncthreads();                              // everyone is done with the previous K, V, P
        load_rows<SLM_BC, DP>(Ks, k + k_head, k0, Tk, D, vec_ok);
        load_rows<SLM_BC, DP>(Vs, v + k_head, k0, Tk, D, vec_ok);
        __syncthreads();

        float s[4][8];
        tile_dot<DP>(s, Qs, Ks, tx, ty);              // s = Q_tile K_tile^T (unscaled)
        __syncthreads();                              // all reads of Ks done: it becomes Ps below

        // Only the last key tile (keys past T) and the diagonal tile (keys past the query) need masks.
        const bool edge = (k0 + SLM_BC > Tk) || (causal && k0 + SLM_BC - 1 > q0 + offset);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int qi = q0 + ty + 16 * i;
            float row_max = SLM_NEG_INF;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float x = s[i][j] * scale_log2;
                if (edge) {
                    const int kj = k0 + tx + 8 * j;
                    if (kj >= Tk || (causal && kj > qi + offset)) x = SLM_NEG_INF;
                }
                s[i][j] = x;
                row_max = fmaxf(row_max, x);
            }
            row_max = fmaxf(row_max, __shfl_xor_sync(SLM_FULL_MASK, row_max, 1));
            row_max = fmaxf(row_max, __shfl_xor_sync(SLM_FULL_MASK, row_max, 2));
            row_max = fmaxf(row_max, __shfl_xor_sync(SLM_FULL_MASK, row_max, 4));
            const float m_new = fmaxf(m_run[i], row_max);
            // A row that has seen only masked keys keeps m = -inf; subtract 0 then, not -inf (NaN).
            const float m_use = (m_new == SLM_NEG_INF) ? 0.f : m_new;
            const float alpha = exp2f(m_run[i] - m_use);       // rescales what was summed so far
            m_run[i] = m_new;
            l_run[i] *= alpha;
#pragma unroll
            for (int m = 0; m < NM; ++m)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[i][m][c] *= alpha;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float p = exp2f(s[i][j] - m_use);         // exp2(-inf) = 0 for masked keys
                l_run[i] += p;
                Ps[(ty + 16 * i) * kLdP + tx + 8 * j] = p;
            }
        }
        __syncthreads();
        tile_accumulate<DP, SLM_BC, NM>(acc, Ps, Vs, 0, tx, ty);       // acc += P V
    }

    float inv_l[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float l = l_run[i];
        l += __shfl_xor_sync(SLM_FULL_MASK, l, 1);
        l += __shfl_xor_sync(SLM_FULL_MASK, l, 2);
        l += __shfl_xor_sync(SLM_FULL_MASK, l, 4);
        inv_l[i] = 1.f / l;
        const int qi = q0 + ty + 16 * i;
        if (tx == 0 && qi < Tq) lse[(size_t)blockIdx.y * Tq + qi] = (m_run[i] + log2f(l)) * SLM_LN2;
    }
    store_rows<DP>(o + q_head, acc, inv_l, q0, Tq, D, vec_ok, tx, ty);
}

// ------------------------------------------------------------------------- backward: delta = rowsum
// delta[r] = sum_d dO[r, d] O[r, d] for the B*H*T rows; one warp per row, 8 warps per block.
__global__ void attention_backward_delta_f32(const float* __restrict__ dout, const float* __restrict__ o,
                                             float* __restrict__ delta, long long rows, int D) {
    const long long row = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* a = dout + row * D;
    const float* b = o + row * D;
    float sum = 0.f;
    for (int d = lane; d < D; d += 32) sum = fmaf(a[d], b[d], sum);
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(SLM_FULL_MASK, sum, offset);
    if (lane == 0) delta[row] = sum;
}

// ------------------------------------------------------------------- backward: dK, dV, and dQ += ...
// grid = (ceil(Tk / BC), B * H), block = 128, dynamic shared memory = attention_backward_smem(DP).
// In the score tiles here rows are keys and columns are queries (S^T, P^T, dS^T).
template <int DP>
__global__ void __launch_bounds__(SLM_THREADS)
attention_backward_dkdv_f32(const float* __restrict__ q, const float* __restrict__ k,
                            const float* __restrict__ v, const float* __restrict__ dout,
                            const float* __restrict__ lse, const float* __restrict__ delta,
                            float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv,
                            int Tq, int Tk, int D, float scale, int causal) {
    using namespace slm_attention;
    constexpr int LD = DP + 4;
    constexpr int NM = DP / 32;
    extern __shared__ float4 smem_f4[];
    float* Ks = reinterpret_cast<float*>(smem_f4);   // (BC, LD)  this block's keys (resident)
    float* Vs = Ks + SLM_BC * LD;                     // (BC, LD)  this block's values (resident)
    float* Qs = Vs + SLM_BC * LD;                     // (BR, LD)  current query tile
    float* dOs = Qs + SLM_BR * LD;                    // (BR, LD)  current output-gradient tile
    float* Pt = dOs + SLM_BR * LD;                    // (BC, kLdP) P^T   [key][query]
    float* dSt = Pt + SLM_BC * kLdP;                  // (BC, kLdP) dS^T  [key][query]
    float* dS = Pt;                                   // (BR, kLdP) dS    [query][key], reusing P^T
                                                      // once dV has been accumulated
    float* lse2 = dSt + SLM_BC * kLdP;                // (BR,) lse in base 2
    float* dlt = lse2 + SLM_BR;                       // (BR,) delta

    const int tid = threadIdx.x, tx = tid & 7, ty = tid >> 3;
    const int k0 = blockIdx.x * SLM_BC;
    const size_t q_head = (size_t)blockIdx.y * Tq * D, k_head = (size_t)blockIdx.y * Tk * D;
    const int offset = Tk - Tq;                       // causal: query i sees keys j <= i + offset
    const float* lse_h = lse + (size_t)blockIdx.y * Tq;
    const float* delta_h = delta + (size_t)blockIdx.y * Tq;
    const bool vec_ok = (D & 3) == 0;
    const float scale_log2 = scale * SLM_LOG2E;

    load_rows<SLM_BC, DP>(Ks, k + k_head, k0, Tk, D, vec_ok);
    load_rows<SLM_BC, DP>(Vs, v + k_head, k0, Tk, D, vec_ok);

    float dk_acc[4][NM][4], dv_acc[4][NM][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int m = 0; m < NM; ++m)
#pragma unroll
            for (int c = 0; c < 4; ++c) dk_acc[i][m][c] = dv_acc[i][m][c] = 0.f;

    const int n_q = (Tq + SLM_BR - 1) / SLM_BR;
    const int first_query = k0 - offset;              // the first query that may see key k0
    const int q_start = (causal && first_query > 0) ? first_query / SLM_BR : 0;
    for (int qt = q_start; qt < n_q; ++qt) {
        const int q0 = qt * SLM_BR;
        __syncthreads();                              // previous tile's readers are done
        load_rows<SLM_BR, DP>(Qs, q + q_head, q0, Tq, D, vec_ok);
        load_rows<SLM_BR, DP>(dOs, dout + q_head, q0, Tq, D, vec_ok);
        for (int r = tid; r < SLM_BR; r += SLM_THREADS) {
            const bool valid = q0 + r < Tq;
            lse2[r] = valid ? lse_h[q0 + r] * SLM_LOG2E : 0.f;
            dlt[r] = valid ? delta_h[q0 + r] : 0.f;
        }
        __syncthreads();

        // P^T[key][query] = exp(scale * K.Q - lse[query]), recomputed; masked entries are exactly 0.
        float s[4][8];
        tile_dot<DP>(s, Ks, Qs, tx, ty);
        const bool edge = (q0 + SLM_BR > Tq) || (k0 + SLM_BC > Tk) || (causal && k0 + SLM_BC - 1 > q0 + offset);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float p = exp2f(s[i][j] * scale_log2 - lse2[tx + 8 * j]);
                if (edge) {
                    const int kj = k0 + ty + 16 * i, qj = q0 + tx + 8 * j;
                    if (kj >= Tk || qj >= Tq || (causal && kj > qj + offset)) p = 0.f;
                }
                Pt[(ty + 16 * i) * kLdP + tx + 8 * j] = p;    // this thread reads it back below
            }
        // dP^T[key][query] = V.dO, then dS^T = P^T * (dP^T - delta[query]).
        tile_dot<DP>(s, Vs, dOs, tx, ty);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int key = ty + 16 * i, query = tx + 8 * j;
                const float ds = Pt[key * kLdP + query] * (s[i][j] - dlt[query]);
                dSt[key * kLdP + query] = ds;
            }
        __syncthreads();

        tile_accumulate<DP, SLM_BR, NM>(dv_acc, Pt, dOs, 0, tx, ty);    // dV += P^T dO
        tile_accumulate<DP, SLM_BR, NM>(dk_acc, dSt, Qs, 0, tx, ty);    // dK += dS^T Q   (scaled at the end)
        __syncthreads();                              // P^T is dead: its space takes dS (query-major)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int key = ty + 16 * i, query = tx + 8 * j;
                dS[query * kLdP + key] = dSt[key * kLdP + query];   // values this thread wrote
            }
        __syncthreads();

        // dQ[query] += scale * sum_key dS[query][key] K[key]: this tile's share, added atomically.
        // One 32-column group at a time keeps 16 accumulators live beside dK and dV.
#pragma unroll
        for (int m = 0; m < NM; ++m) {
            float dq_acc[4][1][4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int c = 0; c < 4; ++c) dq_acc[i][0][c] = 0.f;
            tile_accumulate<DP, SLM_BC, 1>(dq_acc, dS, Ks, m, tx, ty);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int row = q0 + ty + 16 * i;
                if (row >= Tq) continue;
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int col = 32 * m + 4 * tx + c;
                    if (col < D) atomicAdd(&dq[q_head + (size_t)row * D + col], dq_acc[i][0][c] * scale);
                }
            }
        }
    }

    float ones[4] = {1.f, 1.f, 1.f, 1.f}, scales[4] = {scale, scale, scale, scale};
    store_rows<DP>(dv + k_head, dv_acc, ones, k0, Tk, D, vec_ok, tx, ty);
    store_rows<DP>(dk + k_head, dk_acc, scales, k0, Tk, D, vec_ok, tx, ty);
}

#ifdef SCRATCHLM_INSTANTIATE_ALL
// For compile checks with nvcc (the Python side instantiates through NVRTC name expressions).
template __global__ void attention_forward_f32<32>(const float*, const float*, const float*, float*,
                                                   float*, int, int, int, float, int);
template __global__ void attention_forward_f32<64>(const float*, const float*, const float*, float*,
                                                   float*, int, int, int, float, int);
template __global__ void attention_forward_f32<96>(const float*, const float*, const float*, float*,
                                                   float*, int, int, int, float, int);
template __global__ void attention_forward_f32<128>(const float*, const float*, const float*, float*,
                                                    float*, int, int, int, float, int);
template __global__ void attention_backward_dkdv_f32<32>(const float*, const float*, const float*,
    const float*, const float*, const float*, float*, float*, float*, int, int, int, float, int);
template __global__ void attention_backward_dkdv_f32<64>(const float*, const float*, const float*,
    const float*, const float*, const float*, float*, float*, float*, int, int, int, float, int);
template __global__ void attention_backward_dkdv_f32<96>(const float*, const float*, const float*,
    const float*, const float*, const float*, float*, float*, float*, int, int, int, float, int);
template __global__ void attention_backward_dkdv_f32<128>(const float*, const float*, const float*,
    const float*, const float*, const float*, float*, float*, float*, int, int, int, float, int);
#endif

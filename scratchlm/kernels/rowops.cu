// Row-wise fused kernels for CuPy: layer norm, softmax + cross-entropy, embedding scatter-add.
//
// Loaded by scratchlm/kernels/cuda.py through cupy.RawModule (NVRTC, -std=c++17); each template is
// instantiated for float and double with name_expressions. Accumulation is in the storage type.
// Compile-check alone: nvcc -std=c++17 -arch=sm_90 -ptx -DSCRATCHLM_INSTANTIATE_ALL rowops.cu
// Shapes: x, y, dy, dx: (N, C); logits, dlogits: (N, V); idx, targets: (N,) int64.

#define SLM_FULL_MASK 0xffffffffu

namespace slm_rowops {

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(SLM_FULL_MASK, x, offset);
    return x;
}

template <typename T> __device__ __forceinline__ T neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -__int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double neg_inf<double>() {
    return -__longlong_as_double(0x7ff0000000000000LL);
}
template <typename T> __device__ __forceinline__ T quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() {
    return __longlong_as_double(0x7ff8000000000000LL);
}

// Combine two online-softmax partial states (max m, sum s of exp(x - m)) into one.
template <typename T>
__device__ __forceinline__ void merge_max_sum(T& m, T& s, T m_other, T s_other) {
    const T m_new = m > m_other ? m : m_other;
    if (m_new == neg_inf<T>()) return;                 // both empty: keep (-inf, 0)
    s = s * exp(m - m_new) + s_other * exp(m_other - m_new);
    m = m_new;
}

}  // namespace slm_rowops

// -------------------------------------------------------------------------------- layer norm
// y = (x - mean) * rstd * weight + bias, mean = sum_c x / C, rstd = 1 / sqrt(sum_c (x - mean)^2 / C + eps)
// One warp per row (8 rows per 256-thread block); weight/bias may be null (no affine part).
// With a residual (non-null ``residual`` and ``s``): the rows normalised are s = x + residual, written
// to ``s`` in the first pass (the fused residual add + layer norm of a pre-LN block). Each lane reads
// back only the columns it wrote itself, so no synchronisation is needed between the passes.
template <typename T>
__global__ void layer_norm_forward(const T* __restrict__ x, const T* __restrict__ residual,
                                   const T* __restrict__ weight, const T* __restrict__ bias,
                                   T* __restrict__ s, T* __restrict__ y, T* __restrict__ mean,
                                   T* __restrict__ rstd, long long N, int C, T eps) {
    using namespace slm_rowops;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= N) return;
    const T* xr = x + row * C;
    T sum = 0;
    if (residual != nullptr) {
        const T* rr = residual + row * C;
        T* sr = s + row * C;
        for (int c = lane; c < C; c += 32) {
            const T v = xr[c] + rr[c];
            sr[c] = v;
            sum += v;
        }
        xr = sr;                                        // the passes below read s
    } else {
        for (int c = lane; c < C; c += 32) sum += xr[c];
    }
    const T mu = warp_sum(sum) / C;
    T sq = 0;                                           // two passes: no cancellation in E[x^2] - mu^2
    for (int c = lane; c < C; c += 32) {
        const T d = xr[c] - mu;
        sq += d * d;
    }
    const T rs = rsqrt(warp_sum(sq) / C + eps);
    T* yr = y + row * C;
    for (int c = lane; c < C; c += 32) {
        T val = (xr[c] - mu) * rs;
        if (weight != nullptr) val = val * weight[c];
        if (bias != nullptr) val = val + bias[c];
        yr[c] = val;
    }
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

// With xhat = (x - mean) * rstd and g = dy * weight (g = dy without weight):
//     dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))  (+ dresidual, the gradient that reaches
// the fused op's sum s directly, when non-null: dL/ds = dL/ds|direct + the layer norm's part)
// One warp per row.
template <typename T>
__global__ void layer_norm_backward_dx(const T* __restrict__ dy, const T* __restrict__ dresidual,
                                       const T* __restrict__ x, const T* __restrict__ weight,
                                       const T* __restrict__ mean, const T* __restrict__ rstd,
                                       T* __restrict__ dx, long long N, int C) {
    using namespace slm_rowops;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= N) return;
    const T* xr = x + row * C;
    const T* dyr = dy + row * C;
    const T mu = mean[row], rs = rstd[row];
    T sum_g = 0, sum_gx = 0;
    for (int c = lane; c < C; c += 32) {
        const T g = weight != nullptr ? dyr[c] * weight[c] : dyr[c];
        sum_g += g;
        sum_gx += g * (xr[c] - mu) * rs;
    }
    const T mean_g = warp_sum(sum_g) / C;
    const T mean_gx = warp_sum(sum_gx) / C;
    T* dxr = dx + row * C;
    const T* drr = dresidual != nullptr ? dresidual + row * C : nullptr;
    for (int c = lane; c < C; c += 32) {
        const T g = weight != nullptr ? dyr[c] * weight[c] : dyr[c];
        T val = rs * (g - mean_g - (xr[c] - mu) * rs * mean_gx);
        if (drr != nullptr) val += drr[c];
        dxr[c] = val;
    }
}

// dweight[c] = sum_n dy[n, c] xhat[n, c], dbias[c] = sum_n dy[n, c], in two deterministic steps:
// block (32, 8) covers 32 columns and one chunk of rows, writing partial sums
// partial[0, chunk, c] (dweight) and partial[1, chunk, c] (dbias); the caller sums over chunks.
template <typename T>
__global__ void layer_norm_backward_params(const T* __restrict__ dy, const T* __restrict__ x,
                                           const T* __restrict__ mean, const T* __restrict__ rstd,
                                           T* __restrict__ partial, long long N, int C, int rows_per_chunk) {
    __shared__ T red_w[8][33];
    __shared__ T red_b[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const long long r_begin = (long long)blockIdx.y * rows_per_chunk;
    long long r_end = r_begin + rows_per_chunk;
    if (r_end > N) r_end = N;
    T sw = 0, sb = 0;
    if (c < C) {
        for (long long r = r_begin + threadIdx.y; r < r_end; r += 8) {
            const T g = dy[r * C + c];
            sw += g * (x[r * C + c] - mean[r]) * rstd[r];
            sb += g;
        }
    }
    red_w[threadIdx.y][threadIdx.x] = sw;
    red_b[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        T tw = 0, tb = 0;
        for (int i = 0; i < 8; ++i) {
            tw += red_w[i][threadIdx.x];
            tb += red_b[i][threadIdx.x];
        }
        const size_t n_chunks = gridDim.y;
        partial[(size_t)blockIdx.y * C + c] = tw;
        partial[(n_chunks + blockIdx.y) * C + c] = tb;
    }
}

// ---------------------------------------------------------------------- softmax + cross-entropy
// lse[n] = log sum_v exp(logits[n, v]);  row_loss[n] = lse[n] - logits[n, targets[n]]
// (0 for rows whose target is ignore_index, NaN for a target outside [0, V) so a bad label shows).
// One block per row (256 threads): each thread keeps an online (max, sum) over its strided columns,
// then the block merges them: one read of the row.
template <typename T>
__global__ void cross_entropy_forward(const T* __restrict__ logits, const long long* __restrict__ targets,
                                      T* __restrict__ lse, T* __restrict__ row_loss, int V,
                                      long long ignore_index) {
    using namespace slm_rowops;
    __shared__ T sh_m[32], sh_s[32];
    const long long row = blockIdx.x;
    const T* lr = logits + row * V;
    T m = neg_inf<T>(), s = 0;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        const T x = lr[v];
        if (x > m) {
            s = s * exp(m - x) + 1;                     // exp(-inf) = 0 on the first element
            m = x;
        } else {
            s += exp(x - m);
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        const T m_o = __shfl_xor_sync(SLM_FULL_MASK, m, offset);
        const T s_o = __shfl_xor_sync(SLM_FULL_MASK, s, offset);
        merge_max_sum(m, s, m_o, s_o);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
    if (lane == 0) {
        sh_m[warp] = m;
        sh_s[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < n_warps ? sh_m[lane] : neg_inf<T>();
        s = lane < n_warps ? sh_s[lane] : T(0);
        for (int offset = 16; offset > 0; offset >>= 1) {
            const T m_o = __shfl_xor_sync(SLM_FULL_MASK, m, offset);
            const T s_o = __shfl_xor_sync(SLM_FULL_MASK, s, offset);
            merge_max_sum(m, s, m_o, s_o);
        }
        if (lane == 0) {
            const T row_lse = m + log(s);
            lse[row] = row_lse;
            const long long t = targets[row];
            T loss;
            if (t == ignore_index) loss = 0;
            else if (t < 0 || t >= V) loss = quiet_nan<T>();
            else loss = row_lse - lr[t];
            row_loss[row] = loss;
        }
    }
}

// dlogits[n, v] = coef * (exp(logits[n, v] - lse[n]) - [v == targets[n]]), coef = dloss / n_valid,
// and 0 on ignored rows. coef is a one-element device array so no host round-trip is needed.
// grid = (ceil(V / (blockDim.x * 4)), N): each thread writes up to 4 columns of one row.
template <typename T>
__global__ void cross_entropy_backward(const T* __restrict__ logits, const T* __restrict__ lse,
                                       const long long* __restrict__ targets, const T* __restrict__ coef,
                                       T* __restrict__ dlogits, int V, long long ignore_index) {
    const long long row = blockIdx.y;
    const long long t = targets[row];
    const T scale = (t == ignore_index) ? T(0) : coef[0];
    const T row_lse = lse[row];
    const T* lr = logits + row * V;
    T* dr = dlogits + row * V;
    const int start = blockIdx.x * blockDim.x * 4 + threadIdx.x;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const int v = start + u * blockDim.x;
        if (v < V) {
            const T p = exp(lr[v] - row_lse);
            dr[v] = scale * (p - (v == t ? T(1) : T(0)));
        }
    }
}

// ------------------------------------------------------------------------ embedding backward
// dweight[idx[n], c] += dout[n, c] for all n: repeated ids add up (atomicAdd; the order of the adds,
// and so the last bits of a row hit many times, varies between runs). dweight must start at zero.
// grid = (N, ceil(C / blockDim.x)).
template <typename T>
__global__ void embedding_backward(const T* __restrict__ dout, const long long* __restrict__ idx,
                                   T* __restrict__ dweight, int C) {
    const long long n = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    atomicAdd(&dweight[idx[n] * C + c], dout[n * C + c]);
}

#ifdef SCRATCHLM_INSTANTIATE_ALL
template __global__ void layer_norm_forward<float>(const float*, const float*, const float*, const float*,
                                                   float*, float*, float*, float*, long long, int, float);
template __global__ void layer_norm_forward<double>(const double*, const double*, const double*, const double*,
                                                    double*, double*, double*, double*, long long, int, double);
template __global__ void layer_norm_backward_dx<float>(const float*, const float*, const float*, const float*,
                                                       const float*, const float*, float*, long long, int);
template __global__ void layer_norm_backward_dx<double>(const double*, const double*, const double*,
                                                        const double*, const double*, const double*, double*,
                                                        long long, int);
template __global__ void layer_norm_backward_params<float>(const float*, const float*, const float*,
                                                           const float*, float*, long long, int, int);
template __global__ void layer_norm_backward_params<double>(const double*, const double*, const double*,
                                                            const double*, double*, long long, int, int);
template __global__ void cross_entropy_forward<float>(const float*, const long long*, float*, float*, int,
                                                      long long);
template __global__ void cross_entropy_forward<double>(const double*, const long long*, double*, double*,
                                                       int, long long);
template __global__ void cross_entropy_backward<float>(const float*, const float*, const long long*,
                                                       const float*, float*, int, long long);
template __global__ void cross_entropy_backward<double>(const double*, const double*, const long long*,
                                                        const double*, double*, int, long long);
template __global__ void embedding_backward<float>(const float*, const long long*, float*, int);
template __global__ void embedding_backward<double>(const double*, const long long*, double*, int);
#endif

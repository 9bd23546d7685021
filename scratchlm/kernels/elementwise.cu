// Elementwise GELU for CuPy, forward and backward, 16-byte vector loads and stores.
//
// Loaded by scratchlm/kernels/cuda.py through cupy.RawModule (NVRTC, -std=c++17), instantiated for
// float and double. Compile-check alone: nvcc -std=c++17 -arch=sm_90 -ptx -DSCRATCHLM_INSTANTIATE_ALL
//
//   exact:  y = x Phi(x),  Phi(x) = (1 + erf(x / sqrt 2)) / 2,   dy/dx = Phi(x) + x phi(x)
//   tanh:   u = sqrt(2/pi) (x + 0.044715 x^3),  y = x (1 + tanh u) / 2,
//           dy/dx = (1 + tanh u) / 2 + x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2) / 2
//
// Each thread handles one 16-byte pack (4 floats or 2 doubles); the caller passes arrays whose
// base addresses are 16-byte aligned (CuPy allocations are), and the last partial pack is done
// element by element. n_packs = n / PACK; the grid is a grid-stride loop over packs.

namespace slm_elementwise {

template <typename T>
struct alignas(16) Pack {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

template <typename T>
__device__ __forceinline__ T gelu_value(T x, bool tanh_form) {
    if (tanh_form) {
        const T u = T(0.79788456080286535588) * (x + T(0.044715) * x * x * x);
        return T(0.5) * x * (T(1) + tanh(u));
    }
    return T(0.5) * x * (T(1) + erf(x * T(0.70710678118654752440)));
}

template <typename T>
__device__ __forceinline__ T gelu_slope(T x, bool tanh_form) {
    if (tanh_form) {
        const T u = T(0.79788456080286535588) * (x + T(0.044715) * x * x * x);
        const T th = tanh(u);
        const T du = T(0.79788456080286535588) * (T(1) + T(0.134145) * x * x);
        return T(0.5) * (T(1) + th) + T(0.5) * x * (T(1) - th * th) * du;
    }
    const T cdf = T(0.5) * (T(1) + erf(x * T(0.70710678118654752440)));
    const T pdf = T(0.39894228040143267794) * exp(T(-0.5) * x * x);
    return cdf + x * pdf;
}

}  // namespace slm_elementwise

// y = gelu(x) for n elements.
template <typename T>
__global__ void gelu_forward(const T* __restrict__ x, T* __restrict__ y, long long n, int tanh_form) {
    using namespace slm_elementwise;
    constexpr int P = Pack<T>::N;
    const long long n_packs = n / P;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_packs; i += stride) {
        Pack<T> a = reinterpret_cast<const Pack<T>*>(x)[i];
#pragma unroll
        for (int e = 0; e < P; ++e) a.v[e] = gelu_value(a.v[e], tanh_form != 0);
        reinterpret_cast<Pack<T>*>(y)[i] = a;
    }
    const long long tail = n_packs * P + (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tail < n) y[tail] = gelu_value(x[tail], tanh_form != 0);
}

// dx = dy * gelu'(x) for n elements.
template <typename T>
__global__ void gelu_backward(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                              long long n, int tanh_form) {
    using namespace slm_elementwise;
    constexpr int P = Pack<T>::N;
    const long long n_packs = n / P;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_packs; i += stride) {
        Pack<T> a = reinterpret_cast<const Pack<T>*>(x)[i];
        const Pack<T> g = reinterpret_cast<const Pack<T>*>(dy)[i];
#pragma unroll
        for (int e = 0; e < P; ++e) a.v[e] = g.v[e] * gelu_slope(a.v[e], tanh_form != 0);
        reinterpret_cast<Pack<T>*>(dx)[i] = a;
    }
    const long long tail = n_packs * P + (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tail < n) dx[tail] = dy[tail] * gelu_slope(x[tail], tanh_form != 0);
}

#ifdef SCRATCHLM_INSTANTIATE_ALL
template __global__ void gelu_forward<float>(const float*, float*, long long, int);
template __global__ void gelu_forward<double>(const double*, double*, long long, int);
template __global__ void gelu_backward<float>(const float*, const float*, float*, long long, int);
template __global__ void gelu_backward<double>(const double*, const double*, double*, long long, int);
#endif

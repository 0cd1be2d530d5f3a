// Fused in-place optimizer updates and the two helpers gradient clipping needs, fp32.
//
//   sgd_update     PyTorch SGD: g = grad + weight_decay * p; with momentum
//                  v = momentum v + g and step = g + momentum v (Nesterov) or v;
//                  without momentum step = g and `velocity` is not touched; p -= lr step.
//   adam_update    PyTorch Adam / AdamW: decoupled: p *= 1 - lr weight_decay, g = grad;
//                  else g = grad + weight_decay p. m = b1 m + (1 - b1) g,
//                  v = b2 v + (1 - b2) g^2, p -= step_size m / (sqrt(v) inv_sqrt_bias2 + eps)
//                  with step_size = lr / (1 - b1^t) and inv_sqrt_bias2 = 1 / sqrt(1 - b2^t)
//                  computed on the host in double.
//   sumsq          out[0] = sum a^2 (deterministic, reduce.cuh).
//   scale_inplace  a *= s.
//
// All are elementwise over n contiguous floats (n may exceed 2^31): block REDUCE_THREADS,
// grid-stride loops; each element is read and written once (sumsq reads only), so they
// run at memory bandwidth. Flags are runtime ints: the branches are uniform across the
// grid and cost nothing next to the memory traffic.
#include "reduce.cuh"

extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    sgd_update(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ velocity,
               float lr, float momentum, int nesterov, float weight_decay, long long n) {
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const float p = param[i];
        const float g = fmaf(weight_decay, p, grad[i]);
        float step = g;
        if (momentum != 0.0f) {
            const float v = fmaf(momentum, velocity[i], g);
            velocity[i] = v;
            step = nesterov ? fmaf(momentum, v, g) : v;
        }
        param[i] = p - lr * step;
    }
}

extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    adam_update(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
                float* __restrict__ v, float lr, float beta1, float beta2, float eps, float weight_decay,
                float step_size, float inv_sqrt_bias2, int decoupled, long long n) {
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        float p = param[i];
        float g = grad[i];
        if (decoupled) {
            p *= 1.0f - lr * weight_decay;
        } else {
            g = fmaf(weight_decay, p, g);
        }
        const float mi = fmaf(beta1, m[i], (1.0f - beta1) * g);
        const float vi = fmaf(beta2, v[i], (1.0f - beta2) * g * g);
        m[i] = mi;
        v[i] = vi;
        param[i] = p - step_size * mi / fmaf(sqrtf(vi), inv_sqrt_bias2, eps);
    }
}

extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    sumsq(const float* __restrict__ a, float* __restrict__ partials, unsigned int* __restrict__ ticket,
          float* __restrict__ out, long long n) {
    float total = 0.0f;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        total = fmaf(a[i], a[i], total);
    }
    gpubp::grid_sum_to(total, partials, ticket, out, 1.0f);
}

extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    scale_inplace(float* __restrict__ a, float s, long long n) {
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        a[i] *= s;
    }
}

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
//   rmsprop_update PyTorch RMSprop: g = grad + weight_decay p; v = alpha v + (1 - alpha) g^2;
//                  centered: gm = alpha gm + (1 - alpha) g, avg = sqrt(v - gm^2) + eps, else
//                  avg = sqrt(v) + eps and `grad_avg` is not touched; with momentum
//                  b = momentum b + g / avg, p -= lr b; without, p -= lr g / avg and
//                  `momentum_buffer` is not touched.
//   *_hyper        the same updates with lr (and Adam's step_size, inv_sqrt_bias2) read from
//                  device memory, skipped when the step's loss is not finite: the kernels a
//                  captured training step (a CUDA graph) replays.
//   sumsq          out[0] = sum a^2 (deterministic, reduce.cuh).
//   scale_inplace  a *= s.
//
// All are elementwise over n contiguous floats (n may exceed 2^31): block REDUCE_THREADS,
// grid-stride loops; each element is read and written once (sumsq reads only), so they
// run at memory bandwidth. Flags are runtime ints: the branches are uniform across the
// grid and cost nothing next to the memory traffic.
#include "reduce.cuh"

namespace {

// The update bodies, shared by the entry points that take the learning rate (and Adam's
// bias corrections) as kernel arguments and the *_hyper ones that read them from device
// memory, which a CUDA graph captures once and a host copy updates before every replay.

__device__ __forceinline__ void sgd_body(float* __restrict__ param, const float* __restrict__ grad,
                                         float* __restrict__ velocity, float lr, float momentum, int nesterov,
                                         float weight_decay, long long n) {
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

__device__ __forceinline__ void adam_body(float* __restrict__ param, const float* __restrict__ grad,
                                          float* __restrict__ m, float* __restrict__ v, float lr, float beta1,
                                          float beta2, float eps, float weight_decay, float step_size,
                                          float inv_sqrt_bias2, int decoupled, long long n) {
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

__device__ __forceinline__ void rmsprop_body(float* __restrict__ param, const float* __restrict__ grad,
                                             float* __restrict__ square_avg, float* __restrict__ grad_avg,
                                             float* __restrict__ momentum_buffer, float lr, float alpha, float eps,
                                             float weight_decay, float momentum, int centered, long long n) {
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const float p = param[i];
        const float g = fmaf(weight_decay, p, grad[i]);
        const float v = fmaf(alpha, square_avg[i], (1.0f - alpha) * g * g);
        square_avg[i] = v;
        float variance = v;
        if (centered) {
            const float gm = fmaf(alpha, grad_avg[i], (1.0f - alpha) * g);
            grad_avg[i] = gm;
            variance = fmaf(-gm, gm, v);
        }
        float step = g / (sqrtf(variance) + eps);
        if (momentum != 0.0f) {
            step = fmaf(momentum, momentum_buffer[i], step);
            momentum_buffer[i] = step;
        }
        param[i] = p - lr * step;
    }
}

// A replayed step cannot stop between its loss and its update the way the host loop does,
// so the update itself skips when the loss it follows is not finite: the weights stay those
// of the previous step, as in fit.
// |x| <= FLT_MAX is false for NaN and for +-inf, and needs no math header under NVRTC.
__device__ __forceinline__ bool loss_is_finite(const float* __restrict__ loss) {
    return fabsf(__ldg(loss)) <= 3.40282347e38f;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    sgd_update(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ velocity,
               float lr, float momentum, int nesterov, float weight_decay, long long n) {
    sgd_body(param, grad, velocity, lr, momentum, nesterov, weight_decay, n);
}

// hyper = {lr}; loss: the step's loss, on the device.
extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    sgd_update_hyper(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ velocity,
                     const float* __restrict__ hyper, const float* __restrict__ loss, float momentum, int nesterov,
                     float weight_decay, long long n) {
    if (!loss_is_finite(loss)) return;
    sgd_body(param, grad, velocity, __ldg(hyper), momentum, nesterov, weight_decay, n);
}

extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    adam_update(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
                float* __restrict__ v, float lr, float beta1, float beta2, float eps, float weight_decay,
                float step_size, float inv_sqrt_bias2, int decoupled, long long n) {
    adam_body(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step_size, inv_sqrt_bias2, decoupled, n);
}

// hyper = {lr, step_size, inv_sqrt_bias2}; loss: the step's loss, on the device.
extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    adam_update_hyper(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
                      float* __restrict__ v, const float* __restrict__ hyper, const float* __restrict__ loss,
                      float beta1, float beta2, float eps, float weight_decay, int decoupled, long long n) {
    if (!loss_is_finite(loss)) return;
    adam_body(param, grad, m, v, __ldg(hyper), beta1, beta2, eps, weight_decay, __ldg(hyper + 1), __ldg(hyper + 2),
              decoupled, n);
}

extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    rmsprop_update(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ square_avg,
                   float* __restrict__ grad_avg, float* __restrict__ momentum_buffer, float lr, float alpha,
                   float eps, float weight_decay, float momentum, int centered, long long n) {
    rmsprop_body(param, grad, square_avg, grad_avg, momentum_buffer, lr, alpha, eps, weight_decay, momentum, centered,
                 n);
}

// hyper = {lr}; loss: the step's loss, on the device.
extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    rmsprop_update_hyper(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ square_avg,
                         float* __restrict__ grad_avg, float* __restrict__ momentum_buffer,
                         const float* __restrict__ hyper, const float* __restrict__ loss, float alpha, float eps,
                         float weight_decay, float momentum, int centered, long long n) {
    if (!loss_is_finite(loss)) return;
    rmsprop_body(param, grad, square_avg, grad_avg, momentum_buffer, __ldg(hyper), alpha, eps, weight_decay, momentum,
                 centered, n);
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

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
//   *_many         the same updates of several tensors in one launch (a training step's
//                  parameters): the table (below) gives each block its tensor and chunk; lr
//                  (and Adam's corrections) come as arguments, or with `hyper` from its row t
//                  of `hyper_stride` floats for tensor t, guarded by `loss` as *_hyper are.
//                  Each element gets the single-tensor kernel's arithmetic, so the results are
//                  the same bits.
//   sumsq          out[0] = sum a^2 (deterministic, reduce.cuh); sumsq_many: over several arrays.
//   scale_inplace  a *= s; scale_many: several arrays in one launch; scale_many_clip: the
//                  gradient clipping of a captured step, its scale computed on the device.
//
// All are elementwise over n contiguous floats (n may exceed 2^31): block REDUCE_THREADS,
// grid-stride loops (the *_many ones: a chunk of MULTI_CHUNK elements per block); each
// element is read and written once (sumsq reads only), so they run at memory bandwidth.
// Flags are runtime ints: the branches are uniform across the grid and cost nothing next to
// the memory traffic.
#include "reduce.cuh"

namespace {

// The update bodies, shared by the entry points that take the learning rate (and Adam's
// bias corrections) as kernel arguments and the *_hyper ones that read them from device
// memory, which a CUDA graph captures once and a host copy updates before every replay.

// g + weight_decay p, the L2 decay PyTorch adds to the gradient. No decay adds nothing: 0 * p is
// NaN for an infinite p, where the other backends keep it.
__device__ __forceinline__ float with_weight_decay(float g, float p, float weight_decay) {
    return weight_decay != 0.0f ? fmaf(weight_decay, p, g) : g;
}

__device__ __forceinline__ void sgd_element(float* __restrict__ param, const float* __restrict__ grad,
                                            float* __restrict__ velocity, float lr, float momentum, int nesterov,
                                            float weight_decay, long long i) {
    const float p = param[i];
    const float g = with_weight_decay(grad[i], p, weight_decay);
    float step = g;
    if (momentum != 0.0f) {
        const float v = fmaf(momentum, velocity[i], g);
        velocity[i] = v;
        step = nesterov ? fmaf(momentum, v, g) : v;
    }
    param[i] = p - lr * step;
}

__device__ __forceinline__ void sgd_body(float* __restrict__ param, const float* __restrict__ grad,
                                         float* __restrict__ velocity, float lr, float momentum, int nesterov,
                                         float weight_decay, long long n) {
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        sgd_element(param, grad, velocity, lr, momentum, nesterov, weight_decay, i);
    }
}

__device__ __forceinline__ void adam_element(float* __restrict__ param, const float* __restrict__ grad,
                                             float* __restrict__ m, float* __restrict__ v, float lr, float beta1,
                                             float beta2, float eps, float weight_decay, float step_size,
                                             float inv_sqrt_bias2, int decoupled, long long i) {
    float p = param[i];
    float g = grad[i];
    if (decoupled) {
        p *= 1.0f - lr * weight_decay;
    } else {
        g = with_weight_decay(g, p, weight_decay);
    }
    const float mi = fmaf(beta1, m[i], (1.0f - beta1) * g);
    const float vi = fmaf(beta2, v[i], (1.0f - beta2) * g * g);
    m[i] = mi;
    v[i] = vi;
    param[i] = p - step_size * mi / fmaf(sqrtf(vi), inv_sqrt_bias2, eps);
}

__device__ __forceinline__ void adam_body(float* __restrict__ param, const float* __restrict__ grad,
                                          float* __restrict__ m, float* __restrict__ v, float lr, float beta1,
                                          float beta2, float eps, float weight_decay, float step_size,
                                          float inv_sqrt_bias2, int decoupled, long long n) {
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        adam_element(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step_size, inv_sqrt_bias2, decoupled, i);
    }
}

__device__ __forceinline__ void rmsprop_element(float* __restrict__ param, const float* __restrict__ grad,
                                                float* __restrict__ square_avg, float* __restrict__ grad_avg,
                                                float* __restrict__ momentum_buffer, float lr, float alpha, float eps,
                                                float weight_decay, float momentum, int centered, long long i) {
    const float p = param[i];
    const float g = with_weight_decay(grad[i], p, weight_decay);
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

__device__ __forceinline__ void rmsprop_body(float* __restrict__ param, const float* __restrict__ grad,
                                             float* __restrict__ square_avg, float* __restrict__ grad_avg,
                                             float* __restrict__ momentum_buffer, float lr, float alpha, float eps,
                                             float weight_decay, float momentum, int centered, long long n) {
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        rmsprop_element(param, grad, square_avg, grad_avg, momentum_buffer, lr, alpha, eps, weight_decay, momentum,
                        centered, i);
    }
}

// A replayed step cannot stop between its loss and its update the way the host loop does,
// so the update itself skips when the loss it follows is not finite: the weights stay those
// of the previous step, as in fit.
// |x| <= FLT_MAX is false for NaN and for +-inf, and needs no math header under NVRTC.
__device__ __forceinline__ bool loss_is_finite(const float* __restrict__ loss) {
    return fabsf(__ldg(loss)) <= 3.40282347e38f;
}

// A multi-tensor launch's table, `count` tensors of K buffers each, as 64-bit words:
//   [t * K + j]               buffer j of tensor t (param, grad, then the optimizer's state),
//   [count * K + t]           tensor t's length,
//   [count * K + count + t]   its first chunk (t = count: all the chunks), ascending.
// Chunk b is elements [c * MULTI_CHUNK, (c + 1) * MULTI_CHUNK) of the tensor t whose chunks
// hold b, c = b - first chunk of t; MULTI_CHUNK is cupy_backend's. A block updates one chunk.
constexpr int MULTI_CHUNK = 4 * gpubp::REDUCE_THREADS;

template <int K>
struct MultiTensor {
    float* buffer[K];
    int index;              // the tensor's, 0 .. count - 1
    long long begin, end;   // the elements of it this block updates

    __device__ static MultiTensor of_block(const long long* __restrict__ table, int count) {
        return of_chunk(table, count, blockIdx.x);
    }

    // Chunk b of the launch's (a block's, or one of the chunks a block loops over).
    __device__ static MultiTensor of_chunk(const long long* __restrict__ table, int count, long long b) {
        const long long* first = table + count * K + count;
        int lo = 0, hi = count - 1;  // the last tensor whose first chunk is at or before b
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (__ldg(first + mid) <= b) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        MultiTensor tensor;
#pragma unroll
        for (int j = 0; j < K; ++j) tensor.buffer[j] = reinterpret_cast<float*>(__ldg(table + lo * K + j));
        const long long n = __ldg(table + count * K + lo);
        tensor.index = lo;
        tensor.begin = (b - __ldg(first + lo)) * MULTI_CHUNK;
        tensor.end = n < tensor.begin + MULTI_CHUNK ? n : tensor.begin + MULTI_CHUNK;
        return tensor;
    }
};

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

// The multi-tensor updates. from_hyper = 0: lr (and Adam's step_size, inv_sqrt_bias2) as
// arguments, `hyper` and `loss` unread. from_hyper = 1: read from tensor t's row of `hyper`
// ({lr}, or Adam's {lr, step_size, inv_sqrt_bias2}), and nothing updated when `loss` is not
// finite. A buffer an update does not touch (velocity without momentum, ...) is param again.
extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    sgd_update_many(const long long* __restrict__ table, int count, const float* __restrict__ hyper,
                    int hyper_stride, const float* __restrict__ loss, int from_hyper, float lr, float momentum,
                    int nesterov, float weight_decay) {
    if (from_hyper && !loss_is_finite(loss)) return;
    const auto t = MultiTensor<3>::of_block(table, count);
    if (from_hyper) lr = __ldg(hyper + static_cast<long long>(t.index) * hyper_stride);
    for (long long i = t.begin + threadIdx.x; i < t.end; i += blockDim.x) {
        sgd_element(t.buffer[0], t.buffer[1], t.buffer[2], lr, momentum, nesterov, weight_decay, i);
    }
}

extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    adam_update_many(const long long* __restrict__ table, int count, const float* __restrict__ hyper,
                     int hyper_stride, const float* __restrict__ loss, int from_hyper, float lr, float beta1,
                     float beta2, float eps, float weight_decay, float step_size, float inv_sqrt_bias2,
                     int decoupled) {
    if (from_hyper && !loss_is_finite(loss)) return;
    const auto t = MultiTensor<4>::of_block(table, count);
    if (from_hyper) {
        const float* row = hyper + static_cast<long long>(t.index) * hyper_stride;
        lr = __ldg(row);
        step_size = __ldg(row + 1);
        inv_sqrt_bias2 = __ldg(row + 2);
    }
    for (long long i = t.begin + threadIdx.x; i < t.end; i += blockDim.x) {
        adam_element(t.buffer[0], t.buffer[1], t.buffer[2], t.buffer[3], lr, beta1, beta2, eps, weight_decay,
                     step_size, inv_sqrt_bias2, decoupled, i);
    }
}

extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    rmsprop_update_many(const long long* __restrict__ table, int count, const float* __restrict__ hyper,
                        int hyper_stride, const float* __restrict__ loss, int from_hyper, float lr, float alpha,
                        float eps, float weight_decay, float momentum, int centered) {
    if (from_hyper && !loss_is_finite(loss)) return;
    const auto t = MultiTensor<5>::of_block(table, count);
    if (from_hyper) lr = __ldg(hyper + static_cast<long long>(t.index) * hyper_stride);
    for (long long i = t.begin + threadIdx.x; i < t.end; i += blockDim.x) {
        rmsprop_element(t.buffer[0], t.buffer[1], t.buffer[2], t.buffer[3], t.buffer[4], lr, alpha, eps,
                        weight_decay, momentum, centered, i);
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

// The sum of squares of every tensor of a table (K = 1) in one launch, as gradient clipping
// needs it: block b takes chunks b, b + gridDim.x, ... of `chunks` (gridDim.x is capped at
// the partials' buffer), then grid_sum_to adds the blocks' sums in block order.
extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    sumsq_many(const long long* __restrict__ table, float* __restrict__ partials, unsigned int* __restrict__ ticket,
               float* __restrict__ out, int count, long long chunks) {
    float total = 0.0f;
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        const auto t = MultiTensor<1>::of_chunk(table, count, c);
        const float* __restrict__ a = t.buffer[0];
        for (long long i = t.begin + threadIdx.x; i < t.end; i += blockDim.x) total = fmaf(a[i], a[i], total);
    }
    gpubp::grid_sum_to(total, partials, ticket, out, 1.0f);
}

// a *= s for every tensor of a table (K = 1), one chunk a block.
extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    scale_many(const long long* __restrict__ table, int count, float s) {
    const auto t = MultiTensor<1>::of_block(table, count);
    float* __restrict__ a = t.buffer[0];
    for (long long i = t.begin + threadIdx.x; i < t.end; i += blockDim.x) a[i] *= s;
}

// The gradient clipping of a captured training step: every tensor of the table (K = 1) times
// s = max_norm / (sqrt(*sumsq) + 1e-6) unless s >= 1 (so a NaN norm makes every gradient NaN, and
// an infinite one scales by 0, as torch's clip_grad_norm_ does), nothing when the step's loss is
// not finite.
// s in double, as gpubp.optim.clip_grad_norm computes it on the host in an eager step, then
// rounded to float as the eager step's scale argument is: the same bits.
extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    scale_many_clip(const long long* __restrict__ table, int count, const float* __restrict__ sumsq,
                    const float* __restrict__ loss, double max_norm) {
    if (!loss_is_finite(loss)) return;
    const double s = max_norm / (sqrt(static_cast<double>(__ldg(sumsq))) + 1e-6);
    if (s >= 1.0) return;
    const float f = static_cast<float>(s);
    const auto t = MultiTensor<1>::of_block(table, count);
    float* __restrict__ a = t.buffer[0];
    for (long long i = t.begin + threadIdx.x; i < t.end; i += blockDim.x) a[i] *= f;
}

extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    scale_inplace(float* __restrict__ a, float s, long long n) {
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        a[i] *= s;
    }
}

// Fused loss kernels, fp32: loss value and gradient of the mean in one pass each.
//
//   ce_fwd_bwd_i32 / ce_fwd_bwd_i64   softmax cross-entropy, labels int32 / int64
//       logits (B, C) row-major, labels (B,), grad (B, C), label smoothing eps in [0, 1)
//       (the last argument): each row's target is t = (1 - eps) onehot(label) + eps / C,
//       loss = mean_r [ log sum_c exp(z_rc) - (1 - eps) z_r,label - eps / C sum_c z_rc ],
//       grad_rc = (softmax(z_r)_c - t_c) / B (PyTorch's label_smoothing). eps = 0 runs the
//       plain one-hot code (OneHot below), so its results are what they were before eps; with
//       eps > 0 (Smoothed) a -inf logit makes the row's loss +inf, as in PyTorch. A label outside
//       [0, C) makes the loss and its row's gradient NaN.
//       A row group of ce_row_lanes(C) lanes per row: the warp for C > 16, else the smallest
//       power of two >= C, so a warp takes 32 / lanes adjacent rows at once and a short row
//       (C = 10: two rows per warp, 80 contiguous bytes per load) does not leave most of the
//       warp idle (grid-stride over rows, REDUCE_THREADS / lanes rows per block at a time):
//       an online max/sum-of-exp pass over the row, then one pass writing the gradient. Each
//       row costs two reads and one write of C floats; the second read is usually an L1/L2
//       hit. The lanes a group has beyond C hold the empty (LOWEST, 0) pair, which merges
//       exactly, so the gradient is the same to the bit for any group width >= C.
//   mse_fwd_bwd    pred, target, grad (n,): loss = mean (p - t)^2, grad = 2 (p - t) / n.
//   mae_fwd_bwd    pred, target, grad (n,): loss = mean |p - t|, grad = sign(p - t) / n, 0 where
//       p = t (as PyTorch's L1Loss).
//   huber_fwd_bwd  pred, target, grad (n,), delta > 0: with d = p - t and c = clamp(d, -delta,
//       delta), loss = mean c (d - c / 2) (d^2 / 2 inside delta, delta (|d| - delta / 2) past
//       it), grad = c / n.
//   bce_fwd_bwd    logits, target, grad (n,), binary cross-entropy on logits:
//       loss = mean [max(z, 0) - z t + log1p(exp(-|z|))], grad = (sigmoid(z) - t) / n;
//       both terms take exp of -|z| only, so any finite logit is safe.
//   poisson_fwd_bwd  log_rate, target, grad (n,), Poisson negative log-likelihood on log rates
//       (PyTorch's poisson_nll_loss with log_input, without the log t! constant):
//       loss = mean [exp(z) - t z], grad = (exp(z) - t) / n; exp(z) overflows past z ~ 88.7,
//       as PyTorch's float32 does.
//   *_weighted     the same with per-sample weights w (B,) (Keras's sample_weight): each row's
//       terms and gradient are multiplied by its weight, and the sum is still divided by B
//       (cross-entropy) or n (the others); the elementwise kernels take the row width to find
//       an element's row. The unweighted kernels are these with every weight 1, which the
//       compiler folds away, so their results are what they were without weights.
//
// Launch: block REDUCE_THREADS, grid min(work, the host's partials buffer) blocks, grid-stride
// loops; the loss scalar goes to out[0] via reduce.cuh's deterministic grid sum, using
// `partials` (gridDim.x floats) and `ticket` (one zeroed unsigned int). Indices are long
// long, so n and B * C may exceed 2^31.
#include "activations.cuh"
#include "reduce.cuh"

namespace gpubp {

// The cross-entropy kernels ask for 4 resident blocks per SM (1024 threads, what sm_75 holds; at
// most 64 registers): left to choose, ptxas gave the version with the label check (ce_rows) 32
// registers and spilled 4 to 8 bytes around the row loop; asked for 4 blocks it takes 35 to 39,
// as the kernels did before the check, which leaves 6 blocks resident on sm_80 and sm_90.
constexpr int CE_MIN_BLOCKS = 4;

// Running max starts at the lowest finite float rather than -inf, so a lane that saw no
// element (C < 32) merges as (LOWEST, 0) without ever forming -inf - -inf = NaN.
constexpr float LOWEST = -3.402823466e38f;

// Row weights: the unweighted kernels count every row once; the *_weighted ones read w[row].
struct EveryRowOnce {
    __device__ __forceinline__ float of_row(long long) const { return 1.0f; }
};
struct SampleWeights {
    const float* __restrict__ w;
    __device__ __forceinline__ float of_row(long long row) const { return __ldg(w + row); }
};

// The lanes that share one row of C classes: a power of two, at most the warp (the host's
// rows per block, REDUCE_THREADS / this, is cupy_backend.ce_row_lanes).
__device__ __forceinline__ int ce_row_lanes(int C) {
    int lanes = 1;
    while (lanes < C && lanes < 32) lanes *= 2;
    return lanes;
}

// Merge two (max, sum of exp(v - max)) pairs.
__device__ __forceinline__ void merge_softmax_stats(float& m, float& s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}

// The row target of the cross-entropy. OneHot: the label's one-hot row, the kernel as it was
// before label smoothing. Smoothed: (1 - eps) onehot + eps / C, which also needs the row's
// sum of z - m (taken in the gradient pass, where the max m is known, so that a logit of any
// magnitude cancels against m before it is summed). With m the row max and s = sum exp(z - m):
// loss = log s - (1 - eps)(z_label - m) - eps / C sum (z - m), which is the header's formula.
struct OneHot {
    static constexpr bool SUMS_ROW = false;
    __device__ __forceinline__ float grad(float p, bool is_label) const { return is_label ? p - 1.0f : p; }
    __device__ __forceinline__ float row_loss(float s, float m, float z_label, float) const {
        // z_label - m first: log s + m would lose log s to m's rounding at a large shared offset
        return logf(s) - (z_label - m);
    }
};
struct Smoothed {
    float keep;  // 1 - eps
    float off;   // eps / C: every class's share
    float on;    // 1 - eps + eps / C: the label's target
    __device__ Smoothed(float eps, int C)
        : keep(1.0f - eps), off(eps / static_cast<float>(C)), on(1.0f - eps + eps / static_cast<float>(C)) {}
    static constexpr bool SUMS_ROW = true;
    __device__ __forceinline__ float grad(float p, bool is_label) const { return p - (is_label ? on : off); }
    __device__ __forceinline__ float row_loss(float s, float m, float z_label, float shifted_sum) const {
        return logf(s) - keep * (z_label - m) - off * shifted_sum;
    }
};

template <class Label, class Weights, class Target>
__device__ __forceinline__ void ce_rows(const float* __restrict__ logits, const Label* __restrict__ labels,
                                        Weights weights, float* __restrict__ grad, float* __restrict__ partials,
                                        unsigned int* __restrict__ ticket, float* __restrict__ out, int B, int C,
                                        Target target) {
    constexpr int WARPS = REDUCE_THREADS / 32;
    const int lanes = ce_row_lanes(C);  // per row; 32 / lanes rows per warp
    const int rows_per_warp = 32 / lanes;
    const int lane = threadIdx.x % lanes;  // within the row group
    const float inv_b = 1.0f / static_cast<float>(B);
    float loss_total = 0.0f;  // meaningful in lane 0 of each row group
    // first: the warp's first row; the loop's bounds are the warp's, so every lane takes each
    // shuffle (a lane whose row is past B carries the empty pair and writes nothing).
    for (long long first = (static_cast<long long>(blockIdx.x) * WARPS + threadIdx.x / 32) * rows_per_warp;
         first < B; first += static_cast<long long>(gridDim.x) * WARPS * rows_per_warp) {
        const long long row = first + (threadIdx.x % 32) / lanes;
        const bool in_batch = row < B;
        const float* z = logits + (in_batch ? row : 0) * C;
        float m = LOWEST, s = 0.0f;
        for (int c = lane; in_batch && c < C; c += lanes) {
            const float v = z[c];
            if (v > m) {
                s = s * expf(m - v) + 1.0f;
                m = v;
            } else {
                s += expf(v - m);
            }
        }
        for (int offset = lanes / 2; offset > 0; offset /= 2) {
            const float m2 = __shfl_xor_sync(FULL_WARP, m, offset);
            const float s2 = __shfl_xor_sync(FULL_WARP, s, offset);
            merge_softmax_stats(m, s, m2, s2);
        }
        // A label outside [0, C) (one unsigned compare) is read as 0 with a NaN weight: the row's
        // loss and gradient are NaN, and z[label] never reads another row's logit, or past the
        // logits (which ends the CUDA context). The backend cannot check labels on the host
        // without waiting for the device.
        const long long given = in_batch ? static_cast<long long>(labels[row]) : 0;
        const bool labelled = static_cast<unsigned long long>(given) < static_cast<unsigned long long>(C);
        const long long label = labelled ? given : 0;
        const float weight = in_batch ? (labelled ? weights.of_row(row) : __int_as_float(0x7fc00000)) : 0.0f;
        const float inv_s = 1.0f / s;
        const float scale = inv_b * weight;
        float* g = grad + (in_batch ? row : 0) * C;
        float shifted_sum = 0.0f;  // this lane's sum of z - m (Smoothed only)
        for (int c = lane; in_batch && c < C; c += lanes) {
            const float shifted = z[c] - m;
            const float p = expf(shifted) * inv_s;
            g[c] = target.grad(p, c == label) * scale;
            if (Target::SUMS_ROW) shifted_sum += shifted;
        }
        if (Target::SUMS_ROW) {
            for (int offset = lanes / 2; offset > 0; offset /= 2) {
                shifted_sum += __shfl_xor_sync(FULL_WARP, shifted_sum, offset);
            }
        }
        if (in_batch && lane == 0) loss_total += weight * target.row_loss(s, m, z[label], shifted_sum);
    }
    grid_sum_to(loss_total, partials, ticket, out, inv_b);
}

// An entry point's eps picks the target: 0 runs OneHot, anything else Smoothed.
template <class Label, class Weights>
__device__ __forceinline__ void ce_fwd_bwd(const float* __restrict__ logits, const Label* __restrict__ labels,
                                           Weights weights, float* __restrict__ grad, float* __restrict__ partials,
                                           unsigned int* __restrict__ ticket, float* __restrict__ out,
                                           int B, int C, float eps) {
    if (eps == 0.0f) {
        ce_rows(logits, labels, weights, grad, partials, ticket, out, B, C, OneHot{});
    } else {
        ce_rows(logits, labels, weights, grad, partials, ticket, out, B, C, Smoothed(eps, C));
    }
}

// The pass every elementwise loss makes: grid-stride over the n elements, element i in row
// i / width of weight w; term(p, t, w, inv_n, total) adds the element's weighted loss to total
// and returns its gradient. The grid's sum of total over n is the loss.
template <class Weights, class Term>
__device__ __forceinline__ void elementwise_loss(const float* __restrict__ pred, const float* __restrict__ target,
                                                 Weights weights, long long width, float* __restrict__ grad,
                                                 float* __restrict__ partials, unsigned int* __restrict__ ticket,
                                                 float* __restrict__ out, long long n, Term term) {
    const float inv_n = 1.0f / static_cast<float>(n);
    float total = 0.0f;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        grad[i] = term(pred[i], target[i], weights.of_row(i / width), inv_n, total);
    }
    grid_sum_to(total, partials, ticket, out, inv_n);
}

// The elementwise losses' terms (the formulas at the top of this file).
struct SquaredError {
    __device__ __forceinline__ float operator()(float p, float t, float w, float inv_n, float& total) const {
        const float d = p - t;
        const float wd = d * w;
        total = fmaf(wd, d, total);
        return wd * (2.0f * inv_n);
    }
};

struct AbsoluteError {
    __device__ __forceinline__ float operator()(float p, float t, float w, float inv_n, float& total) const {
        const float d = p - t;
        total = fmaf(w, fabsf(d), total);
        return (d > 0.0f ? inv_n : (d < 0.0f ? -inv_n : 0.0f)) * w;
    }
};

struct HuberError {
    float delta;
    __device__ __forceinline__ float operator()(float p, float t, float w, float inv_n, float& total) const {
        const float d = p - t;
        // Not fminf(fmaxf(d, -delta), delta): those return the operand that is not NaN, which
        // would give a NaN prediction a finite gradient. Comparisons pass a NaN d through.
        const float c = d < -delta ? -delta : (d > delta ? delta : d);
        const float wc = c * w;
        total = fmaf(wc, d - 0.5f * c, total);
        return wc * inv_n;
    }
};

struct BinaryCrossEntropy {  // p is a logit
    __device__ __forceinline__ float operator()(float z, float t, float w, float inv_n, float& total) const {
        total += w * (fmaxf(z, 0.0f) - z * t + log1pf(expf(-fabsf(z))));
        return (stable_sigmoid(z) - t) * inv_n * w;
    }
};

struct PoissonNll {  // p is a log rate
    __device__ __forceinline__ float operator()(float z, float t, float w, float inv_n, float& total) const {
        const float rate = expf(z);
        total = fmaf(w, rate - z * t, total);
        return (rate - t) * inv_n * w;
    }
};

}  // namespace gpubp

extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS, gpubp::CE_MIN_BLOCKS)
    ce_fwd_bwd_i32(const float* __restrict__ logits, const int* __restrict__ labels, float* __restrict__ grad,
                   float* __restrict__ partials, unsigned int* __restrict__ ticket, float* __restrict__ out,
                   int B, int C, float eps) {
    gpubp::ce_fwd_bwd(logits, labels, gpubp::EveryRowOnce{}, grad, partials, ticket, out, B, C, eps);
}

extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS, gpubp::CE_MIN_BLOCKS)
    ce_fwd_bwd_i64(const float* __restrict__ logits, const long long* __restrict__ labels,
                   float* __restrict__ grad, float* __restrict__ partials, unsigned int* __restrict__ ticket,
                   float* __restrict__ out, int B, int C, float eps) {
    gpubp::ce_fwd_bwd(logits, labels, gpubp::EveryRowOnce{}, grad, partials, ticket, out, B, C, eps);
}

extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS, gpubp::CE_MIN_BLOCKS)
    ce_fwd_bwd_weighted_i32(const float* __restrict__ logits, const int* __restrict__ labels,
                            const float* __restrict__ weights, float* __restrict__ grad, float* __restrict__ partials,
                            unsigned int* __restrict__ ticket, float* __restrict__ out, int B, int C,
                            float eps) {
    gpubp::ce_fwd_bwd(logits, labels, gpubp::SampleWeights{weights}, grad, partials, ticket, out, B, C, eps);
}

extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS, gpubp::CE_MIN_BLOCKS)
    ce_fwd_bwd_weighted_i64(const float* __restrict__ logits, const long long* __restrict__ labels,
                            const float* __restrict__ weights, float* __restrict__ grad, float* __restrict__ partials,
                            unsigned int* __restrict__ ticket, float* __restrict__ out, int B, int C,
                            float eps) {
    gpubp::ce_fwd_bwd(logits, labels, gpubp::SampleWeights{weights}, grad, partials, ticket, out, B, C, eps);
}

// An elementwise loss's two entry points: NAME(pred, target, grad, partials, ticket, out, n), and
// NAME_weighted, which also takes the per-sample weights (B,) and the row width that finds an
// element's row; both run elementwise_loss with TERM.
#define GPUBP_ELEMENTWISE_LOSS_ENTRIES(NAME, TERM)                                                              \
    extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)                                        \
        NAME(const float* __restrict__ pred, const float* __restrict__ target, float* __restrict__ grad,      \
             float* __restrict__ partials, unsigned int* __restrict__ ticket, float* __restrict__ out,         \
             long long n) {                                                                                     \
        gpubp::elementwise_loss(pred, target, gpubp::EveryRowOnce{}, 1, grad, partials, ticket, out, n, TERM); \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)                                        \
        NAME##_weighted(const float* __restrict__ pred, const float* __restrict__ target,                     \
                        const float* __restrict__ weights, float* __restrict__ grad,                           \
                        float* __restrict__ partials, unsigned int* __restrict__ ticket,                       \
                        float* __restrict__ out, long long n, long long width) {                               \
        gpubp::elementwise_loss(pred, target, gpubp::SampleWeights{weights}, width, grad, partials, ticket,    \
                                out, n, TERM);                                                                  \
    }

GPUBP_ELEMENTWISE_LOSS_ENTRIES(mse_fwd_bwd, gpubp::SquaredError{})
GPUBP_ELEMENTWISE_LOSS_ENTRIES(mae_fwd_bwd, gpubp::AbsoluteError{})
GPUBP_ELEMENTWISE_LOSS_ENTRIES(bce_fwd_bwd, gpubp::BinaryCrossEntropy{})
GPUBP_ELEMENTWISE_LOSS_ENTRIES(poisson_fwd_bwd, gpubp::PoissonNll{})

// Huber's take its delta last.
extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    huber_fwd_bwd(const float* __restrict__ pred, const float* __restrict__ target, float* __restrict__ grad,
                  float* __restrict__ partials, unsigned int* __restrict__ ticket, float* __restrict__ out,
                  long long n, float delta) {
    gpubp::elementwise_loss(pred, target, gpubp::EveryRowOnce{}, 1, grad, partials, ticket, out, n,
                            gpubp::HuberError{delta});
}

extern "C" __global__ void __launch_bounds__(gpubp::REDUCE_THREADS)
    huber_fwd_bwd_weighted(const float* __restrict__ pred, const float* __restrict__ target,
                           const float* __restrict__ weights, float* __restrict__ grad, float* __restrict__ partials,
                           unsigned int* __restrict__ ticket, float* __restrict__ out, long long n, long long width,
                           float delta) {
    gpubp::elementwise_loss(pred, target, gpubp::SampleWeights{weights}, width, grad, partials, ticket, out, n,
                            gpubp::HuberError{delta});
}

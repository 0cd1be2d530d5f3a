// Activation functions and their derivatives, selected at compile time by integer id.
//
// Ids and formulas match gpubp/activations.py (ACT_ID, the NumPy reference):
//
//   id  name        y = act(z)                         act'(.) from
//   0   identity    z                                  -
//   1   relu        max(z, 0)                          y: 1 if y > 0 else 0
//   2   leaky_relu  z if z > 0 else 0.01 z             y: 1 if y > 0 else 0.01
//   3   sigmoid     1 / (1 + exp(-z))                  y: y (1 - y)
//   4   tanh        tanh(z)                            y: 1 - y^2
//   5   gelu        z Phi(z), Phi the normal CDF       z: Phi(z) + z phi(z)
//   6   gelu_tanh   0.5 z (1 + tanh(c (z + a z^3)))    z: 0.5 (1 + t) + 0.5 z (1 - t^2) c (1 + 3 a z^2)
//   7   silu        z sigmoid(z) (swish)               z: s (1 + z (1 - s)), s = sigmoid(z)
//
// Only gelu, gelu_tanh and silu need the pre-activation z in backward (act_needs_z); the other
// derivatives are functions of the output y, so forward never stores z for them.
// Everything is full-precision fp32 (erff/normcdff/expf/tanhf; never built with fast math),
// and finite for any finite z: sigmoid takes exp of -|z| only, so |z| = 1e4 gives exactly
// 0 or 1; gelu uses normcdff, which is accurate in the far negative tail where
// 0.5 (1 + erf(z / sqrt 2)) would cancel to 0, and its z phi(z) is z * 0 once z^2 overflows;
// gelu_tanh's derivative reads z clamped to +-GELU_SATURATION, where tanh is already +-1
// (as in activations.py), since from |z| = 1.8e19 z^2 overflows and (1 - t^2) du = 0 * inf.
// silu uses the same exp(-|z|) sigmoid, so its forward and derivative are 0 (not NaN) for a
// large negative z, where z (1 - s) is large but s is exactly 0.
//
// Device code only, no includes: the same text compiles under nvcc and NVRTC.
#pragma once

namespace gpubp {

enum ActId : int {
    ACT_IDENTITY = 0,
    ACT_RELU = 1,
    ACT_LEAKY_RELU = 2,
    ACT_SIGMOID = 3,
    ACT_TANH = 4,
    ACT_GELU = 5,
    ACT_GELU_TANH = 6,
    ACT_SILU = 7,
    ACT_COUNT = 8,
};

// Members of a struct rather than namespace-scope constants, which NVRTC reports as
// unused in every file that does not instantiate the activation using them.
struct ActConst {
    static constexpr float LEAKY_SLOPE = 0.01f;
    static constexpr float GELU_TANH_A = 0.044715f;
    static constexpr float GELU_TANH_C = 0.7978845608028654f;  // sqrt(2 / pi)
    static constexpr float INV_SQRT_2PI = 0.3989422804014327f;
    static constexpr float GELU_SATURATION = 40.0f;  // gpubp/activations.py GELU_SATURATION
};

// Activation sets: one kernel serves every activation of its set, chosen at run time by an `act`
// argument (an ActId, the same for the whole launch) through with_activation below. The main loop,
// which is what costs compile time, is then compiled once per kernel instead of once per
// activation; each epilogue still has its activation fixed at compile time, behind one uniform
// branch taken after the main loop. A set is a bit mask of ActIds (members of a struct, as above).
__host__ __device__ constexpr unsigned act_bit(int act) { return 1u << act; }
struct ActSet {
    static constexpr unsigned ALL = (1u << ACT_COUNT) - 1;
    // The epilogues that fit beside the 64 accumulators of an fp32 thread tile within 128
    // registers (dense_forward.cu); sigmoid's and silu's IEEE division, gelu's erf and gelu_tanh's
    // tanh of a cubic do not.
    static constexpr unsigned LIGHT = act_bit(ACT_IDENTITY) | act_bit(ACT_RELU) | act_bit(ACT_LEAKY_RELU) |
                                      act_bit(ACT_TANH);
    static constexpr unsigned HEAVY = ALL & ~LIGHT;
};

template <int A>
struct ActTag {
    static constexpr int ID = A;
};

// Compiling only the activations a model launches. Each epilogue of a set is unrolled over a
// thread's tile, so a kernel serving every activation spends most of its compile time on
// epilogues a model never runs (the fp32 fused_mlp_fwd: 9 s for all eight, 2 s for relu and
// identity). The CuPy backend's NVRTC path therefore builds such a kernel for the activations a
// launch may pick, with -DGPUBP_ONLY_ACTS=<bit mask of ActIds> (cupy_backend.kernel_part):
// with_activation then instantiates only the members of SET in the mask, and an act outside it
// traps as one outside SET does. Without the macro (the CMake fatbins, NVRTC's whole-set builds,
// the CPU harness, the sanitizers) every member of SET is compiled. The CPU harness builds a file
// once and its CuPy stand-in names the mask of the module a launch comes from
// (gpubp_cpu_set_only_acts), so an act that module lacks traps there too, at run time.
#if defined(GPUBP_CUDA_ON_CPU)
inline unsigned cpu_only_acts = ~0u;
__attribute__((no_sanitize_address, no_sanitize_thread)) inline bool act_launchable(int act) {
    return ((__atomic_load_n(&cpu_only_acts, __ATOMIC_RELAXED) >> act) & 1u) != 0;
}
constexpr unsigned COMPILED_ACTS = ~0u;
#else
__device__ constexpr bool act_launchable(int) { return true; }
#if defined(GPUBP_ONLY_ACTS)
constexpr unsigned COMPILED_ACTS = GPUBP_ONLY_ACTS;
#else
constexpr unsigned COMPILED_ACTS = ~0u;
#endif
#endif

// f(ActTag<act>{}) for the activation `act` of SET: f is instantiated once per member of SET (and
// of COMPILED_ACTS). An act outside SET traps: the host launched the kernel of another set (or
// from a module built for other activations), and no output is written.
template <unsigned SET, int A = 0, class F>
__device__ __forceinline__ void with_activation(int act, F&& f) {
    if constexpr (A == ACT_COUNT) {
        __trap();
    } else {
        if constexpr ((SET & COMPILED_ACTS & act_bit(A)) != 0) {
            if (act == A && act_launchable(A)) {
                f(ActTag<A>{});
                return;
            }
        }
        with_activation<SET, A + 1>(act, f);
    }
}

template <int ACT>
__host__ __device__ constexpr bool act_needs_z() {
    return ACT == ACT_GELU || ACT == ACT_GELU_TANH || ACT == ACT_SILU;
}

__device__ __forceinline__ float stable_sigmoid(float z) {
    const float e = expf(-fabsf(z));  // in (0, 1]: never overflows
    const float s = 1.0f / (1.0f + e);
    return z >= 0.0f ? s : e * s;
}

template <int ACT>
__device__ __forceinline__ float act_forward(float z) {
    if constexpr (ACT == ACT_IDENTITY) {
        return z;
    } else if constexpr (ACT == ACT_RELU) {
        return z < 0.0f ? 0.0f : z;  // not fmaxf, which returns 0 for a NaN z
    } else if constexpr (ACT == ACT_LEAKY_RELU) {
        return z > 0.0f ? z : ActConst::LEAKY_SLOPE * z;
    } else if constexpr (ACT == ACT_SIGMOID) {
        return stable_sigmoid(z);
    } else if constexpr (ACT == ACT_TANH) {
        return tanhf(z);
    } else if constexpr (ACT == ACT_GELU) {
        return z * normcdff(z);
    } else if constexpr (ACT == ACT_SILU) {
        return z * stable_sigmoid(z);
    } else {
        static_assert(ACT == ACT_GELU_TANH, "unknown activation id");
        const float t = tanhf(z * (ActConst::GELU_TANH_C + ActConst::GELU_TANH_A * ActConst::GELU_TANH_C * z * z));
        return 0.5f * z * (1.0f + t);
    }
}

// act'(.) at one element: y is the forward output, z the pre-activation. Callers pass
// whichever the activation needs (act_needs_z) and anything for the other.
template <int ACT>
__device__ __forceinline__ float act_grad(float y, float z);

// dy * act'(.), the gradient through the activation. For relu a select: where the unit is off, an
// inf or NaN dy gives 0, as PyTorch's threshold_backward and the NumPy backend give (a product with
// act' = 0 would give NaN).
template <int ACT>
__device__ __forceinline__ float act_backward(float dy, float y, float z) {
    if constexpr (ACT == ACT_RELU) {
        return y > 0.0f ? dy : 0.0f;
    } else {
        return dy * act_grad<ACT>(y, z);
    }
}

template <int ACT>
__device__ __forceinline__ float act_grad(float y, float z) {
    if constexpr (ACT == ACT_IDENTITY) {
        return 1.0f;
    } else if constexpr (ACT == ACT_RELU) {
        return y > 0.0f ? 1.0f : 0.0f;
    } else if constexpr (ACT == ACT_LEAKY_RELU) {
        return y > 0.0f ? 1.0f : ActConst::LEAKY_SLOPE;
    } else if constexpr (ACT == ACT_SIGMOID) {
        return y * (1.0f - y);
    } else if constexpr (ACT == ACT_TANH) {
        return 1.0f - y * y;
    } else if constexpr (ACT == ACT_GELU) {
        // z phi(z) with z clamped by comparisons (a NaN passes): at z = +-inf it would be inf * 0
        constexpr float S = ActConst::GELU_SATURATION;
        const float zs = z > S ? S : (z < -S ? -S : z);
        return normcdff(z) + zs * ActConst::INV_SQRT_2PI * expf(-0.5f * zs * zs);
    } else if constexpr (ACT == ACT_SILU) {
        const float s = stable_sigmoid(z);
        return s * (1.0f + z * (1.0f - s));
    } else {
        static_assert(ACT == ACT_GELU_TANH, "unknown activation id");
        // Comparisons rather than fminf/fmaxf, which would turn a NaN z into a number.
        constexpr float S = ActConst::GELU_SATURATION;
        const float zs = z > S ? S : (z < -S ? -S : z);
        const float z2 = zs * zs;
        const float t = tanhf(zs * (ActConst::GELU_TANH_C + ActConst::GELU_TANH_A * ActConst::GELU_TANH_C * z2));
        const float du = ActConst::GELU_TANH_C + 3.0f * ActConst::GELU_TANH_A * ActConst::GELU_TANH_C * z2;
        return 0.5f * (1.0f + t) + 0.5f * zs * (1.0f - t * t) * du;
    }
}

}  // namespace gpubp

#if defined(GPUBP_CUDA_ON_CPU)
extern "C" __attribute__((no_sanitize_address, no_sanitize_thread)) void gpubp_cpu_set_only_acts(unsigned mask) {
    __atomic_store_n(&gpubp::cpu_only_acts, mask, __ATOMIC_RELAXED);
}
#endif

// Instantiates MACRO(name, id) once per activation, so each kernel file declares its
// extern "C" entry points (one per activation) in one line. The names are what the
// Python backend asks the module for, identically for the fatbin and NVRTC paths.
#define GPUBP_FOR_EACH_ACTIVATION(MACRO)        \
    MACRO(identity, gpubp::ACT_IDENTITY)        \
    MACRO(relu, gpubp::ACT_RELU)                \
    MACRO(leaky_relu, gpubp::ACT_LEAKY_RELU)    \
    MACRO(sigmoid, gpubp::ACT_SIGMOID)          \
    MACRO(tanh, gpubp::ACT_TANH)                \
    MACRO(gelu, gpubp::ACT_GELU)                \
    MACRO(gelu_tanh, gpubp::ACT_GELU_TANH)      \
    MACRO(silu, gpubp::ACT_SILU)

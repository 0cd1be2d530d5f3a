// Philox4x32-10, the counter-based generator of dropout masks (gpubp/philox.py is the
// definition; the tests hold this copy, the NumPy one and the Numba one to the published known
// answers of Random123 and to each other, bit for bit).
//
// Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3" (SC 2011): a
// 128-bit counter and a 64-bit key give four 32-bit words. Each of the 10 rounds multiplies
// counter words 0 and 2 by M0 and M1 (full 64-bit products: __umulhi gives the high half),
// mixes the high halves with words 1 and 3 and the key, and then adds the Weyl constants W0,
// W1 to the key. No state: any thread computes any element's word, and a backward pass
// regenerates its forward's mask from the key instead of reading a stored one.
//
// The mask: element (row, col) of a row-major (rows, cols) array reads word col % 4 at counter
// (col / 4, first_row + row, 0, 0) and is kept when it is >= threshold = floor(rate 2^32).
// A run of four columns starting at a multiple of 4 costs one call. first_row is 0 but in a
// data-parallel step, where it is the array's first row in the global batch.
//
// Device code only, no includes: the same text compiles under nvcc and NVRTC.
#pragma once

namespace gpubp {

struct PhiloxConst {
    static constexpr unsigned int M0 = 0xD2511F53u;
    static constexpr unsigned int M1 = 0xCD9E8D57u;
    static constexpr unsigned int W0 = 0x9E3779B9u;
    static constexpr unsigned int W1 = 0xBB67AE85u;
    static constexpr int ROUNDS = 10;
    static constexpr int COLUMNS_PER_CALL = 4;  // the four words serve four neighbouring columns
};

struct PhiloxWords {
    unsigned int w[4];
};

__device__ __forceinline__ PhiloxWords philox4x32_10(unsigned int c0, unsigned int c1, unsigned int c2,
                                                     unsigned int c3, unsigned int k0, unsigned int k1) {
#pragma unroll
    for (int round = 0; round < PhiloxConst::ROUNDS; ++round) {
        const unsigned int hi0 = __umulhi(PhiloxConst::M0, c0), lo0 = PhiloxConst::M0 * c0;
        const unsigned int hi1 = __umulhi(PhiloxConst::M1, c2), lo1 = PhiloxConst::M1 * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += PhiloxConst::W0;  // unsigned: wraps mod 2^32, as the definition does
        k1 += PhiloxConst::W1;
    }
    return PhiloxWords{{c0, c1, c2, c3}};
}

// The mask words of key (k0, k1), global row `row` and the group of four columns holding `col`
// (a multiple of 4).
__device__ __forceinline__ PhiloxWords dropout_words(unsigned int k0, unsigned int k1, long long row, long long col) {
    return philox4x32_10(static_cast<unsigned int>(col / PhiloxConst::COLUMNS_PER_CALL),
                         static_cast<unsigned int>(row), 0u, 0u, k0, k1);
}

}  // namespace gpubp

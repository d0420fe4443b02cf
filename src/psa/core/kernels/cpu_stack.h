// Building blocks of cpu_stack.cpp, which alone includes this: vector types and loads, lane
// sums, the dropout hash and activation, the thread split, block loads. An anonymous namespace,
// as the .cpp's own code: with internal linkage the compiler inlines these and contracts
// products across the calls into FMAs the same way wherever they are defined, so the bits do
// not depend on which file holds them. psa.core.kernels.cpu_stack hashes this file into the build's
// cache key with the .cpp.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

// Rows per block. Activations are held unit-major, (W, ROWS), so that every loop over rows is a
// loop of fixed length over contiguous floats, which the compiler turns into vector instructions
// (the hash of the dropout masks included); a block of 8 x 64 floats is 2 KB.
constexpr int64_t ROWS = 64;

// Vectors: GCC/Clang vector extensions of the widest unit the build targets (AVX-512: 16 floats,
// AVX2: 8, else 4); a product a * b + c contracts to an FMA where the flags allow (-ffp-contract).
#if defined(__AVX512F__)
constexpr int VL = 16;
constexpr int RB = 4;  // rows per block of the first layer's forward (RB x NB accumulators)
constexpr int IB = 4;  // input vectors per block of its weight gradient (NB x IB accumulators)
#elif defined(__AVX2__)
constexpr int VL = 8;
constexpr int RB = 2;
constexpr int IB = 2;
#else
constexpr int VL = 4;
constexpr int RB = 2;
constexpr int IB = 2;
#endif
constexpr int NB = 6;  // outputs per block of the first layer
typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4)));  // for unaligned loads and stores

inline vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
inline vf vbroadcast(float x) { return vf{} + x; }

// sum of the VL lanes in one fixed pairwise order: lane i += lane i + h for h = VL/2, ..., 1, i.e.
// the lower half plus the upper half until one lane is left (shuffles where the compiler has them:
// the deep stacks reduce (W W + W) x depth accumulators per member and step)
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define PSA_HAVE_SHUFFLE 1
#endif
#endif
#ifdef PSA_HAVE_SHUFFLE
typedef float vf2 __attribute__((vector_size(8)));
typedef float vf4 __attribute__((vector_size(16)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf16 __attribute__((vector_size(64)));
inline float hsum_v(vf2 v) { return v[0] + v[1]; }
inline float hsum_v(vf4 v) { return hsum_v(__builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3)); }
inline float hsum_v(vf8 v) {
    return hsum_v(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
}
inline float hsum_v(vf16 v) {
    return hsum_v(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}
inline float hsum(vf v) { return hsum_v(v); }
#else
inline float hsum(vf v) {
    alignas(64) float t[VL];
    vstore(t, v);
    for (int h = VL / 2; h >= 1; h /= 2)
        for (int i = 0; i < h; ++i) t[i] += t[i + h];
    return t[0];
}
#endif

// whether every lane of every vector of g is 0 (or -0)
template <int W, int RV>
inline bool all_zero(const vf (&g)[W][RV]) {
    vf m{};  // 1 in the lanes where some g is not 0
    for (int i = 0; i < W; ++i)
        for (int v = 0; v < RV; ++v) m = g[i][v] != 0.0f ? vbroadcast(1.0f) : m;
    return hsum(m) == 0.0f;
}

// lowbias32, as psa.core.rng.mix32 (uint32 arithmetic wraps), on one uint32 or on a vector of
// them (vu below: GCC's vector extension takes the same operators lane by lane)
template <typename U>
inline U mix32(U x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

template <typename F>
void parallel(int64_t n, int threads, F f) {
    int t = static_cast<int>(std::min<int64_t>(std::max(threads, 1), n));
    if (t <= 1) {
        if (n > 0) f(0, n);
        return;
    }
    std::vector<std::thread> pool;
    for (int k = 1; k < t; ++k) pool.emplace_back(f, n * k / t, n * (k + 1) / t);
    f(0, n / t);
    for (auto& th : pool) th.join();
}

typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

inline vu viota() {
    vu v{};
    for (int i = 0; i < VL; ++i) v[i] = static_cast<uint32_t>(i);
    return v;
}

// ReLU (NaN stays NaN) and dropout of one unit, VL rows at once (rows row0 .. row0 + VL - 1): the
// multiplier is 0 or the member's scale, from the hash of (row * n_units + unit) and the key, bit
// for bit psa.core.rng.dropout_noise's (rng.position_hash wraps row * units + unit to 32 bits, as
// uint32 arithmetic does)
template <bool DROP>
inline vf vactivate(vf z, int64_t row0, uint32_t unit, uint32_t n_units, uint32_t key, uint32_t thr, float sc) {
    vf v = z <= 0.0f ? vf{} : z;
    if (DROP) {
        const vu c = (viota() + static_cast<uint32_t>(row0)) * n_units + unit;
        const vu h = mix32(mix32(c) ^ key);
        v = v * (h >= thr ? vbroadcast(sc) : vf{});
    }
    return v;
}

// zt[u][r] = z[(r0 + r) s_row + u s_unit] for a block's nr rows, zeros past them (rows past the
// batch are carried through the stack and never used)
template <int W>
void load_block(const float* z, int64_t s_row, int64_t s_unit, int64_t r0, int64_t nr, float (*zt)[ROWS]) {
    for (int u = 0; u < W; ++u) {
        for (int64_t r = 0; r < nr; ++r) zt[u][r] = z[(r0 + r) * s_row + u * s_unit];
        for (int64_t r = nr; r < ROWS; ++r) zt[u][r] = 0.0f;
    }
}

// sum_r a[r] * b[r] (b null: sum_r a[r]) over n floats, lane-wise then across lanes: one fixed order
inline float dot(const float* a, const float* b, int64_t n) {
    vf acc{};
    int64_t r = 0;
    for (; r + VL <= n; r += VL) acc += b ? vload(a + r) * vload(b + r) : vload(a + r);
    float s = hsum(acc);
    for (; r < n; ++r) s += b ? a[r] * b[r] : a[r];
    return s;
}

// exp(x) for x <= 0 (or NaN, which stays NaN), VL at a time: Cephes' expf (x = n ln2 + r, n the
// nearest integer, a degree-6 polynomial in r, times 2^n), within 2 ulp of expf; below -87 it
// gives exp(-87), ~1.6e-38, where expf gives a denormal or 0 (a difference of at most 1.6e-38
// in a probability).
inline vf exp_neg(vf x) {
    x = x < -87.0f ? vbroadcast(-87.0f) : x;
    const vf big = vbroadcast(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
    const vf n = (x * 1.44269504088896341f + big) - big;
    vf r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    vf y = vbroadcast(1.9875691500e-4f);
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return y * (vf)e;  // the bits of e as floats: 2^n
}

// The first layer reads its rows either as floats or as 8-bit codes c with x = alpha c + beta
// (psa.core.kernels.cpu_stack.input_codes: a data set of 8-bit images normalised by one scalar mean and
// std, e.g. MNIST, whose floats are alpha c + beta within 4 ulp). Codes are a quarter of the
// bytes: a width-1 net's step is otherwise bound by reading 800 KB of rows per seed group from
// memory. With codes the sums run over c, and the affine map is applied once per output:
// sum_i w_i x_i = alpha sum_i w_i c_i + beta sum_i w_i.
inline vf xload(const float* p) { return vload(p); }
inline vf xload(const uint8_t* p) {
    // zero-extend to int32, then convert: one instruction each (GCC turns the vector extension's
    // uint8 -> float conversion into one scalar conversion per lane)
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#elif defined(__SSE2__)
    int32_t four;
    std::memcpy(&four, p, 4);
    const __m128i zero = _mm_setzero_si128();
    const __m128i w16 = _mm_unpacklo_epi8(_mm_cvtsi32_si128(four), zero);
    return (vf)_mm_cvtepi32_ps(_mm_unpacklo_epi16(w16, zero));
#else
    vf v;
    for (int i = 0; i < VL; ++i) v[i] = static_cast<float>(p[i]);
    return v;
#endif
}

}  // namespace

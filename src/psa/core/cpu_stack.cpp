// The hidden stack of narrow MLPs on the CPU: every middle layer of one member and one block of
// 64 batch rows in one pass, the activations in a few KB of stack (L1), a layer's weights (at
// most 8 x 8) read once per block. psa.core.cpu_stack builds this file with the system's C++
// compiler and calls it through ctypes. The flat-buffer layout and the dropout hashes are
// psa.core.kernels' (described there); unlike the Triton kernels, the forward keeps only the last
// layer's activations, and the backward recomputes the others block by block from hidden layer
// 0's pre-activation (see forward_block).
//
// Arithmetic: each product is accumulated in float32 over the input units in order, then the
// bias added, as a small fp32 GEMM does (a BLAS's blocking differs by rounding only). ReLU keeps
// NaN (a diverged member stays detectable); its backward passes the gradient where the
// activation is not <= 0, as torch's threshold_backward does. Dropout multiplies by 0 or the
// member's scale, bit for bit psa.core.rng.dropout_noise's multiplier.
//
// Threads: work items (forward: member and row block; backward: member) are split into contiguous
// ranges, one per thread; no item's result depends on another's or on the thread count.

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

// Rows per block. Activations are held unit-major, (W, ROWS), so that every loop over rows is a
// loop of fixed length over contiguous floats, which the compiler turns into vector instructions
// (the hash of the dropout masks included); a block of 8 x 64 floats is 2 KB.
constexpr int64_t ROWS = 64;

inline uint32_t mix32(uint32_t x) {
    // lowbias32, as psa.core.rng.mix32 (uint32 arithmetic wraps)
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

// ReLU (NaN stays NaN) and dropout of one unit over a block of rows starting at row r0: the
// multiplier is 0 or the member's scale, from the hash of (row * n_units + unit) and the key.
template <bool DROP>
inline void activate(float* a, const float* z, int64_t r0, uint32_t unit, uint32_t n_units, uint32_t key,
                     uint32_t thr, float sc) {
    for (int64_t r = 0; r < ROWS; ++r) {
        float v = (z[r] <= 0.0f) ? 0.0f : z[r];
        if (DROP) {
            // rng.position_hash wraps r * units + u to 32 bits; uint32 arithmetic does the same
            uint32_t c = static_cast<uint32_t>(r0 + r) * n_units + unit;
            uint32_t h = mix32(mix32(c) ^ key);
            v = v * (h >= thr ? sc : 0.0f);
        }
        a[r] = v;
    }
}

struct Stack {
    const float* z0; int64_t s_zm, s_zb, s_zw;  // hidden layer 0's pre-activation (M, B, W)
    const float* flat; int64_t w_off, b_off, layer_stride;
    const int64_t* ks; const int64_t* thr; const float* sc;  // dropout (null: none)
    int64_t members, rows, n_layers, n_units;
};

// One member's block of rows through the whole stack: a_0 = drop(relu(z0)), a_l = drop(relu(W_l
// a_{l-1} + b_l)). `save` (n_layers, W, ROWS) receives every a_l if not null; `out` (row-major
// (rows, W) of this member) receives a_{L-1} if not null. The backward calls this again to get the
// activations back (the same code, so the same bits), rather than storing them: for a deep stack
// they would be hundreds of MB a step, written once and read twice, where this recomputation
// costs a forward pass in L1/L2.
template <int W, bool DROP>
void forward_block(const Stack& p, int64_t m, int64_t r0, float (*save)[W][ROWS], float* out) {
    const int64_t nr = std::min(ROWS, p.rows - r0);
    alignas(64) float a[W][ROWS];
    alignas(64) float z[W][ROWS];
    uint32_t key = 0, thr = 0;
    float sc = 1.0f;
    if (DROP) {
        key = static_cast<uint32_t>(p.ks[m]);
        thr = static_cast<uint32_t>(p.thr[m]);
        sc = p.sc[m];
    }
    const uint32_t n_units = static_cast<uint32_t>(p.n_units);
    const float* z0 = p.z0 + m * p.s_zm + r0 * p.s_zb;
    for (int u = 0; u < W; ++u) {
        for (int64_t r = 0; r < nr; ++r) z[u][r] = z0[r * p.s_zb + u * p.s_zw];
        for (int64_t r = nr; r < ROWS; ++r) z[u][r] = 0.0f;  // rows past the batch: computed, never stored
        activate<DROP>(a[u], z[u], r0, u, n_units, key, thr, sc);
    }
    auto keep = [&](int64_t l) {
        if (save)
            for (int u = 0; u < W; ++u)
                for (int64_t r = 0; r < ROWS; ++r) save[l][u][r] = a[u][r];
    };
    keep(0);
    const float* wm = p.flat + p.w_off + m * W * W;
    const float* bm = p.flat + p.b_off + m * W;
    for (int64_t l = 1; l < p.n_layers; ++l) {
        const float* w = wm + (l - 1) * p.layer_stride;
        const float* b = bm + (l - 1) * p.layer_stride;
        for (int o = 0; o < W; ++o) {
            // products summed over the input units in order, then the bias, as a small GEMM does
            for (int64_t r = 0; r < ROWS; ++r) z[o][r] = 0.0f;
            for (int i = 0; i < W; ++i) {
                const float wi = w[o * W + i];
                for (int64_t r = 0; r < ROWS; ++r) z[o][r] += a[i][r] * wi;
            }
            const float bo = b[o];
            for (int64_t r = 0; r < ROWS; ++r) z[o][r] += bo;
        }
        for (int o = 0; o < W; ++o) activate<DROP>(a[o], z[o], r0, static_cast<uint32_t>(l * W + o), n_units, key, thr, sc);
        keep(l);
    }
    if (out)
        for (int64_t r = 0; r < nr; ++r)
            for (int u = 0; u < W; ++u) out[(r0 + r) * W + u] = a[u][r];
}

template <int W>
void fwd(const Stack& p, float* out, int threads) {
    const int64_t blocks = (p.rows + ROWS - 1) / ROWS;
    parallel(p.members * blocks, threads, [&](int64_t lo, int64_t hi) {
        for (int64_t it = lo; it < hi; ++it) {
            const int64_t m = it / blocks, r0 = it % blocks * ROWS;
            float* o = out + m * p.rows * W;
            if (p.ks) forward_block<W, true>(p, m, r0, nullptr, o);
            else forward_block<W, false>(p, m, r0, nullptr, o);
        }
    });
}

// sum of x[0..ROWS) in one fixed pairwise order (vectorisable, unlike a running sum)
inline float lane_sum(float* x) {
    for (int64_t h = ROWS / 2; h >= 1; h /= 2)
        for (int64_t r = 0; r < h; ++r) x[r] += x[r + h];
    return x[0];
}

struct Grad {
    const float* da; int64_t s_dm, s_db, s_dw;  // dLoss/da_{L-1} (M, B, W)
    float* grad; float* dz0;
};

template <int W, bool DROP>
void bwd_member(const Stack& p, const Grad& q, int64_t m, float (*save)[W][ROWS], float* acc) {
    // acc (n_layers - 1, W * W + W): this member's middle-layer gradients, summed block after
    // block in order (within a block, over its rows pairwise): one fixed order, whatever the threads
    const int64_t B = p.rows;
    const int64_t L = p.n_layers;
    const int64_t per = W * W + W;
    const float sc = DROP ? p.sc[m] : 1.0f;
    std::fill(acc, acc + (L - 1) * per, 0.0f);
    alignas(64) float g[W][ROWS], dz[W][ROWS], t[ROWS];
    for (int64_t r0 = 0; r0 < B; r0 += ROWS) {
        const int64_t nr = std::min(ROWS, B - r0);
        forward_block<W, DROP>(p, m, r0, save, nullptr);
        const float* da = q.da + m * q.s_dm + r0 * q.s_db;
        for (int u = 0; u < W; ++u) {
            for (int64_t r = 0; r < nr; ++r) g[u][r] = da[r * q.s_db + u * q.s_dw];
            for (int64_t r = nr; r < ROWS; ++r) g[u][r] = 0.0f;  // rows past the batch add nothing
        }
        for (int64_t l = L - 1; l >= 0; --l) {
            // ReLU's backward (0 where the activation is <= 0, as torch's threshold_backward),
            // then dropout's scale (exactly 1 for a member without dropout)
            for (int o = 0; o < W; ++o)
                for (int64_t r = 0; r < ROWS; ++r) dz[o][r] = ((save[l][o][r] <= 0.0f) ? 0.0f : g[o][r]) * sc;
            if (l == 0) break;
            float* gl = acc + (l - 1) * per;
            const float* wl = p.flat + p.w_off + (l - 1) * p.layer_stride + m * W * W;
            for (int o = 0; o < W; ++o) {
                for (int i = 0; i < W; ++i) {
                    for (int64_t r = 0; r < ROWS; ++r) t[r] = dz[o][r] * save[l - 1][i][r];
                    gl[o * W + i] += lane_sum(t);
                }
                for (int64_t r = 0; r < ROWS; ++r) t[r] = dz[o][r];
                gl[W * W + o] += lane_sum(t);
            }
            for (int i = 0; i < W; ++i) {
                for (int64_t r = 0; r < ROWS; ++r) g[i][r] = 0.0f;
                for (int o = 0; o < W; ++o) {
                    const float woi = wl[o * W + i];
                    for (int64_t r = 0; r < ROWS; ++r) g[i][r] += dz[o][r] * woi;
                }
            }
        }
        float* dz0 = q.dz0 + (m * B + r0) * W;
        for (int64_t r = 0; r < nr; ++r)
            for (int u = 0; u < W; ++u) dz0[r * W + u] = dz[u][r];
    }
    for (int64_t l = 1; l < L; ++l) {
        const float* gl = acc + (l - 1) * per;
        float* gw = q.grad + p.w_off + (l - 1) * p.layer_stride + m * W * W;
        float* gb = q.grad + p.b_off + (l - 1) * p.layer_stride + m * W;
        for (int k = 0; k < W * W; ++k) gw[k] = gl[k];
        for (int o = 0; o < W; ++o) gb[o] = gl[W * W + o];
    }
}

template <int W>
void bwd(const Stack& p, const Grad& q, int threads) {
    parallel(p.members, threads, [&](int64_t lo, int64_t hi) {
        std::vector<float> save(static_cast<size_t>(p.n_layers) * W * ROWS);
        std::vector<float> acc(static_cast<size_t>(std::max<int64_t>(p.n_layers - 1, 1)) * (W * W + W));
        auto* s = reinterpret_cast<float (*)[W][ROWS]>(save.data());
        for (int64_t m = lo; m < hi; ++m) {
            if (p.ks) bwd_member<W, true>(p, q, m, s, acc.data());
            else bwd_member<W, false>(p, q, m, s, acc.data());
        }
    });
}

#define PSA_WIDTHS(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8)

}  // namespace

extern "C" {

int psa_stack_max_width() { return 8; }

int psa_stack_forward(const float* z0, int64_t s_zm, int64_t s_zb, int64_t s_zw, const float* flat, int64_t w_off,
                      int64_t b_off, int64_t layer_stride, const int64_t* ks, const int64_t* thr, const float* sc,
                      float* out, int64_t members, int64_t rows, int64_t n_layers, int64_t width, int threads) {
    Stack p{z0, s_zm, s_zb, s_zw, flat, w_off, b_off, layer_stride, ks, thr, sc, members, rows, n_layers,
            n_layers * width};
    switch (width) {
#define PSA_FWD(N) case N: fwd<N>(p, out, threads); return 0;
        PSA_WIDTHS(PSA_FWD)
#undef PSA_FWD
        default: return 1;
    }
}

int psa_stack_backward(const float* z0, int64_t s_zm, int64_t s_zb, int64_t s_zw, const float* flat, int64_t w_off,
                       int64_t b_off, int64_t layer_stride, const int64_t* ks, const int64_t* thr, const float* sc,
                       const float* da, int64_t s_dm, int64_t s_db, int64_t s_dw, float* grad, float* dz0,
                       int64_t members, int64_t rows, int64_t n_layers, int64_t width, int threads) {
    Stack p{z0, s_zm, s_zb, s_zw, flat, w_off, b_off, layer_stride, ks, thr, sc, members, rows, n_layers,
            n_layers * width};
    Grad q{da, s_dm, s_db, s_dw, grad, dz0};
    switch (width) {
#define PSA_BWD(N) case N: bwd<N>(p, q, threads); return 0;
        PSA_WIDTHS(PSA_BWD)
#undef PSA_BWD
        default: return 1;
    }
}

}  // extern "C"

// The hidden stack of narrow MLPs on the CPU: every middle layer of one member and one block of
// batch rows in one pass, the activations in a few hundred bytes of stack (L1), the weights of a
// layer (at most 16 x 16) read once per row block. psa.core.cpu_stack builds this file with the
// system's C++ compiler and calls it through ctypes; the contract (arguments, flat-buffer layout,
// dropout hashes) is psa.core.kernels.stack_forward / stack_backward's, described there.
//
// Arithmetic: each product is accumulated in float32 over the input units in order, then the
// bias added, as a small fp32 GEMM does (the order of a BLAS's blocking differs by rounding only).
// ReLU keeps NaN (a diverged member stays detectable); its backward passes the gradient where the
// activation is not <= 0, as torch's threshold_backward does. Dropout multiplies by 0 or the
// member's scale, bit for bit psa.core.rng.dropout_noise's multiplier.
//
// Threads: work items are split into contiguous ranges, one per thread; no item's result depends
// on another's or on the thread count (the weight gradient of a member is summed over its rows in
// one fixed order by one thread).

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

constexpr int64_t ROWS = 32;  // rows per forward block: 32 x 16 floats = 2 KB of activations

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

struct Fwd {
    const float* z0; int64_t s_zm, s_zb, s_zw;
    const float* flat; int64_t w_off, b_off, layer_stride;
    float* out; int64_t act_layer_stride; int store_all;
    const int64_t* ks; const int64_t* thr; const float* sc;
    int64_t members, rows, n_layers, n_units;
};

template <int W, bool DROP>
void fwd_block(const Fwd& p, int64_t m, int64_t r0) {
    const int64_t nr = std::min(ROWS, p.rows - r0);
    float a[ROWS][W];
    uint32_t key = 0, thr = 0;
    float sc = 1.0f;
    if (DROP) {
        key = static_cast<uint32_t>(p.ks[m]);
        thr = static_cast<uint32_t>(p.thr[m]);
        sc = p.sc[m];
    }
    const uint32_t n_units = static_cast<uint32_t>(p.n_units);
    auto activate = [&](float z, int64_t r, int64_t unit) -> float {
        float v = (z <= 0.0f) ? 0.0f : z;  // NaN stays NaN
        if (DROP) {
            // rng.position_hash wraps r * units + u to 32 bits; uint32 arithmetic does the same
            uint32_t c = static_cast<uint32_t>(r) * n_units + static_cast<uint32_t>(unit);
            uint32_t h = mix32(mix32(c) ^ key);
            v = v * (h >= thr ? sc : 0.0f);
        }
        return v;
    };
    const float* z0 = p.z0 + m * p.s_zm;
    for (int64_t r = 0; r < nr; ++r)
        for (int u = 0; u < W; ++u) a[r][u] = activate(z0[(r0 + r) * p.s_zb + u * p.s_zw], r0 + r, u);
    // layer l's activations go to out + l * act_layer_stride (training) or only the last (eval)
    float* base = p.out + (m * p.rows + r0) * W;
    auto store = [&](int64_t l) {
        float* dst = base + (p.store_all ? l * p.act_layer_stride : 0);
        for (int64_t r = 0; r < nr; ++r)
            for (int u = 0; u < W; ++u) dst[r * W + u] = a[r][u];
    };
    if (p.store_all || p.n_layers == 1) store(0);
    const float* wm = p.flat + p.w_off + m * W * W;
    const float* bm = p.flat + p.b_off + m * W;
    for (int64_t l = 1; l < p.n_layers; ++l) {
        float w[W][W], b[W];
        const float* wl = wm + (l - 1) * p.layer_stride;
        const float* bl = bm + (l - 1) * p.layer_stride;
        for (int o = 0; o < W; ++o) {
            b[o] = bl[o];
            for (int i = 0; i < W; ++i) w[o][i] = wl[o * W + i];
        }
        for (int64_t r = 0; r < nr; ++r) {
            float z[W];
            for (int o = 0; o < W; ++o) {
                float acc = 0.0f;
                for (int i = 0; i < W; ++i) acc += a[r][i] * w[o][i];
                z[o] = acc + b[o];
            }
            for (int o = 0; o < W; ++o) a[r][o] = activate(z[o], r0 + r, l * W + o);
        }
        if (p.store_all || l == p.n_layers - 1) store(l);
    }
}

template <int W>
void fwd(const Fwd& p, int threads) {
    const int64_t blocks = (p.rows + ROWS - 1) / ROWS;
    parallel(p.members * blocks, threads, [&](int64_t lo, int64_t hi) {
        for (int64_t it = lo; it < hi; ++it) {
            if (p.ks) fwd_block<W, true>(p, it / blocks, it % blocks * ROWS);
            else fwd_block<W, false>(p, it / blocks, it % blocks * ROWS);
        }
    });
}

struct Bwd {
    const float* da; int64_t s_dm, s_db, s_dw;
    const float* acts;
    const float* flat; int64_t w_off, layer_stride;
    float* grad; int64_t gw_off, gb_off;
    float* dz0; const float* sc;
    int64_t members, rows, n_layers;
};

template <int W>
void bwd_member(const Bwd& p, int64_t m, float* g) {
    // g (rows, W): dLoss/da_l of this member, walked from the last layer down
    const int64_t B = p.rows;
    const int64_t als = p.members * B * W;
    const float* acts = p.acts + m * B * W;
    const float sc = p.sc ? p.sc[m] : 1.0f;
    const float* da = p.da + m * p.s_dm;
    for (int64_t r = 0; r < B; ++r)
        for (int u = 0; u < W; ++u) g[r * W + u] = da[r * p.s_db + u * p.s_dw];
    for (int64_t l = p.n_layers - 1; l >= 1; --l) {
        const float* al = acts + l * als;
        const float* ap = acts + (l - 1) * als;
        float w[W][W], gw[W][W] = {}, gb[W] = {};
        const float* wl = p.flat + p.w_off + (l - 1) * p.layer_stride + m * W * W;
        for (int o = 0; o < W; ++o)
            for (int i = 0; i < W; ++i) w[o][i] = wl[o * W + i];
        for (int64_t r = 0; r < B; ++r) {
            float dz[W];
            for (int o = 0; o < W; ++o) {
                float v = (al[r * W + o] <= 0.0f) ? 0.0f : g[r * W + o];
                dz[o] = p.sc ? v * sc : v;
            }
            for (int o = 0; o < W; ++o) {
                gb[o] += dz[o];
                for (int i = 0; i < W; ++i) gw[o][i] += dz[o] * ap[r * W + i];
            }
            for (int i = 0; i < W; ++i) {
                float acc = 0.0f;
                for (int o = 0; o < W; ++o) acc += dz[o] * w[o][i];
                g[r * W + i] = acc;
            }
        }
        float* gwl = p.grad + p.gw_off + (l - 1) * p.layer_stride + m * W * W;
        float* gbl = p.grad + p.gb_off + (l - 1) * p.layer_stride + m * W;
        for (int o = 0; o < W; ++o) {
            gbl[o] = gb[o];
            for (int i = 0; i < W; ++i) gwl[o * W + i] = gw[o][i];
        }
    }
    float* dz0 = p.dz0 + m * B * W;
    for (int64_t r = 0; r < B; ++r)
        for (int u = 0; u < W; ++u) {
            float v = (acts[r * W + u] <= 0.0f) ? 0.0f : g[r * W + u];
            dz0[r * W + u] = p.sc ? v * sc : v;
        }
}

template <int W>
void bwd(const Bwd& p, int threads) {
    parallel(p.members, threads, [&](int64_t lo, int64_t hi) {
        std::vector<float> g(static_cast<size_t>(p.rows) * W);
        for (int64_t m = lo; m < hi; ++m) bwd_member<W>(p, m, g.data());
    });
}

#define PSA_WIDTHS(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15) X(16)

}  // namespace

extern "C" {

int psa_stack_max_width() { return 16; }

int psa_stack_forward(const float* z0, int64_t s_zm, int64_t s_zb, int64_t s_zw, const float* flat, int64_t w_off,
                      int64_t b_off, int64_t layer_stride, float* out, int64_t act_layer_stride, int store_all,
                      const int64_t* ks, const int64_t* thr, const float* sc, int64_t members, int64_t rows,
                      int64_t n_layers, int64_t width, int threads) {
    Fwd p{z0, s_zm, s_zb, s_zw, flat, w_off, b_off, layer_stride, out, act_layer_stride, store_all,
          ks, thr, sc, members, rows, n_layers, n_layers * width};
    switch (width) {
#define PSA_FWD(N) case N: fwd<N>(p, threads); return 0;
        PSA_WIDTHS(PSA_FWD)
#undef PSA_FWD
        default: return 1;
    }
}

int psa_stack_backward(const float* da, int64_t s_dm, int64_t s_db, int64_t s_dw, const float* acts,
                       const float* flat, int64_t w_off, int64_t layer_stride, float* grad, int64_t gw_off,
                       int64_t gb_off, float* dz0, const float* sc, int64_t members, int64_t rows,
                       int64_t n_layers, int64_t width, int threads) {
    Bwd p{da, s_dm, s_db, s_dw, acts, flat, w_off, layer_stride, grad, gw_off, gb_off, dz0, sc,
          members, rows, n_layers};
    switch (width) {
#define PSA_BWD(N) case N: bwd<N>(p, threads); return 0;
        PSA_WIDTHS(PSA_BWD)
#undef PSA_BWD
        default: return 1;
    }
}

}  // extern "C"

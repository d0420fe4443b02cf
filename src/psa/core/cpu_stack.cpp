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
#include <cmath>
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

// ---------------------------------------------------------------------------------------------
// The whole training step of a SimpleMLP population whose hidden layers are all one width <= 8:
// per seed group (k members that share the batch), the batch rows read straight from the
// training set by index, the first layer's forward for the group's k members while those rows are
// in cache, the middle stack (forward_block / bwd_member above), the head, the mean cross-entropy
// and its gradient, the backward of head and stack, and the first layer's weight and bias
// gradients from the same rows, now in L2. Threads split the seed groups; every sum runs in one
// fixed order within its group, so the bits do not depend on the thread count.
//
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

// sum of the VL lanes in one fixed pairwise order
inline float hsum(vf v) {
    alignas(64) float t[VL];
    vstore(t, v);
    for (int h = VL / 2; h >= 1; h /= 2)
        for (int i = 0; i < h; ++i) t[i] += t[i + h];
    return t[0];
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

// exp(x) for x <= 0 (or NaN, which stays NaN), vectorisable: Cephes' expf (x = n ln2 + r,
// a degree-6 polynomial in r, times 2^n), within 2 ulp of expf; below -87 it gives exp(-87),
// ~1.6e-38, where expf gives a denormal or 0: a difference of at most 1.6e-38 in a probability.
inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    __builtin_memcpy(&scale, &e, 4);
    return y * scale;
}

// Z[r][n] = bias[n] + sum_i X_r[i] W[n][i] for RB_ rows and NB_ outputs (a register block)
template <int RB_, int NB_>
void first_fwd_block(const float* const* rows, const float* w, int64_t n_in, const float* bias, float* z,
                     int64_t ldz) {
    vf acc[RB_][NB_] = {};
    int64_t i = 0;
    for (; i + VL <= n_in; i += VL) {
        vf x[RB_];
        for (int a = 0; a < RB_; ++a) x[a] = vload(rows[a] + i);
        for (int n = 0; n < NB_; ++n) {
            const vf wv = vload(w + n * n_in + i);
            for (int a = 0; a < RB_; ++a) acc[a][n] += x[a] * wv;
        }
    }
    for (int a = 0; a < RB_; ++a)
        for (int n = 0; n < NB_; ++n) {
            float s = hsum(acc[a][n]);
            for (int64_t j = i; j < n_in; ++j) s += rows[a][j] * w[n * n_in + j];
            z[a * ldz + n] = s + bias[n];
        }
}

template <int RB_>
void first_fwd_rows(const float* const* rows, const float* w, int64_t n_in, const float* bias, float* z, int64_t ldz,
                    int64_t n_out) {
    int64_t n0 = 0;
    for (; n0 + NB <= n_out; n0 += NB) first_fwd_block<RB_, NB>(rows, w + n0 * n_in, n_in, bias + n0, z + n0, ldz);
    const float* wr = w + n0 * n_in;
    switch (n_out - n0) {
        case 1: first_fwd_block<RB_, 1>(rows, wr, n_in, bias + n0, z + n0, ldz); break;
        case 2: first_fwd_block<RB_, 2>(rows, wr, n_in, bias + n0, z + n0, ldz); break;
        case 3: first_fwd_block<RB_, 3>(rows, wr, n_in, bias + n0, z + n0, ldz); break;
        case 4: first_fwd_block<RB_, 4>(rows, wr, n_in, bias + n0, z + n0, ldz); break;
        case 5: first_fwd_block<RB_, 5>(rows, wr, n_in, bias + n0, z + n0, ldz); break;
        default: break;
    }
}

// The first layer's forward: Z (b, n_out) row-major from the b rows and W (n_out, n_in)
void first_forward(const float* const* rows, int64_t b, const float* w, int64_t n_in, const float* bias, float* z,
                   int64_t n_out) {
    int64_t r = 0;
    for (; r + RB <= b; r += RB) first_fwd_rows<RB>(rows + r, w, n_in, bias, z + r * n_out, n_out, n_out);
    for (; r < b; ++r) first_fwd_rows<1>(rows + r, w, n_in, bias, z + r * n_out, n_out, n_out);
}

// G[n][i0 + q VL + l] = sum_r D[n][r] X_r[i0 + ...] for NB_ outputs and IB_ input vectors, rows in order
template <int NB_, int IB_>
void first_grad_block(const float* const* rows, int64_t b, const float* d, float* g, int64_t n_in, int64_t i0) {
    vf acc[NB_][IB_] = {};
    for (int64_t r = 0; r < b; ++r) {
        vf x[IB_];
        for (int q = 0; q < IB_; ++q) x[q] = vload(rows[r] + i0 + q * VL);
        for (int n = 0; n < NB_; ++n) {
            const vf dv = vbroadcast(d[n * b + r]);
            for (int q = 0; q < IB_; ++q) acc[n][q] += dv * x[q];
        }
    }
    for (int n = 0; n < NB_; ++n)
        for (int q = 0; q < IB_; ++q) vstore(g + n * n_in + i0 + q * VL, acc[n][q]);
}

template <int NB_>
void first_grad_outputs(const float* const* rows, int64_t b, const float* d, float* g, int64_t n_in) {
    int64_t i = 0;
    for (; i + IB * VL <= n_in; i += IB * VL) first_grad_block<NB_, IB>(rows, b, d, g, n_in, i);
    for (; i + VL <= n_in; i += VL) first_grad_block<NB_, 1>(rows, b, d, g, n_in, i);
    for (; i < n_in; ++i)
        for (int n = 0; n < NB_; ++n) {
            float s = 0.0f;
            for (int64_t r = 0; r < b; ++r) s += d[n * b + r] * rows[r][i];
            g[n * n_in + i] = s;
        }
}

// The first layer's weight gradient G (n_out, n_in) from D (n_out, b), output-major, and the rows
void first_grad(const float* const* rows, int64_t b, const float* d, float* g, int64_t n_in, int64_t n_out) {
    int64_t n0 = 0;
    for (; n0 + NB <= n_out; n0 += NB) first_grad_outputs<NB>(rows, b, d + n0 * b, g + n0 * n_in, n_in);
    const float* dr = d + n0 * b;
    float* gr = g + n0 * n_in;
    switch (n_out - n0) {
        case 1: first_grad_outputs<1>(rows, b, dr, gr, n_in); break;
        case 2: first_grad_outputs<2>(rows, b, dr, gr, n_in); break;
        case 3: first_grad_outputs<3>(rows, b, dr, gr, n_in); break;
        case 4: first_grad_outputs<4>(rows, b, dr, gr, n_in); break;
        case 5: first_grad_outputs<5>(rows, b, dr, gr, n_in); break;
        default: break;
    }
}

struct Step {
    const float* x; const int64_t* y; int64_t n_in;  // the training set (N, n_in), labels (N,)
    const int64_t* order; int64_t n_train;            // (G, N) every group's data order
    const int64_t* step; int64_t batch_size, b;       // this step reads positions step * batch_size + [0, b)
    const float* flat; float* grad;                   // parameters and gradients of the members
    int64_t members, k;                               // k consecutive members share a group's batch
    int64_t w0_off, b0_off;                           // first layer (M, W, n_in) and (M, W)
    int64_t w_off, b_off, layer_stride, n_layers;     // the middle stack, as Stack above; n_layers hidden
    int64_t hw_off, hb_off, n_out;                    // head (M, n_out, W) and (M, n_out)
    const int64_t* dkeys; const int64_t* thr; const float* sc;  // dropout: loop keys (M, 2), or null
    float* loss;                                      // (M,) mean cross-entropy of each member
};

// Per thread: every buffer one group needs, reused from group to group and from step to step.
struct Work {
    std::vector<const float*> rows;
    std::vector<int64_t> labels;
    std::vector<float> z, a, at, logits, dl, mx, sm, da, dz, d, save, acc;
    void fit(std::vector<float>& v, size_t n) { if (v.size() < n) v.resize(n); }
};

template <int W>
void step_group(const Step& s, int64_t g, Work& wk) {
    const int64_t b = s.b, k = s.k, n_in = s.n_in, n_out = s.n_out, L = s.n_layers;
    const int64_t N = k * W;                // the group's first-layer outputs
    const int64_t bp = (b + VL - 1) / VL * VL;  // rows padded to whole vectors (unit-major arrays)
    const int64_t pos0 = *s.step * s.batch_size;
    wk.rows.resize(b);
    wk.labels.resize(b);
    for (int64_t r = 0; r < b; ++r) {
        const int64_t idx = s.order[g * s.n_train + pos0 + r];
        wk.rows[r] = s.x + idx * n_in;
        wk.labels[r] = s.y[idx];
    }
    wk.fit(wk.z, b * N);
    wk.fit(wk.a, static_cast<size_t>(b) * W);
    wk.fit(wk.at, W * bp);
    wk.fit(wk.mx, bp);
    wk.fit(wk.sm, bp);
    wk.fit(wk.logits, n_out * bp);
    wk.fit(wk.dl, n_out * bp);
    wk.fit(wk.da, W * bp);
    wk.fit(wk.dz, static_cast<size_t>(k) * b * W);
    wk.fit(wk.d, N * b);
    wk.fit(wk.save, static_cast<size_t>(L) * W * ROWS);
    wk.fit(wk.acc, static_cast<size_t>(std::max<int64_t>(L - 1, 1)) * (W * W + W));
    const float* const* rows = wk.rows.data();
    const int64_t m0 = g * k;
    // first layer, forward: Z (b, k W), member j's units at columns [j W, (j + 1) W)
    first_forward(rows, b, s.flat + s.w0_off + m0 * W * n_in, n_in, s.flat + s.b0_off + m0 * W, wk.z.data(), N);
    const float inv_b = static_cast<float>(1.0 / static_cast<double>(b));
    for (int64_t j = 0; j < k; ++j) {
        const int64_t m = m0 + j;
        uint32_t key = 0;
        if (s.dkeys) {
            // rng.step_keys: mix32(mix32(step ^ k0) ^ k1)
            key = mix32(mix32(static_cast<uint32_t>(*s.step ^ s.dkeys[2 * m])) ^ static_cast<uint32_t>(s.dkeys[2 * m + 1]));
        }
        const int64_t key64 = key;
        Stack st{wk.z.data() + j * W, 0, N, 1, s.flat, s.w_off + m * W * W, s.b_off + m * W, s.layer_stride,
                 s.dkeys ? &key64 : nullptr, s.dkeys ? s.thr + m : nullptr, s.dkeys ? s.sc + m : nullptr,
                 1, b, L, L * W};
        // the stack, forward: the last hidden layer's activations A (b, W) row-major
        float* A = wk.a.data();
        for (int64_t r0 = 0; r0 < b; r0 += ROWS) {
            if (s.dkeys) forward_block<W, true>(st, 0, r0, nullptr, A);
            else forward_block<W, false>(st, 0, r0, nullptr, A);
        }
        // the head, unit-major over the rows: logits[c][r] = sum_u A[r][u] hw[c][u] + hb[c]
        float* at = wk.at.data();
        for (int u = 0; u < W; ++u)
            for (int64_t r = 0; r < b; ++r) at[u * bp + r] = A[r * W + u];
        const float* hw = s.flat + s.hw_off + m * n_out * W;
        const float* hb = s.flat + s.hb_off + m * n_out;
        float* lg = wk.logits.data();
        float* dl = wk.dl.data();
        for (int64_t c = 0; c < n_out; ++c) {
            float* lc = lg + c * bp;
            for (int64_t r = 0; r < b; ++r) {
                float t = 0.0f;
                for (int u = 0; u < W; ++u) t += at[u * bp + r] * hw[c * W + u];
                lc[r] = t + hb[c];
            }
        }
        // mean cross-entropy; its gradient (softmax - onehot) / b into dl
        float* mx = wk.mx.data();
        float* sm = wk.sm.data();
        for (int64_t r = 0; r < b; ++r) mx[r] = lg[r];
        for (int64_t c = 1; c < n_out; ++c)
            for (int64_t r = 0; r < b; ++r) mx[r] = lg[c * bp + r] > mx[r] ? lg[c * bp + r] : mx[r];
        for (int64_t c = 0; c < n_out; ++c)  // a NaN logit makes its row's loss and gradient NaN
            for (int64_t r = 0; r < b; ++r) mx[r] = lg[c * bp + r] != lg[c * bp + r] ? lg[c * bp + r] : mx[r];
        for (int64_t r = 0; r < b; ++r) sm[r] = 0.0f;
        for (int64_t c = 0; c < n_out; ++c) {
            float* dc = dl + c * bp;
            const float* lc = lg + c * bp;
            for (int64_t r = 0; r < b; ++r) {
                dc[r] = exp_neg(lc[r] - mx[r]);
                sm[r] += dc[r];
            }
        }
        double loss = 0.0;
        for (int64_t r = 0; r < b; ++r) {
            const float lse = mx[r] + std::log(sm[r]);
            loss += static_cast<double>(lse - lg[wk.labels[r] * bp + r]);
            sm[r] = 1.0f / sm[r];
        }
        s.loss[m] = static_cast<float>(loss / static_cast<double>(b));
        for (int64_t c = 0; c < n_out; ++c) {
            float* dc = dl + c * bp;
            for (int64_t r = 0; r < b; ++r) dc[r] = (dc[r] * sm[r] - (wk.labels[r] == c ? 1.0f : 0.0f)) * inv_b;
        }
        // the head's gradients, and dLoss/dA unit-major (da[u][r])
        float* ghw = s.grad + s.hw_off + m * n_out * W;
        float* ghb = s.grad + s.hb_off + m * n_out;
        for (int64_t c = 0; c < n_out; ++c) {
            for (int u = 0; u < W; ++u) ghw[c * W + u] = dot(dl + c * bp, at + u * bp, b);
            ghb[c] = dot(dl + c * bp, nullptr, b);
        }
        float* da = wk.da.data();
        for (int u = 0; u < W; ++u) {
            float* du = da + u * bp;
            for (int64_t r = 0; r < b; ++r) du[r] = 0.0f;
            for (int64_t c = 0; c < n_out; ++c) {
                const float wcu = hw[c * W + u];
                const float* dc = dl + c * bp;
                for (int64_t r = 0; r < b; ++r) du[r] += dc[r] * wcu;
            }
        }
        // the stack, backward: middle gradients into grad, dLoss/dz0 (b, W) row-major
        Grad q{da, 0, 1, bp, s.grad, wk.dz.data() + j * b * W};
        auto* save = reinterpret_cast<float (*)[W][ROWS]>(wk.save.data());
        if (s.dkeys) bwd_member<W, true>(st, q, 0, save, wk.acc.data());
        else bwd_member<W, false>(st, q, 0, save, wk.acc.data());
        // output-major for the first layer: d[j W + u][r]
        const float* dzj = wk.dz.data() + j * b * W;
        for (int u = 0; u < W; ++u)
            for (int64_t r = 0; r < b; ++r) wk.d[(j * W + u) * b + r] = dzj[r * W + u];
    }
    // first layer, backward: weight gradients from the same rows, bias gradients
    first_grad(rows, b, wk.d.data(), s.grad + s.w0_off + m0 * W * n_in, n_in, N);
    float* gb0 = s.grad + s.b0_off + m0 * W;
    for (int64_t n = 0; n < N; ++n) gb0[n] = dot(wk.d.data() + n * b, nullptr, b);
}

template <int W>
void train_step(const Step& s, int threads) {
    const int64_t groups = s.members / s.k;
    parallel(groups, threads, [&](int64_t lo, int64_t hi) {
        thread_local Work wk;
        for (int64_t g = lo; g < hi; ++g) step_group<W>(s, g, wk);
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

int psa_train_step(const float* x, const int64_t* y, int64_t n_in, const int64_t* order, int64_t n_train,
                   const int64_t* step, int64_t batch_size, int64_t b, const float* flat, float* grad,
                   int64_t members, int64_t k, int64_t w0_off, int64_t b0_off, int64_t w_off, int64_t b_off,
                   int64_t layer_stride, int64_t n_layers, int64_t hw_off, int64_t hb_off, int64_t n_out,
                   const int64_t* dkeys, const int64_t* thr, const float* sc, float* loss, int64_t width,
                   int threads) {
    Step s{x, y, n_in, order, n_train, step, batch_size, b, flat, grad, members, k, w0_off, b0_off, w_off, b_off,
           layer_stride, n_layers, hw_off, hb_off, n_out, dkeys, thr, sc, loss};
    if (members <= 0 || k <= 0 || members % k || b <= 0) return 2;
    switch (width) {
#define PSA_STEP(N) case N: train_step<N>(s, threads); return 0;
        PSA_WIDTHS(PSA_STEP)
#undef PSA_STEP
        default: return 1;
    }
}

}  // extern "C"

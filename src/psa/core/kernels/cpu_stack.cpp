// Narrow MLPs on the CPU, called by psa.core.kernels.cpu_stack through ctypes (it builds this file with
// the system's C++ compiler; cpu_stack.h holds the vector, hash, thread and load helpers):
// - psa_train_step: the whole training step of a population whose hidden layers are all one
//   width <= 8. Per seed group: the batch rows read by index from the training set (as floats,
//   or as 8-bit codes x = alpha c + beta), the first layer for the group's members, then per
//   member and block of 64 rows the stack's forward with every layer's activations saved
//   (depth x 64 x W floats, in L2), the head and the loss for those rows, and the stack's
//   backward from the saved activations, rows carried in registers from layer to layer; then
//   the first layer's gradients from the same rows.
// - psa_count_correct: the evaluation's stack, head and argmax from the first layer's output,
//   through the training step's stack forward and head (one implementation of each).
// The flat-buffer layout and the dropout hashes are psa.core.kernels.triton_stack's (described there).
//
// Arithmetic: each product is accumulated in float32 over the input units in order, then the
// bias added, as a small fp32 GEMM does (a BLAS's blocking differs by rounding only); sums over
// batch rows and the first layer's inputs run lane-wise in vectors, then across the lanes, in one
// fixed order. ReLU keeps NaN (a diverged member stays detectable); its backward passes the
// gradient where the activation is not <= 0, as torch's threshold_backward does. Dropout
// multiplies by 0 or the member's scale, bit for bit psa.core.rng.dropout_noise's multiplier.
//
// Threads: work items (the training step: seed group; the evaluation: member) are split into
// contiguous ranges, one per thread; no item's result depends on another's or on the thread
// count.

#include <atomic>
#include <cmath>
#include <type_traits>

#include "cpu_stack.h"

namespace {

// ---------------------------------------------------------------------------------------------
// The whole training step of a SimpleMLP population whose hidden layers are all one width <= 8:
// per seed group (k members that share the batch), the batch rows read straight from the
// training set by index, the first layer's forward for the group's k members while those rows are
// in cache, the middle stack, the head, the mean cross-entropy and its gradient, the backward of
// head and stack, and the first layer's weight and bias gradients from the same rows, now in L2.
// Threads split the seed groups; every sum runs in one fixed order within its group, so the bits
// do not depend on the thread count.

// Z[r][n] = alpha S + shift[n], S = sum_i X_r[i] W[n][i], for RB_ rows and NB_ outputs (a register
// block); for float rows alpha = 1 and shift = the bias (1 S is S: the same bits as S + bias).
// `ahead` (null or RB_ row pointers): rows to prefetch meanwhile, one cache line per row and step;
// the batch rows sit at random places in the training set, where the hardware prefetcher
// cannot guess the next one: without this the first read of each row waits for memory.
template <int RB_, int NB_, typename T>
void first_fwd_block(const T* const* rows, const T* const* ahead, const float* w, int64_t n_in, float alpha,
                     const float* shift, float* z, int64_t ldz) {
    constexpr int64_t LINE = 64 / sizeof(T);  // elements per cache line
    vf acc[RB_][NB_] = {};
    int64_t i = 0;
    for (; i + VL <= n_in; i += VL) {
        if (ahead && i % LINE == 0)
            for (int a = 0; a < RB_; ++a) __builtin_prefetch(ahead[a] + i, 0, 3);
        vf x[RB_];
        for (int a = 0; a < RB_; ++a) x[a] = xload(rows[a] + i);
        for (int n = 0; n < NB_; ++n) {
            const vf wv = vload(w + n * n_in + i);
            for (int a = 0; a < RB_; ++a) acc[a][n] += x[a] * wv;
        }
    }
    for (int a = 0; a < RB_; ++a)
        for (int n = 0; n < NB_; ++n) {
            float s = hsum(acc[a][n]);
            for (int64_t j = i; j < n_in; ++j) s += static_cast<float>(rows[a][j]) * w[n * n_in + j];
            z[a * ldz + n] = alpha * s + shift[n];
        }
}

template <int RB_, typename T>
void first_fwd_rows(const T* const* rows, const T* const* ahead, const float* w, int64_t n_in, float alpha,
                    const float* shift, float* z, int64_t ldz, int64_t n_out) {
    int64_t n0 = 0;
    for (; n0 + NB <= n_out; n0 += NB) {
        first_fwd_block<RB_, NB>(rows, ahead, w + n0 * n_in, n_in, alpha, shift + n0, z + n0, ldz);
        ahead = nullptr;  // fetched once, by the first block of outputs
    }
    const float* wr = w + n0 * n_in;
    switch (n_out - n0) {
        case 1: first_fwd_block<RB_, 1>(rows, ahead, wr, n_in, alpha, shift + n0, z + n0, ldz); break;
        case 2: first_fwd_block<RB_, 2>(rows, ahead, wr, n_in, alpha, shift + n0, z + n0, ldz); break;
        case 3: first_fwd_block<RB_, 3>(rows, ahead, wr, n_in, alpha, shift + n0, z + n0, ldz); break;
        case 4: first_fwd_block<RB_, 4>(rows, ahead, wr, n_in, alpha, shift + n0, z + n0, ldz); break;
        case 5: first_fwd_block<RB_, 5>(rows, ahead, wr, n_in, alpha, shift + n0, z + n0, ldz); break;
        default: break;
    }
}

// Rows (of RB) ahead that the first layer's forward prefetches
constexpr int64_t AHEAD = 8 * RB;

// The first layer's forward: Z (b, n_out) row-major from the b rows and W (n_out, n_in)
template <typename T>
void first_forward(const T* const* rows, int64_t b, const float* w, int64_t n_in, float alpha, const float* shift,
                   float* z, int64_t n_out) {
    int64_t r = 0;
    for (; r + RB <= b; r += RB)
        first_fwd_rows<RB>(rows + r, r + AHEAD + RB <= b ? rows + r + AHEAD : nullptr, w, n_in, alpha, shift,
                           z + r * n_out, n_out, n_out);
    for (; r < b; ++r)
        first_fwd_rows<1>(rows + r, static_cast<const T* const*>(nullptr), w, n_in, alpha, shift, z + r * n_out, n_out,
                          n_out);
}

// G[n][i0 + q VL + l] = alpha sum_r D[n][r] X_r[i0 + ...] + off[n] for NB_ outputs and IB_ input
// vectors, rows in order (float rows: no alpha or off, the sums as they are)
template <int NB_, int IB_, typename T>
void first_grad_block(const T* const* rows, int64_t b, const float* d, float* g, int64_t n_in, int64_t i0,
                      float alpha, const float* off) {
    vf acc[NB_][IB_] = {};
    for (int64_t r = 0; r < b; ++r) {
        vf x[IB_];
        for (int q = 0; q < IB_; ++q) x[q] = xload(rows[r] + i0 + q * VL);
        for (int n = 0; n < NB_; ++n) {
            const vf dv = vbroadcast(d[n * b + r]);
            for (int q = 0; q < IB_; ++q) acc[n][q] += dv * x[q];
        }
    }
    for (int n = 0; n < NB_; ++n)
        for (int q = 0; q < IB_; ++q) {
            if (std::is_same<T, float>::value) vstore(g + n * n_in + i0 + q * VL, acc[n][q]);
            else vstore(g + n * n_in + i0 + q * VL, alpha * acc[n][q] + off[n]);
        }
}

template <int NB_, typename T>
void first_grad_outputs(const T* const* rows, int64_t b, const float* d, float* g, int64_t n_in, float alpha,
                        const float* off) {
    int64_t i = 0;
    for (; i + IB * VL <= n_in; i += IB * VL) first_grad_block<NB_, IB>(rows, b, d, g, n_in, i, alpha, off);
    for (; i + VL <= n_in; i += VL) first_grad_block<NB_, 1>(rows, b, d, g, n_in, i, alpha, off);
    for (; i < n_in; ++i)
        for (int n = 0; n < NB_; ++n) {
            float s = 0.0f;
            for (int64_t r = 0; r < b; ++r) s += d[n * b + r] * static_cast<float>(rows[r][i]);
            g[n * n_in + i] = std::is_same<T, float>::value ? s : alpha * s + off[n];
        }
}

// The first layer's weight gradient G (n_out, n_in) from D (n_out, b), output-major, and the rows;
// for coded rows off[n] = beta sum_r D[n][r]
template <typename T>
void first_grad(const T* const* rows, int64_t b, const float* d, float* g, int64_t n_in, int64_t n_out, float alpha,
                const float* off) {
    int64_t n0 = 0;
    for (; n0 + NB <= n_out; n0 += NB)
        first_grad_outputs<NB>(rows, b, d + n0 * b, g + n0 * n_in, n_in, alpha, off + n0);
    const float* dr = d + n0 * b;
    float* gr = g + n0 * n_in;
    const float* o = off + n0;
    switch (n_out - n0) {
        case 1: first_grad_outputs<1>(rows, b, dr, gr, n_in, alpha, o); break;
        case 2: first_grad_outputs<2>(rows, b, dr, gr, n_in, alpha, o); break;
        case 3: first_grad_outputs<3>(rows, b, dr, gr, n_in, alpha, o); break;
        case 4: first_grad_outputs<4>(rows, b, dr, gr, n_in, alpha, o); break;
        case 5: first_grad_outputs<5>(rows, b, dr, gr, n_in, alpha, o); break;
        default: break;
    }
}

struct Step {
    const float* x; const int64_t* y; int64_t n_in;  // the training set (N, n_in), labels (N,)
    const uint8_t* xc; float alpha, beta;             // null, or the training set as 8-bit codes: x = alpha xc + beta
    const int64_t* order; int64_t n_train;            // (G, N) every group's data order
    const int64_t* step; int64_t batch_size, b;       // this step reads positions step * batch_size + [0, b)
    const float* flat; float* grad;                   // parameters and gradients of the members
    int64_t members, k;                               // k consecutive members share a group's batch
    int64_t w0_off, b0_off;                           // first layer (M, W, n_in) and (M, W)
    int64_t w_off, b_off, layer_stride, n_layers;     // the middle stack: Linear 1's, + layer_stride per layer; n_layers hidden
    int64_t hw_off, hb_off, n_out;                    // head (M, n_out, W) and (M, n_out)
    const int64_t* dkeys; const int64_t* thr; const float* sc;  // dropout: loop keys (M, 2), or null
    float* loss;                                      // (M,) mean cross-entropy of each member
    std::atomic<int>* bad;                            // set by a group with a label or index out of range
};

// ---------------------------------------------------------------------------------------------
// One member's share of the fused step, a block of ROWS batch rows at a time: the stack's forward
// saving every layer's activations (ROWS x W x depth floats: at most ~0.6 MB for the study's
// deepest stacks, in L2), the head, the loss and its gradient for those rows, and the stack's
// backward from the saved activations, so the forward runs once. Within the stack, RV vectors of
// rows per unit stay in registers from layer to layer (rows outer, layers inner): a narrow layer
// is a handful of instructions, and a round trip through memory per layer would cost more than
// its arithmetic.

// Row vectors per unit carried in registers: W x RV vectors of state, leaving room for the
// next layer's and the backward's (at most ~24 of AVX-512's 32 registers).
template <int W>
constexpr int row_vectors() { return W <= 2 ? 4 : W <= 4 ? 2 : 1; }

// save[l][u][r] = a_l of unit u for the block's row r, l = 0 .. L-1, from zt[u][r] = z_0 (the
// first layer's pre-activation); rows past the batch are carried (zeros in, ignored later)
template <int W, bool DROP, bool SAVE = true>
void stack_forward_saved(const float (*zt)[ROWS], float (*save)[W][ROWS], const float* wm, const float* bm,
                         int64_t layer_stride, int64_t L, int64_t r0, uint32_t key, uint32_t thr, float sc) {
    // SAVE false (an evaluation): only a_{L-1}, into save[0]
    constexpr int RV = row_vectors<W>();
    const uint32_t n_units = static_cast<uint32_t>(L * W);
    for (int64_t v0 = 0; v0 < ROWS; v0 += RV * VL) {
        vf a[W][RV];
        for (int u = 0; u < W; ++u)
            for (int v = 0; v < RV; ++v) {
                const int64_t r = v0 + v * VL;
                a[u][v] = vactivate<DROP>(vload(zt[u] + r), r0 + r, static_cast<uint32_t>(u), n_units, key, thr, sc);
                if (SAVE || L == 1) vstore(save[0][u] + r, a[u][v]);
            }
        for (int64_t l = 1; l < L; ++l) {
            const float* w = wm + (l - 1) * layer_stride;
            const float* b = bm + (l - 1) * layer_stride;
            vf t[W][RV];
            for (int o = 0; o < W; ++o)
                for (int v = 0; v < RV; ++v) {
                    // products summed over the input units in order, then the bias, as a small GEMM does
                    vf s = a[0][v] * w[o * W];
                    for (int i = 1; i < W; ++i) s += a[i][v] * w[o * W + i];
                    t[o][v] = s + b[o];
                }
            for (int o = 0; o < W; ++o)
                for (int v = 0; v < RV; ++v) {
                    const int64_t r = v0 + v * VL;
                    a[o][v] = vactivate<DROP>(t[o][v], r0 + r, static_cast<uint32_t>(l * W + o), n_units, key, thr, sc);
                    if (SAVE) vstore(save[l][o] + r, a[o][v]);
                    else if (l == L - 1) vstore(save[0][o] + r, a[o][v]);
                }
        }
    }
}

// The stack's backward for VL x RV rows (from row v0 of the block) from dat[u][r] = dLoss/da_{L-1}
// (zero past the batch): dz0[u][r] = dLoss/dz_0, and every middle layer's weight and bias gradient
// added, as lane sums, to acc ((L - 1) x (W W + W) vectors; layer l's at l - 1), row vectors in
// order: one fixed order whatever the threads. `floor`: acc's layers below it hold nothing yet
// (they are 0), so rows that reach them write their sums rather than add them (no pass to zero
// acc first: a 632*4 member's is 0.8 MB); lowered to the last layer these rows wrote.
template <int W, bool DROP>
void stack_backward_rows(const float (*save)[W][ROWS], const float (*dat)[ROWS], const float* wm,
                         int64_t layer_stride, int64_t L, float sc, vf* acc, float (*dz0)[ROWS], int64_t v0,
                         int64_t& floor) {
    constexpr int RV = row_vectors<W>();
    constexpr int per = W * W + W;
    vf g[W][RV], a[W][RV];
    for (int u = 0; u < W; ++u)
        for (int v = 0; v < RV; ++v) {
            g[u][v] = vload(dat[u] + v0 + v * VL);
            a[u][v] = vload(save[L - 1][u] + v0 + v * VL);
        }
    for (int64_t l = L - 1;; --l) {
        // ReLU's backward (0 where the activation is <= 0, as torch's threshold_backward), then
        // dropout's scale
        vf dz[W][RV];
        for (int o = 0; o < W; ++o)
            for (int v = 0; v < RV; ++v) {
                dz[o][v] = a[o][v] <= 0.0f ? vf{} : g[o][v];
                if (DROP) dz[o][v] *= sc;
            }
        if (l == 0) {
            for (int u = 0; u < W; ++u)
                for (int v = 0; v < RV; ++v) vstore(dz0[u] + v0 + v * VL, dz[u][v]);
            floor = 0;
            return;
        }
        for (int i = 0; i < W; ++i)
            for (int v = 0; v < RV; ++v) a[i][v] = vload(save[l - 1][i] + v0 + v * VL);
        vf* gl = acc + (l - 1) * per;
        const bool fresh = l - 1 < floor;
        for (int o = 0; o < W; ++o) {
            for (int i = 0; i < W; ++i) {
                vf t = fresh ? dz[o][0] * a[i][0] : gl[o * W + i] + dz[o][0] * a[i][0];
                for (int v = 1; v < RV; ++v) t += dz[o][v] * a[i][v];
                gl[o * W + i] = t;
            }
            vf t = fresh ? dz[o][0] : gl[W * W + o] + dz[o][0];
            for (int v = 1; v < RV; ++v) t += dz[o][v];
            gl[W * W + o] = t;
        }
        const float* w = wm + (l - 1) * layer_stride;
        for (int i = 0; i < W; ++i)
            for (int v = 0; v < RV; ++v) {
                vf t = dz[0][v] * w[i];
                for (int o = 1; o < W; ++o) t += dz[o][v] * w[o * W + i];
                g[i][v] = t;
            }
        if (l % 4 == 0 && all_zero(g)) {
            // These rows' gradient is exactly 0 from here down (a deep narrow net's units die: a
            // layer whose every row is off stops it), so every lower layer's sums would gain +0
            // from them, and dz0 is 0: stop. The one difference from carrying on: 0 x an infinite
            // activation would give NaN.
            for (int u = 0; u < W; ++u)
                for (int v = 0; v < RV; ++v) vstore(dz0[u] + v0 + v * VL, vf{});
            floor = std::min(floor, l - 1);
            return;
        }
    }
}

// stack_backward_rows over a block
template <int W, bool DROP>
void stack_backward_saved(const float (*save)[W][ROWS], const float (*dat)[ROWS], const float* wm,
                          int64_t layer_stride, int64_t L, float sc, vf* acc, float (*dz0)[ROWS], int64_t& floor) {
    constexpr int RV = row_vectors<W>();
    for (int64_t v0 = 0; v0 < ROWS; v0 += RV * VL)
        stack_backward_rows<W, DROP>(save, dat, wm, layer_stride, L, sc, acc, dz0, v0, floor);
}

// Per thread: every buffer one group needs, reused from group to group and from step to step.
struct Work {
    std::vector<const float*> rows;
    std::vector<const uint8_t*> crows;  // the rows' codes, where the step reads codes
    std::vector<float> shift, off;      // per first-layer output: the forward's and the gradient's constant
    std::vector<int64_t> labels;
    std::vector<float> yf;     // the labels as floats, -1 past the batch (rows padded to whole blocks)
    std::vector<float> valid;  // 1 for a batch row, 0 past the batch
    std::vector<float> z, d, save, lg, dl;  // lg, dl: (n_out, ROWS) logits and their gradient
    std::vector<float> pw;  // the group's middle layers, packed: per member and layer W x W weights, then W biases
    std::vector<float> pg;  // their gradients, the same way
    std::vector<vf> acc;   // the stack's gradient lane sums
    std::vector<vf> hacc;  // the head's
    void fit(std::vector<float>& v, size_t n) { if (v.size() < n) v.resize(n); }
};

// Members m0 .. m0 + k - 1's middle layers packed side by side into dst, member after member:
// per layer W x W weights, then W biases (16-80 KB a member for the study's deepest stacks, in
// L1/L2). In the population's layout a layer's members share a cache line or two, which each
// member's every block would otherwise fetch again.
template <int W>
void pack_layers(const float* flat, int64_t w_off, int64_t b_off, int64_t layer_stride, int64_t L, int64_t m0,
                 int64_t k, float* dst) {
    constexpr int64_t per = W * W + W;
    const int64_t mper = std::max<int64_t>(L - 1, 1) * per;  // floats per member
    for (int64_t l = 1; l < L; ++l) {
        const float* w = flat + w_off + (l - 1) * layer_stride + m0 * W * W;
        const float* bb = flat + b_off + (l - 1) * layer_stride + m0 * W;
        for (int64_t j = 0; j < k; ++j) {
            float* d = dst + j * mper + (l - 1) * per;
            std::copy(w + j * W * W, w + (j + 1) * W * W, d);
            std::copy(bb + j * W, bb + (j + 1) * W, d + W * W);
        }
    }
}

// the head's logits for a block: lg[c][r] = sum_u at[u][r] hw[c][u] (units in order), then + hb[c];
// the training step's and the evaluation's, so both score the same arithmetic
template <int W>
void head_logits(const float (*at)[ROWS], const float* hw, const float* hb, int64_t n_out, float (*lg)[ROWS]) {
    for (int64_t c = 0; c < n_out; ++c)
        for (int64_t r = 0; r < ROWS; r += VL) {
            vf t = vload(at[0] + r) * hw[c * W];
            for (int u = 1; u < W; ++u) t += vload(at[u] + r) * hw[c * W + u];
            vstore(lg[c] + r, t + hb[c]);
        }
}

// The head (logits = A hw^T + hb), the mean cross-entropy's terms and gradient for one block of
// rows (at[u][r] = the last hidden layer's activations), the head's gradients added to hacc as
// lane sums, dLoss/dA into dat; returns the block's sum of per-row losses (rows in order)
template <int W>
double head_block(const float (*at)[ROWS], const float* hw, const float* hb, int64_t n_out, const float* yf,
                  const float* valid, const int64_t* labels, int64_t nr, float inv_b, float (*lg)[ROWS], float (*dl)[ROWS],
                  vf* hacc, float (*dat)[ROWS]) {
    alignas(64) float mxs[ROWS], sms[ROWS];
    head_logits<W>(at, hw, hb, n_out, lg);
    for (int64_t r = 0; r < ROWS; r += VL) {
        vf mx = vload(lg[0] + r);
        for (int64_t c = 1; c < n_out; ++c) {
            const vf l = vload(lg[c] + r);
            mx = l > mx ? l : mx;
        }
        for (int64_t c = 0; c < n_out; ++c) {  // a NaN logit makes its row's loss and gradient NaN
            const vf l = vload(lg[c] + r);
            mx = l != l ? l : mx;
        }
        vf sum{};
        for (int64_t c = 0; c < n_out; ++c) {
            const vf e = exp_neg(vload(lg[c] + r) - mx);
            vstore(dl[c] + r, e);
            sum += e;
        }
        vstore(mxs + r, mx);
        vstore(sms + r, sum);
    }
    double loss = 0.0;
    for (int64_t r = 0; r < nr; ++r) {
        const float lse = mxs[r] + std::log(sms[r]);
        loss += static_cast<double>(lse - lg[labels[r]][r]);
    }
    for (int64_t r = 0; r < ROWS; r += VL) {
        const vf inv = vbroadcast(1.0f) / vload(sms + r);
        const vf y = vload(yf + r);
        const vf ok = vload(valid + r);
        for (int64_t c = 0; c < n_out; ++c) {
            const vf one = y == static_cast<float>(c) ? vbroadcast(1.0f) : vf{};
            // rows past the batch contribute exactly 0 (a select, not a product: their activations
            // are computed from zeros and never checked)
            vstore(dl[c] + r, ok > 0.0f ? (vload(dl[c] + r) * inv - one) * inv_b : vf{});
        }
    }
    for (int64_t c = 0; c < n_out; ++c) {
        vf* h = hacc + c * (W + 1);
        for (int64_t r = 0; r < ROWS; r += VL) {
            const vf dv = vload(dl[c] + r);
            for (int u = 0; u < W; ++u) h[u] += dv * vload(at[u] + r);
            h[W] += dv;
        }
    }
    for (int u = 0; u < W; ++u)
        for (int64_t r = 0; r < ROWS; r += VL) {
            vf t = vload(dl[0] + r) * hw[u];
            for (int64_t c = 1; c < n_out; ++c) t += vload(dl[c] + r) * hw[c * W + u];
            vstore(dat[u] + r, t);
        }
    return loss;
}

template <int W>
void step_group(const Step& s, int64_t g, Work& wk) {
    const int64_t b = s.b, k = s.k, n_in = s.n_in, n_out = s.n_out, L = s.n_layers;
    const int64_t N = k * W;                          // the group's first-layer outputs
    const int64_t bpr = (b + ROWS - 1) / ROWS * ROWS;  // rows padded to whole blocks
    const int64_t pos0 = *s.step * s.batch_size;
    if (s.xc) wk.crows.resize(b);
    else wk.rows.resize(b);
    wk.labels.resize(bpr);
    wk.yf.assign(bpr, -1.0f);
    wk.valid.assign(bpr, 0.0f);
    for (int64_t r = 0; r < b; ++r) {
        const int64_t idx = s.order[g * s.n_train + pos0 + r];
        if (idx < 0 || idx >= s.n_train || s.y[idx] < 0 || s.y[idx] >= n_out) {
            s.bad->store(1);  // never read outside the data: the caller raises
            return;
        }
        if (s.xc) wk.crows[r] = s.xc + idx * n_in;
        else wk.rows[r] = s.x + idx * n_in;
        wk.labels[r] = s.y[idx];
        wk.yf[r] = static_cast<float>(s.y[idx]);
        wk.valid[r] = 1.0f;
    }
    constexpr int64_t per = W * W + W;
    wk.fit(wk.z, b * N);
    wk.fit(wk.d, N * b);
    wk.fit(wk.save, static_cast<size_t>(L) * W * ROWS);
    wk.fit(wk.lg, n_out * ROWS);
    wk.fit(wk.pw, static_cast<size_t>(k) * std::max<int64_t>(L - 1, 1) * per);
    wk.fit(wk.pg, static_cast<size_t>(k) * std::max<int64_t>(L - 1, 1) * per);
    wk.fit(wk.dl, n_out * ROWS);
    if (wk.acc.size() < static_cast<size_t>(std::max<int64_t>(L - 1, 1)) * per)
        wk.acc.resize(static_cast<size_t>(std::max<int64_t>(L - 1, 1)) * per);
    if (wk.hacc.size() < static_cast<size_t>(n_out * (W + 1))) wk.hacc.resize(n_out * (W + 1));
    const int64_t m0 = g * k;
    // first layer, forward: Z (b, k W), member j's units at columns [j W, (j + 1) W)
    const float* w0 = s.flat + s.w0_off + m0 * W * n_in;
    const float* b0 = s.flat + s.b0_off + m0 * W;
    if (s.xc) {
        wk.fit(wk.shift, N);  // beta sum_i w_i + bias: the codes' offset, once per output
        for (int64_t n = 0; n < N; ++n) wk.shift[n] = s.beta * dot(w0 + n * n_in, nullptr, n_in) + b0[n];
        first_forward(wk.crows.data(), b, w0, n_in, s.alpha, wk.shift.data(), wk.z.data(), N);
    } else {
        first_forward(wk.rows.data(), b, w0, n_in, 1.0f, b0, wk.z.data(), N);
    }
    const float inv_b = static_cast<float>(1.0 / static_cast<double>(b));
    auto* save = reinterpret_cast<float (*)[W][ROWS]>(wk.save.data());
    const int64_t mper = std::max<int64_t>(L - 1, 1) * per;  // floats per member in pw and pg
    pack_layers<W>(s.flat, s.w_off, s.b_off, s.layer_stride, L, m0, k, wk.pw.data());
    alignas(64) float zt[W][ROWS], dat[W][ROWS], dz0[W][ROWS];
    for (int64_t j = 0; j < k; ++j) {
        const int64_t m = m0 + j;
        // a member without dropout (threshold 0: every unit kept, times exactly 1) skips the hashes
        const bool drop = s.dkeys && s.thr[m] > 0;
        uint32_t key = 0, thr = 0;
        float sc = 1.0f;
        if (drop) {
            // rng.step_keys: mix32(mix32(step ^ k0) ^ k1)
            key = mix32(mix32(static_cast<uint32_t>(*s.step ^ s.dkeys[2 * m])) ^ static_cast<uint32_t>(s.dkeys[2 * m + 1]));
            thr = static_cast<uint32_t>(s.thr[m]);
            sc = s.sc[m];
        }
        const float* pw = wk.pw.data() + j * mper;
        const float* wm = pw;
        const float* bm = pw + W * W;
        const float* hw = s.flat + s.hw_off + m * n_out * W;
        const float* hb = s.flat + s.hb_off + m * n_out;
        vf* acc = wk.acc.data();
        vf* hacc = wk.hacc.data();
        std::fill(hacc, hacc + n_out * (W + 1), vf{});
        double loss = 0.0;
        int64_t floor = L - 1;  // acc holds nothing yet
        for (int64_t r0 = 0; r0 < b; r0 += ROWS) {
            const int64_t nr = std::min(ROWS, b - r0);
            load_block<W>(wk.z.data() + j * W, N, 1, r0, nr, zt);
            if (drop) stack_forward_saved<W, true>(zt, save, wm, bm, per, L, r0, key, thr, sc);
            else stack_forward_saved<W, false>(zt, save, wm, bm, per, L, r0, key, thr, sc);
            loss += head_block<W>(save[L - 1], hw, hb, n_out, wk.yf.data() + r0, wk.valid.data() + r0,
                                  wk.labels.data() + r0, nr, inv_b, reinterpret_cast<float (*)[ROWS]>(wk.lg.data()),
                                  reinterpret_cast<float (*)[ROWS]>(wk.dl.data()), hacc, dat);
            if (drop) stack_backward_saved<W, true>(save, dat, wm, per, L, sc, acc, dz0, floor);
            else stack_backward_saved<W, false>(save, dat, wm, per, L, sc, acc, dz0, floor);
            // output-major for the first layer: d[j W + u][r]
            for (int u = 0; u < W; ++u)
                for (int64_t r = 0; r < nr; ++r) wk.d[(j * W + u) * b + r0 + r] = dz0[u][r];
        }
        s.loss[m] = static_cast<float>(loss / static_cast<double>(b));
        float* ghw = s.grad + s.hw_off + m * n_out * W;
        float* ghb = s.grad + s.hb_off + m * n_out;
        for (int64_t c = 0; c < n_out; ++c) {
            for (int u = 0; u < W; ++u) ghw[c * W + u] = hsum(hacc[c * (W + 1) + u]);
            ghb[c] = hsum(hacc[c * (W + 1) + W]);
        }
        // the middle layers' gradients, packed as pw; below the floor no row reached: 0
        float* pg = wk.pg.data() + j * mper;
        std::fill(pg, pg + floor * per, 0.0f);
        for (int64_t q = floor * per; q < (L - 1) * per; ++q) pg[q] = hsum(acc[q]);
    }
    for (int64_t l = 1; l < L; ++l) {  // ... into the population's layout, a layer's k members at once
        float* gw = s.grad + s.w_off + (l - 1) * s.layer_stride + m0 * W * W;
        float* gb = s.grad + s.b_off + (l - 1) * s.layer_stride + m0 * W;
        for (int64_t j = 0; j < k; ++j) {
            const float* src = wk.pg.data() + j * mper + (l - 1) * per;
            std::copy(src, src + W * W, gw + j * W * W);
            std::copy(src + W * W, src + per, gb + j * W);
        }
    }
    // first layer, backward: weight gradients from the same rows, bias gradients
    float* gb0 = s.grad + s.b0_off + m0 * W;
    for (int64_t n = 0; n < N; ++n) gb0[n] = dot(wk.d.data() + n * b, nullptr, b);
    if (s.xc) {
        wk.fit(wk.off, N);
        for (int64_t n = 0; n < N; ++n) wk.off[n] = s.beta * gb0[n];
        first_grad(wk.crows.data(), b, wk.d.data(), s.grad + s.w0_off + m0 * W * n_in, n_in, N, s.alpha, wk.off.data());
    } else {
        first_grad(wk.rows.data(), b, wk.d.data(), s.grad + s.w0_off + m0 * W * n_in, n_in, N, 1.0f, gb0);
    }
}

template <int W>
void train_step(const Step& s, int threads) {
    const int64_t groups = s.members / s.k;
    parallel(groups, threads, [&](int64_t lo, int64_t hi) {
        thread_local Work wk;
        for (int64_t g = lo; g < hi; ++g) step_group<W>(s, g, wk);
    });
}

// ---------------------------------------------------------------------------------------------
// Evaluation: correct predictions of each member from its first layer's pre-activation z0
// (M, B, W, any strides): the stack (no dropout: evaluation), the head, and torch.argmax's choice
// per row (the first largest logit; a NaN counts as the largest, the first NaN wins), compared
// with the label. Threads split the members; a member's count is an integer, in any order the same.
struct Eval {
    const float* z0; int64_t s_zm, s_zb, s_zw;  // hidden layer 0's pre-activation (M, B, W)
    const float* flat; int64_t w_off, b_off, layer_stride;  // the middle stack, as Step's
    int64_t members, rows, n_layers;
};

template <int W>
void count_member(const Eval& p, const float* hw, const float* hb, int64_t n_out, const int64_t* y, int64_t m,
                  int64_t* correct, std::vector<float>& pw, std::vector<float>& lg) {
    constexpr int64_t per = W * W + W;
    const int64_t L = p.n_layers;
    if (pw.size() < static_cast<size_t>(std::max<int64_t>(L - 1, 1) * per)) pw.resize(std::max<int64_t>(L - 1, 1) * per);
    if (lg.size() < static_cast<size_t>(n_out * ROWS)) lg.resize(n_out * ROWS);
    pack_layers<W>(p.flat, p.w_off, p.b_off, p.layer_stride, L, m, 1, pw.data());
    const float* hwm = hw + m * n_out * W;
    const float* hbm = hb + m * n_out;
    alignas(64) float zt[W][ROWS], at[1][W][ROWS];
    int64_t count = 0;
    const float* z0 = p.z0 + m * p.s_zm;
    for (int64_t r0 = 0; r0 < p.rows; r0 += ROWS) {
        const int64_t nr = std::min(ROWS, p.rows - r0);
        load_block<W>(z0, p.s_zb, p.s_zw, r0, nr, zt);
        stack_forward_saved<W, false, false>(zt, at, pw.data(), pw.data() + W * W, per, L, r0, 0, 0, 1.0f);
        float* l = lg.data();
        head_logits<W>(at[0], hwm, hbm, n_out, reinterpret_cast<float (*)[ROWS]>(l));
        for (int64_t r = 0; r < nr; ++r) {
            float best = l[r];
            int64_t arg = 0;
            for (int64_t c = 1; c < n_out; ++c) {
                const float v = l[c * ROWS + r];
                if (best == best && (v > best || v != v)) {
                    best = v;
                    arg = c;
                }
            }
            count += arg == y[r0 + r];
        }
    }
    correct[m] = count;
}

template <int W>
void count_correct(const Eval& p, const float* hw, const float* hb, int64_t n_out, const int64_t* y,
                   int64_t* correct, int threads) {
    parallel(p.members, threads, [&](int64_t lo, int64_t hi) {
        std::vector<float> pw, lg;
        for (int64_t m = lo; m < hi; ++m) count_member<W>(p, hw, hb, n_out, y, m, correct, pw, lg);
    });
}

#define PSA_WIDTHS(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8)

}  // namespace

extern "C" {

int psa_stack_max_width() { return 8; }

int psa_count_correct(const float* z0, int64_t s_zm, int64_t s_zb, int64_t s_zw, const float* flat, int64_t w_off,
                      int64_t b_off, int64_t layer_stride, int64_t n_layers, int64_t width, const float* hw,
                      const float* hb, int64_t n_out, const int64_t* y, int64_t* correct, int64_t members,
                      int64_t rows, int threads) {
    Eval p{z0, s_zm, s_zb, s_zw, flat, w_off, b_off, layer_stride, members, rows, n_layers};
    if (n_out <= 0 || n_layers <= 0) return 2;
    switch (width) {
#define PSA_COUNT(N) case N: count_correct<N>(p, hw, hb, n_out, y, correct, threads); return 0;
        PSA_WIDTHS(PSA_COUNT)
#undef PSA_COUNT
        default: return 1;
    }
}

int psa_train_step(const float* x, const uint8_t* xc, float alpha, float beta, const int64_t* y, int64_t n_in, const int64_t* order, int64_t n_train,
                   const int64_t* step, int64_t batch_size, int64_t b, const float* flat, float* grad,
                   int64_t members, int64_t k, int64_t w0_off, int64_t b0_off, int64_t w_off, int64_t b_off,
                   int64_t layer_stride, int64_t n_layers, int64_t hw_off, int64_t hb_off, int64_t n_out,
                   const int64_t* dkeys, const int64_t* thr, const float* sc, float* loss, int64_t width,
                   int threads) {
    std::atomic<int> bad{0};
    Step s{x, y, n_in, xc, alpha, beta, order, n_train, step, batch_size, b, flat, grad, members, k, w0_off, b0_off, w_off, b_off,
           layer_stride, n_layers, hw_off, hb_off, n_out, dkeys, thr, sc, loss, &bad};
    if (members <= 0 || k <= 0 || members % k || b <= 0) return 2;
    switch (width) {
#define PSA_STEP(N) case N: train_step<N>(s, threads); return bad.load() ? 3 : 0;
        PSA_WIDTHS(PSA_STEP)
#undef PSA_STEP
        default: return 1;
    }
}

}  // extern "C"

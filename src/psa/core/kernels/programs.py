"""The Triton programs behind psa.core.kernels.triton_stack: the stack forward and backward (one program per
member and block of batch rows, every middle layer in registers or pipelined through shared
memory) and the dropout noise. triton_stack sizes and launches them; the layout of the
flat parameter buffer they read is described there.

Without triton installed this module defines no program (the package runs without them).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; only these kernels need it
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _mix32(x):
        # lowbias32 on uint32: multiplies wrap mod 2**32 and shifts are logical, as in rng.mix32
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _and_less(mask, a, b):
        # mask & (a < b) for scalars a, b. Broadcast first: Triton 3.9's interpreter rejects a
        # mask built from a scalar comparison ("mask has unsupported dtype").
        return mask & ((mask.to(tl.int32) * 0 + a) < b)

    @triton.jit
    def _activate(z, rows, units, n_units, key, thr, sc, HAS_DROP: tl.constexpr):
        # max with NaN propagation, so that a diverged member stays NaN and detectable
        a = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
        if HAS_DROP:
            # A member without dropout (threshold 0, scale 1: every unit kept, times 1) skips the
            # hash, some 20 integer operations an element on the layer's serial chain: one
            # program is one member, so the branch is uniform, and in a population of the
            # paper's six modes five members in six have no dropout. The same bits either way.
            if (thr != 0) | (sc != 1.0):
                # rng.position_hash wraps r*U + u to 32 bits; uint32 arithmetic does the same
                c = (rows.to(tl.uint32)[:, None] * n_units + units.to(tl.uint32)[None, :]).to(tl.uint32)
                h = _mix32(_mix32(c) ^ key)
                a = tl.where(h >= thr, a * sc, 0.0)
        return a

    @triton.jit
    def _round_tf32(x):
        # psa.core.precision.round_tf32: nearest TF32 value, ties to even, on the bit pattern; inf
        # and NaN kept (zeroed for the add, so that nothing carries out of them)
        bits = x.to(tl.int32, bitcast=True)
        special = (bits & 0x7F800000) == 0x7F800000
        safe = tl.where(special, 0, bits)
        rounded = (safe + (0xFFF + ((safe >> 13) & 1))) & -0x2000
        return tl.where(special, bits, rounded).to(tl.float32, bitcast=True)

    @triton.jit
    def _round_bf16(x):
        # torch's float32 -> bfloat16 -> float32: nearest, ties to even, on the bit pattern.
        # Not x.to(tl.bfloat16): Triton's interpreter truncates where a GPU rounds.
        bits = x.to(tl.int32, bitcast=True)
        special = (bits & 0x7F800000) == 0x7F800000
        safe = tl.where(special, 0, bits)
        rounded = (safe + (0x7FFF + ((safe >> 16) & 1))) & -0x10000
        return tl.where(special, bits, rounded).to(tl.float32, bitcast=True)

    @triton.jit
    def _matmul(x, y, PREC: tl.constexpr, DOT: tl.constexpr, ROUND_Y: tl.constexpr = True):
        # x (R, K) @ y (K, N); ROUND_Y False: y is rounded to PREC already (the wide stacks'
        # weights, staged once per step by _stage_kernel instead of rounded once per row block)
        if DOT:
            if PREC == 2:
                # bf16 operands, fp32 accumulation. The rounded values are exact in tf32, so a
                # tf32 dot of them computes what a bf16 dot would (the interpreter has no
                # working bf16 dot, so this path is also the one the CPU tests check); rounded
                # on the bit pattern, as the interpreter's .to(tl.bfloat16) truncates
                x = _round_bf16(x)
                if ROUND_Y:
                    y = _round_bf16(y)
                return tl.dot(x, y, input_precision="tf32")
            elif PREC == 1:
                # rounded to nearest first: the tensor cores' tf32 dot drops the low mantissa
                # bits instead of rounding them (by how much on a card: docs/gpu.md)
                x = _round_tf32(x)
                if ROUND_Y:
                    y = _round_tf32(y)
                return tl.dot(x, y, input_precision="tf32")
            else:
                return tl.dot(x, y, input_precision="ieee")
        else:
            if PREC == 2:
                x = _round_bf16(x)
                y = _round_bf16(y)
            elif PREC == 1:
                x = _round_tf32(x)
                y = _round_tf32(y)
            return tl.sum(x[:, :, None] * y[None, :, :], axis=1)

    @triton.jit
    def _wide_fwd_layer(a, l, w_base, w_layer_stride, b_base, b_layer_stride, wt_idx, u, umask, r, n_units,
                        key, thr, sc, act_tile, act_layer_stride, tile_mask,
                        W: tl.constexpr, HAS_DROP: tl.constexpr, STORE_ALL: tl.constexpr,
                        PREC: tl.constexpr):
        # middle layer l of the wide forward: loads its staged weights and biases itself (padded
        # with zeros, the weights rounded to PREC: no masks, 16-byte copies; the pipeliner moves
        # the loads one layer ahead, into shared memory)
        l64 = tl.cast(l - 1, tl.int64)
        wt = tl.load(w_base + l64 * w_layer_stride + wt_idx)
        bias = tl.load(b_base + l64 * b_layer_stride + u)
        z = _matmul(a, wt, PREC, True, False) + bias[None, :]
        a = _activate(z, r, l * W + u, n_units, key, thr, sc, HAS_DROP)
        a = tl.where(umask[None, :], a, 0.0)
        if STORE_ALL:
            tl.store(act_tile + tl.cast(l, tl.int64) * act_layer_stride, a, mask=tile_mask)
        return a

    @triton.jit
    def _wide_bwd_layer(da, a_cur, k, act_tile, act_layer_stride, tile_mask, dz_tile,
                        w_base, layer_stride, w_idx, sc, PREC: tl.constexpr):
        # middle layer l = k + 1 of the wide backward (its weights staged transposed, padded and
        # rounded to PREC, so that the product's (K, N) operand is K-contiguous in memory as in
        # the forward): da = dLoss/da_l, a_cur = a_l. Stores dLoss/dz_l for the weight gradients, which are one
        # batched product after the kernel (in here they would be a second product a layer on
        # the serial chain, and a (W, W) partial written per row block). Returns dLoss/da_k, a_k.
        k64 = tl.cast(k, tl.int64)
        a_in = tl.load(act_tile + k64 * act_layer_stride, mask=tile_mask, other=0.0)
        # a > 0 exactly where the unit was kept and its pre-activation was positive
        dz = tl.where(a_cur > 0, da * sc, 0.0)
        tl.store(dz_tile + k64 * act_layer_stride, dz, mask=tile_mask)
        w = tl.load(w_base + k64 * layer_stride + w_idx)
        return _matmul(dz, w, PREC, True, False), a_in

    @triton.jit(do_not_specialize=["n"])
    def _range_probe_kernel(out_ptr, n):
        acc = tl.zeros((2,), tl.float32)
        for i in tl.range(0, n, num_stages=1):
            acc += 1.0
        tl.store(out_ptr + tl.arange(0, 2), acc)

    # n_layers must stay a runtime value (Triton turns an int argument equal to 1 into a
    # constant, which a while condition cannot take)
    @triton.jit(do_not_specialize=["n_layers"])
    def _stack_fwd_kernel(
        z0_ptr, s_zm, s_zb, s_zw,
        flat_ptr, w_off, b_off, layer_stride, wr_ptr, wr_off, wr_layer_stride, br_ptr, br_layer_stride,
        acts_ptr, act_layer_stride,
        ks_ptr, thr_ptr, sc_ptr,
        B, n_layers, n_units,
        W: tl.constexpr, WP: tl.constexpr, BLOCK_R: tl.constexpr,
        HAS_DROP: tl.constexpr, STORE_ALL: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
        WIDE: tl.constexpr, FOR_LOOP: tl.constexpr, STAGES: tl.constexpr,
    ):
        m = tl.cast(tl.program_id(0), tl.int64)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        u = tl.arange(0, WP)
        umask = u < W
        tile_mask = (r < B)[:, None] & umask[None, :]
        wmask = umask[:, None] & umask[None, :]
        # weights loaded transposed, wt[i, o] = W[o, i], so that z = a @ wt
        wt_idx = u[:, None] + u[None, :] * W

        key = tl.full((), 0, tl.uint32)
        thr = tl.full((), 0, tl.uint32)
        sc = 1.0
        if HAS_DROP:
            key = tl.load(ks_ptr + m).to(tl.uint32)
            thr = tl.load(thr_ptr + m).to(tl.uint32)
            sc = tl.load(sc_ptr + m)

        z = tl.load(z0_ptr + m * s_zm + r[:, None] * s_zb + u[None, :] * s_zw, mask=tile_mask, other=0.0)
        a = _activate(z, r, u, n_units, key, thr, sc, HAS_DROP)
        # padded units stay exactly 0 even when a real unit is inf or NaN (0 * inf = NaN)
        a = tl.where(umask[None, :], a, 0.0)
        act_tile = acts_ptr + m * B * W + r[:, None] * W + u[None, :]
        if STORE_ALL:
            tl.store(act_tile, a, mask=tile_mask)

        w_base = flat_ptr + w_off + m * W * W
        b_base = flat_ptr + b_off + m * W
        if WIDE:
            # the weights from wr_ptr: staged (WP, WP) tiles, W itself, wt[i, o] = W[o, i] at o * WP + i;
            # the biases from br_ptr, (WP,) a member and layer
            wr_base = wr_ptr + wr_off + m * WP * WP
            br_base = br_ptr + m * WP
            wide_idx = u[:, None] + u[None, :] * WP
            if FOR_LOOP:
                for l in tl.range(1, n_layers, num_stages=STAGES):
                    a = _wide_fwd_layer(a, l, wr_base, wr_layer_stride, br_base, br_layer_stride, wide_idx, u,
                                        umask, r, n_units, key, thr, sc, act_tile, act_layer_stride, tile_mask,
                                        W, HAS_DROP, STORE_ALL, PREC)
            else:
                l = tl.full((), 1, tl.int32)
                while l < n_layers:
                    a = _wide_fwd_layer(a, l, wr_base, wr_layer_stride, br_base, br_layer_stride, wide_idx, u,
                                        umask, r, n_units, key, thr, sc, act_tile, act_layer_stride, tile_mask,
                                        W, HAS_DROP, STORE_ALL, PREC)
                    l += 1
        else:
            # Each layer waits on its weights, which do not depend on the activations: load the
            # next layer's while this one computes, to hide the memory latency of the serial chain.
            wt = tl.load(w_base + wt_idx, mask=_and_less(wmask, 1, n_layers), other=0.0)
            bias = tl.load(b_base + u, mask=_and_less(umask, 1, n_layers), other=0.0)
            # a while loop, not range(1, n_layers): the same runtime loop, but Triton 3.6's
            # interpreter cannot take a kernel argument as a range bound under numpy >= 2.4
            l = tl.full((), 1, tl.int32)
            while l < n_layers:
                wt_cur = wt
                b_cur = bias
                nxt = tl.cast(l, tl.int64) * layer_stride
                wt = tl.load(w_base + nxt + wt_idx, mask=_and_less(wmask, l + 1, n_layers), other=0.0)
                bias = tl.load(b_base + nxt + u, mask=_and_less(umask, l + 1, n_layers), other=0.0)

                z = _matmul(a, wt_cur, PREC, DOT) + b_cur[None, :]
                a = _activate(z, r, l * W + u, n_units, key, thr, sc, HAS_DROP)
                a = tl.where(umask[None, :], a, 0.0)
                if STORE_ALL:
                    tl.store(act_tile + tl.cast(l, tl.int64) * act_layer_stride, a, mask=tile_mask)
                l += 1
        if not STORE_ALL:
            tl.store(act_tile, a, mask=tile_mask)

    @triton.jit(do_not_specialize=["n_layers"])
    def _stack_bwd_kernel(
        da_ptr, s_dm, s_db, s_dw,
        acts_ptr, act_layer_stride,
        flat_ptr, w_off, layer_stride,
        part_ptr, p_w_off, p_b_off, p_layer_stride, p_block_stride,
        dz0_ptr, sc_ptr,
        B, n_layers,
        W: tl.constexpr, WP: tl.constexpr, BLOCK_R: tl.constexpr,
        HAS_SCALE: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
        WIDE: tl.constexpr, FOR_LOOP: tl.constexpr, STAGES: tl.constexpr,
    ):
        m = tl.cast(tl.program_id(0), tl.int64)
        rb = tl.program_id(1)
        r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        u = tl.arange(0, WP)
        umask = u < W
        tile_mask = (r < B)[:, None] & umask[None, :]
        wmask = umask[:, None] & umask[None, :]
        w_idx = u[:, None] * W + u[None, :]

        sc = 1.0
        if HAS_SCALE:
            sc = tl.load(sc_ptr + m)

        da = tl.load(da_ptr + m * s_dm + r[:, None] * s_db + u[None, :] * s_dw, mask=tile_mask, other=0.0)
        act_tile = acts_ptr + m * B * W + r[:, None] * W + u[None, :]
        l = tl.full((), 0, tl.int32) + n_layers - 1
        a_cur = tl.load(act_tile + tl.cast(l, tl.int64) * act_layer_stride, mask=tile_mask, other=0.0)

        if WIDE:
            # flat_ptr holds the staged transposed weights: (WP, WP) tiles, w[o, i] = W[o, i] at
            # i * WP + o. part_ptr is dLoss/dz of the middle layers, laid out like acts (see _wide_bwd_layer)
            w_base = flat_ptr + w_off + m * WP * WP
            wide_idx = u[:, None] + u[None, :] * WP
            dz_tile = part_ptr + m * B * W + r[:, None] * W + u[None, :]
            if FOR_LOOP:
                for j in tl.range(0, n_layers - 1, num_stages=STAGES):
                    da, a_cur = _wide_bwd_layer(da, a_cur, n_layers - 2 - j, act_tile, act_layer_stride, tile_mask,
                                                dz_tile, w_base, layer_stride, wide_idx, sc, PREC)
            else:
                while l >= 1:
                    da, a_cur = _wide_bwd_layer(da, a_cur, l - 1, act_tile, act_layer_stride, tile_mask,
                                                dz_tile, w_base, layer_stride, wide_idx, sc, PREC)
                    l -= 1
        else:
            w_base = flat_ptr + w_off + m * W * W
            # the weight and bias gradients here, per row block (part_ptr: see stack_backward)
            pw_base = part_ptr + p_w_off + tl.cast(rb, tl.int64) * p_block_stride + m * W * W
            pb_base = part_ptr + p_b_off + tl.cast(rb, tl.int64) * p_block_stride + m * W
            # as in the forward, fetch the next (lower) layer's operands while this one computes
            a_prev = tl.load(act_tile + tl.cast(l - 1, tl.int64) * act_layer_stride,
                             mask=_and_less(tile_mask, 0, l), other=0.0)
            w = tl.load(w_base + tl.cast(l - 1, tl.int64) * layer_stride + w_idx,
                        mask=_and_less(wmask, 0, l), other=0.0)
            while l >= 1:
                a_in = a_prev
                w_cur = w
                a_prev = tl.load(act_tile + tl.cast(l - 2, tl.int64) * act_layer_stride,
                                 mask=_and_less(tile_mask, 1, l), other=0.0)
                w = tl.load(w_base + tl.cast(l - 2, tl.int64) * layer_stride + w_idx,
                            mask=_and_less(wmask, 1, l), other=0.0)

                # a > 0 exactly where the unit was kept and its pre-activation was positive
                dz = tl.where(a_cur > 0, da * sc, 0.0)
                gw = _matmul(tl.trans(dz), a_in, PREC, DOT)
                gb = tl.sum(dz, axis=0)
                p_off = tl.cast(l - 1, tl.int64) * p_layer_stride
                tl.store(pw_base + p_off + w_idx, gw, mask=wmask)
                tl.store(pb_base + p_off + u, gb, mask=umask)
                da = _matmul(dz, w_cur, PREC, DOT)
                a_cur = a_in
                l -= 1
        dz = tl.where(a_cur > 0, da * sc, 0.0)
        tl.store(dz0_ptr + m * B * W + r[:, None] * W + u[None, :], dz, mask=tile_mask)

    @triton.jit
    def _stage_kernel(src_ptr, src_off, src_b_off, src_stride, fwd_ptr, bias_ptr, bwd_ptr, members,
                      W: tl.constexpr, WP: tl.constexpr, BLOCK_O: tl.constexpr, PREC: tl.constexpr,
                      FWD: tl.constexpr, BWD: tl.constexpr):
        # Rows [o0, o0 + BLOCK_O) of the (W, W) weights of member m in middle layer l (from
        # src_off, layers src_stride apart), rounded to PREC by the very functions the dots use,
        # into (WP, WP) tiles padded with zeros: W itself in fwd (row o at o * WP) and W
        # transposed in bwd (column o at o: row i at i * WP). Each direction's product then
        # reads its (K, N) operand K-contiguous and 16-byte aligned, whatever W is. With fwd,
        # the same rows' biases (from src_b_off) into (WP,) padded with zeros, as they are.
        # (layer, member) on the grid's first axis, which takes 2**31 - 1 programs (the second, 65535)
        j = tl.cast(tl.program_id(0), tl.int64)  # l * members + m
        o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        i = tl.arange(0, WP)
        l = j // members
        m = j - l * members
        mask = (o < W)[:, None] & (i < W)[None, :]
        x = tl.load(src_ptr + src_off + l * src_stride + m * W * W + o[:, None] * W + i[None, :], mask=mask,
                    other=0.0)
        if PREC == 2:
            x = _round_bf16(x)
        elif PREC == 1:
            x = _round_tf32(x)
        if FWD:
            tl.store(fwd_ptr + j * WP * WP + o[:, None] * WP + i[None, :], x)
            b = tl.load(src_ptr + src_b_off + l * src_stride + m * W + o, mask=o < W, other=0.0)
            tl.store(bias_ptr + j * WP + o, b)
        if BWD:
            tl.store(bwd_ptr + j * WP * WP + i[None, :] * WP + o[:, None], x)

    @triton.jit
    def _dropout_noise_kernel(out_ptr, ks_ptr, thr_ptr, sc_ptr, n, BLOCK: tl.constexpr):
        d = tl.cast(tl.program_id(1), tl.int64)
        c = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = c < n
        key = tl.load(ks_ptr + d).to(tl.uint32)
        thr = tl.load(thr_ptr + d).to(tl.uint32)
        sc = tl.load(sc_ptr + d)
        # truncating the position to 32 bits is rng.position_hash's `c & MASK32`
        h = _mix32(_mix32(c.to(tl.uint32)) ^ key)
        tl.store(out_ptr + d * n + c, tl.where(h >= thr, sc, 0.0), mask=mask)

"""`psa selftest`: each fast path checked against the plain torch path on this device, and timed.

Every check draws fresh random inputs from one printed seed and compares a fast path with a
plain one it must reproduce: the Triton stack kernels (forward and backward) and dropout noise
against float64 and psa.core.rng; a captured CUDA graph against the eager step, bit for bit; one
meta-loop of a tiny population against a plain one-model PyTorch loop (`reference_loop`);
tf32 and bf16 products against float64 within their rounding. A fast path that is missing or
fails to run is a SKIP with the reason (the engine then takes the safe path), never a crash; a
mismatch is a FAIL. The timings run a few representative architectures and set their achieved
TFLOP/s against the matmul peak measured here.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from psa.core import rng
from psa.core.kernels import triton_stack as kernels
from psa.core.ablation import choose_neuron
from psa.core.arch import N_IN, N_OUT, Arch, parse_arch
from psa.core.data import Dataset
from psa.core.device import (
    Execution,
    best_seconds,
    describe_device,
    resolve_execution,
    synchronize,
)
from psa.core.mlp.engine import Engine
from psa.core.hparams import HParams
from psa.core.model import SimpleMLP
from psa.core.member import MODES, Member
from psa.core.mlp.population import Population
from psa.core.precision import Matmul

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

# The checks' hyperparameters: the paper's learning rate, with decay and dropout large enough
# that each mechanism moves the weights visibly within a few steps (as the engine tests use).
CHECK_HP = HParams(weight_decay=0.05, dropout=0.3, batch_size=32)
# Relative error bounds of the stack kernels against float64 (tests/test_kernels.py): reduced
# precision errors grow about linearly with depth; the interpreter truncates to bf16.
KERNEL_TOL = {"fp32": 1e-5, "tf32": 1.5e-2, "bf16": 5e-2}
# One product's relative error against float64: about the operands' unit roundoff (tf32 2^-11,
# bf16 2^-8) times a small constant for random signs; 4 units leaves room without hiding a
# product that rounds to fewer bits than its precision promises.
MATMUL_TOL = {"fp32": 1e-5, "tf32": 4 * 2.0**-11, "bf16": 4 * 2.0**-8}
# Engine against the one-model reference after one meta-loop: the fused AdamW and batched
# products differ from torch.optim.AdamW by float32's last-bit rounding only, far inside this bound.
ENGINE_TOL = 1e-5
# The timed architectures: one wide, one deep and narrow, one square (all from the study).
TIMED = ("1*2048", "185*4", "32*32")
TIMED_QUICK = ("32*32",)


@dataclass(frozen=True)
class Check:
    """One fast path against its reference: PASS, FAIL or SKIP, with the measured difference."""

    name: str
    status: str  # PASS | FAIL | SKIP
    measure: float | None  # e.g. the max relative error or max abs difference; None when skipped
    limit: float | None  # the largest measure that passes
    detail: str  # what was compared, or why it was skipped


@dataclass(frozen=True)
class Timing:
    """Timed meta-loops of one architecture's population against the device's matmul peak."""

    arch: str
    members: int
    steps: int  # training steps per timed loop (then a validation pass)
    loop_ms: float
    tflops: float
    peak_tflops: float
    fraction: float  # tflops / peak_tflops
    path: str  # what the engine ran: precision, kernels, graphs (or why it failed)


@dataclass(frozen=True)
class Report:
    """Everything one selftest found."""

    device: str
    seed: int
    quick: bool
    checks: tuple[Check, ...]
    timings: tuple[Timing, ...]
    peaks: dict[str, float]

    @property
    def ok(self) -> bool:
        """No check failed."""
        return all(c.status != FAIL for c in self.checks)

    def to_dict(self) -> dict:
        """JSON-able (non-finite numbers as None)."""
        def clean(d: dict) -> dict:
            return {k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()}

        return {"device": self.device, "seed": self.seed, "quick": self.quick, "ok": self.ok,
                "torch": torch.__version__, "triton": _triton_version(), "peaks": self.peaks,
                "checks": [clean(dataclasses.asdict(c)) for c in self.checks],
                "timings": [clean(dataclasses.asdict(t)) for t in self.timings]}


def _triton_version() -> str | None:
    from psa.core.kernels.programs import triton

    return getattr(triton, "__version__", None) if triton is not None else None


def _judge(name: str, measure: float, limit: float, detail: str) -> Check:
    # a NaN measure (non-finite output) must fail, so the comparison is written to be False on NaN
    return Check(name, PASS if measure <= limit else FAIL, measure, limit, detail)


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| in float64 (inf when ours is not finite)."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(ours).all():
        return float("inf")
    return (ours - ref).norm().item() / max(ref.norm().item(), 1e-300)


def synthetic_data(n_train: int, n_val: int, seed: int, device: torch.device) -> Dataset:
    """Random images and labels with MNIST's shapes: what the checks and timings train on."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_val, N_IN, generator=g)
    y = torch.randint(0, N_OUT, (n_train + n_val,), generator=g)
    t = {k: v.to(device) for k, v in (("tx", x[:n_train]), ("ty", y[:n_train]), ("vx", x[n_train:]),
                                         ("vy", y[n_train:]))}
    return Dataset("synthetic", t["tx"], t["ty"], t["vx"], t["vy"], t["vx"], t["vy"], f"random, seed {seed}")


# ------------------------------------------------------------------------------ stack kernels


@dataclass(frozen=True)
class _Stack:
    """Random inputs of the stack kernels: M members' L-layer stack of width W on B rows, packed
    in a flat buffer after a prefix (as layer 0 sits before it in a population's buffer)."""

    M: int
    B: int
    W: int
    L: int
    flat: torch.Tensor
    w_off: int
    stride: int
    z0: torch.Tensor
    da: torch.Tensor
    ks: torch.Tensor
    thr: torch.Tensor
    sc: torch.Tensor

    @property
    def b_off(self) -> int:
        return self.w_off + self.M * self.W * self.W

    def weight(self, l: int) -> torch.Tensor:
        s = self.w_off + (l - 1) * self.stride
        return self.flat[s:s + self.M * self.W * self.W].view(self.M, self.W, self.W)

    def bias(self, l: int) -> torch.Tensor:
        s = self.b_off + (l - 1) * self.stride
        return self.flat[s:s + self.M * self.W].view(self.M, self.W)


def _stack_case(g: torch.Generator, M: int, B: int, W: int, L: int) -> _Stack:
    """He-scaled weights keep deep stacks' activations alive and bounded; half the members drop."""
    stride, prefix = M * W * (W + 1), 11
    flat = torch.randn(prefix + (L - 1) * stride + 7, generator=g)
    for l in range(1, L):
        s = prefix + (l - 1) * stride
        flat[s:s + M * W * W] *= (2.0 / W) ** 0.5
        flat[s + M * W * W:s + stride] *= 0.1
    p = torch.rand(M, generator=g) * 0.5 + 0.1
    on = torch.arange(M) % 2 == 0
    thr = torch.tensor([rng.dropout_threshold(float(q)) if o else 0 for q, o in zip(p, on)], dtype=torch.int64)
    sc = torch.where(on, 1.0 / (1.0 - p), torch.ones(M)).to(torch.float32)
    z0, da = torch.randn(M, B, W, generator=g), torch.randn(M, B, W, generator=g)
    ks = torch.randint(0, 2**32, (M,), generator=g, dtype=torch.int64)
    return _Stack(M, B, W, L, flat, prefix, stride, z0, da, ks, thr, sc)


def _stack_reference(c: _Stack, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (activations, middle-stack gradient in flat's layout, dz0). The backward runs on
    the kernel's own activations, so a reduced-precision forward cannot flip a relu mask."""
    noise = rng.dropout_noise(rng.position_hash(c.B, c.L * c.W, "cpu"), c.ks, c.thr, c.sc).double()
    out: list[torch.Tensor] = []
    z = c.z0.double()
    for l in range(c.L):
        if l:
            z = out[-1] @ c.weight(l).double().transpose(1, 2) + c.bias(l).double().unsqueeze(1)
        keep = noise[:, :, l * c.W:(l + 1) * c.W]
        out.append(torch.where(keep != 0, torch.relu(z) * keep, 0.0))
    sc = c.sc.double().view(-1, 1, 1)
    grad = torch.zeros_like(c.flat, dtype=torch.float64)
    da = c.da.double()
    for l in range(c.L - 1, 0, -1):
        dz = torch.where(acts[l].double() > 0, da * sc, 0.0)
        s = c.w_off + (l - 1) * c.stride
        grad[s:s + c.M * c.W * c.W] = (dz.transpose(1, 2) @ acts[l - 1].double()).flatten()
        grad[s + c.M * c.W * c.W:s + c.stride] = dz.sum(1).flatten()
        da = dz @ c.weight(l).double()
    return torch.stack(out), grad, torch.where(acts[0].double() > 0, da * sc, 0.0)


def _kernels_missing() -> str | None:
    """Why the Triton kernels cannot run here, or None."""
    from psa.core.kernels.programs import triton

    if triton is None:
        return "Triton is not installed: the engine runs the torch path"
    if not kernels.available():
        return "no CUDA GPU and TRITON_INTERPRET is not 1: the engine runs the torch path"
    return None


def check_stack_kernels(seed: int, device: torch.device, quick: bool) -> list[Check]:
    """The Triton stack kernels' activations, dz0 and gradients against float64, per precision."""
    precisions = ("fp32", "tf32", "bf16")
    names = [f"stack kernels {p} {d}" for p in precisions for d in ("forward", "backward")]
    why = _kernels_missing()
    if why is not None:
        return [Check(n, SKIP, None, None, why) for n in names]
    # narrow (broadcast products), tl.dot widths, and above 32 the pipelined wide path at both of
    # its padded widths (64 and 128: their own tiles, rows per program and warps), at odd widths
    # as the paper's deep squares have them (35, 71, 91, 115: rows of activations 4 bytes aligned)
    shapes = ([(3, 33, 8, 3), (2, 40, 35, 2), (2, 21, 115, 2)] if quick
              else [(3, 70, 8, 5), (3, 40, 32, 4), (2, 37, 48, 3), (2, 37, 35, 3), (2, 37, 115, 3)])
    g = torch.Generator().manual_seed(seed)
    cases = [_stack_case(g, *s) for s in shapes]
    out: list[Check] = []
    for prec in precisions:
        fwd = bwd = 0.0
        try:
            for c in cases:
                d = {k: getattr(c, k).to(device) for k in ("flat", "z0", "da", "ks", "thr", "sc")}
                acts = torch.full((c.L, c.M, c.B, c.W), float("nan"), device=device)
                kernels.stack_forward(d["z0"], d["flat"], c.w_off, c.b_off, c.stride, c.L, c.W, acts=acts,
                                      drop=(d["ks"], d["thr"], d["sc"]), precision=prec)
                grad = torch.zeros_like(d["flat"])
                dz0 = kernels.stack_backward(d["da"], acts, d["flat"], grad, c.w_off, c.b_off, c.stride, c.L, c.W,
                                             scale=d["sc"], precision=prec)
                synchronize(device)
                acts = acts.cpu()
                ref_acts, ref_grad, ref_dz0 = _stack_reference(c, acts)
                fwd = max(fwd, _rel(acts, ref_acts))
                bwd = max(bwd, _rel(grad, ref_grad), _rel(dz0, ref_dz0))
        except Exception as e:  # noqa: BLE001 - a failing fast path is reported, not raised
            reason = f"FALLBACK: the kernels raised {type(e).__name__}: {str(e).splitlines()[0][:160]}; " \
                     "the engine falls back to the torch path"
            out += [Check(f"stack kernels {prec} {d}", SKIP, None, None, reason) for d in ("forward", "backward")]
            continue
        what = ", ".join(f"{c.W}x{c.L} M={c.M} B={c.B}" for c in cases)
        out.append(_judge(f"stack kernels {prec} forward", fwd, KERNEL_TOL[prec],
                          f"max rel. error vs float64 over width x layers {what}"))
        out.append(_judge(f"stack kernels {prec} backward", bwd, KERNEL_TOL[prec],
                          "max rel. error of gradients and dz0 vs float64"))
    return out


def check_dropout_kernel(seed: int, device: torch.device) -> Check:
    """The Triton dropout-noise kernel against psa.core.rng, bit for bit."""
    name = "dropout noise kernel"
    why = _kernels_missing()
    if why is not None:
        return Check(name, SKIP, None, None, why)
    g = torch.Generator().manual_seed(seed + 1)
    rows, units, d = 70, 45, 4
    ks = torch.randint(0, 2**32, (d,), generator=g, dtype=torch.int64)
    thr = torch.tensor([rng.dropout_threshold(p) for p in (0.1, 0.3, 0.5, 0.0)], dtype=torch.int64)
    sc = torch.tensor([1 / 0.9, 1 / 0.7, 2.0, 1.0], dtype=torch.float32)
    try:
        got = kernels.dropout_noise(rows, units, ks.to(device), thr.to(device), sc.to(device)).cpu()
    except Exception as e:  # noqa: BLE001
        return Check(name, SKIP, None, None, f"FALLBACK: the kernel raised {type(e).__name__}: "
                                             f"{str(e).splitlines()[0][:160]}; the engine draws with torch")
    want = rng.dropout_noise(rng.position_hash(rows, units, "cpu"), ks, thr, sc)
    diff = float((got != want).sum().item())
    return _judge(name, diff, 0.0, f"elements that differ from psa.core.rng ({d}x{rows}x{units})")


# ------------------------------------------------------------------------------ precision


def check_matmul_precision(seed: int, device: torch.device, quick: bool) -> list[Check]:
    """tf32 and bf16 products (tensor cores on a GPU, emulated elsewhere) against float64."""
    g = torch.Generator().manual_seed(seed + 2)
    k = 256 if quick else 1024
    a, b = torch.randn(4, 64, k, generator=g), torch.randn(4, k, 96, generator=g)
    ref = a.double() @ b.double()
    errs = {}
    for p in ("fp32", "tf32", "bf16"):
        mm = Matmul(p, device)
        with mm.context():  # where the engine computes: cuBLAS's float32 mode set for the precision
            errs[p] = _rel(mm.bmm(a.to(device), b.to(device)), ref)
    out = []
    for p in ("tf32", "bf16"):
        # much closer than the precision's rounding means it computed in fp32: right, only slower
        note = "; not rounded (computed in fp32)" if errs[p] < MATMUL_TOL[p] / 64 else ""
        out.append(_judge(f"matmul {p} vs float64", errs[p], MATMUL_TOL[p],
                          f"rel. error of a (4,64,{k})@({k},96) product; fp32's is {errs['fp32']:.1e}{note}"))
    return out


# ------------------------------------------------------------------------------ engine


def reference_loop(arch: Arch, data: Dataset, member: Member, hp: HParams, loop: int = 1
                   ) -> tuple[dict[str, torch.Tensor], int]:
    """Meta-loop `loop` of one fresh member, as a plain one-model PyTorch harness writes it (on
    the CPU, fp32, torch.optim.AdamW): (trained state_dict, correct validation answers). It uses
    the engine's randomness (psa.core.rng, psa.core.ablation) and nothing else of it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(member.seed)  # the initial weights, as Population.create draws them
        model = SimpleMLP(arch)
    lins = model.linears()
    a = choose_neuron(arch, member.mode, member.seed, loop)
    if a is not None:
        layer, neuron = a
        with torch.no_grad():
            lins[layer].weight[neuron].zero_()
            lins[layer].bias[neuron].zero_()
            if member.mode == "hidden":
                lins[layer + 1].weight[:, neuron].zero_()
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, betas=hp.betas, eps=hp.eps,
                            weight_decay=member.weight_decay)
    x_all, y_all = data.train_x.cpu(), data.train_y.cpu()
    n = x_all.shape[0]
    perm = rng.data_order([member.seed], loop, n, "cpu")[0]
    units = sum(arch.hidden)
    keys = torch.tensor([rng.loop_keys(member.seed, "dropout", loop)], dtype=torch.int64)
    thr = torch.tensor([rng.dropout_threshold(member.dropout)], dtype=torch.int64)
    scale = torch.ones(1) / (1.0 - torch.tensor([member.dropout], dtype=torch.float32))  # as the engine rounds it
    for step, s in enumerate(range(0, n, hp.batch_size)):
        idx = perm[s:s + hp.batch_size]
        h, off = x_all[idx], 0
        noise = None
        if member.dropout > 0 and units:
            ks = rng.step_keys(keys, torch.tensor(step, dtype=torch.int64))
            noise = rng.dropout_noise(rng.position_hash(len(idx), units, "cpu"), ks, thr, scale)[0]
        for lin in lins[:-1]:
            h = torch.relu(lin(h))
            if noise is not None:
                h = h * noise[:, off:off + lin.out_features]
                off += lin.out_features
        loss = F.cross_entropy(lins[-1](h), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        correct = int((model(data.val_x.cpu()).argmax(1) == data.val_y.cpu()).sum())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, correct


def _engine_execution(device: torch.device, graphs: bool = True) -> Execution:
    """fp32 with every fast path this device has: on a CPU with Triton's interpreter the stack
    kernels too (automatic, so that a failing kernel falls back as on a GPU)."""
    ex = resolve_execution(device, "fp32", "auto", graphs)
    if not ex.triton and kernels.available():
        ex = dataclasses.replace(ex, triton=True, stack_max_width=kernels.MAX_WIDTH, kernels_fall_back=True)
    return ex


def _paths(eng: Engine) -> str:
    """What the engine runs now: precision, kernels, graphs."""
    p = eng.paths
    stack = "triton stack" if p.triton_stack else "triton" if p.triton else "cpu step" if p.cpu_step else "torch"
    return "+".join([p.precision, stack,
                     *(["graphs"] if eng.use_graphs else [])])


def check_engine_vs_reference(seed: int, device: torch.device, quick: bool) -> Check:
    """One meta-loop of a six-member population (one per mode) against `reference_loop`."""
    arch = parse_arch("[3*4]")
    data = synthetic_data(128 if quick else 512, 200, seed + 3, device)
    members = [CHECK_HP.member(m, seed) for m in MODES]
    pop = Population.create(arch, members, device, n_val=data.val_y.numel())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        eng = Engine(pop, data, CHECK_HP, _engine_execution(device))
        res = eng.meta_loop()
    diff, images = 0.0, 0
    for j, mem in enumerate(pop.members):
        ref, correct = reference_loop(arch, data, mem, CHECK_HP)
        got = pop.member_state_dict(j)
        diff = max(diff, *((got[k] - ref[k]).abs().max().item() for k in got))
        images = max(images, round(abs(res.candidate_acc[j] * data.val_y.numel() / 100.0 - correct)))
    fell = "; ".join(str(w.message) for w in caught if "failed" in str(w.message))
    detail = f"max abs weight difference, {arch.short} x {pop.size} members ({_paths(eng)})"
    if fell:
        detail += f"; FALLBACK: {fell}"
    if images > 1:  # one image either way is a last-bit tie in a logit
        return Check("engine vs one-model reference", FAIL, diff, ENGINE_TOL,
                     detail + f"; validation counts differ by {images} images")
    return _judge("engine vs one-model reference", diff, ENGINE_TOL, detail)


def check_cuda_graphs(seed: int, device: torch.device, quick: bool) -> Check:
    """Meta-loops replayed from captured CUDA graphs against the same loops run eagerly, bit for bit."""
    name = "CUDA graph vs eager step"
    if device.type != "cuda":
        return Check(name, SKIP, None, None, f"CUDA graphs need a CUDA device, not {device.type}")
    arch = parse_arch("[2*12]")
    # 5 steps of 32 and a tail: more than the capture's warm-up, and both batch sizes captured
    data = synthetic_data(180, 200, seed + 4, device)
    members = [CHECK_HP.member(m, s) for s in (seed, seed + 1) for m in MODES]
    out = {}
    for graphs in (True, False):
        pop = Population.create(arch, members, device, n_val=data.val_y.numel())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            eng = Engine(pop, data, CHECK_HP, _engine_execution(device, graphs))
            recs = [eng.meta_loop() for _ in range(1 if quick else 2)]
        if graphs and not eng.use_graphs:
            fell = "; ".join(str(w.message) for w in caught) or "the engine did not capture"
            return Check(name, SKIP, None, None, f"FALLBACK: {fell}")
        out[graphs] = ([(r.candidate_acc, r.promoted, r.train_loss) for r in recs], pop.lkg.cpu())
    diff = (out[True][1] - out[False][1]).abs().max().item()
    if out[True][0] != out[False][0]:
        diff = max(diff, float("inf") if diff == 0 else diff)  # records differ: never a pass
    return _judge(name, diff, 0.0, f"max abs weight difference after {len(out[True][0])} loop(s) of "
                                   f"{len(members)} members of {arch.short}")


# ------------------------------------------------------------------------------ timings


def matmul_peak(device: torch.device, precision: str, quick: bool) -> float:
    """Dense matmul TFLOP/s in `precision` (fp32 where it is only emulated: off CUDA)."""
    n = (4096 if quick else 8192) if device.type == "cuda" else (512 if quick else 1024)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(device), torch.randn(n, n, generator=g).to(device)
    if device.type != "cuda":
        precision = "fp32"
    if precision == "bf16":
        a, b = a.bfloat16(), b.bfloat16()
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
        return 2 * n**3 / best_seconds(lambda: torch.mm(a, b), device, 3) / 1e12
    finally:
        torch.set_float32_matmul_precision(old)


def time_architecture(text: str, device: torch.device, seed: int, quick: bool, peak: float) -> Timing:
    """The mean of two meta-loops (one if quick; after a first that compiles and captures) of the study's
    population (6 modes x 10 seeds on a GPU, one seed elsewhere) in the device's auto execution."""
    arch = parse_arch(text)
    cuda = device.type == "cuda"
    hp = HParams()  # the paper's batch size and rates
    steps = (20 if quick else 60) if cuda else 2
    n_val = 10_000 if cuda else 512
    data = synthetic_data(steps * hp.batch_size, n_val, seed + 5, device)
    members = [hp.member(m, s) for s in range(10 if cuda else 1) for m in MODES]
    pop = Population.create(arch, members, device, n_val=n_val)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            eng = Engine(pop, data, hp, resolve_execution(device))
            eng.meta_loop()  # compiles the kernels and captures the graphs
            synchronize(device)
            n_loops = 1 if quick else 2
            t0 = time.perf_counter()
            for _ in range(n_loops):
                eng.meta_loop()
            synchronize(device)
            loop = (time.perf_counter() - t0) / n_loops
    except Exception as e:  # noqa: BLE001 - a timing that cannot run is reported, not raised
        nan = float("nan")
        return Timing(text, pop.size, steps, nan, nan, peak, nan, f"failed: {type(e).__name__}: {str(e)[:120]}")
    f = arch.flops_per_sample()
    tflops = pop.size * f * (3 * data.train_y.numel() + n_val) / loop / 1e12
    path = _paths(eng) + ("; fell back" if any("failed" in str(w.message) for w in caught) else "")
    return Timing(text, pop.size, steps, loop * 1e3, tflops, peak, tflops / peak, path)


# ------------------------------------------------------------------------------ all of it


def run(device: torch.device, seed: int = 0, quick: bool = False,
        on_row: Callable[[Check | Timing], None] | None = None) -> Report:
    """Every check, then the timings, on `device`; `on_row` sees each row as it is made."""
    def emit(row):
        if on_row is not None:
            on_row(row)
        return row

    def guarded(name: str, fn: Callable[[], Check | list[Check]]) -> list[Check]:
        try:
            rows = fn()
        except Exception as e:  # noqa: BLE001 - a crash in a check is that check's failure
            rows = Check(name, FAIL, None, None, f"raised {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return [emit(r) for r in (rows if isinstance(rows, list) else [rows])]

    checks = [
        *guarded("stack kernels", lambda: check_stack_kernels(seed, device, quick)),
        *guarded("dropout noise kernel", lambda: check_dropout_kernel(seed, device)),
        *guarded("matmul precision", lambda: check_matmul_precision(seed, device, quick)),
        *guarded("CUDA graph vs eager step", lambda: check_cuda_graphs(seed, device, quick)),
        *guarded("engine vs one-model reference", lambda: check_engine_vs_reference(seed, device, quick)),
    ]
    precision = resolve_execution(device).precision
    peak = matmul_peak(device, precision, quick)
    peaks = {f"matmul_{precision if device.type == 'cuda' else 'fp32'}_tflops": peak}
    timings = [emit(time_architecture(a, device, seed, quick, peak)) for a in (TIMED_QUICK if quick else TIMED)]
    return Report(describe_device(device), seed, quick, tuple(checks), tuple(timings), peaks)

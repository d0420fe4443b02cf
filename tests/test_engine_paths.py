"""The engine's ways of running one loop give the records of the plain way: chunked populations,
launches interleaved across engines, an out-of-memory retry, the Triton stack kernels (compiled
on a GPU, in Triton's interpreter elsewhere), reduced precision, automatic fallbacks, and on a
GPU only: CUDA graphs, and the GPU engine against the CPU engine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from psa.core.arch import parse_arch
from psa.core.device import Execution, resolve_execution
from psa.core.mlp.engine import Engine
from psa.core.member import MODES
from psa.core.mlp.population import Population
from psa.core.mlp.step import TrainStep

from . import oracle
from .conftest import ENGINE_HP as HP
from .conftest import engine, layers, population, set_paths
from .tolerance import Bound, assert_apart, assert_close, epoch_steps, training_bound

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on(ds, device):
    """The data set on `device`."""
    return dataclasses.replace(ds, **{f: getattr(ds, f).to(device) for f in
                                      ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")})


def records(results):
    return [(r.candidate_acc, r.promoted, r.ablated, r.lkg_score, r.diverged) for r in results]


def run(arch, ds, specs, loops, hp=HP, **how):
    pop = population(arch, ds, specs, hp)
    eng = engine(pop, ds, hp, **how)
    return pop, eng, [eng.meta_loop() for _ in range(loops)]


def trained(loops: int, n: int, arch, hp=HP) -> Bound:
    """The rounding a population may carry after `loops` epochs of `n` images (tests/tolerance.py)."""
    return training_bound(loops * epoch_steps(n, hp.batch_size), arch.widths, hp.batch_size)


SPECS = [(m, s) for s in (1, 2, 3) for m in MODES]
ARCH = parse_arch("[2*12]")


@pytest.fixture(scope="module")
def reference(small):
    return run(ARCH, small, SPECS, 3)


@pytest.mark.parametrize("text,n_runs", [("[3*5]", 3), ("[2*12, 1*7, 3*4]", 6), ("[]", 1), ("[1*9]", 2)])
def test_runs_views_cover_the_buffer_once(text, n_runs):
    arch = parse_arch(text)
    pop = Population.create(arch, [HP.member("none", 0), HP.member("none", 1)], "cpu", n_val=1)
    flat = torch.zeros(pop.layout.numel)
    runs = pop.layout.runs(flat)
    assert len(runs) == n_runs
    for w, b in runs:
        w.add_(1)
        b.add_(1)
    assert (flat == 1).all()  # every element in exactly one run
    flat = torch.arange(pop.layout.numel, dtype=torch.float32)
    layers = iter(pop.layout.views(flat))
    for w_run, b_run in pop.layout.runs(flat):
        for w, b in zip(w_run, b_run):  # a run's layers, in order, are the layers' own views
            wv, bv = next(layers)
            assert torch.equal(w, wv.reshape(2, -1)) and torch.equal(b, bv)
    assert next(layers, None) is None


@pytest.mark.parametrize("max_members", [6, 7, 12])
def test_chunked_population_gives_the_same_records(small, reference, max_members):
    """Chunks of whole seed groups (6, 12) or single members (7: groups cannot split evenly)."""
    ref_pop, _, ref = reference
    pop, eng, res = run(ARCH, small, SPECS, 3, max_members=max_members)
    assert eng.members_at_once == max_members if max_members != 7 else eng.members_at_once == 6
    # the same arithmetic per member, but AdamW's vector loop meets each member's elements elsewhere
    assert_close(f"chunks of {max_members}", layers(pop), layers(ref_pop), trained(3, 2048, ARCH))
    for a, b in zip(res, ref):
        assert a.promoted == b.promoted and a.ablated == b.ablated and a.diverged == b.diverged
        assert all(abs(x - y) <= 100.0 / small.val_y.numel() for x, y in zip(a.candidate_acc, b.candidate_acc))
    assert pop.bounty_loop == ref_pop.bounty_loop


def test_out_of_memory_retries_in_smaller_chunks(small, reference, monkeypatch):
    ref_pop, _, ref = reference
    pop = population(ARCH, small, SPECS)
    eng = engine(pop, small)
    real = TrainStep.__call__
    calls = {"n": 0}

    def flaky(self, ch, b):
        calls["n"] += 1
        if ch.size > 6:  # the whole population "does not fit"
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, ch, b)

    monkeypatch.setattr(TrainStep, "__call__", flaky)
    res = [eng.meta_loop() for _ in range(3)]
    assert eng.members_at_once == 6
    assert_close("retried in chunks of 6", layers(pop), layers(ref_pop), trained(3, 2048, ARCH))
    assert [r.promoted for r in res] == [r.promoted for r in ref]


def test_interleaved_launches_match_one_engine_at_a_time(small):
    specs_a = [(m, s) for s in (4, 5) for m in MODES]
    specs_b = [("dropout", 6), ("hidden", 6)]
    arch_b = parse_arch("[1*20]")
    pa, pb = population(ARCH, small, specs_a), population(arch_b, small, specs_b)
    ea, eb = engine(pa, small), engine(pb, small)
    got_a, got_b = [], []
    for _ in range(2):
        la, lb = ea.launch(), eb.launch()  # both queued before either is read
        got_b.append(lb.result())
        got_a.append(la.result())
    _, _, ref_a = run(ARCH, small, specs_a, 2)
    _, _, ref_b = run(arch_b, small, specs_b, 2)
    assert records(got_a) == records(ref_a)
    assert records(got_b) == records(ref_b)


def test_a_second_launch_needs_the_first_result(small):
    pop = population(ARCH, small, [("none", 1)])
    eng = engine(pop, small)
    pending = eng.launch()
    with pytest.raises(RuntimeError, match="result"):
        eng.launch()
    assert pending.result().loop == 1
    assert eng.launch().result().loop == 2


# How far reduced-precision products may move a population from fp32's in 2 loops of 64 steps
# (ARCH, seed 8). Measured: tf32 moves the LKG weights by 0.29% (relative norm) and a candidate's
# accuracy by at most 0.3 points, bf16 by 0.40% and 0.45; a learning rate only 1.1x the
# design's moves them by 1.5% and 3.5 points, 2x by 14% and 27 points.
PRECISION_WEIGHT_TOL = 0.01
PRECISION_ACC_TOL = 1.0


def trains_like(ref, got) -> tuple[bool, str]:
    """Whether run `got` = (population, results) trained like `ref` up to rounding: LKG
    weights within PRECISION_WEIGHT_TOL (relative norm) and every candidate's accuracy within
    PRECISION_ACC_TOL points; and why not."""
    (p_ref, r_ref), (p, r) = ref, got
    rel = ((p.lkg - p_ref.lkg).norm() / p_ref.lkg.norm()).item()
    acc = max(abs(x - y) for a, b in zip(r_ref, r) for x, y in zip(a.candidate_acc, b.candidate_acc))
    return rel < PRECISION_WEIGHT_TOL and acc < PRECISION_ACC_TOL, f"weights {rel:.3g} apart, accuracy {acc:.3g}"


@pytest.fixture(scope="module")
def fp32_run(small):
    pop, _, res = run(ARCH, small, [(m, 8) for m in MODES], 2, precision="fp32")
    return pop, res


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_trains_like_fp32(small, fp32_run, precision):
    """Same members, same data: reduced-precision products (on the CPU: operands rounded as
    the tensor cores round them, psa.core.precision) move the weights by about their rounding
    error, and the candidates score within a point of fp32's."""
    plo, elo, rlo = run(ARCH, small, [(m, 8) for m in MODES], 2, precision=precision)
    assert elo.paths.precision == precision
    # it did round: further from fp32 than fp32's own rounding could take it
    assert_apart(f"{precision} against fp32", layers(plo), layers(fp32_run[0]), trained(2, 2048, ARCH))
    ok, why = trains_like(fp32_run, (plo, rlo))
    assert ok, why


@pytest.mark.parametrize("factor", [2.0, 1.25])
def test_precision_check_rejects_another_learning_rate(small, fp32_run, factor):
    """The tolerance tells a real change from rounding: fp32 at a slightly different learning
    rate fails the check that tf32 and bf16 pass."""
    hp = dataclasses.replace(HP, lr=HP.lr * factor)
    p, _, r = run(ARCH, small, [(m, 8) for m in MODES], 2, hp=hp, precision="fp32")
    ok, why = trains_like(fp32_run, (p, r))
    assert not ok, why


def test_precision_is_validated():
    from psa.core.errors import ConfigError

    with pytest.raises(ConfigError, match="precision"):
        resolve_execution("cpu", precision="fp16")
    with pytest.raises(ConfigError, match="kernels"):
        resolve_execution("cpu", kernels="cuda")
    with pytest.raises(ConfigError, match="resolved"):
        Execution(torch.device("cpu"), precision="auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_gives_the_eager_records(small):
    dev = "cuda"
    ds = on(small, dev)
    out = {}
    for graphs in (True, False):
        pop = population(ARCH, ds, SPECS, device=dev)
        eng = engine(pop, ds, graphs=graphs, precision="fp32")
        assert eng.use_graphs is graphs
        out[graphs] = (records([eng.meta_loop() for _ in range(3)]), pop.lkg.cpu())
    assert out[True][0] == out[False][0]
    assert torch.equal(out[True][1], out[False][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_of_a_short_epoch_gives_the_eager_records(small):
    """700 images in batches of 256: two batches and a tail, fewer than the warm-up's four steps
    (before the fix, a device-side assert that ended the CUDA context)."""
    ds = on(dataclasses.replace(small, train_x=small.train_x[:700], train_y=small.train_y[:700]), "cuda")
    out = {}
    for graphs in (True, False):
        hp = dataclasses.replace(HP, batch_size=256)
        pop = population(ARCH, ds, SPECS, hp, device="cuda")
        eng = engine(pop, ds, hp, graphs=graphs, precision="fp32")
        assert eng.use_graphs is graphs
        out[graphs] = (records([eng.meta_loop() for _ in range(2)]), pop.lkg.cpu())
    assert out[True][0] == out[False][0]
    assert torch.equal(out[True][1], out[False][1])


def test_fused_stack_matches_the_torch_path_and_the_oracle(small):
    """The Triton stack kernels (compiled on a GPU, interpreted on a CPU) against the torch path
    on the same device and against the oracle."""
    pytest.importorskip("triton")
    arch = parse_arch("[3*4]")
    specs = [(m, s) for s in (1, 2) for m in MODES]
    data = dataclasses.replace(small, train_x=small.train_x[:256], train_y=small.train_y[:256])
    dev_data = on(data, DEVICE)
    torch_pop = population(arch, dev_data, specs, device=DEVICE)
    torch_eng = engine(torch_pop, dev_data, precision="fp32", graphs=False, kernels="torch")
    torch_res = [torch_eng.meta_loop() for _ in range(2)]
    pop = population(arch, dev_data, specs, device=DEVICE)
    eng = engine(pop, dev_data, precision="fp32", graphs=False, kernels="triton")
    res = [eng.meta_loop() for _ in range(2)]
    assert eng.paths.triton_stack and eng.paths.triton
    tol = trained(2, 256, arch)
    assert_close("Triton stack against the torch path", layers(pop), layers(torch_pop), tol)
    for a, b in zip(res, torch_res):
        assert a.promoted == b.promoted and a.diverged == b.diverged
        assert all(abs(x - y) <= 100.0 / data.val_y.numel() for x, y in zip(a.candidate_acc, b.candidate_acc))
    for j, mem in enumerate(pop.members):
        ref = oracle.run(arch, data, mem.seed, mem.mode, 2, HP)
        assert_close(f"{mem.mode} {mem.seed} LKG", pop.member_state_dict(j), ref.lkg, tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("text", ["[3*4]", "[2*40]"])
def test_the_gpu_engine_trains_like_the_cpu_engine(small, text):
    """Counter-based streams: a seed draws the same batches and masks on both devices, so the
    GPU engine with all its fast paths (graphs, Triton stack for 3*4, fp32) follows the CPU's
    trajectory to float rounding."""
    arch = parse_arch(text)
    specs = [(m, s) for s in (1, 2) for m in MODES]
    cpu_pop, _, cpu_res = run(arch, small, specs, 2, precision="fp32")
    gpu_data = on(small, "cuda")
    gpu_pop = population(arch, gpu_data, specs, device="cuda")
    eng = engine(gpu_pop, gpu_data, precision="fp32")
    assert eng.use_graphs and eng.paths.triton_stack  # kernels=auto: the stack kernels up to width 128
    gpu_res = [eng.meta_loop() for _ in range(2)]
    assert_close("GPU against CPU", layers(gpu_pop, gpu_pop.lkg.cpu()), layers(cpu_pop), trained(2, 2048, arch))
    for a, b in zip(gpu_res, cpu_res):
        assert all(abs(x - y) <= 100.0 / small.val_y.numel() for x, y in zip(a.candidate_acc, b.candidate_acc))


def test_an_automatic_fast_path_that_fails_falls_back_with_a_warning(small, monkeypatch):
    """kernels=auto picked Triton (forced here: a CPU never picks it), and the kernel fails: the
    engine warns once, drops the kernels and trains the same loop on the torch path."""
    from psa.core.kernels import triton_stack as kernels

    arch = parse_arch("[3*4]")
    specs = [(m, 1) for m in MODES]
    ref_pop, _, ref = run(arch, small, specs, 2, kernels="torch")
    pop = population(arch, small, specs)
    eng = engine(pop, small)
    # an engine that picked Triton never also picks the fused CPU step
    set_paths(eng, triton=True, triton_stack=True, cpu_step=False)

    def broken(*a, **k):
        raise RuntimeError("PTX compilation failed (simulated)")

    monkeypatch.setattr(kernels, "stack_forward", broken)
    with pytest.warns(RuntimeWarning, match="Triton kernels failed .*simulated"):
        res = [eng.meta_loop() for _ in range(2)]
    assert not eng.paths.triton and not eng.paths.triton_stack
    assert records(res) == records(ref)
    assert torch.equal(pop.lkg, ref_pop.lkg)
    # an explicit choice is not second-guessed
    eng2 = engine(population(arch, small, specs), small, kernels="triton")
    with pytest.raises(RuntimeError, match="simulated"):
        eng2.meta_loop()


def test_an_engine_is_freed_as_soon_as_it_is_dropped(small):
    """No reference cycle between an engine and its chunks: their buffers (gigabytes for a big
    population) go when the last reference does, not at the next garbage collection."""
    import gc
    import weakref

    pop = population(ARCH, small, [("none", 1), ("dropout", 1)])
    eng = engine(pop, small)
    eng.meta_loop()
    refs = [weakref.ref(eng), weakref.ref(eng._whole), weakref.ref(eng._whole.cand)]
    gc.disable()
    try:
        del eng
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def test_graph_warm_up_stays_inside_a_short_epoch(small, monkeypatch):
    """The warm-up before a graph capture (run here on the CPU, where an index past the data
    order raises instead of killing a CUDA context): 700 images in batches of 256 are two full
    batches and a tail of 188, fewer than its four steps walk through unless every step starts
    the epoch again. The warm-up leaves nothing behind: the loops after it are those of an
    engine that never warmed up."""
    from psa.core.optim import new_adamw

    data = dataclasses.replace(small, train_x=small.train_x[:700], train_y=small.train_y[:700])
    hp = dataclasses.replace(HP, batch_size=256)
    specs = [(m, s) for s in (1, 2) for m in MODES]
    ref_pop, _, ref = run(ARCH, data, specs, 2, hp)
    pop = population(ARCH, data, specs, hp)
    eng = engine(pop, data, hp)
    ch = eng._chunk(0, pop.size)
    assert ch.batch_sizes() == [256, 256, 188]
    ch.cand.copy_(pop.lkg)
    ch.adamw = new_adamw([ch.cand], hp)
    ends = []
    real = TrainStep.__call__

    def spy(self, chunk, b):
        ends.append(int(chunk.step) * hp.batch_size + b)  # one past the last position read
        return real(self, chunk, b)

    monkeypatch.setattr(TrainStep, "__call__", spy)
    ch._warm_up(eng.step, [256, 188])
    assert ends == [256, 256, 188, 188]
    res = [eng.meta_loop() for _ in range(2)]
    assert max(ends) <= 700 and len(ends) == 4 + 2 * 3
    assert records(res) == records(ref)
    assert torch.equal(pop.lkg, ref_pop.lkg)


@pytest.mark.parametrize("error", [
    (torch.OutOfMemoryError, "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"),
    (RuntimeError, "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)` (simulated)"),
    (RuntimeError, "Triton Error [CUDA]: out of memory (simulated)"),
])
def test_out_of_memory_frees_the_failed_chunk_before_retrying(small, monkeypatch, error):
    """When the cache is emptied for the smaller chunk, nothing of the failed one is alive: not
    the chunk, its candidate, gradient, optimizer or workspace, nor the exception (we are out of
    its handler). cuBLAS's ALLOC_FAILED and Triton's out of memory shrink the chunk like
    torch's OutOfMemoryError, and do not turn the fast path (here the Triton kernels) off."""
    import gc
    import sys
    import warnings
    import weakref

    from psa.core.mlp import engine as engine_mod

    pytest.importorskip("triton")
    data = on(dataclasses.replace(small, train_x=small.train_x[:64], train_y=small.train_y[:64],
                                  val_x=small.val_x[:100], val_y=small.val_y[:100]), DEVICE)
    pop = population(ARCH, data, SPECS, device=DEVICE)
    eng = engine(pop, data)
    set_paths(eng, triton=True, triton_stack=True)  # as kernels=auto picks them on a GPU (there with graphs too)
    real = TrainStep.__call__
    seen: dict = {}

    def flaky(self, ch, b):
        real(self, ch, b)
        if ch.size > 6:  # after a real step: its workspace exists
            seen["refs"] = [weakref.ref(t) for t in (ch, ch.cand, ch.grad, ch.adamw, *ch.work.values())]
            raise error[0](error[1])  # a fresh exception, as the device raises

    def release(device):
        seen["alive"] = [r() is not None for r in seen["refs"]]
        seen["handling"] = sys.exc_info()[0]

    monkeypatch.setattr(TrainStep, "__call__", flaky)
    monkeypatch.setattr(engine_mod, "release_cached", release)
    gc.disable()  # what is alive must be freed by reference counting, as on the GPU
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="psa:")  # a fall-back would warn
            eng.meta_loop()
    finally:
        gc.enable()
    assert len(seen["refs"]) > 4
    assert seen["alive"] == [False] * len(seen["refs"])
    assert seen["handling"] is None
    assert eng.members_at_once == 6 and eng.paths.triton and eng.paths.triton_stack


def test_is_out_of_memory_tells_memory_from_other_failures():
    from psa.core.device import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_out_of_memory(RuntimeError("CUDA driver error: out of memory"))
    assert not is_out_of_memory(RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448"))
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not from the device


def test_new_streams_are_distinct_in_torchs_round_robin_pool(monkeypatch):
    """torch.cuda.Stream() is the next of 32 pooled streams, round robin (a fake pool here): made
    per engine, a stream is shared with every 32nd. new_streams gives distinct ones, none the
    side stream, wherever the pool's counter stands; the side stream is made once."""
    from psa.core import device as device_mod

    turn = {"n": 0}

    class Pooled:
        def __init__(self, device=None, priority=0):
            self.cuda_stream = 0x7000 + turn["n"] % device_mod.STREAM_POOL
            turn["n"] += 1

    monkeypatch.setattr(torch.cuda, "Stream", Pooled)
    monkeypatch.setattr(device_mod, "_SIDE_STREAMS", {})
    dev = torch.device("cuda", 0)
    side = device_mod.side_stream(dev)
    assert device_mod.side_stream(dev) is side
    for already in (0, 5, 27, 31):
        turn["n"] += already  # streams other code took meanwhile
        handles = [s.cuda_stream for s in device_mod.new_streams(dev, 8, avoid=(side,))]
        assert len(set(handles)) == 8 and side.cuda_stream not in handles
    assert len(device_mod.new_streams(dev, 40, avoid=(side,))) == device_mod.STREAM_POOL - 1


def test_a_cuda_stream_needs_a_cuda_population(small):
    from psa.core.errors import ConfigError

    with pytest.raises(ConfigError, match="stream"):
        engine(population(ARCH, small, [("none", 1)]), small, stream=object())


def test_on_device_enters_the_engines_cuda_device():
    """Triton launches and graph captures go to the current CUDA device: an engine on cuda:1
    enters it (the context object is checked here; entering it needs the device)."""
    from psa.core.device import on_device

    ctx = on_device(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    with on_device(torch.device("cpu")):
        pass


def meta_twin(pop, ds, hp, **how):
    """An engine on the meta device (shapes only: nothing is computed or allocated) for `pop`
    and `ds`: a non-CPU device that a machine without a GPU has."""
    meta = torch.device("meta")
    data = dataclasses.replace(ds, **{f: torch.empty(getattr(ds, f).shape, dtype=getattr(ds, f).dtype, device=meta)
                                      for f in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")})
    twin = dataclasses.replace(pop, device=meta, lkg=torch.empty(pop.lkg.shape, device=meta),
                               lkg_correct=torch.empty(pop.lkg_correct.shape, dtype=torch.int64, device=meta))
    return Engine(twin, data, hp, Execution(meta, **how)), data


def test_a_chunk_sends_host_tensors_only_through_to_device(small, monkeypatch):
    """On a GPU a copy from pageable host memory waits for the stream: for a chunked population,
    for the previous chunk's epoch. Building a chunk and beginning its loop must send whatever
    they build on the host through population.to_device (pinned and queued on a GPU). Watched on
    the meta device: any other host-to-device transfer is caught."""
    from torch.overrides import TorchFunctionMode

    from psa.core.mlp import chunk as chunk_mod
    from psa.core.mlp import population as population_mod
    from psa.core import rng as rng_mod

    depth = {"n": 0}
    real = chunk_mod.to_device

    def counted(host, device):
        depth["n"] += 1
        try:
            return real(host, device)
        finally:
            depth["n"] -= 1

    for mod in (chunk_mod, rng_mod, population_mod):
        monkeypatch.setattr(mod, "to_device", counted)
    stray = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if depth["n"] == 0 and isinstance(out, torch.Tensor) and out.device.type == "meta":
                inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                from_host = any(a.device.type == "cpu" for a in inputs)
                from_data = not inputs and "device" in kwargs and getattr(func, "__name__", "") in ("tensor", "as_tensor")
                if from_host or from_data:
                    stray.append(getattr(func, "__name__", str(func)))
            return out

    hp = dataclasses.replace(HP, weight_decay=0.05)
    specs = [(m, s) for s in (1, 2) for m in MODES]  # decay and dropout members: every constant exists
    pop = population(ARCH, small, specs, hp)
    eng, _ = meta_twin(pop, small, hp, max_members=6)
    assert eng.members_at_once == 6
    with Watch():
        ch = eng._chunk(6, 12)
        ch.begin(eng.population, 2, [(0, "full", 0, 3), (1, "hidden", 1, 2)], eng.step, eng.use_graphs)
    assert ch.decay is not None and ch.dropout and not ch.drop_rows_all
    assert stray == []


@pytest.mark.parametrize("text,precision", [("[3*20]", "fp32"), ("[4*8]", "fp32"), ("[2*3]", "fp32"),
                                            ("[3*40]", "fp32"), ("[3*40]", "tf32")])
def test_memory_estimate_counts_the_stack_kernels_gradient_scratch(small, monkeypatch, text, precision):
    """What the Triton backward allocates for the weight gradients (measured: what it hands to
    the reduction or the product) is in working_bytes for a fused engine: 16 row blocks of
    partials at width 20, four times the 16 bytes a parameter that the estimate otherwise counts
    for the middle layers; at width 40 every middle layer's dLoss/dz and the product's result,
    and the step's two staged copies of the middle weights (padded to 64 x 64). With graphs, an
    evaluation's staged copy comes on top."""
    pytest.importorskip("triton")
    from psa.core.kernels import triton_stack as kernels
    from psa.core.mlp.memory import stack_scratch_bytes, working_bytes

    arch = parse_arch(text)
    hp = dataclasses.replace(HP, batch_size=256)
    data = on(dataclasses.replace(small, train_x=small.train_x[:256], train_y=small.train_y[:256],
                                  val_x=small.val_x[:64], val_y=small.val_y[:64]), DEVICE)
    pop = population(arch, data, [(m, 1) for m in MODES], hp, device=DEVICE)
    eng = engine(pop, data, hp, kernels="triton", precision=precision)
    assert eng.paths.triton_stack
    seen, staged = [], []
    real_write, real_product, real_stage = kernels._write_grad, kernels._wide_weight_grads, kernels.stage_weights

    def spy_stage(*a, **k):
        out = real_stage(*a, **k)
        if out is not None:  # train_epoch evaluates nothing: the step's
            staged.append(sum(t.numel() * t.element_size() for t in (out.forward, out.backward, out.bias)
                              if t is not None))
        return out

    def spy_write(grad, part, *a):
        if part.dim() == 3:  # per-row-block partials, not a direct write
            seen.append(part.numel() * part.element_size())
        return real_write(grad, part, *a)

    def spy_product(grad, dz, acts, *a):
        n_mid, m, _, w = dz.shape
        # dz as allocated, and the product's float32 results: one per middle-layer parameter
        # alive with them: the step's staged weights
        seen.append(dz.numel() * dz.element_size() + n_mid * m * w * (w + 1) * 4 + sum(staged[-1:]))
        return real_product(grad, dz, acts, *a)

    monkeypatch.setattr(kernels, "_write_grad", spy_write)
    monkeypatch.setattr(kernels, "_wide_weight_grads", spy_product)
    monkeypatch.setattr(kernels, "stage_weights", spy_stage)
    eng.train_epoch(1)
    measured = max(seen, default=0) / pop.size
    extra = (working_bytes(arch, 256, triton_stack=True, precision=precision)
             - working_bytes(arch, 256, precision=precision))
    assert extra == stack_scratch_bytes(arch, 256, precision) >= measured
    assert extra == measured  # exactly what the kernel allocates: the estimate is not padded
    if text == "[3*20]":
        middle = 2 * 20 * 21
        assert extra == 16 * middle * 4 == 4 * (16 * middle)
    if text == "[3*40]":
        assert extra == 2 * (256 * 40 + 40 * 41 + 2 * 64 * 64 + 64) * 4
        assert staged
        pool = (working_bytes(arch, 256, triton_stack=True, precision=precision, graphs=True)
                - working_bytes(arch, 256, triton_stack=True, precision=precision))
        # a graph's pool: the labels and the loss's buffers, and then the evaluation's forward copy
        assert pool == 256 * (8 + 2 * 4 * arch.n_out) + 2 * (64 * 64 + 64) * 4


def test_free_memory_leaves_out_blocks_cached_in_graph_pools(monkeypatch):
    """Another engine's captured graphs keep their private pool: its cached blocks are no use
    to a new engine and must not count as free (fakes of torch.cuda's memory queries)."""
    from psa.core.device import free_memory

    mib = 1 << 20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000 * mib, 8000 * mib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 700 * mib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 400 * mib)
    segments = [
        {"device": 0, "segment_pool_id": (0, 0), "total_size": 500 * mib, "allocated_size": 300 * mib},
        {"device": 0, "segment_pool_id": (1, 7), "total_size": 200 * mib, "allocated_size": 100 * mib},
        {"device": 1, "segment_pool_id": (1, 9), "total_size": 900 * mib, "allocated_size": 0},
    ]
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda *a, **k: segments)
    # 1000 free + 300 cached, of which 100 sit in a graph pool of this device
    assert free_memory(torch.device("cuda", 0)) == 1200 * mib


@pytest.mark.parametrize("text,kernels_choice", [("[3*4]", "triton"), ("[2*20]", "triton"), ("[1*9, 1*5]", "triton"),
                                                 ("[3*40]", "triton")])
def test_kernel_launches_foresee_what_a_loop_launches(small, monkeypatch, text, kernels_choice):
    """What kernels.precompile() gets (the meta-device dry run) is exactly the set of launches a
    real meta-loop and test make, argument for argument, so the compiled variants are the ones
    the run needs: the stack kernels (3*4, 2*20, training with a tail batch, validation and
    test in blocks), the dropout kernel of an unfused stack (1*9, 1*5) and the wide stack's
    weight staging (3*40)."""
    pytest.importorskip("triton")
    from psa.core.kernels import triton_stack as kernels
    from psa.core.mlp.engine import kernel_launches

    arch = parse_arch(text)
    data = on(dataclasses.replace(small, train_x=small.train_x[:80], train_y=small.train_y[:80],
                                  val_x=small.val_x[:90], val_y=small.val_y[:90],
                                  test_x=small.test_x[:70], test_y=small.test_y[:70]), DEVICE)
    specs = [(m, s) for s in (1, 2) for m in MODES]
    pop = population(arch, data, specs, device=DEVICE)
    ex = dataclasses.replace(resolve_execution(pop.device, precision="tf32", kernels=kernels_choice),
                             eval_bytes=8 * 9 * 40 * 5)
    eng = Engine(pop, data, HP, ex)
    real = kernels._launch
    made = []

    def spy(kernel, grid, *args, **kw):
        with kernels.recording() as rec:
            real(kernel, grid, *args, **kw)
        made.extend(rec)
        return real(kernel, grid, *args, **kw)

    monkeypatch.setattr(kernels, "_launch", spy)
    eng.meta_loop()
    eng.test_accuracy()
    monkeypatch.setattr(kernels, "_launch", real)
    foreseen = kernel_launches(arch, pop.members, data, HP, ex)
    assert len(set(made)) >= (2 if eng.paths.triton_stack else 1)
    assert set(foreseen) == set(made)
    assert any(lc.kernel.__name__ == "_stage_kernel" for lc in made) == (text == "[3*40]")
    assert kernels.precompile(foreseen) == len(set(made))  # interpreted: nothing to compile, but every launch taken


def test_kernel_launches_are_none_without_triton(small):
    from psa.core.mlp.engine import kernel_launches

    plain = resolve_execution("cpu", kernels="torch")
    assert kernel_launches(parse_arch("[3*4]"), [HP.member("none", 1)], small, HP, plain) == []
    auto = resolve_execution("cpu", kernels="auto")  # the CPU never picks Triton by itself
    assert kernel_launches(parse_arch("[3*4]"), [HP.member("none", 1)], small, HP, auto) == []

"""The engine's ways of running one loop give the records of the plain way: chunked populations,
launches interleaved across engines, an out-of-memory retry, the Triton stack kernels (compiled
on a GPU, in Triton's interpreter elsewhere), reduced precision, automatic fallbacks, and on a
GPU only: CUDA graphs, and the GPU engine against the CPU engine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from psa.core.arch import parse_arch
from psa.core.engine import Engine, TrainConfig
from psa.core.population import MODES, Population, make_member

from . import oracle
from .conftest import ENGINE_CFG as CFG
from .conftest import population

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on(ds, device):
    """The data set on `device`."""
    return dataclasses.replace(ds, **{f: getattr(ds, f).to(device) for f in
                                      ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")})


def records(results):
    return [(r.candidate_acc, r.promoted, r.ablated, r.lkg_score, r.diverged) for r in results]


def run(arch, ds, specs, loops, cfg=CFG):
    pop = population(arch, ds, specs, cfg)
    eng = Engine(pop, ds, cfg)
    return pop, eng, [eng.meta_loop() for _ in range(loops)]


def close_states(p1, p2, tol):
    diff = (p1.lkg - p2.lkg).abs().max().item()
    return diff < tol, diff


SPECS = [(m, s) for s in (1, 2, 3) for m in MODES]
ARCH = parse_arch("[2*12]")


@pytest.fixture(scope="module")
def reference(small):
    return run(ARCH, small, SPECS, 3)


@pytest.mark.parametrize("text,n_runs", [("[3*5]", 3), ("[2*12, 1*7, 3*4]", 6), ("[]", 1), ("[1*9]", 2)])
def test_runs_views_cover_the_buffer_once(text, n_runs):
    arch = parse_arch(text)
    pop = Population.create(arch, [make_member("none", 0), make_member("none", 1)], "cpu", n_val=1)
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
    cfg = dataclasses.replace(CFG, max_members=max_members)
    pop, eng, res = run(ARCH, small, SPECS, 3, cfg)
    assert eng.chunk_size == max_members if max_members != 7 else eng.chunk_size == 6
    assert len(eng._chunks()) == -(-pop.size // eng.chunk_size)
    ok, diff = close_states(pop, ref_pop, 1e-6)
    assert ok, diff
    for a, b in zip(res, ref):
        assert a.promoted == b.promoted and a.ablated == b.ablated and a.diverged == b.diverged
        assert all(abs(x - y) <= 100.0 / small.val_y.numel() for x, y in zip(a.candidate_acc, b.candidate_acc))
    assert pop.bounty_loop == ref_pop.bounty_loop


def test_out_of_memory_retries_in_smaller_chunks(small, reference, monkeypatch):
    ref_pop, _, ref = reference
    pop = population(ARCH, small, SPECS)
    eng = Engine(pop, small, CFG)
    real = Engine._step
    calls = {"n": 0}

    def flaky(self, ch, b):
        calls["n"] += 1
        if ch.size > 6:  # the whole population "does not fit"
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, ch, b)

    monkeypatch.setattr(Engine, "_step", flaky)
    res = [eng.meta_loop() for _ in range(3)]
    assert eng.chunk_size == 6
    ok, diff = close_states(pop, ref_pop, 1e-6)
    assert ok, diff
    assert [r.promoted for r in res] == [r.promoted for r in ref]


def test_interleaved_launches_match_one_engine_at_a_time(small):
    specs_a = [(m, s) for s in (4, 5) for m in MODES]
    specs_b = [("dropout", 6), ("hidden", 6)]
    arch_b = parse_arch("[1*20]")
    pa, pb = population(ARCH, small, specs_a), population(arch_b, small, specs_b)
    ea, eb = Engine(pa, small, CFG), Engine(pb, small, CFG)
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
    eng = Engine(pop, small, CFG)
    pending = eng.launch()
    with pytest.raises(RuntimeError, match="result"):
        eng.launch()
    assert pending.result().loop == 1
    assert eng.launch().result().loop == 2


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_trains_like_fp32(small, precision):
    """Same members, same data: reduced-precision products move the weights by about their
    rounding error, and the candidates score within a few images of fp32's."""
    specs = [(m, 8) for m in MODES]
    p32, _, r32 = run(ARCH, small, specs, 2, dataclasses.replace(CFG, precision="fp32"))
    plo, elo, rlo = run(ARCH, small, specs, 2, dataclasses.replace(CFG, precision=precision))
    assert elo.precision == precision
    diff = (p32.lkg - plo.lkg).abs().max().item()
    assert 1e-7 < diff < 0.05, diff
    for a, b in zip(r32, rlo):
        assert all(abs(x - y) < 2.0 for x, y in zip(a.candidate_acc, b.candidate_acc))


def test_precision_is_validated():
    from psa.core.population import ConfigError

    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ConfigError, match="kernels"):
        TrainConfig(kernels="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_gives_the_eager_records(small):
    dev = "cuda"
    ds = on(small, dev)
    out = {}
    for graphs in (True, False):
        cfg = dataclasses.replace(CFG, graphs=graphs, precision="fp32")
        pop = population(ARCH, ds, SPECS, cfg, device=dev)
        eng = Engine(pop, ds, cfg)
        assert eng.use_graphs is graphs
        out[graphs] = (records([eng.meta_loop() for _ in range(3)]), pop.lkg.cpu())
    assert out[True][0] == out[False][0]
    assert torch.equal(out[True][1], out[False][1])


def test_fused_stack_matches_the_torch_path_and_the_oracle(small):
    """The Triton stack kernels (compiled on a GPU, interpreted on a CPU) against the torch path
    on the same device and against the oracle."""
    pytest.importorskip("triton")
    arch = parse_arch("[3*4]")
    specs = [(m, s) for s in (1, 2) for m in MODES]
    data = dataclasses.replace(small, train_x=small.train_x[:256], train_y=small.train_y[:256])
    cfg = dataclasses.replace(CFG, precision="fp32", graphs=False)
    dev_data = on(data, DEVICE)
    torch_pop = population(arch, dev_data, specs, cfg, device=DEVICE)
    torch_eng = Engine(torch_pop, dev_data, dataclasses.replace(cfg, kernels="torch"))
    torch_res = [torch_eng.meta_loop() for _ in range(2)]
    pop = population(arch, dev_data, specs, cfg, device=DEVICE)
    eng = Engine(pop, dev_data, dataclasses.replace(cfg, kernels="triton"))
    res = [eng.meta_loop() for _ in range(2)]
    assert eng.fused and eng.triton
    ok, diff = close_states(pop, torch_pop, 1e-5)
    assert ok, diff
    for a, b in zip(res, torch_res):
        assert a.promoted == b.promoted and a.diverged == b.diverged
        assert all(abs(x - y) <= 100.0 / data.val_y.numel() for x, y in zip(a.candidate_acc, b.candidate_acc))
    for j, mem in enumerate(pop.members):
        ref = oracle.run(arch, data, mem.seed, mem.mode, 2, CFG)
        got = pop.member_state_dict(j)
        assert max((got[k] - ref.lkg[k]).abs().max().item() for k in got) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("text", ["[3*4]", "[2*40]"])
def test_the_gpu_engine_trains_like_the_cpu_engine(small, text):
    """Counter-based streams: a seed draws the same batches and masks on both devices, so the
    GPU engine with all its fast paths (graphs, Triton stack for 3*4, fp32) follows the CPU's
    trajectory to float rounding."""
    arch = parse_arch(text)
    specs = [(m, s) for s in (1, 2) for m in MODES]
    cfg = dataclasses.replace(CFG, precision="fp32")
    cpu_pop, _, cpu_res = run(arch, small, specs, 2, cfg)
    gpu_data = on(small, "cuda")
    gpu_pop = population(arch, gpu_data, specs, cfg, device="cuda")
    eng = Engine(gpu_pop, gpu_data, cfg)
    assert eng.use_graphs and eng.fused == (text == "[3*4]")
    gpu_res = [eng.meta_loop() for _ in range(2)]
    assert (gpu_pop.lkg.cpu() - cpu_pop.lkg).abs().max().item() < 1e-5
    for a, b in zip(gpu_res, cpu_res):
        assert all(abs(x - y) <= 100.0 / small.val_y.numel() for x, y in zip(a.candidate_acc, b.candidate_acc))


def test_an_automatic_fast_path_that_fails_falls_back_with_a_warning(small, monkeypatch):
    """kernels=auto picked Triton (forced here: a CPU never picks it), and the kernel fails: the
    engine warns once, drops the kernels and trains the same loop on the torch path."""
    from psa.core import kernels

    arch = parse_arch("[3*4]")
    specs = [(m, 1) for m in MODES]
    ref_pop, _, ref = run(arch, small, specs, 2, dataclasses.replace(CFG, kernels="torch"))
    pop = population(arch, small, specs)
    eng = Engine(pop, small, CFG)
    eng.triton = eng.fused = True

    def broken(*a, **k):
        raise RuntimeError("PTX compilation failed (simulated)")

    monkeypatch.setattr(kernels, "stack_forward", broken)
    with pytest.warns(RuntimeWarning, match="Triton kernels failed .*simulated"):
        res = [eng.meta_loop() for _ in range(2)]
    assert not eng.triton and not eng.fused
    assert records(res) == records(ref)
    assert torch.equal(pop.lkg, ref_pop.lkg)
    # an explicit choice is not second-guessed
    eng2 = Engine(population(arch, small, specs), small, dataclasses.replace(CFG, kernels="triton"))
    with pytest.raises(RuntimeError, match="simulated"):
        eng2.meta_loop()


def test_an_engine_is_freed_as_soon_as_it_is_dropped(small):
    """No reference cycle between an engine and its chunks: their buffers (gigabytes for a big
    population) go when the last reference does, not at the next garbage collection."""
    import gc
    import weakref

    pop = population(ARCH, small, [("none", 1), ("dropout", 1)])
    eng = Engine(pop, small, CFG)
    eng.meta_loop()
    refs = [weakref.ref(eng), weakref.ref(eng._whole), weakref.ref(eng._whole.cand)]
    gc.disable()
    try:
        del eng
        assert all(r() is None for r in refs)
    finally:
        gc.enable()

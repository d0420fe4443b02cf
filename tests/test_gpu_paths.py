"""What was added after the first run on a card, on a GPU: ResMLP populations, the engine
variants (the fused AdamW chunk and the per-member MemberAdamW one) and the torch.func
population of a user's module. Each against the CPU engine (counter-based streams: a seed draws
the same batches, masks and neurons on both devices), and captured graphs against the eager step
bit for bit. Every test here needs CUDA; `bench/gpu_check.sh` runs them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from psa.core.arch import parse_arch
from psa.core.module.engine import ModuleEngine
from psa.core.module.population import ModulePopulation
from psa.core.member import MODES
from psa.core.mlp.population import Population

from .conftest import ENGINE_HP, engine, layers, subset
from .test_engine_paths import on
from .test_module import BN_WIDTHS, CNN_WIDTHS, MLP_WIDTHS, bn_mlp, bn_ops, image_subset, plain_mlp, small_cnn
from .test_variants import GREEDY_CHUNK, PERSIST_CHUNK
from .tolerance import assert_close, epoch_steps, net_widths, training_bound

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

LOOPS = 3
HP = dataclasses.replace(ENGINE_HP, meta_loops=8)  # the variants' schedules sum to 8 loops


def records(results):
    return [(r.candidate_acc, r.promoted, r.ablated, r.lkg_score, r.diverged, getattr(r, "forced", None))
            for r in results]


@pytest.fixture(scope="module")
def data(small):
    d = subset(small, 1000, n_val=1000, n_test=500)
    assert d.train_x.shape[0] % HP.batch_size == 8  # a last partial batch
    return d


# (name, arch, model, [(mode, variant)] per seed)
CASES = {
    "resmlp": ("[2*12, 1*8]", "resmlp", [(m, None) for m in MODES]),
    "variants-fused-adamw": ("[2*8]", "simplemlp", GREEDY_CHUNK),
    "variants-member-adamw": ("[2*8]", "simplemlp", PERSIST_CHUNK),
}


def make_population(case: str, ds, device: str) -> Population:
    text, model, specs = CASES[case]
    members = [HP.member(mode, s) if v is None else HP.member(mode, s, v) for s in (31, 32) for mode, v in specs]
    return Population.create(parse_arch(text), members, device, n_val=ds.val_y.numel(), model=model)


def bounty_state(pop: Population, j: int) -> dict[str, torch.Tensor]:
    return pop.member_state_dict(j, pop.bounty_model()) if pop.patient else pop.member_state_dict(j)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_graph_gives_the_eager_records(data, case):
    gpu = on(data, "cuda")
    out = {}
    for graphs in (True, False):
        pop = make_population(case, gpu, "cuda")
        eng = engine(pop, gpu, HP, graphs=graphs, precision="fp32")
        out[graphs] = (records([eng.meta_loop() for _ in range(LOOPS)]), pop.lkg.cpu(),
                       [bounty_state(pop, j) for j in range(pop.size)], eng.use_graphs)
    assert out[True][0] == out[False][0]
    assert torch.equal(out[True][1], out[False][1])
    for a, b in zip(out[True][2], out[False][2]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert out[False][3] is False


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_gpu_engine_trains_like_the_cpu_engine(data, case):
    cpu_pop = make_population(case, data, "cpu")
    cpu_eng = engine(cpu_pop, data, HP, precision="fp32")
    cpu_res = [cpu_eng.meta_loop() for _ in range(LOOPS)]
    gpu = on(data, "cuda")
    gpu_pop = make_population(case, gpu, "cuda")
    gpu_eng = engine(gpu_pop, gpu, HP, precision="fp32")
    gpu_res = [gpu_eng.meta_loop() for _ in range(LOOPS)]
    text, model, _ = CASES[case]
    tol = training_bound(LOOPS * epoch_steps(1000, HP.batch_size), net_widths(parse_arch(text), model), HP.batch_size)
    assert_close("GPU against CPU", layers(gpu_pop, gpu_pop.lkg.cpu()), layers(cpu_pop), tol)
    one_image = 100.0 / data.val_y.numel()
    for a, b in zip(gpu_res, cpu_res):
        assert a.promoted == b.promoted and a.ablated == b.ablated
        assert all(abs(x - y) <= one_image for x, y in zip(a.candidate_acc, b.candidate_acc))
    assert gpu_eng.test_accuracy() == pytest.approx(cpu_eng.test_accuracy(), abs=100.0 / data.test_y.numel())


@pytest.mark.parametrize("make", [plain_mlp, small_cnn, bn_mlp], ids=["mlp", "cnn", "batchnorm-mlp"])
def test_the_module_population_trains_alike_on_both_devices(small, make):
    """The torch.func population (vmap over functional_call) of a user's module on the GPU
    against the same population on the CPU, and twice on the GPU bit for bit. psa runs a
    module's convolutions in fp32 (cuDNN would take TF32 by default: 3e-4 apart after one loop
    on an H200) and deterministically (cuDNN may pick algorithms that add in any order)."""
    # noise for the BatchNorm MLP: see test_module (a constant pixel's weights before a
    # BatchNorm have a gradient that is rounding noise, which AdamW turns into lr-sized steps)
    ds = image_subset(small, 1000, n_val=1000, noise=0.1 if make is bn_mlp else 0.0)
    members = [HP.member(mode, s) for s in (31, 32) for mode in MODES]
    out = {}
    for run, device in enumerate(("cpu", "cuda", "cuda")):
        d = on(ds, device)
        pop = ModulePopulation.create(make, members, d, torch.device(device), n_classes=10)
        eng = ModuleEngine(pop, d, HP)
        out[run] = (records([eng.meta_loop() for _ in range(LOOPS)]), pop)
    (cpu_res, cpu_pop), (gpu_res, gpu_pop), (again_res, again_pop) = out[0], out[1], out[2]
    for a, b in zip(gpu_res, cpu_res):
        assert a[1:3] == b[1:3]  # promoted, ablated
    widths, extra = {plain_mlp: (MLP_WIDTHS, 0), small_cnn: (CNN_WIDTHS, 0),
                     bn_mlp: (BN_WIDTHS, bn_ops(HP.batch_size))}[make]
    tol = training_bound(LOOPS * epoch_steps(1000, HP.batch_size), widths, HP.batch_size, extra)
    for j in range(len(members)):
        gpu_state = {k: v.cpu() for k, v in gpu_pop.member_state_dict(j).items()}
        assert_close(f"member {j} GPU against CPU", gpu_state, cpu_pop.member_state_dict(j), tol)
    assert again_res == gpu_res
    assert all(torch.equal(again_pop.member_state_dict(j)[k], gpu_pop.member_state_dict(j)[k])
               for j in range(len(members)) for k in gpu_pop.member_state_dict(j))

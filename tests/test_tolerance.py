"""tests/tolerance.py catches what it must. A run one AdamW step short (the oracle's loop 1
ends a step early: a dropped last batch, an off-by-one in the epoch) fails the comparisons of
psa's engine and of the module engine with their oracles, which pass on the same runs without
the planted bug; and the helper's own rules: integers exact, NaN only where the reference has
it, a message that names what failed and the bound's derivation."""

from __future__ import annotations

import math

import pytest
import torch

from psa.core.arch import parse_arch
from psa.core.mlp.engine import Engine
from psa.core.module.engine import ModuleEngine
from psa.core.module.population import ModulePopulation

from . import module_oracle, oracle
from .conftest import ENGINE_HP, population, subset
from .test_module import BN_UNITS, HP, REFERENCE_LOOPS, bn_mlp, image_subset, reference_bound
from .tolerance import assert_close, bound, compare, epoch_steps, training_bound


def skip_one_adamw_step(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """torch.optim.AdamW, the oracles' optimizer, leaves out its `at`-th step from now on."""
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        return None if calls["n"] == at else real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.numeric
def test_the_engine_against_an_oracle_one_step_short(small, monkeypatch):
    """psa's engine on test_engine's net and hyperparameters (lr = 1e-4: its rounding is the
    smallest), 2 loops of 16 steps."""
    data = subset(small, 512)
    arch, loops = parse_arch("[2*24, 1*16]"), 2
    specs = [("none", 11), ("dropout", 11), ("hidden", 12)]
    pop = population(arch, data, specs)
    eng = Engine(pop, data, ENGINE_HP)
    for _ in range(loops):
        eng.meta_loop()
    steps = epoch_steps(data.train_x.shape[0], ENGINE_HP.batch_size)
    tol = training_bound(loops * steps, arch.widths, ENGINE_HP.batch_size)
    for j, (mode, seed) in enumerate(specs):
        ref = oracle.run(arch, data, seed, mode, loops, ENGINE_HP)
        assert_close(f"{mode} {seed} LKG", pop.member_state_dict(j), ref.lkg, tol)
        skip_one_adamw_step(monkeypatch, at=steps)  # loop 1's last step
        short = oracle.run(arch, data, seed, mode, loops, ENGINE_HP)
        monkeypatch.undo()
        caught = compare(f"{mode} {seed} LKG against a loop one step short", pop.member_state_dict(j), short.lkg, tol)
        assert caught.ratio > 1, caught.message


@pytest.mark.numeric
def test_the_module_engine_against_an_oracle_one_step_short(mnist, monkeypatch):
    """The BatchNorm MLP of the issue (the largest rounding of the module tests) on the
    reference test's data and loops."""
    ds = image_subset(mnist, 300, noise=0.1)
    members = [HP.member(m, 5) for m in ("none", "hidden")]
    pop = ModulePopulation.create(bn_mlp, members, ds)
    eng = ModuleEngine(pop, ds, HP, batched=True)
    for _ in range(REFERENCE_LOOPS):
        eng.meta_loop()
    tol = reference_bound(bn_mlp)
    steps = epoch_steps(ds.train_x.shape[0], HP.batch_size)
    for j, mem in enumerate(pop.members):
        ref = module_oracle.run(bn_mlp, BN_UNITS, ds, mem.seed, mem.mode, REFERENCE_LOOPS, HP)
        assert_close(f"{mem.mode} LKG", pop.member_state_dict(j), ref.lkg, tol)
        skip_one_adamw_step(monkeypatch, at=steps)
        short = module_oracle.run(bn_mlp, BN_UNITS, ds, mem.seed, mem.mode, REFERENCE_LOOPS, HP)
        monkeypatch.undo()
        caught = compare(f"{mem.mode} LKG against a loop one step short", pop.member_state_dict(j), short.lkg, tol)
        assert caught.ratio > 1, caught.message


@pytest.mark.numeric
def test_the_helper_compares_integers_exactly_and_keeps_nan_in_place():
    tol = bound(100)
    ref = {"w": torch.tensor([1.0, -2.0, float("nan")]), "steps": torch.tensor([3, 4])}
    assert compare("same", {k: v.clone() for k, v in ref.items()}, ref, tol).ratio == 0
    off_by_one = {"w": ref["w"], "steps": torch.tensor([3, 5])}
    assert compare("counts", off_by_one, ref, tol).ratio == math.inf
    nan = {"w": torch.tensor([1.0, float("nan"), float("nan")]), "steps": ref["steps"]}
    assert not compare("nan", nan, ref, tol).ratio <= 1
    # within the bound of the largest |value| (2.0), and just outside it
    inside = {"w": torch.tensor([1.0, -2.0 + 1.9 * tol.rel, float("nan")], dtype=torch.float64), "steps": ref["steps"]}
    assert compare("inside", inside, ref, tol).ratio <= 1
    outside = {"w": torch.tensor([1.0 + 2.1 * tol.rel, -2.0, float("nan")], dtype=torch.float64),
               "steps": ref["steps"]}
    c = compare("weights", outside, ref, tol)
    assert c.ratio > 1
    assert c.message.startswith("weights w: differs") and "of its largest |value| 2" in c.message
    assert "4 eps32 sqrt(100)" in c.message  # the bound's derivation

"""End to end: every model family of tests/zoo.py through `psa.fit` on a few hundred MNIST
images, in every mode that applies (a mode that cannot apply refused in one line); the
population (vmap) and one member at a time giving the same records; no dependence on the global
random generator; promoted ablations of ReLU-guarded units still exactly zero in the LKG (by a
hand-written map of each model), and every promoted ablation persisting or regrowing as psa's
verdict says; the notes psa gives about each model; bad input as one clear error (library) or
one line and exit 2 (CLI), nothing written; the module engine's per-step callback.

Each family is fitted once per path (module-scoped cache) and the fits are shared by the tests."""

from __future__ import annotations

import math
import os
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import psa
from psa.core import data as psa_data
from psa.core import loop as psa_loop
from psa.core.errors import ConfigError
from psa.core.member import ABLATIVE_MODES, MODES
from psa.results import FitResult

from .conftest import env, one_line_error, psa_cmd, run_main
from .zoo import BY_NAME, ZOO, ZooModel

N_TRAIN, N_VAL, N_TEST = 256, 128, 64  # 8 steps of 32 per epoch; one validation image = 0.78 points
# 3 loops: ablations in loops 2 and 3, so that one promoted in loop 2 trains on in loop 3. lr 1e-3
# (not the paper's 1e-4): the models learn within 3 epochs of 256 images, so promotions are real
# decisions. Seed 4 gives every ReLU-guarded family a promoted hidden-unit ablation in both full and
# hidden mode to check (full picks the output layer half the time).
TRIALS, META_LOOPS, BATCH, LR = 2, 3, 32, 1e-3
SEED = 4
ONE_IMAGE = 100.0 / N_VAL  # a validation accuracy's resolution, in points

# What each family can run: `dropout` needs a dropout in the model (the transformer's attention
# and feed-forward dropout, the MLP's nn.Dropout), `hidden` a hidden unit layer (a GRU or LSTM
# holds none: the recurrent layer holds no units, and their only unit layer is the head).
REFUSED: dict[tuple[str, str], str] = {
    **{(name, "dropout"): "sets the rate of every dropout of the model"
       for name in ("cnn", "bn_mlp", "ln_mlp", "residual_mlp", "gru", "lstm", "mha", "embedding", "tied")},
    **{(name, "hidden"): "needs a hidden unit layer" for name in ("gru", "lstm")},
}


def modes_of(name: str) -> tuple[str, ...]:
    return tuple(m for m in MODES if (name, m) not in REFUSED)


# ------------------------------------------------------------------------------------------
# the fits, shared


@dataclass
class Fit:
    result: FitResult
    notes: list[warnings.WarningMessage]  # every warning psa.fit gave, in order


def splits(mnist: psa_data.Dataset, z: ZooModel, noise: float = 0.0) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """(train, val, test) of the first MNIST images as `z` takes them, with Gaussian `noise` added
    to the inputs if given."""
    g = torch.Generator().manual_seed(0)

    def part(x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = x[:n].clone()
        if noise:
            x = x + noise * torch.randn(x.shape, generator=g)
        return z.inputs(x), y[:n].clone()

    return (part(mnist.train_x, mnist.train_y, N_TRAIN), part(mnist.val_x, mnist.val_y, N_VAL),
            part(mnist.test_x, mnist.test_y, N_TEST))


# BatchNorm behind a Linear fed by MNIST's constant border pixels gets gradients that are 0 in
# theory and rounding noise in practice, which AdamW turns into lr-sized steps: the two paths then
# part after a loop (docs/module.md#checks). Noise on the inputs makes those gradients real.
NOISE = {"bn_mlp": 0.1}


def fit(make: Callable[[], nn.Module], data: tuple, modes: tuple[str, ...], batched: bool | str,
        **kw: object) -> Fit:
    # psa says a note once per process: another test of the suite may have fitted this factory
    # already, so start from a process that has said nothing
    psa_loop._NOTED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = psa.fit(make, *data, modes=modes, trials=TRIALS, meta_loops=META_LOOPS, batch_size=BATCH, seed=SEED, lr=LR,
                    batched=batched, device="cpu", progress=False, **kw)
    return Fit(r, list(caught))


@pytest.fixture(scope="module")
def fitted(mnist: psa_data.Dataset) -> Callable[[str, bool | str], Fit]:
    """fitted(name, path): the family's fit in every mode that applies, "auto" (the path the rule
    picks) or "other" (the path auto did not pick), each computed once per module."""
    cache: dict[tuple[str, bool | str], Fit] = {}

    def get(name: str, path: bool | str) -> Fit:
        if (name, path) not in cache:
            z = BY_NAME[name]
            data = splits(mnist, z, NOISE.get(name, 0.0))
            if path == "other":
                cache[(name, path)] = fit(z.factory, data, modes_of(name), not get(name, "auto").result.batched)
            else:
                cache[(name, path)] = fit(z.factory, data, modes_of(name), path)
        return cache[(name, path)]

    return get


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One intra-op thread (conftest's _fixed_threads restores the count): these models are tiny,
    and on a shared two-core machine two threads per fit only fight over the cores (10x slower).
    Every fit of this module runs with it, so the paths' comparisons see the same reductions."""
    torch.set_num_threads(1)


NAMES = [z.name for z in ZOO]
RECURRENT = ("gru", "lstm")  # vmap has no batching rule for aten::gru / aten::lstm


# ------------------------------------------------------------------------------------------
# 1. every family in every mode that applies


@pytest.mark.parametrize("name", NAMES)
def test_every_family_fits_in_every_mode_that_applies(fitted, mnist, name: str) -> None:
    r = fitted(name, "auto").result
    modes = modes_of(name)
    assert r.modes == modes and r.conditions == modes
    assert len(r.records) == len(modes) * TRIALS * META_LOOPS
    last = r.spec.layers[-1].name
    names = {layer.name for layer in r.spec.layers}
    for rec in r.records:
        # loop 1 trains the fresh model; later loops ablate one unit in the ablative modes only
        if rec.loop == 1 or rec.mode not in ABLATIVE_MODES:
            assert rec.ablated is None, rec
        else:
            assert rec.ablated is not None and rec.ablated[0] in names, rec
            assert 0 <= rec.ablated[1] < next(la.units for la in r.spec.layers if la.name == rec.ablated[0])
            if rec.mode == "output":
                assert rec.ablated[0] == last
            if rec.mode == "hidden":
                assert rec.ablated[0] != last
        assert math.isfinite(rec.train_loss) and not rec.diverged
        assert 0.0 <= rec.candidate_acc <= 100.0
    # the LKG is the best candidate so far: it never goes down, and it moves exactly on a promotion
    for mode in modes:
        for k in range(1, TRIALS + 1):
            recs = [x for x in r.records if x.mode == mode and x.trial == k]
            assert [x.loop for x in recs] == list(range(1, META_LOOPS + 1))
            best = -1.0
            for x in recs:
                assert x.promoted == (x.candidate_acc > best)
                best = max(best, x.candidate_acc)
                assert x.lkg_score == best
            assert r.bounty[(mode, k)] == best
            assert (mode, k) in r.test_acc
    # each saved model loads into the factory's own module and scores its bounty on the
    # validation images (psa scores in eval mode; so does this)
    z = BY_NAME[name]
    _, (vx, vy), _ = splits(mnist, z, NOISE.get(name, 0.0))
    for mode in modes:
        model = z.factory()
        model.load_state_dict(r.state_dict(mode, TRIALS))
        model.eval()
        with torch.no_grad():
            acc = 100.0 * float((model(vx).argmax(1) == vy).sum()) / N_VAL
        assert abs(acc - r.bounty[(mode, TRIALS)]) <= ONE_IMAGE + 1e-9, (mode, acc)


@pytest.mark.parametrize("name,mode", sorted(REFUSED))
def test_a_mode_that_cannot_apply_is_one_clear_line(mnist, name: str, mode: str) -> None:
    z = BY_NAME[name]
    with pytest.raises(ConfigError) as e:
        psa.fit(z.factory, *splits(mnist, z)[:2], modes=["none", mode], trials=1, meta_loops=1, device="cpu",
                progress=False)
    message = str(e.value)
    assert REFUSED[(name, mode)] in message and f"tests.zoo:{name}" in message and "\n" not in message


# ------------------------------------------------------------------------------------------
# 2. the population and one member at a time


@pytest.mark.parametrize("name", [n for n in NAMES if n not in RECURRENT])
def test_the_population_and_one_at_a_time_give_the_same_records(fitted, name: str) -> None:
    """Both paths compute the same thing but round differently (docs/module.md#populations): the
    draws (data order, ablated units) are the same bits, the accuracies the same to a validation
    image, the losses to 1e-5 relative (the tolerance the module tests hold both paths to)."""
    a, b = fitted(name, "auto").result, fitted(name, "other").result
    assert {a.batched, b.batched} == {True, False}
    ra, rb = a.to_records(), b.to_records()
    assert len(ra) == len(rb)
    exact = ("model", "condition", "mode", "variant", "trial", "seed", "loop", "ablated_layer", "ablated_unit",
             "ablations", "diverged", "forced", "promoted")
    for x, y in zip(ra, rb):
        assert {k: x[k] for k in exact} == {k: y[k] for k in exact}
        assert abs(x["candidate_acc"] - y["candidate_acc"]) <= ONE_IMAGE + 1e-9
        assert abs(x["lkg_score"] - y["lkg_score"]) <= ONE_IMAGE + 1e-9
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)


@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_models_train_one_at_a_time_and_refuse_the_population(fitted, mnist, name: str) -> None:
    """vmap has no batching rule for a GRU or an LSTM: auto trains one member at a time, and
    batched=True is refused in one line that says why and what to do."""
    r = fitted(name, "auto").result
    assert r.batched is False and "vmap cannot batch it" in r.batching and f"aten::{name}" in r.batching
    z = BY_NAME[name]
    with pytest.raises(ConfigError) as e:
        psa.fit(z.factory, *splits(mnist, z)[:2], modes=["none"], trials=1, meta_loops=1, batched=True,
                device="cpu", progress=False)
    assert "vmap cannot batch tests.zoo:" in str(e.value) and "batched=False" in str(e.value)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------
# 3. no global randomness


class FunctionalDropout(nn.Module):
    """784-32-10 with F.dropout in the forward (no nn.Dropout module for psa to find by type)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.dropout(torch.relu(self.fc(x.flatten(1))), 0.5, self.training))


def functional_dropout() -> nn.Module:
    return FunctionalDropout()


@pytest.mark.parametrize("name,modes", [
    ("transformer", ("none", "dropout", "hidden")),  # attention and feed-forward dropout in dropout mode
    ("gru", ("none", "full")),  # one member at a time, autograd's GRU
    ("functional_dropout", ("none", "dropout")),
])
def test_a_fit_never_depends_on_the_global_generator(mnist, name: str, modes: tuple[str, ...]) -> None:
    """Data order, dropout masks and ablated units are psa's draws of (seed, loop), the initial
    weights the factory's under the seed: two fits under different global seeds are the same run,
    bit for bit, and leave the caller's generator where it was."""
    z = BY_NAME.get(name) or ZooModel(name, functional_dropout, "rows")
    data = splits(mnist, z)
    runs = []
    for global_seed in (7, 123456):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        runs.append(fit(z.factory, data, modes, "auto").result)
        assert torch.equal(torch.get_rng_state(), before)
    a, b = runs
    assert a.to_records() == b.to_records()
    assert a.states_equal(b)


# ------------------------------------------------------------------------------------------
# 4. ablated units stay zero in the LKG


@dataclass(frozen=True)
class Reader:
    """Where a hidden unit layer's units go: its one reader and the columns each unit becomes
    there (1, or a channel's block after a Flatten), and the BatchNorm that belongs to the unit."""

    layer: str
    block: int = 1
    norm: str | None = None


# every hidden unit layer of the ReLU-guarded families, written out from tests/zoo.py: a zeroed
# unit outputs relu(0) = 0, whose gradient is 0, so its zeroed weights stay exactly 0 under AdamW
GUARDED: dict[str, dict[str, Reader]] = {
    "mlp": {"1": Reader("4"), "4": Reader("7")},
    "cnn": {"0": Reader("2"), "2": Reader("5", block=4 * 4)},
    "bn_mlp": {"1": Reader("4", norm="2")},
    "embedding": {"fc": Reader("head")},
}


@pytest.mark.parametrize("mode", ["full", "hidden"])
@pytest.mark.parametrize("name", list(GUARDED))
def test_promoted_ablations_stay_zero_in_the_lkg(fitted, name: str, mode: str) -> None:
    """Every hidden unit ablated in a promoted loop is still exactly zero in the trial's final LKG
    (the saved model): its incoming weights and bias, its BatchNorm's scale and shift, and in
    `hidden` mode its columns in the reader. Checked on both paths."""
    checked = 0
    for path in ("auto", "other"):
        r = fitted(name, path).result
        for k in range(1, TRIALS + 1):
            state = r.state_dict(mode, k)
            for rec in r.records:
                if rec.mode != mode or rec.trial != k or not rec.promoted or rec.ablated is None:
                    continue
                layer, u = rec.ablated
                if layer not in GUARDED[name]:  # the output layer: its logit is in the loss, it regrows
                    continue
                reader = GUARDED[name][layer]
                zeroed = {f"{layer}.weight": state[f"{layer}.weight"][u]}
                if f"{layer}.bias" in state:
                    zeroed[f"{layer}.bias"] = state[f"{layer}.bias"][u]
                if reader.norm:
                    zeroed[f"{reader.norm}.weight"] = state[f"{reader.norm}.weight"][u]
                    zeroed[f"{reader.norm}.bias"] = state[f"{reader.norm}.bias"][u]
                if mode == "hidden":
                    w = state[f"{reader.layer}.weight"]
                    zeroed[f"{reader.layer}.weight columns"] = w[:, u * reader.block:(u + 1) * reader.block]
                for what, t in zeroed.items():
                    assert t.numel() > 0 and not t.any(), (path, k, rec.loop, what, u)
                checked += 1
    assert checked > 0  # the seed gives promoted hidden ablations to check (a test that checks nothing fails)


# psa's persistence verdict of every unit layer (UnitLayer.verdict(): full and hidden mode), as
# docs/module.md's zoo table gives them
VERDICTS: dict[str, dict[str, str]] = {
    "mlp": {"1": "persists", "4": "persists", "7": "regrows"},
    "cnn": {"0": "persists", "2": "persists", "5": "regrows"},
    "bn_mlp": {"1": "persists", "4": "regrows"},
    "ln_mlp": {"1": "regrows", "4": "regrows"},  # LayerNorm mixes the zeroed unit into the others' statistics
    "residual_mlp": {"inp": "persists", "fc1": "persists", "fc2": "regrows", "head": "regrows"},
    "gru": {"head": "regrows"},
    "lstm": {"head": "regrows"},
    "transformer": {"proj": "regrows", "encoder.self_attn": "full regrows, hidden persists",
                    "encoder.linear1": "persists", "encoder.linear2": "regrows", "head": "regrows"},
    "mha": {"proj": "full regrows, hidden persists", "attn": "full regrows, hidden persists", "head": "regrows"},
    "embedding": {"fc": "persists", "head": "regrows"},
    "tied": {"fc": "persists", "embed.weight": "regrows"},
}


@pytest.mark.parametrize("name", NAMES)
def test_every_promoted_ablation_persists_or_regrows_as_psa_says(fitted, name: str) -> None:
    """The verdicts, then training: in the final LKG of every trial, each unit ablated in a
    promoted loop has every entry its ablation zeroed (UnitLayer.zeroes) still exactly 0 where
    psa says it persists in that mode, and some of them nonzero where it says it regrows (the
    candidate trained an epoch after the ablation). Both paths."""
    layers = {layer.name: layer for layer in fitted(name, "auto").result.spec.layers}
    assert {n: la.verdict() for n, la in layers.items()} == VERDICTS[name]
    seen: dict[bool, int] = {True: 0, False: 0}
    for path in ("auto", "other") if name not in RECURRENT else ("auto",):
        r = fitted(name, path).result
        for rec in r.records:
            if not rec.promoted or rec.ablated is None:
                continue
            layer, u = layers[rec.ablated[0]], rec.ablated[1]
            state = r.state_dict(rec.mode, rec.trial)
            entries = [state[p][i] for p, i in layer.zeroes(u, rec.mode)]
            verdict = layer.persists_in(rec.mode)
            assert verdict is not None
            if verdict:
                assert all(not e.any() for e in entries), (path, rec)
            else:
                assert any(e.any() for e in entries), (path, rec)
            seen[verdict] += 1
    assert seen[False] > 0  # every family has a promoted output ablation at least


# ------------------------------------------------------------------------------------------
# 5. the notes


AUTO_POPULATION = "batched='auto' chose the population (vmap): it has no convolution"
REGROWS = "an ablation does not persist (training regrows the zeroed weights) in "
NEVER_UNITS = ("is never ablated: psa's units are the outputs of Linear and Conv layers and attention heads; "
               "recurrent, embedding and transposed-convolution weights are never units")
NOTES: dict[str, list[str]] = {
    "mlp": [AUTO_POPULATION],
    "cnn": ["batched='auto' chose one member at a time: it has 2 convolutions, which a CPU runs slower under vmap"],
    "bn_mlp": [AUTO_POPULATION],
    "ln_mlp": [REGROWS + "1 (full, hidden: 2 (LayerNorm) normalises it with the other units)", AUTO_POPULATION],
    "residual_mlp": ["no unambiguous consumer of inp (its output is used 2 times)",
                     "no unambiguous consumer of fc2", REGROWS + "fc2 (full, hidden: it reaches a sum",
                     AUTO_POPULATION],
    # the recurrent layer holds no units, and vmap has no batching rule for it
    "gru": ["rnn (GRU) " + NEVER_UNITS,
            "batched='auto' chose one member at a time: vmap cannot batch it (RuntimeError: Batching rule not "
            "implemented for aten::gru"],
    "lstm": ["rnn (LSTM) " + NEVER_UNITS,
             "batched='auto' chose one member at a time: vmap cannot batch it (RuntimeError: Batching rule not "
             "implemented for aten::lstm"],
    "transformer": ["the units of encoder.self_attn (MultiheadAttention) are its 2 heads",
                    "no unambiguous consumer of proj", REGROWS + "proj (full, hidden:", AUTO_POPULATION],
    "mha": ["the units of attn (MultiheadAttention) are its 2 heads", REGROWS + "proj (full:", AUTO_POPULATION],
    "embedding": ["embed (Embedding) " + NEVER_UNITS, AUTO_POPULATION],
    "tied": ["the logits are F.linear(h, embed.weight), so the output layer's units are its rows",
             "also zeroes token u's embedding in embed", AUTO_POPULATION],
}


@pytest.mark.parametrize("name", NAMES)
def test_the_notes_say_what_psa_did_with_the_model(fitted, name: str) -> None:
    """psa's notes on each family (the path auto chose and why, units it cannot follow): each a
    RuntimeWarning starting "psa: ", said once per fit, at the line that called psa.fit."""
    notes = fitted(name, "auto").notes
    texts = [str(w.message) for w in notes]
    assert all(t.startswith(f"psa: tests.zoo:{name}") for t in texts), texts
    assert len(texts) == len(set(texts)), texts  # once each
    assert all(w.category is RuntimeWarning and w.filename == __file__ for w in notes)
    for expected in NOTES[name]:
        assert any(expected in t for t in texts), (expected, texts)
    if name in ("mlp", "cnn", "bn_mlp"):  # plain chains of unit layers: nothing to say but the path
        assert len(texts) == 1, texts


# ------------------------------------------------------------------------------------------
# 6. bad input


@pytest.mark.parametrize("name,split,index,value,said", [
    ("mlp", "train", (5, 17), math.nan, "train inputs hold NaN at index (5, 17)"),
    ("mlp", "train", (7, 3), math.inf, "train inputs hold inf at index (7, 3)"),
    ("mlp", "val", (2, 0), -math.inf, "val inputs hold -inf at index (2, 0)"),
    ("cnn", "test", (3, 0, 4, 5), math.nan, "test inputs hold NaN at index (3, 0, 4, 5)"),
])
def test_non_finite_inputs_name_the_split_and_the_first_index(mnist, name: str, split: str, index: tuple[int, ...],
                                                             value: float, said: str) -> None:
    z = BY_NAME[name]
    parts = dict(zip(("train", "val", "test"), (list(p) for p in splits(mnist, z))))
    x = parts[split][0].clone()
    x[index] = value
    x[index[0] + 1][(0,) * (x.dim() - 1)] = math.nan  # a later bad value is not the one named
    parts[split][0] = x
    with pytest.raises(ConfigError) as e:
        psa.fit(z.factory, *(tuple(p) for p in parts.values()), trials=1, meta_loops=1, device="cpu",
                progress=False)
    assert said + ":" in str(e.value) and "\n" not in str(e.value)


def test_labels_outside_the_classes_are_named(mnist) -> None:
    (tx, ty), val, (sx, sy) = splits(mnist, BY_NAME["mlp"])
    sy = sy.clone()
    sy[11] = -3
    with pytest.raises(ConfigError) as e:
        psa.fit(BY_NAME["mlp"].factory, (tx, ty), val, (sx, sy), trials=1, meta_loops=1, device="cpu",
                progress=False)
    assert "test labels must be in [0, 10)" in str(e.value) and "label -3 at index 11" in str(e.value)


def test_token_inputs_must_not_be_mixed_with_floating_point(mnist) -> None:
    """Integer inputs (the embedding's tokens, int64) train as integers (test 1); a split of
    floating point beside them is one line, not a crash inside the model."""
    (tx, ty), (vx, vy), _ = splits(mnist, BY_NAME["embedding"])
    assert tx.dtype == torch.int64
    with pytest.raises(ConfigError, match="must all be floating point, or all integers"):
        psa.fit(BY_NAME["embedding"].factory, (tx, ty), (vx.float(), vy), trials=1, meta_loops=1, device="cpu",
                progress=False)


def test_saving_onto_a_result_refuses_and_keeps_the_old_files(fitted, tmp_path: Path) -> None:
    old, new = fitted("mlp", "auto").result, fitted("embedding", "auto").result
    old.save(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(FileExistsError) as e:
        new.save(tmp_path / "run")
    assert "overwrite=True" in str(e.value) and "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    back = psa.load(tmp_path / "run")
    assert back == old and back.states_equal(old)


STUDY = ["study", "--modes", "none,hidden", "--trials", "1", "--meta-loops", "1", "--train-subset", "256",
         "--quiet", "--db", "x.sqlite"]


@pytest.mark.parametrize("flags,message", [
    pytest.param(["--model", "tests.zoo:mlp", "--device", "cuda"], "device 'cuda' is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["--model", "tests.zoo:mlp", "--batched", "maybe"], "argument --batched: invalid choice: 'maybe'"),
    # a study shows the model images: the token model fails on them, in one line
    (["--model", "tests.zoo:embedding"], "tests.zoo:embedding fails on a batch of the data of shape (2, 1, 28, 28)"),
    (["--model", "tests.zoo:gru"], "mode 'hidden' needs a hidden unit layer; tests.zoo:gru has only head[10]"),
    # refused before the database and the checkpoint are written (it once left both behind)
    (["--model", "tests.zoo:gru", "--modes", "none", "--batched", "yes"],
     "--batched yes: torch.func.vmap cannot batch tests.zoo:gru (RuntimeError: Batching rule not implemented for "
     "aten::gru.input"),
    (["--model", "tests.zoo:lstm", "--modes", "none", "--batched", "yes"], "train it with --batched no (or auto)"),
])
def test_bad_zoo_studies_are_one_line_and_write_nothing(tmp_path: Path, flags: list[str], message: str) -> None:
    rc, _, err = run_main([*STUDY, *flags], tmp_path)
    assert rc == 2 and message in one_line_error(err)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_study_prints_its_one_line_only(tmp_path: Path) -> None:
    """As a process (warnings reach stderr): the GRU's note (its recurrent layer holds no units)
    is not printed before the refusal of --batched yes; stderr is the one line."""
    (tmp_path / "work").mkdir()
    e = env()
    e["PYTHONPATH"] += os.pathsep + str(Path(__file__).resolve().parents[1])  # tests.zoo, from the checkout
    out = subprocess.run(psa_cmd(*STUDY, "--modes", "none", "--model", "tests.zoo:gru", "--batched", "yes"),
                         cwd=tmp_path / "work", env=e, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "train it with --batched no" in one_line_error(out.stderr)
    assert list((tmp_path / "work").iterdir()) == []


# ------------------------------------------------------------------------------------------
# 8. progress within a loop


@pytest.mark.parametrize("batched", [True, False])
def test_the_module_engine_reports_every_training_step(mnist, batched: bool) -> None:
    """launch(on_step) calls on_step(step, steps) after every step of each slice of members
    trained at once, as psa's own engine does per chunk; one at a time, a slice's members' steps
    are counted one after another. The callback changes nothing that is computed."""
    from psa.core.data import Dataset
    from psa.core.hparams import HParams
    from psa.core.module.engine import ModuleEngine
    from psa.core.module.population import ModulePopulation

    z = BY_NAME["mlp"]
    (tx, ty), (vx, vy), (sx, sy) = splits(mnist, z)
    ds = Dataset("m", tx, ty, vx, vy, sx, sy, "given")
    hp = HParams(batch_size=BATCH, lr=LR)
    steps = N_TRAIN // BATCH
    runs = []
    for callback in (True, False):
        members = [hp.member(m, SEED) for m in ("none", "dropout", "hidden")]
        pop = ModulePopulation.create(z.factory, members, ds)
        eng = ModuleEngine(pop, ds, hp, batched=batched, max_members=2)
        calls: list[tuple[int, int]] = []
        on_step = (lambda s, n: calls.append((s, n))) if callback else None
        results = [eng.meta_loop(on_step) for _ in range(2)]
        runs.append(([(r.candidate_acc, r.promoted, r.ablated, r.train_loss) for r in results], pop.params))
        if callback:
            # slices of 2 and 1 members, each loop
            one = [(s, steps) for s in range(1, steps + 1)]
            per_slice = one * 2 if batched else [(s, 2 * steps) for s in range(1, 2 * steps + 1)] + one
            assert calls == per_slice * 2
    (a, pa), (b, pb) = runs
    assert a == b and all(torch.equal(pa[k], pb[k]) for k in pa)

"""What a unit is in the models researchers bring (tests/zoo.py), what its ablation zeroes, and
whether that ablation persists: psa's verdict (psa.core.module.trace, from the gradients)
against what training does. Each zoo model gets one population with a member per (unit layer,
mode that ablates it), every member ablating unit 1 of its layer at loop 1 (promoted: the LKG
starts at -1); after one epoch the zeroed entries must be exactly zero where psa says the
ablation persists, and not all zero where it says they regrow."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from psa.core.data import Dataset
from psa.core.hparams import HParams
from psa.core.module.engine import ModuleEngine, choose_batching, convolutions, vmap_check
from psa.core.module.population import ModulePopulation
from psa.core.module.units import Consumer, ModelSpec, inspect_model

from .conftest import subset
from .zoo import BY_NAME, ZOO, ZooModel

HP = HParams(lr=1e-3, batch_size=32, meta_loops=1)
UNIT = 1  # the unit every member ablates

# psa's verdicts on the zoo: (layer, kind, units, full, hidden; "" for the output layer)
P, R = "persists", "regrows"
EXPECTED: dict[str, list[tuple[str, str, int, str, str]]] = {
    "mlp": [("1", "Linear", 32, P, P), ("4", "Linear", 16, P, P), ("7", "Linear", 10, R, "")],
    "cnn": [("0", "Conv2d", 4, P, P), ("2", "Conv2d", 8, P, P), ("5", "Linear", 10, R, "")],
    "bn_mlp": [("1", "Linear", 32, P, P), ("4", "Linear", 10, R, "")],
    "ln_mlp": [("1", "Linear", 32, R, R), ("4", "Linear", 10, R, "")],
    "residual_mlp": [("inp", "Linear", 32, P, P), ("fc1", "Linear", 32, P, P), ("fc2", "Linear", 32, R, R),
                     ("head", "Linear", 10, R, "")],
    "gru": [("head", "Linear", 10, R, "")],
    "lstm": [("head", "Linear", 10, R, "")],
    "transformer": [("proj", "Linear", 16, R, R), ("encoder.self_attn", "MultiheadAttention", 2, R, P),
                    ("encoder.linear1", "Linear", 32, P, P), ("encoder.linear2", "Linear", 16, R, R),
                    ("head", "Linear", 10, R, "")],
    "embedding": [("fc", "Linear", 32, P, P), ("head", "Linear", 10, R, "")],
    "tied": [("fc", "Linear", 16, P, P), ("embed.weight", "F.linear", 10, R, "")],
    "mha": [("proj", "Linear", 16, R, P), ("attn", "MultiheadAttention", 2, R, P), ("head", "Linear", 10, R, "")],
}

# the path batched="auto" takes on a CPU: one member at a time for convolutions (the rule) and
# where vmap cannot batch the model (torch has no batching rule for aten::gru and aten::lstm)
ONE_AT_A_TIME = {"cnn", "gru", "lstm"}


def zoo_data(mnist: Dataset, z: ZooModel, n_train: int = 128) -> Dataset:
    s = subset(mnist, n_train, 64, 16)
    return Dataset(s.name, z.inputs(s.train_x), s.train_y, z.inputs(s.val_x), s.val_y, z.inputs(s.test_x), s.test_y,
                   s.source)


def spec_of(z: ZooModel, mnist: Dataset) -> ModelSpec:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return inspect_model(z.build(0), z.inputs(mnist.train_x[:2]), 10, z.name)


def ablate_and_train(make, ds: Dataset, plan: list[tuple[str, int]]) -> tuple[ModulePopulation, bool]:
    """One epoch of a population whose member k ablates unit UNIT of unit layer plan[k][1] in
    mode plan[k][0] at loop 1, on the path psa.fit's batched="auto" picks; every candidate is
    promoted (the LKG starts at -1). Returns the population and whether it trained batched."""
    members = [HP.member(mode, 100 + k) for k, (mode, _) in enumerate(plan)]  # seeds in plan order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pop = ModulePopulation.create(make, members, ds)
        assert pop.template is not None
        batched, why = choose_batching("auto", convolutions(pop.template), "cpu", vmap_check(pop, ds))
        eng = ModuleEngine(pop, ds, HP, batched=batched, batching=why)
        forced = tuple(((layer, UNIT),) for _, layer in plan)
        eng._ablations = lambda loop: forced  # type: ignore[method-assign]
        result = eng.meta_loop()
    assert all(result.promoted) and list(result.ablated) == [(layer, UNIT) for _, layer in plan]
    return pop, batched


def every_mode(spec: ModelSpec) -> list[tuple[str, int]]:
    """(mode, layer) for every unit layer and every ablative mode that picks it."""
    last = len(spec.layers) - 1
    return [(mode, i) for i in range(len(spec.layers)) for mode in (("full", "output") if i == last else
                                                                   ("full", "hidden"))]


def check_persistence(pop: ModulePopulation, plan: list[tuple[str, int]]) -> list[str]:
    """The members whose zeroed entries disagree with psa's verdict, for people."""
    wrong = []
    for j, (mode, i) in enumerate(plan):
        layer = pop.spec.layers[i]
        largest = max(float(pop.params[k][j][idx].abs().max()) for k, idx in layer.zeroes(UNIT, mode))
        if (largest == 0.0) != layer.persists_in(mode):
            wrong.append(f"{layer.name} in {mode}: psa says {layer.verdict()}, largest zeroed |w| {largest:.3g}")
    return wrong


# ------------------------------------------------------------------------------------------
# the zoo: verdicts, and training agreeing with them


@pytest.mark.parametrize("name", [z.name for z in ZOO])
def test_zoo_verdicts(mnist, name):
    spec = spec_of(BY_NAME[name], mnist)
    got = [(r["layer"], r["kind"], r["units"], r["full"], r["hidden"]) for r in spec.summary_rows()]
    assert got == EXPECTED[name]
    rows = spec.summary_rows()
    assert [r["role"] for r in rows] == ["hidden"] * (len(rows) - 1) + ["output"]
    assert rows[-1]["output"] == R and rows[-1]["why"] == "the output layer: its logits are in the loss"
    assert all(r["why"] for r in rows) and len(spec.persistence_lines()) == len(rows)


@pytest.mark.slow
@pytest.mark.parametrize("name", [z.name for z in ZOO])
def test_ablated_units_stay_zero_exactly_where_psa_says_they_persist(mnist, name):
    z = BY_NAME[name]
    ds = zoo_data(mnist, z)
    plan = every_mode(spec_of(z, mnist))
    pop, batched = ablate_and_train(z.factory, ds, plan)
    assert check_persistence(pop, plan) == []
    assert batched == (name not in ONE_AT_A_TIME)
    if name in ("transformer", "mha"):  # full mode: a head's queries and keys stay zero, its values regrow
        j = plan.index(("full", 1))
        attn = pop.spec.layers[1]
        q, k, v = (pop.params[c.param][j][c.index(UNIT)] for c in attn.incoming[:3])
        assert q.abs().max() == 0 and k.abs().max() == 0 and v.abs().max() > 0


# ------------------------------------------------------------------------------------------
# what a unit is: attention heads, tied weights, norms, recurrent layers


def test_attention_heads_are_units_and_join_in_call_order(mnist):
    spec = spec_of(BY_NAME["transformer"], mnist)
    assert spec.describe() == "proj[16], encoder.self_attn[2], encoder.linear1[32], encoder.linear2[16], head[10]"
    attn = spec.layers[1]
    assert attn.has_bias and attn.consumer == Consumer("encoder.self_attn", 8, "out_proj.weight")
    w = "encoder.self_attn.in_proj_weight"
    zeroed = dict((k, i) for k, i in attn.zeroes(1, "hidden") if k != w)
    rows = [i for k, i in attn.zeroes(1, "hidden") if k == w]
    assert rows == [(slice(8, 16),), (slice(24, 32),), (slice(40, 48),)]  # q, k, v rows of head 1 (E = 16)
    assert zeroed["encoder.self_attn.out_proj.weight"] == (slice(None), slice(8, 16))
    assert all(k != "encoder.self_attn.out_proj.weight" for k, _ in attn.zeroes(1, "full"))
    # the encoder's Linear layers are traced inside it: their consumers are found
    assert spec.layers[2].consumer == Consumer("encoder.linear2", 1)
    mha = spec_of(BY_NAME["mha"], mnist)
    assert mha.describe() == "proj[16], attn[2], head[10]"
    assert mha.layers[0].consumer == Consumer("attn", 1, "in_proj_weight")  # self-attention reads proj's unit u


def test_notes_say_what_is_ablated_and_what_regrows(mnist):
    notes = {z.name: spec_of(z, mnist).notes for z in ZOO}
    assert not any("more than once" in n or "never run" in n for ns in notes.values() for n in ns)
    assert not notes["mlp"] and not notes["cnn"] and not notes["bn_mlp"]
    heads = [n for n in notes["transformer"] if "heads" in n]
    assert len(heads) == 1 and "encoder.self_attn" in heads[0] and "2 heads" in heads[0]
    regrow = [n for n in notes["transformer"] if "does not persist" in n]
    assert len(regrow) == 1
    for layer in ("proj (full, hidden", "encoder.self_attn (full:", "encoder.linear2 (full, hidden"):
        assert layer in regrow[0]
    assert "linear1" not in regrow[0] and "head (" not in regrow[0]
    for rnn in ("gru", "lstm"):
        assert len(notes[rnn]) == 1 and "rnn (" in notes[rnn][0] and "never units" in notes[rnn][0]
        assert "recurrent" in notes[rnn][0]
    assert any("embed (Embedding) is never ablated" in n for n in notes["embedding"])
    tied = [n for n in notes["tied"] if "tied weights" in n]
    assert len(tied) == 2  # fc's reader is the tied table; the output layer's rows are the embedding's
    assert "F.linear(h, embed.weight)" in tied[1] and "token u's embedding" in tied[1]
    assert not any("never ablated" in n for n in notes["tied"])
    assert any("LayerNorm" in n and "does not persist" in n for n in notes["ln_mlp"])
    assert any("fc2 (full, hidden: it reaches a sum" in n for n in notes["residual_mlp"])


def test_tied_output_layer_rows_are_the_embeddings(mnist):
    spec = spec_of(BY_NAME["tied"], mnist)
    assert spec.tied == (("embed.weight", ("embed (Embedding)", "F.linear")),)
    out = spec.layers[-1]
    assert out.zeroes(3, "output") == (("embed.weight", (slice(3, 4),)),) and not out.has_bias
    assert spec.layers[0].consumer is None  # its reader's weight is the embedding table: not zeroed


def test_layernorm_belongs_to_its_unit(mnist):
    spec = spec_of(BY_NAME["ln_mlp"], mnist)
    layer = spec.layers[0]
    assert layer.norm == "2" and layer.consumer == Consumer("4", 1)
    assert [k for k, _ in layer.zeroes(0, "full")] == ["1.weight", "1.bias", "2.weight", "2.bias"]


# ------------------------------------------------------------------------------------------
# the rules on small models: activations, norms, tying by module, what fx cannot see


def gelu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 8), nn.GELU(), nn.Linear(8, 3))


def linear_chain() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 3))


def sigmoid_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 8), nn.Sigmoid(), nn.Linear(8, 3))


def tanh_relu() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.ReLU(), nn.Linear(8, 3))


def bn_gelu() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 8, bias=False), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 3))


class GatedRelu(nn.Module):
    """a's units scaled by a gate and a buffer before a ReLU: 0 times anything stays 0."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.g, self.b = nn.Linear(12, 8), nn.Linear(12, 8), nn.Linear(8, 3)
        self.register_buffer("scale", torch.full((8,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x) * torch.sigmoid(self.g(x)) / 2 * self.scale))


class ModuleTied(nn.Module):
    """The output Linear's weight is the embedding's (`head.weight = embed.weight`)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc, self.head = nn.Embedding(3, 8), nn.Linear(8, 8), nn.Linear(8, 3, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(self.embed(t).mean(1))))


def toy(tokens: bool = False, n: int = 96) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (n, 12), generator=g) if tokens else torch.randn(n, 12, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return Dataset("toy", x[:64], y[:64], x[64:80], y[64:80], x[80:], y[80:], "toy")


@pytest.mark.parametrize("make, full, hidden", [
    (gelu_mlp, R, P),  # GELU'(0) = 1/2: full regrows; hidden zeroes the only reader's column
    (linear_chain, R, P),
    (sigmoid_mlp, R, R),  # sigmoid(0) = 1/2: the column reads a constant and regrows
    (tanh_relu, P, P),  # tanh keeps the 0, the ReLU stops the gradient
    (bn_gelu, R, P),  # its BatchNorm's zeroed shift gets GELU's gradient
    (ModuleTied, P, P),
    (GatedRelu, P, P),  # multiplied by a tensor, its 0 stays 0: the ReLU still stops it (it said regrows)
])
def test_rules_agree_with_training(make, full, hidden):
    ds = toy(tokens=make is ModuleTied)
    spec = inspect_model(make(), ds.train_x[:2], 3)
    assert spec.summary_rows()[0]["full"] == full and spec.summary_rows()[0]["hidden"] == hidden
    plan = every_mode(spec)
    pop, _ = ablate_and_train(make, ds, plan)
    assert check_persistence(pop, plan) == []


def test_behind_its_own_scaled_norm_only_the_shift_regrows():
    """A unit with its own BatchNorm before a GELU: the zeroed scale stops every gradient to the
    unit's weights and to itself, so only the shift comes back (a constant unit); psa says so
    rather than that the unit regrows."""
    ds = toy()
    spec = inspect_model(bn_gelu(), ds.train_x[:2], 3)
    why = spec.summary_rows()[0]["why"]
    assert why.startswith("only the shift of its norm 1 regrows (it reaches 3 (Linear) with no ReLU between): the "
                          "norm's zeroed scale keeps the unit's weights and itself at 0, so the unit comes back as a "
                          "constant")
    plan = [("full", 0)]
    pop, _ = ablate_and_train(bn_gelu, ds, plan)
    assert float(pop.params["0.weight"][0][UNIT].abs().max()) == 0.0
    assert float(pop.params["1.weight"][0][UNIT]) == 0.0 and float(pop.params["1.bias"][0][UNIT]) != 0.0
    assert check_persistence(pop, plan) == []  # regrows: not every zeroed entry is 0


def test_weights_tied_by_module_are_zeroed_under_their_one_name():
    """`head.weight = embed.weight`: the population holds it once, as embed.weight; an output
    ablation zeroes that row (it was silently skipped when named head.weight)."""
    ds = toy(tokens=True)
    pop, _ = ablate_and_train(ModuleTied, ds, [("output", 1)])
    assert "head.weight" not in pop.params and pop.params["embed.weight"][0, 1].abs().max() > 0  # regrew
    assert pop.spec.layers[-1].zeroes(2, "output") == (("embed.weight", (slice(2, 3),)),)
    assert pop.spec.tied == (("embed.weight", ("embed (Embedding)", "head (Linear)")),)
    assert any("head (Linear), whose weight is embed.weight" in s and "token u's embedding in embed" in s
               for s in pop.spec.notes)
    eng = ModuleEngine(pop, ds, HP)
    params = {k: v.clone() for k, v in pop.params.items()}
    eng._ablate(params, 0, (((1, 2),),))
    assert params["embed.weight"][0, 2].abs().max() == 0


def row_linear() -> nn.Module:
    """A Linear on each of 3 rows of 4, flattened: unit u's columns in the head are every 8th,
    not a block of 3."""
    return nn.Sequential(nn.Unflatten(1, (3, 4)), nn.Linear(4, 8), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3))


def linear_into_conv() -> nn.Module:
    """A Linear on each of 3 rows (its units: the last dimension) read by a Conv1d whose 3
    channels are the rows."""
    return nn.Sequential(nn.Unflatten(1, (3, 4)), nn.Linear(4, 3), nn.ReLU(), nn.Conv1d(3, 2, 2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4, 3))


class CalledTwice(nn.Module):
    """fc reads inp's units and then its own output: its columns also read fc's units."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc, self.head = nn.Linear(12, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(F.relu(self.fc(F.relu(self.inp(x)))))))


@pytest.mark.parametrize("make, why", [
    (row_linear, "4 reads it in an unknown layout"),
    (CalledTwice, "its reader fc is called more than once"),
    (linear_into_conv, "3 reads it in an unknown layout"),
])
def test_no_consumer_where_its_columns_are_not_the_units(make, why):
    """`hidden` mode zeroes a unit's columns only where they read that unit alone: not a block
    of a Linear's flattened multi-row output (its units are strided), not a Conv's input
    channels after a Linear (its units are the last dimension, the channels dimension 1), and
    not in a reader called on other inputs too (their gradient regrows the columns)."""
    ds = toy()
    spec = inspect_model(make(), ds.train_x[:2], 3)
    assert spec.layers[0].consumer is None and any(f"of {spec.layers[0].name} ({why})" in n for n in spec.notes)
    plan = every_mode(spec)
    pop, _ = ablate_and_train(make, ds, plan)
    assert check_persistence(pop, plan) == []


def pooled_units() -> nn.Module:
    """AvgPool1d over a Linear's output averages neighbouring units: unit 1's zero is no
    longer a zero at the ReLU, whose gradient then regrows it."""
    return nn.Sequential(nn.Linear(12, 8), nn.AvgPool1d(2), nn.ReLU(), nn.Linear(4, 3))


def test_pooling_a_linears_units_is_not_taken_for_a_channel_pooling():
    ds = toy()
    spec = inspect_model(pooled_units(), ds.train_x[:2], 3)
    first = spec.layers[0]
    assert first.consumer is None and first.verdict() == "cannot tell"
    assert any("1 (AvgPool1d) pools the dimensions that hold its units" in n for n in spec.notes)
    pop, _ = ablate_and_train(pooled_units, ds, [("full", 0)])
    assert pop.params["0.weight"][0, UNIT].abs().max() > 0  # psa once said it persists


class ViewBySize(nn.Module):
    """The classic CNN flatten, h.view(h.size(0), -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv1d(1, 4, 3), nn.Linear(40, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x.unsqueeze(1)))
        return self.head(h.view(h.size(0), -1))


def test_reading_the_shape_is_not_a_second_use():
    """h.size(0) reads no unit: the note names the view psa does not follow, not two uses."""
    spec = inspect_model(ViewBySize(), toy().train_x[:2], 3)
    assert [n.split(": ", 1)[1] for n in spec.notes if "consumer" in n] == [
        "no unambiguous consumer of conv (it passes through call_method view); `hidden` mode zeroes only its "
        "incoming weights"]


class TemperatureAfterHead(nn.Module):
    """A learned temperature computed after the logits layer: the last Linear called is 1 wide."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head, self.temp = nn.Linear(12, 8), nn.Linear(8, 3), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        return self.head(h) * F.softplus(self.temp(h))


def test_the_output_layer_is_the_logits_layer_not_the_last_called():
    spec = inspect_model(TemperatureAfterHead(), toy().train_x[:2], 3)
    assert spec.describe() == "a[8], temp[1], head[3]" and spec.n_out == 3 and spec.hidden == (8, 1)
    assert spec.layers[-1].persistence == "the output layer: its logits are in the loss"
    assert spec.layers[-1].zeroes(2, "output") == (("head.weight", (slice(2, 3),)), ("head.bias", (slice(2, 3),)))


class InEncoder(nn.Module):
    """A TransformerEncoder, which fx cannot enter: its layers run inside one opaque call."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.proj(x.view(-1, 3, 4))).mean(1))


def test_what_fx_cannot_see_is_said_not_guessed():
    spec = inspect_model(InEncoder(), torch.randn(2, 12), 3)
    assert spec.describe() == "proj[8], enc.layers.0.self_attn[2], enc.layers.0.linear1[16], " \
                              "enc.layers.0.linear2[8], head[3]"
    inner = spec.layers[2]
    assert inner.persists is None and inner.verdict() == "cannot tell"
    assert inner.persistence == "it runs inside enc (TransformerEncoder), which torch.fx does not trace into"
    assert spec.layers[1].persists is False and spec.layers[1].persists_hidden is True  # heads: decided inside
    assert any("cannot tell whether an ablation persists in enc.layers.0.linear1" in n for n in spec.notes)
    assert not any("more than once" in n for n in spec.notes)

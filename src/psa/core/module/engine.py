"""The Frustration Engine on a ModulePopulation: every member's meta-loop in lockstep, engine
variants included (psa.core.variant; docs/variants.md), through torch.func.

The members train together as vmap over torch.func.functional_call (one AdamW over the stacked
parameters), or, where vmap cannot batch the model, one at a time with plain autograd. Which
path is decided once, before the first loop (choose_batching, which tries vmap on the model:
vmap_blocker), and kept for the whole meta-loop, training and scoring alike, and for the whole
run: the two paths round differently. Every random draw of a member's forward comes from its
own seeded streams (psa.core.module.noise), on either path.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from psa.core import rng
from psa.core.ablation import choose_neurons
from psa.core.data import Dataset
from psa.core.device import is_out_of_memory
from psa.core.errors import ConfigError, one_line
from psa.core.hparams import HParams
from psa.core.loop import (
    EVAL_ROWS,
    Ablations,
    FinishedLoop,
    LoopResult,
    StepCallback,
    batch_sizes,
    loop_result,
    promotion,
    scheduled_members,
)
from psa.core.member import Member
from psa.core.module.checkpoint import module_checkpoint
from psa.core.module.functional import cross_entropy, engine_template, fp32_arithmetic, in_fp32
from psa.core.module.noise import MemberRandomness, Noise, StepDropout, member_forward, member_generator, step_key
from psa.core.module.population import ModulePopulation, TensorDict
from psa.core.optim import adamw_step, member_adamw_step, new_adamw, step_dtype

BATCHED = (True, False, "auto")


def convolutions(model: nn.Module) -> tuple[str, ...]:
    """The names of `model`'s convolution modules (nn.Conv1d/2d/3d and the transposed ones)."""
    return tuple(n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd))


def auto_batched(convs: tuple[str, ...] | list[str], device: torch.device | str) -> tuple[bool, str]:
    """batched="auto" for a model with convolution modules `convs` on `device`: (batched, why),
    `why` one clause for people.

    On a CPU: one member at a time (False) if the model has a convolution, the population (True)
    if it has none; on any other device the population. A rule of the model's structure and the
    device's type, never of a timing, so the same command on the same device always trains on
    the same path (the two paths round differently). The reason: under vmap each convolution
    becomes one grouped convolution, which a CPU runs slower than the members' own convolutions
    one after another, while an MLP's population beats its members one at a time
    (docs/module.md#populations); on a GPU the population fills the device (not timed there).
    """
    kind = torch.device(device).type
    if kind == "cpu" and convs:
        return False, (f"it has {len(convs)} convolution{'s' if len(convs) > 1 else ''}, which a CPU runs slower "
                       f"under vmap (as grouped convolutions)")
    if kind == "cpu":
        return True, "it has no convolution, and on a CPU its population (vmap) is faster"
    return True, f"on {kind} the population (vmap) fills the device"


@dataclass(frozen=True)
class VmapCheck:
    """What trying vmap on a model found: `error`, why it cannot batch it at all; `slow`, an
    operation it batches only by looping over the members (torch's batching fallback)."""

    error: str | None = None
    slow: str | None = None


def vmap_check(population: ModulePopulation, data: Dataset) -> VmapCheck:
    """Try what the batched path runs, on two copies of the first member and two training
    examples: a training step (gradients of the loss, dropout drawn as the engine draws it) and
    a scoring in eval mode. Any error (a missing batching rule, a random operation psa cannot
    draw per member) means vmap cannot batch the model for the whole meta-loop."""
    assert population.template is not None
    holder, randomness = Noise(), MemberRandomness()
    model = engine_template(population.template, population.spec, holder).to(population.device)

    def two(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v[:1].expand(2, *v.shape[1:]).clone() for k, v in t.items()}

    params, buffers = two(population.params), two(population.buffers)
    x = data.train_x[:2].unsqueeze(0).expand(2, *data.train_x[:2].shape)
    y = data.train_y[:2].unsqueeze(0).expand(2, 2)
    units = population.spec.dropout_units
    noise = torch.ones(2, 2, units, device=population.device) if units else None
    # the members' functional dropout as a dropout member draws it (a threshold of 2**31: p = 1/2)
    key = torch.zeros(2, dtype=torch.int64, device=population.device)
    threshold = torch.full((2,), 1 << 31, dtype=torch.int64, device=population.device)
    scale = torch.full((2,), 2.0, device=population.device)

    def loss(p: TensorDict, b: TensorDict, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None,
             key: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        holder.noise = noise
        with member_forward(randomness, StepDropout(key, threshold, scale)):
            return cross_entropy(functional_call(model, (p, b), (x,)), y)

    with warnings.catch_warnings(record=True) as caught, fp32_arithmetic():
        warnings.simplefilter("always")
        try:
            model.train()
            vmap(grad_and_value(loss), in_dims=(0, 0, 0, 0, 0 if units else None, 0, 0, 0))(
                params, buffers, x, y, noise, key, threshold, scale)
            model.eval()
            with torch.no_grad():
                vmap(lambda p, b: functional_call(model, (p, b), (x[0],)))(params, buffers)
        except Exception as e:  # noqa: BLE001 - whatever vmap refuses means: one at a time
            return VmapCheck(error=one_line(e))
        finally:
            holder.noise = None
    slow = next((str(w.message) for w in caught if "batching rule" in str(w.message)), None)
    if slow is not None:
        op = slow.partition("batching rule for ")[2].split(".")[0] or "an operation"
        slow = f"vmap has no batching rule for {op} and would loop over the members"
    return VmapCheck(slow=slow)


def choose_batching(batched: bool | str, convs: tuple[str, ...] | list[str], device: torch.device | str,
                    check: VmapCheck | None = None, name: str = "the model") -> tuple[bool, str]:
    """(members trained together through vmap, why) for the `batched` argument of psa.fit and
    `psa study --batched`: True or False as asked, "auto" by auto_batched's rule. `check`
    (vmap_check's finding on the model) turns "auto" to one member at a time where vmap cannot
    batch the model or only by looping, and refuses True where it cannot (ConfigError). The one
    place the choice is made; the engine is given its result."""
    if not any(batched is b for b in (True, False)) and batched != "auto":
        raise ConfigError(f"batched must be True, False or 'auto', got {batched!r}")
    check = check or VmapCheck()
    if batched is True and check.error is not None:
        raise ConfigError(f"batched=True: torch.func.vmap cannot batch {name} ({check.error}); train it with "
                          f"batched=False (or 'auto')")
    if batched == "auto":
        if check.error is not None or check.slow is not None:
            return False, f"auto: vmap cannot batch it ({check.error or check.slow})"
        together, why = auto_batched(convs, device)
        return together, f"auto: {why}"
    return bool(batched), ("batched=True: the members together (vmap)" if batched
                           else "batched=False: one member at a time")


def batching_text(batched: bool, why: str) -> str:
    """For people: "the members together (vmap) (why)" or "one member at a time (why)"."""
    return f"{'the members together (vmap)' if batched else 'one member at a time'} ({why})"


@dataclass(frozen=True)
class LoopDropout:
    """The dropout of a slice's members for one meta-loop: the keys of their nn.Dropout masks
    and of their functional dropout (C, 2) each, and their rates' thresholds and scales (C,)."""

    keys: torch.Tensor
    fkeys: torch.Tensor
    threshold: torch.Tensor
    scale: torch.Tensor


def _per_member(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(C,) per-member values shaped to broadcast over a stacked (C, ...) tensor."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class MemberMoments:
    """AdamW's moments of stacked (C, ...) parameters with a step count per member, for a slice
    of members where some member's optimizer state persists (psa.core.optim.member_adamw_step).
    `rows` steps some of the members (the one-at-a-time path)."""

    def __init__(self, params: TensorDict, hp: HParams) -> None:
        self.exp_avg = {k: torch.zeros_like(v) for k, v in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in params.items()}
        first = next(iter(params.values()))
        self.steps = torch.zeros(first.shape[0], dtype=step_dtype(first.device), device=first.device)
        self.hp = hp

    def step(self, params: TensorDict, grads: TensorDict, rows: slice = slice(None)) -> None:
        """One AdamW step of members `rows` (params and grads hold just those rows)."""
        member_adamw_step(((p, grads[k], self.exp_avg[k][rows], self.exp_avg_sq[k][rows]) for k, p in params.items()),
                          self.steps[rows], self.hp, member_dim=0)


class ModuleEngine:
    """The Frustration Engine on a ModulePopulation (psa.core.loop.Trainer)."""

    def __init__(self, population: ModulePopulation, data: Dataset, hparams: HParams, batched: bool = True,
                 batching: str = "", max_members: int | None = None, eval_rows: int = EVAL_ROWS) -> None:
        """`batched`: True vmaps the members together, False trains them one at a time with
        plain autograd (choose_batching decides it; `batching` says why); `max_members`: members
        trained at once (None: all, halved on out-of-memory); `eval_rows`: validation images per
        evaluation block."""
        if data.train_x.device != population.device:
            raise ConfigError(f"data on {data.train_x.device} but population on {population.device}")
        if not any(batched is b for b in (True, False)):
            raise ConfigError(f"batched must be True or False here (choose_batching resolves 'auto'), got {batched!r}")
        self.population, self.data, self.hp = population, data, hparams
        self.batched = batched
        self.batching = batching or choose_batching(batched, (), population.device)[1]
        self._on_step: StepCallback | None = None  # launch's callback, while it runs
        self.members_at_once = max_members or population.size
        self.eval_rows = eval_rows
        self.holder = Noise()
        self.randomness = MemberRandomness()
        assert population.template is not None
        self.model = engine_template(population.template, population.spec, self.holder).to(population.device)
        units = population.spec.dropout_units
        self.pos_hash = rng.position_hash(hparams.batch_size, units, population.device) if units else None

    # ------------------------------------------------------------ member settings
    # Everything a member's settings decide is read here: its ablations, weight decay, dropout
    # rate, and (_follow_schedules) its mode.
    def _ablations(self, loop: int) -> Ablations:
        """Every (unit layer, unit) each member ablates at `loop` (psa.core.ablation.choose_neurons
        over the model's unit layers: a plain MLP gets its SimpleMLP's neurons)."""
        arch = self.population.spec.arch
        return tuple(choose_neurons(arch, m.mode, m.seed, loop, m.variant, self.hp.meta_loops)
                     for m in self.population.members)

    def _follow_schedules(self, loop: int) -> None:
        """Members on a mode schedule switch mode at a loop boundary, as psa's engine does: the
        new mode's rates (HParams.member) and a mode_history entry."""
        pop = self.population
        pop.members = scheduled_members(pop.members, self.hp, loop, pop.mode_history)

    def _decay(self, members: tuple[Member, ...]) -> torch.Tensor | None:
        """(C,) AdamW's decoupled decay factor 1 - lr*wd per member (float32), or None if 1."""
        f = torch.tensor([1.0 - self.hp.lr * m.weight_decay for m in members], dtype=torch.float32)
        return None if bool((f == 1.0).all()) else f.to(self.population.device)

    def _dropout(self, members: tuple[Member, ...], loop: int) -> LoopDropout | None:
        """The members' dropout at `loop`, or None where none of them drops."""
        if not any(m.dropout > 0 for m in members):
            return None
        dev = self.population.device
        keys = torch.tensor([rng.loop_keys(m.seed, "dropout", loop) for m in members], dtype=torch.int64)
        fkeys = torch.tensor([rng.loop_keys(m.seed, "functional-dropout", loop) for m in members],
                             dtype=torch.int64)
        thr = torch.tensor([rng.dropout_threshold(m.dropout) for m in members], dtype=torch.int64)
        p = torch.tensor([m.dropout for m in members], dtype=torch.float32)
        return LoopDropout(keys.to(dev), fkeys.to(dev), thr.to(dev), (torch.ones(len(members)) / (1.0 - p)).to(dev))

    def _noise(self, drop: LoopDropout | None, step: int, rows: int) -> torch.Tensor | None:
        """(C, rows, units) multipliers of the nn.Dropout modules at `step`, or None."""
        if drop is None or self.pos_hash is None:
            return None
        keys = rng.step_keys(drop.keys, torch.tensor(step, dtype=torch.int64, device=self.population.device))
        return rng.dropout_noise(self.pos_hash[:rows], keys, drop.threshold, drop.scale)

    # ------------------------------------------------------------ ablation
    @torch.no_grad()
    def _ablate(self, tensors: TensorDict, m0: int, ablated: Ablations) -> None:
        """Zero in `tensors` (a slice's parameters, or AdamW moments keyed alike) what each
        member j's ablations name, in its mode (psa.core.module.units.UnitLayer.zeroes)."""
        layers = self.population.spec.layers
        for j, units in enumerate(ablated):
            mode = self.population.members[m0 + j].mode
            for layer_index, u in units:
                for key, index in layers[layer_index].zeroes(u, mode):
                    tensors[key][j][index].zero_()

    # ------------------------------------------------------------ one loop
    def _loss(self, params: TensorDict, buffers: TensorDict, x: torch.Tensor, y: torch.Tensor,
              noise: torch.Tensor | None, key: torch.Tensor | None, threshold: torch.Tensor | None,
              scale: torch.Tensor | None) -> torch.Tensor:
        """A member's mean loss on (x, y); `noise` its nn.Dropout modules' multipliers; `key`,
        `threshold` and `scale` its functional dropout at this step (None: no member drops)."""
        self.holder.noise = noise
        step = None if key is None else StepDropout(key, threshold, scale)  # type: ignore[arg-type]
        try:
            with member_forward(self.randomness, step):
                out = functional_call(self.model, (params, buffers), (x,))
        finally:
            self.holder.noise = None
        return cross_entropy(out, y)

    def _steps(self) -> list[int]:
        return batch_sizes(self.data.train_x.shape[0], self.hp.batch_size)

    def _train_batched(self, params: TensorDict, buffers: TensorDict, members: tuple[Member, ...], loop: int,
                       moments: MemberMoments | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch of the members in `params` (C, ...) together; (loss sum, diverged) (C,)."""
        dev, data, hp = self.population.device, self.data, self.hp
        c = len(members)
        order = rng.data_order([m.seed for m in members], loop, data.train_x.shape[0], dev)
        names = list(params)
        opt = new_adamw([params[k] for k in names], hp) if moments is None else None
        decay = self._decay(members)
        drop = self._dropout(members, loop)
        noisy = None if drop is None else 0
        step_grad = vmap(grad_and_value(self._loss),
                         in_dims=(0, 0, 0, 0, 0 if self.pos_hash is not None and drop else None, noisy, noisy, noisy))
        loss_sum = torch.zeros(c, device=dev)
        diverged = torch.zeros(c, dtype=torch.bool, device=dev)
        self.model.train()
        for s, b in enumerate(self._steps()):
            idx = order[:, s * hp.batch_size : s * hp.batch_size + b]
            x = data.train_x[idx.reshape(-1)].view(c, b, *data.train_x.shape[1:])
            y = data.train_y[idx]
            f = (None, None, None) if drop is None else (step_key(drop.fkeys, s), drop.threshold, drop.scale)
            grads, loss = step_grad(params, buffers, x, y, self._noise(drop, s, b), *f)
            loss_sum += loss.detach()
            diverged |= ~torch.isfinite(loss.detach())
            with torch.no_grad():
                if decay is not None:
                    for k in names:
                        params[k].mul_(_per_member(decay, params[k]))
                if moments is not None:
                    moments.step(params, grads)
                else:
                    for k in names:
                        params[k].grad = grads[k]
                    assert opt is not None
                    adamw_step(opt)
            if self._on_step is not None:
                self._on_step(s + 1, len(self._steps()))
        for k in names:
            params[k].grad = None
        return loss_sum, diverged

    def _train_single(self, params: TensorDict, buffers: TensorDict, members: tuple[Member, ...], loop: int,
                      moments: MemberMoments | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The same epoch one member after another with plain autograd (models vmap cannot batch)."""
        dev, data, hp = self.population.device, self.data, self.hp
        c = len(members)
        loss_sum = torch.zeros(c, device=dev)
        diverged = torch.zeros(c, dtype=torch.bool, device=dev)
        decay = self._decay(members)
        self.model.train()
        for j, mem in enumerate(members):
            order = rng.data_order([mem.seed], loop, data.train_x.shape[0], dev)[0]
            # (1, ...) rows of the slice's tensors: trained in place, stepped like a slice of one
            p_j = {k: v[j : j + 1].detach().requires_grad_() for k, v in params.items()}
            b_j = {k: v[j] for k, v in buffers.items()}
            opt = new_adamw(list(p_j.values()), hp) if moments is None else None
            drop = self._dropout((mem,), loop)
            for s, b in enumerate(self._steps()):
                idx = order[s * hp.batch_size : s * hp.batch_size + b]
                noise = self._noise(drop, s, b)
                f = (None, None, None) if drop is None else (step_key(drop.fkeys, s)[0], drop.threshold[0],
                                                             drop.scale[0])
                for v in p_j.values():
                    v.grad = None
                # what the model draws beyond psa's dropouts comes from the member's own generator
                try:
                    with member_generator(mem.seed, loop, s, dev):
                        loss = self._loss({k: v[0] for k, v in p_j.items()}, b_j, data.train_x[idx],
                                          data.train_y[idx], None if noise is None else noise[0], *f)
                        loss.backward()
                except Exception as e:  # noqa: BLE001 - the model's own failure (a BatchNorm on 1 example) is one line
                    if is_out_of_memory(e):
                        raise
                    raise ConfigError(f"{self.population.factory} fails in training on a batch of {b} example"
                                      f"{'s' if b > 1 else ''} (step {s + 1} of loop {loop}): {one_line(e)}") from None
                loss_sum[j] += loss.detach()
                diverged[j] |= ~torch.isfinite(loss.detach())
                with torch.no_grad():
                    if decay is not None:
                        for v in p_j.values():
                            v.mul_(decay[j])
                    if moments is not None:
                        moments.step(p_j, {k: v.grad for k, v in p_j.items()}, slice(j, j + 1))
                    else:
                        assert opt is not None
                        adamw_step(opt)
                if self._on_step is not None:  # the slice's steps, member after member
                    n = len(self._steps())
                    self._on_step(j * n + s + 1, c * n)
            for v in p_j.values():
                v.grad = None
        return loss_sum, diverged

    @torch.no_grad()
    def count_correct(self, params: TensorDict, buffers: TensorDict, x_all: torch.Tensor,
                      y_all: torch.Tensor) -> torch.Tensor:
        """(C,) correct predictions of each member (eval mode) on (x_all, y_all)."""
        c = next(iter(params.values())).shape[0]
        correct = torch.zeros(c, dtype=torch.int64, device=self.population.device)
        self.model.eval()
        try:
            for r0 in range(0, x_all.shape[0], self.eval_rows):
                x, y = x_all[r0 : r0 + self.eval_rows], y_all[r0 : r0 + self.eval_rows]
                if self.batched:
                    out = vmap(lambda p, b: functional_call(self.model, (p, b), (x,)))(params, buffers)
                else:
                    out = torch.stack([functional_call(self.model, ({k: v[j] for k, v in params.items()},
                                                                    {k: v[j] for k, v in buffers.items()}), (x,))
                                       for j in range(c)])
                correct += (out.argmax(dim=2) == y).sum(dim=1)
        finally:
            self.model.train()
        return correct

    def _begin(self, m0: int, m1: int, ablated: Ablations) -> tuple[TensorDict, TensorDict, MemberMoments | None]:
        """A slice's candidates (the LKG rows, ablated) and, where some member persists its
        optimizer state, its per-member AdamW state (the LKG's for those members, fresh for the
        rest, the ablated units' moments zeroed)."""
        pop = self.population
        params = {k: v[m0:m1].clone() for k, v in pop.params.items()}
        buffers = {k: v[m0:m1].clone() for k, v in pop.buffers.items()}
        self._ablate(params, m0, ablated[m0:m1])
        members = pop.members[m0:m1]
        if not any(m.variant.optimizer_state == "persist" for m in members):
            return params, buffers, None
        assert pop.opt_avg is not None and pop.opt_sq is not None and pop.opt_step is not None
        moments = MemberMoments(params, self.hp)
        keep = torch.tensor([m.variant.optimizer_state == "persist" for m in members], device=pop.device)
        for src, dst in ((pop.opt_avg, moments.exp_avg), (pop.opt_sq, moments.exp_avg_sq)):
            for k, v in dst.items():
                v.copy_(torch.where(_per_member(keep, v), src[k][m0:m1], v))
        moments.steps.copy_(torch.where(keep, pop.opt_step[m0:m1], moments.steps))
        self._ablate(moments.exp_avg, m0, ablated[m0:m1])  # an ablated unit's moments die with it
        self._ablate(moments.exp_avg_sq, m0, ablated[m0:m1])
        return params, buffers, moments

    def _run_slice(self, m0: int, m1: int, loop: int, ablated: Ablations) -> tuple[torch.Tensor, ...]:
        pop = self.population
        members = pop.members[m0:m1]
        fixed = tuple(a if m.variant.fixed else () for a, m in zip(ablated[m0:m1], members))
        fell_back = ""  # vmap's error, said once the members trained one at a time (else the model's own)
        while True:
            params, buffers, moments = self._begin(m0, m1, ablated)
            try:
                train = self._train_batched if self.batched else self._train_single
                # a parameter built with requires_grad=False reaches the model as a constant, as
                # torch's own optimizers leave it: no gradient, no step, no decay
                trained = {k: v for k, v in params.items() if k not in pop.frozen}
                constants = {**buffers, **{k: v for k, v in params.items() if k in pop.frozen}}
                loss, diverged = train(trained, constants, members, loop, moments)
                if any(fixed):  # a fixed set stays dead: re-zeroed where it could regrow (output rows)
                    self._ablate(params, m0, fixed)
                    if moments is not None:
                        self._ablate(moments.exp_avg, m0, fixed)
                        self._ablate(moments.exp_avg_sq, m0, fixed)
                correct = self.count_correct(params, buffers, self.data.val_x, self.data.val_y)
                if fell_back:
                    warnings.warn(f"psa: torch.func.vmap cannot batch {pop.factory} ({fell_back}); training its "
                                  f"members one at a time", RuntimeWarning, stacklevel=3)
                break
            except Exception as e:  # noqa: BLE001 - only vmap's limits fall back
                if not self.batched or is_out_of_memory(e):
                    raise
                # vmap_check tries the model before the first loop; this catches what only some
                # data or a later loop reaches. The slice starts over on the other path, whole.
                why = fell_back = one_line(e)
                self.batched = False
                self.batching = f"vmap cannot batch it ({why}): one member at a time"
        with torch.no_grad():
            promote, forced, improved = self._promote(m0, m1, correct, diverged)
            for store, cand in ((pop.params, params), (pop.buffers, buffers)):
                for k, v in cand.items():
                    dst = store[k][m0:m1]
                    dst.copy_(torch.where(_per_member(promote, v), v, dst))
            if pop.bounty_state is not None:
                for k, v in {**params, **buffers}.items():
                    dst = pop.bounty_state[k][m0:m1]
                    dst.copy_(torch.where(_per_member(improved, v), v, dst))
            if moments is not None:
                assert pop.opt_avg is not None and pop.opt_sq is not None and pop.opt_step is not None
                persist = torch.tensor([m.variant.optimizer_state == "persist" for m in members], device=pop.device)
                keep = promote & persist
                for src, store in ((moments.exp_avg, pop.opt_avg), (moments.exp_avg_sq, pop.opt_sq)):
                    for k, v in src.items():
                        dst = store[k][m0:m1]
                        dst.copy_(torch.where(_per_member(keep, v), v, dst))
                lkg_step = pop.opt_step[m0:m1]
                lkg_step.copy_(torch.where(keep, moments.steps, lkg_step))
        return correct, promote, loss / len(self._steps()), diverged, forced, improved

    def _promote(self, m0: int, m1: int, correct: torch.Tensor, diverged: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The promotion decision of members m0..m1 (psa.core.loop.promotion): updates the LKG
        scores and the patience state; returns (promote, forced, improved)."""
        pop = self.population
        patience = None
        if pop.streak is not None:
            assert pop.allowance is not None and pop.bounty_correct is not None
            patience = (pop.streak[m0:m1], pop.allowance[m0:m1], pop.bounty_correct[m0:m1])
        return promotion(correct, diverged, pop.lkg_correct[m0:m1], self.hp, pop.members[m0:m1], patience)

    @in_fp32
    def launch(self, on_step: StepCallback | None = None) -> FinishedLoop:
        """Run the next meta-loop of every member (torch.func trains synchronously, so the loop
        is done when this returns). `on_step(step, steps)` is called after every training step of
        each slice of members trained at once (one member at a time: the slice's members' steps
        one after another). The population moves forward by one loop."""
        t0 = time.perf_counter()
        pop = self.population
        loop = pop.loop + 1
        self._follow_schedules(loop)
        ablated = self._ablations(loop)
        outs: list[tuple[torch.Tensor, ...]] = []
        m0 = 0
        self._on_step = on_step
        while m0 < pop.size:
            m1 = min(pop.size, m0 + self.members_at_once)
            try:
                outs.append(self._run_slice(m0, m1, loop, ablated))
            except Exception as e:  # noqa: BLE001
                if not is_out_of_memory(e) or self.members_at_once <= 1:
                    raise
                self.members_at_once = max(1, self.members_at_once // 2)  # nothing of this slice was promoted yet
                continue
            m0 = m1
        self._on_step = None
        names = ("correct", "promoted", "loss", "diverged", "forced", "improved")
        outcome: dict[str, list[Any]] = {n: torch.cat(t).tolist() for n, t in zip(names, zip(*outs))}
        outcome["lkg_correct"] = pop.lkg_correct.tolist()
        pop.loop = loop
        return FinishedLoop(loop_result(pop, self.hp, loop, ablated, outcome, t0))

    def meta_loop(self, on_step: StepCallback | None = None) -> LoopResult:
        """One meta-loop for every member: launch(...).result()."""
        return self.launch(on_step).result()

    @in_fp32
    def test_accuracy(self) -> list[float]:
        """Test-set accuracy (%) of every member's bounty model (its LKG, unless it has patience)."""
        model = self.population.bounty_model()
        params = {k: model[k] for k in self.population.params}
        buffers = {k: model[k] for k in self.population.buffers}
        correct = self.count_correct(params, buffers, self.data.test_x, self.data.test_y)
        return [100.0 * c / self.data.test_y.numel() for c in correct.tolist()]

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The population's whole state as (tensors, metadata) (psa.core.module.checkpoint)."""
        return module_checkpoint(self.population)

"""Flag groups that several commands share: training hyperparameters and the engine's execution."""

from __future__ import annotations

import argparse

from psa.cli.argtypes import dataset_spec, positive_int, real
from psa.core.device import AUTO_CPU_STACK_MAX_WIDTH, AUTO_STACK_MAX_WIDTH, KERNEL_CHOICES
from psa.core.errors import ConfigError
from psa.core.hparams import BLOCK_DROPOUT, DIVERGED_CHOICES, HParams
from psa.core.model import MODELS, check_model_name
from psa.core.precision import CHOICES as PRECISION_CHOICES

PAPER = HParams()


def add_training_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--lr, --batch-size, --weight-decay, --dropout, --diverged (each None unless given), --device, --dataset,
    --data-dir."""
    p.add_argument("--lr", type=real, help=f"AdamW learning rate (default {PAPER.lr:g})")
    p.add_argument("--batch-size", type=positive_int, help=f"training batch size (default {PAPER.batch_size})")
    p.add_argument("--weight-decay", type=real,
                   help=f"weight decay of `decay` mode (default {PAPER.weight_decay:g}; 0 in other modes)")
    p.add_argument("--dropout", type=real,
                   help=f"dropout rate of `dropout` mode (default {PAPER.dropout:g}; none in other modes)")
    p.add_argument("--diverged", choices=DIVERGED_CHOICES,
                   help="a candidate whose loss went non-finite: score it on what its NaN logits predict and "
                        "promote it like any other, as the authors' harness does (score, the default), or never "
                        "promote it and record its accuracy as missing (discard)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dataset", type=dataset_spec, metavar="NAME",
                   help="mnist (default), fashion-mnist, cifar10 or npz:PATH (docs/datasets.md)")
    p.add_argument("--data-dir",
                   help="directory with the data set's files: the four idx files, or cifar-10-binary.tar.gz "
                        "(else $PSA_DATA_DIR, the shipped copy, ./dataset)")


def model_name(text: str) -> str:
    """argparse type of --model: one of psa.core.model.MODELS (check_model_name says which)."""
    if ":" in text:
        raise argparse.ArgumentTypeError(
            f"{text}: your own model (module:function) trains in a study, e.g. psa study --model {text} --modes "
            f"none,hidden --trials 1, or with psa.fit (docs/module.md); psa train and psa arch take simplemlp or "
            f"resmlp")
    try:
        return check_model_name(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def model_or_factory(text: str) -> str:
    """argparse type of psa study's --model: one of psa.core.model.MODELS, or your own model as
    a factory module:function (imported when the study starts)."""
    if ":" in text:
        return text
    try:
        return check_model_name(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup, knobs: bool = True,
                    factories: bool = False) -> None:
    """--model (None unless given) and, with `knobs`, ResMLP's research knobs --block-dropout
    and --base-weight-decay (None unless given). With `factories`, --model also takes your own
    model as module:function, repeatable (a list)."""
    if factories:
        p.add_argument("--model", type=model_or_factory, action="append",
                       metavar="{" + ",".join(MODELS) + "} | MODULE:FUNCTION",
                       help="the net an architecture describes: simplemlp (the paper's, default) or resmlp (D*W = D "
                            "residual blocks of width W); or your own model, a function returning an nn.Module, e.g. "
                            "mypkg.models:make_cnn, without --arch (repeatable: one cell per factory; docs/module.md)")
    else:
        p.add_argument("--model", type=model_name, metavar="{" + ",".join(MODELS) + "}",
                       help="the net an architecture describes: simplemlp (the paper's, default) or resmlp "
                            "(D*W = D residual blocks of width W)")
    if not knobs:
        return
    p.add_argument("--block-dropout", choices=BLOCK_DROPOUT,
                   help="resmlp: dropout inside the residual blocks in `dropout` mode only (mode, default) or in "
                        "every mode at the --dropout rate (always; the authors' first ResMLP runs)")
    p.add_argument("--base-weight-decay", type=real,
                   help="AdamW weight decay of every mode except `decay`, which uses --weight-decay (default 0; "
                        "the authors' first ResMLP runs had PyTorch's default 0.01)")


def add_engine_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup, precision_default: str | None,
                     precision_note: str) -> None:
    """How the engine runs its arithmetic (not what it computes): --precision, --kernels, --no-graphs."""
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=precision_default,
                   help="matmul precision: fp32, tf32 (tensor cores; emulated off a GPU), bf16, or auto: tf32 on a "
                        f"CUDA GPU, fp32 elsewhere; {precision_note}")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                   help="auto: on a CUDA GPU with Triton installed, Triton kernels for dropout and for hidden "
                        f"stacks of one width up to {AUTO_STACK_MAX_WIDTH}; on a CPU in fp32, the fused CPU step "
                        f"(compiled C++) for nets whose hidden layers are one width up to {AUTO_CPU_STACK_MAX_WIDTH}; "
                        "torch: neither; "
                        "triton: always Triton (needs a GPU or TRITON_INTERPRET=1)")
    p.add_argument("--no-graphs", action="store_true",
                   help="on a GPU, run every training step eagerly instead of replaying a captured CUDA graph")


def add_variant_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The engine variant's settings (psa.core.variant; each None unless given): the paper's
    future work. docs/variants.md says what each does."""
    p.add_argument("--patience", type=int, metavar="K",
                   help="Frustration with Patience: after K discarded candidates in a row accept the next one "
                        "even if worse (0 = the paper's greedy engine, the default)")
    p.add_argument("--patience-growth", type=int, metavar="G",
                   help="the allowance grows to K*G, K*G^2, ... after each forced acceptance (default 2)")
    p.add_argument("--optimizer-state", choices=["reset", "persist"],
                   help="reset: a fresh AdamW every meta-loop (the paper's); persist: its state travels with the LKG")
    p.add_argument("--ablate", metavar="N|P%", help="neurons ablated per meta-loop, or a percentage of the eligible "
                                                     "ones, at least one (default 1)")
    p.add_argument("--ablate-layers", metavar="LAYERS",
                   help="comma-separated Linear layers that may be ablated: indices (0 = first hidden), "
                        "last-hidden, output (default: the mode's)")
    p.add_argument("--ablate-schedule", metavar="SCHEDULE",
                   help="constant (default), linear (decay to zero over the run) or step:L (stop at loop L)")
    p.add_argument("--fixed-ablation", action="store_const", const=True, default=None,
                   help="one seeded set of neurons, dead from loop 1 and re-zeroed after every epoch, instead of "
                        "fresh draws every loop")
    p.add_argument("--schedule", metavar="MODE:LOOPS,...",
                   help='train in one mode, then another, e.g. "dropout:50,hidden:50" (the loops sum to the run\'s)')


def variant_settings(args: argparse.Namespace) -> dict[str, object]:
    """The variant settings given on the command line (as Variant.from_settings reads them)."""
    names = {"patience": "patience", "patience_growth": "patience_growth", "optimizer_state": "optimizer_state",
             "ablate": "ablate", "ablate_layers": "ablate_layers", "ablate_schedule": "ablate_schedule",
             "fixed_ablation": "fixed", "schedule": "schedule"}
    return {field: getattr(args, flag) for flag, field in names.items() if getattr(args, flag, None) is not None}

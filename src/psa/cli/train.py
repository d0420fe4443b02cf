"""`psa arch` and `psa train`: flags onto a TrialConfig, and the call."""

from __future__ import annotations

import argparse
import json
from typing import Any

from psa.cli.argtypes import dataset_spec, positive_int, seed_int
from psa.cli.flags import (
    PAPER,
    add_engine_flags,
    add_model_flags,
    add_training_flags,
    add_variant_flags,
    variant_settings,
)
from psa.core.arch import matched_arch, parse_arch
from psa.core.model import DEFAULT_MODEL, layer_table, param_count
from psa.core.errors import ConfigError
from psa.core.member import MODES


def cmd_arch(args: argparse.Namespace) -> int:
    """Print the layer table and parameter count of an architecture."""
    from psa.study.console import arch_table, out_console

    from psa.core.data import dataset_shape

    n_in, n_out = dataset_shape(args.dataset)
    arch = parse_arch(args.arch, n_in, n_out)
    model = args.model or DEFAULT_MODEL
    if args.match and model != DEFAULT_MODEL:
        raise ConfigError("--match solves equation 2, which counts SimpleMLP parameters: not with --model resmlp")
    matches = [matched_arch(arch, d) for d in args.match or []]
    if args.json:
        print(json.dumps({
            "arch": str(arch),
            "dataset": args.dataset,
            **({} if model == DEFAULT_MODEL else {"model": model}),
            "n_in": arch.n_in,
            "n_out": arch.n_out,
            "params": param_count(arch, model),
            "layers": [{"name": n, "in": a, "out": b, "params": p} for n, a, b, p in layer_table(arch, model)],
            "matched": [{"arch": str(m), "params": m.params} for m in matches],
        }, indent=1))
        return 0
    out_console.print(arch_table(arch, model=model))
    for m in matches:
        out_console.print(f"depth {m.depth}: {m.short} has {m.params:,} parameters "
                          f"({m.params - arch.params:+,} against {arch.short})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train one trial (or resume one) and print its summary."""
    from psa.study.train import TrialConfig, train

    cfg = TrialConfig(
        arch=args.arch, mode=args.mode, meta_loops=args.meta_loops, seed=args.seed, lr=args.lr,
        batch_size=args.batch_size, weight_decay=args.weight_decay, dropout=args.dropout, diverged=args.diverged,
        device=args.device, model=args.model, block_dropout=args.block_dropout,
        base_weight_decay=args.base_weight_decay,
        dataset=args.dataset, data_dir=args.data_dir, out=args.out, resume=args.resume, quiet=args.json,
        precision=args.precision, kernels=args.kernels, graphs=not args.no_graphs, variant=variant_settings(args),
    )
    summary = train(cfg)
    if args.json:
        print(json.dumps(summary, indent=1))
    return 0


def register(sub: Any) -> None:
    """Add `arch` and `train` to psa's subcommands."""
    p = sub.add_parser("arch", help="show an architecture's layers and parameter count")
    p.add_argument("arch", help='e.g. "[2*128, 4*64]" or 1*2048')
    p.add_argument("--match", type=positive_int, nargs="+", metavar="DEPTH",
                   help="also print the parameter-matched DEPTH*W net (equation 2)")
    p.add_argument("--dataset", type=dataset_spec, default="mnist", metavar="NAME",
                   help="the data set whose input size and class count the net has (default mnist: 784 and 10)")
    add_model_flags(p, knobs=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_arch)

    p = sub.add_parser("train", help="train one trial with the Frustration Engine")
    p.add_argument("--arch", help='hidden layers, e.g. "[1*128]" or "[2*128, 4*64]"')
    p.add_argument("--mode", "--ablation-mode", dest="mode", choices=MODES, help="training mode (default none)")
    p.add_argument("--meta-loops", type=positive_int,
                   help=f"meta-loops to run (default {PAPER.meta_loops}; on resume: this many more)")
    p.add_argument("--seed", type=seed_int, help="seed of the initial weights and random streams (default 0)")
    add_training_flags(p)
    add_model_flags(p)
    add_variant_flags(p.add_argument_group("engine variants (the paper's future work; docs/variants.md)"))
    p.add_argument("--out", help="run directory (must be new or empty; default runs/ARCH-MODE-seedN)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run, optionally in another --mode")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary instead of progress")
    add_engine_flags(p, None, "on resume, the run's own")
    p.set_defaults(func=cmd_train)

"""`sdtorch train` and `sdtorch train-vae`: flags generated from the trainers' argument dataclasses.

The same command runs under `torchrun --nproc_per_node N` for DistributedDataParallel training.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
import warnings


def _add_dataclass_flags(p: argparse.ArgumentParser, cls, positional: tuple[str, ...]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if f.name in positional:
            p.add_argument(f.name)
            continue
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif typing.get_origin(kind) is list:
            p.add_argument(flag, nargs="*", default=default, help=f"default: {default}")
        else:
            base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # X | None -> X
            p.add_argument(flag, type=base, default=default, required=required, help=f"default: {default}")


def _run(cls, fn, args) -> None:
    """Build the argument dataclass (the trainer checks it) and train; warnings print as one line each."""
    names = {f.name for f in dataclasses.fields(cls)}
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: print(f"sdtorch: warning: {message}", file=sys.stderr)
        out = fn(cls(**{k: v for k, v in vars(args).items() if k in names}))
    print(f"wrote {out}")


def add_commands(sub) -> None:
    from .training.autoencoder import VAETrainArgs
    from .training.diffusion import TrainArgs

    p = sub.add_parser("train", help="train the text-conditioned UNet (and text encoder) on an image folder")
    _add_dataclass_flags(p, TrainArgs, positional=("data", "output"))
    p.set_defaults(func=lambda a: _run(TrainArgs, _train_fn("diffusion"), a))

    p = sub.add_parser("train-vae", help="train the autoencoder on an image folder")
    _add_dataclass_flags(p, VAETrainArgs, positional=("data", "output"))
    p.set_defaults(func=lambda a: _run(VAETrainArgs, _train_fn("autoencoder"), a))


def _train_fn(module: str):
    import importlib

    return importlib.import_module(f"sdtorch.training.{module}").train

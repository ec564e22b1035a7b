"""`sdtorch train`, `train-vae` and `train-lora`: flags generated from the trainers' argument dataclasses.

The same command runs under `torchrun --nproc_per_node N` for DistributedDataParallel training.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import typing
import warnings


# The option groups of `--help`, in this order: each argument field names its group (training/common.option).
GROUPS = {"data": "data", "model": "model", "loss": "loss", "optimisation": "optimisation",
          "performance": "memory and speed", "checkpoints": "checkpoints and resuming",
          "lora": "LoRA network", "output": "output and logging"}


def _add_dataclass_flags(p: argparse.ArgumentParser, cls, positional: tuple[str, ...]) -> None:
    """One flag per field of `cls` (a positional for the names in `positional`), under its group, with its
    help and default: "(default: X)" is added unless the help already says what the default is."""
    hints = typing.get_type_hints(cls)
    used = {f.metadata["group"] for f in dataclasses.fields(cls)}
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items() if key in used}
    for f in dataclasses.fields(cls):
        kind, group = hints[f.name], groups[f.metadata["group"]]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata["help"].replace("%", "%%")  # argparse %-formats help texts
        if f.name in positional:
            group.add_argument(f.name, help=text)
            continue
        flag = "--" + f.name.replace("_", "-")
        if "(default:" not in text:
            text += " (required)" if required else f" (default: {_shown(default)})"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif typing.get_origin(kind) is list:
            group.add_argument(flag, nargs="*", default=default, help=text)
        else:
            base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # X | None -> X
            group.add_argument(flag, type=base, default=default, required=required, help=text)


def _shown(default) -> str:
    """A default as the user reads it: on or off for a switch, a list as the shell words to type."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list):
        return shlex.join(default)
    return str(default)


def _run(cls, fn, args) -> None:
    """Build the argument dataclass (the trainer checks it) and train; warnings print as one line each."""
    names = {f.name for f in dataclasses.fields(cls)}
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: print(f"sdtorch: warning: {message}", file=sys.stderr)
        out = fn(cls(**{k: v for k, v in vars(args).items() if k in names}))
    print(f"wrote {out}")


def add_commands(sub) -> None:
    from ..training.autoencoder import VAETrainArgs
    from ..training.diffusion import TrainArgs
    from ..training.lora import LoraTrainArgs

    p = sub.add_parser("train", help="train the text-conditioned UNet (and text encoder) on an image folder")
    _add_dataclass_flags(p, TrainArgs, positional=("data", "output"))
    p.set_defaults(func=lambda a: _run(TrainArgs, _train_fn("diffusion"), a))

    p = sub.add_parser("train-vae", help="train the autoencoder on an image folder")
    _add_dataclass_flags(p, VAETrainArgs, positional=("data", "output"))
    p.set_defaults(func=lambda a: _run(VAETrainArgs, _train_fn("autoencoder"), a))

    p = sub.add_parser("train-lora", help="train a LoRA (low-rank adapters) on a frozen model from an image folder")
    _add_dataclass_flags(p, LoraTrainArgs, positional=("data", "output"))
    p.set_defaults(func=lambda a: _run(LoraTrainArgs, _train_fn("lora"), a))


def _train_fn(module: str):
    import importlib

    return importlib.import_module(f"sdtorch.training.{module}").train

"""Checks of the trainers' (and the shapes tools') arguments, run before anything is read or written.

Each check names the flag, says what is allowed and shows the value given, in one line, so the CLI and
the Python API (`train(TrainArgs(...))`) report a bad value the same way and a refused run leaves no
folder behind. A field `batch_size` is shown as its flag, `--batch-size`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

from ..errors import SDTorchError

MAX_RESOLUTION = 4096  # training side in pixels: a batch of 8 such images is 1.6 GB of float32 pixels
MAX_SEED = 2**64 - 1  # torch generators take seeds in [0, 2**64)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(value) -> str:
    """A user's value for a one-line message: strings (paths too) through repr, so no newline gets in."""
    return repr(str(value)) if isinstance(value, (str, Path)) else repr(value)


def fail(name: str, what: str, value) -> typing.NoReturn:
    raise SDTorchError(f"{flag(name)} must be {what}, got {shown(value)}")


def check_types(args) -> None:
    """Every field of the dataclass `args` holds a value of its annotated type (an int is also a float;
    a bool is neither), so `TrainArgs(steps=2.5)` or `lr="1e-4"` is refused as the CLI would refuse it."""
    hints = typing.get_type_hints(type(args))
    for f in dataclasses.fields(args):
        kind, value = hints[f.name], getattr(args, f.name)
        options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
        if not any(_is(value, option) for option in options):
            fail(f.name, " or ".join(_describe(option) for option in options), value)


def _is(value, kind) -> bool:
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return isinstance(value, list) and all(_is(v, item) for v in value)
    return isinstance(value, kind)


def _describe(kind) -> str:
    if kind is type(None):
        return "None"
    if typing.get_origin(kind) is list:
        return "a list of strings" if typing.get_args(kind) == (str,) else f"a list of {kind}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def at_least(args, low: int, *names: str) -> None:
    """Integer fields that must be `low` or more (None, where allowed, is skipped)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < low:
            fail(name, f"at least {low}", value)


def positive(args, *names: str) -> None:
    """Number fields that must be finite and above 0 (None, where allowed, is skipped)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            fail(name, "a finite number above 0", value)


def non_negative(args, *names: str) -> None:
    """Number fields that must be finite and 0 or more (None, where allowed, is skipped)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            fail(name, "0 or more (and finite)", value)


def fraction(args, name: str, one: bool = True) -> None:
    """A field in [0, 1], or [0, 1) without `one`."""
    value = getattr(args, name)
    if not (0 <= value <= 1 if one else 0 <= value < 1):
        fail(name, "in [0, 1]" if one else "in [0, 1)", value)


def one_of(args, name: str, choices: tuple) -> None:
    value = getattr(args, name)
    if value not in choices:
        fail(name, "one of " + ", ".join(map(repr, choices)), value)


def seed(args, name: str = "seed") -> None:
    value = getattr(args, name)
    if not 0 <= value <= MAX_SEED:
        fail(name, "in [0, 2**64 - 1]", value)


def resolution(args, name: str = "resolution", low: int = 8) -> None:
    """A training side: a multiple of 8 (the latent grid of an SD autoencoder), from `low` up to MAX_RESOLUTION."""
    value = getattr(args, name)
    if value % 8 or not low <= value <= MAX_RESOLUTION:
        fail(name, f"a multiple of 8 from {low} to {MAX_RESOLUTION}", value)


def data_folder(path) -> Path:
    """The training images' folder exists and is a folder."""
    path = Path(path)
    if path.is_file():
        raise SDTorchError(f"{shown(path)}: is a file; give the folder of training images")
    if not path.is_dir():
        raise SDTorchError(f"{shown(path)}: no such dataset folder")
    return path


def new_folder(path, what: str = "run folder") -> Path:
    """A folder that sdtorch may create (with its missing parents) or add to: neither it nor the nearest
    existing folder above it is a file, and that folder is writable."""
    import os

    if not str(path):
        raise SDTorchError(f"{shown(path)}: not a {what} name")
    path = existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == path else f"{shown(existing)} is a file"
        raise SDTorchError(f"{shown(path)}: {where}; give a {what}")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise SDTorchError(f"{shown(path)}: folder {shown(existing)} is not writable")
    return path


def existing_path(args, *names: str) -> None:
    """Path fields that, when given, must name an existing file or folder."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not Path(value).exists():
            raise SDTorchError(f"{flag(name)}: no such file or folder {shown(value)}")


def resume_state(args, folder: Path) -> dict | None:
    """The checkpoint to continue from: with `args.resume` the latest in `folder`, which must exist; with
    `args.resume_or_start` that checkpoint or None (a new run); else None."""
    from .common import load_latest

    if not (args.resume or args.resume_or_start):
        return None
    state = load_latest(folder)
    if state is None and args.resume:
        raise SDTorchError(f"--resume: no checkpoint in {shown(folder)} to resume from; leave out --resume to "
                           f"start a new run, or give --resume-or-start")
    return state

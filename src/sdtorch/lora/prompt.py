"""LoRAs named in a prompt, as AUTOMATIC1111 writes them, and LoRAs applied to a model for one generation.

A1111's extra-network syntax (`modules/extra_networks.py`): `<TYPE:ARG1:ARG2...>`, matched by `<(\\w+):([^>]+)>`,
the arguments split at ':'. For `lora` (and the older alias `lyco`) ARG1 is the name and ARG2 the text-encoder
multiplier (default 1); A1111 also takes a separate UNet multiplier, a `dyn` dim and `te=`/`unet=` keywords, which
sdtorch refuses in one line (one scale applies to the whole LoRA here). The tags are cut out of the prompt before it
is encoded; the parameters text keeps them.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import NamedTuple

from ..errors import SDTorchError

TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's re_extra_net
LORA_TYPES = ("lora", "lyco")


class LoraRef(NamedTuple):
    """One LoRA to apply: its network `name`, where it comes from (a file path or a name for `find_lora`), scale."""
    name: str
    source: str | Path
    scale: float


def parse_scale(text: str, what: str) -> float:
    """A finite float from text; SDTorchError naming `what` otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise SDTorchError(f"{what}: scale {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SDTorchError(f"{what}: scale {text!r} is not a finite number")
    return value


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(the prompt without its `<lora:NAME>` / `<lora:NAME:SCALE>` tags, [(name, scale)] in order). Tags of other
    extra-network types (`<hypernet:...>`) are left in the text; a LoRA tag with more than one number, or a bad
    number, is an SDTorchError."""
    found: list[tuple[str, float]] = []

    def take(m: re.Match) -> str:
        if m[1].lower() not in LORA_TYPES:
            return m[0]
        name, *numbers = m[2].split(":")
        if not name.strip():
            raise SDTorchError(f"prompt tag {m[0]!r} has no LoRA name")
        if len(numbers) > 1 or any("=" in n for n in numbers):
            raise SDTorchError(f"prompt tag {m[0]!r}: sdtorch takes one scale per LoRA (<lora:NAME:SCALE>), not "
                               "separate text-encoder/UNet multipliers")
        found.append((name.strip(), parse_scale(numbers[0], f"prompt tag {m[0]!r}") if numbers else 1.0))
        return ""

    return TAG.sub(take, prompt), found


def split_lora_flag(text: str) -> tuple[str, float, str | None]:
    """(source, scale, the text after the last ':' when it was not a number): the scale is split off only where
    it parses as a number, which must then be finite."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head:
        return text, 1.0, None
    try:
        float(tail)
    except ValueError:
        return text, 1.0, tail
    return head, parse_scale(tail, f"--lora {text}"), None


def find_flag(text: str, folder=None) -> tuple[LoraRef, bool]:
    """A `--lora FILE_OR_NAME[:SCALE]` argument as the LoRA to apply, its file found now (before any model
    loads), and whether the name alone would not find that file again (given as a path, or renamed by
    `safe_name`). An existing file followed by ':' and a non-number is reported as a bad scale."""
    from .adapters import find_lora

    source, scale, not_number = split_lora_flag(text)
    try:
        path = find_lora(source, folder)
    except SDTorchError:
        if not_number is not None and Path(text.rpartition(":")[0]).expanduser().is_file():
            raise SDTorchError(f"--lora {text}: scale {not_number!r} is not a number") from None
        raise
    by_path = Path(source).expanduser().is_file()
    name = safe_name(path.stem if by_path else source)
    return LoraRef(name, path, scale), by_path or name != source


def lora_tag(name: str, scale: float) -> str:
    """`<lora:NAME:SCALE>`, the scale written so that it reads back exactly."""
    return f"<lora:{name}:{float(scale)!r}>"


def safe_name(name: str) -> str:
    """A network name that a prompt tag and the "Lora hashes" field can hold (no ':', ',', '<' or '>')."""
    return re.sub(r"[:,<>]", "_", name).strip() or "lora"


@contextlib.contextmanager
def applied_loras(model, refs: list[LoraRef], folder=None, partial: bool = False):
    """Load `refs` onto `model` for the body of the `with`, yielding {name: (network, MatchReport)}; on leaving
    (or on an error while loading) every one of them is unloaded, so the model is as it was. A name already loaded
    on the model, or given twice, is refused before anything loads."""
    names = [r.name for r in refs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SDTorchError(f"two LoRAs are named {twice[0]!r} (a file's name is its stem); give each LoRA once, "
                           "or rename one of the files")
    clash = [n for n in names if n in model.loras]
    if clash:
        raise SDTorchError(f"a LoRA named {clash[0]!r} is already loaded on the model")
    loaded: dict = {}
    try:
        for r in refs:
            report = model.load_lora(r.source, r.scale, name=r.name, partial=partial, folder=folder)
            loaded[r.name] = (model.loras[r.name], report)
        yield loaded
    finally:
        for name in loaded:
            model.unload_lora(name)

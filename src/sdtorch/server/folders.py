"""The server's model and LoRA folders: what a request may name, and nothing outside them.

A request names a model by its title (its path inside `--models-dir`, or a built-in name) and a LoRA by its name
(a file stem inside `--lora-dir`, or a built-in LoRA). A name is looked up only among what a scan of the folder
found, so no text from a request is ever turned into a path: `../x`, `/etc/passwd` or `C:\\x` are simply names
that are not in the list. A symlink inside a folder that points outside it is left out of the scan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import SDTorchError
from ..lora.adapters import builtin_dir
from ..pipeline import BUILTIN, builtin_path

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


@dataclass(frozen=True)
class Entry:
    """A model or LoRA a request may name: its `title` (A1111's "title" / LoRA "name") and where it lies."""

    title: str
    path: Path
    builtin: bool = False

    @property
    def stem(self) -> str:
        return Path(self.title).stem if not self.builtin else self.title


def _inside(folder: Path, path: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def scan_models(folder: Path | None) -> list[Entry]:
    """The built-in models, then every checkpoint file and diffusers folder (one with model_index.json) under
    `folder`, titled by their path relative to it (with '/' on every system). Hidden names are skipped, and a
    diffusers folder is not searched inside."""
    found = [Entry(name, builtin_path(name), True) for name in BUILTIN if builtin_path(name) is not None]
    if folder is None or not folder.is_dir():
        return found
    taken = {e.title for e in found}
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and _inside(folder, root_path / d))
        candidates = [root_path / d for d in dirs if (root_path / d / "model_index.json").is_file()]
        dirs[:] = [d for d in dirs if root_path / d not in candidates]  # a diffusers folder is one model
        candidates += [root_path / f for f in sorted(files) if not f.startswith(".")
                       and Path(f).suffix.lower() in MODEL_SUFFIXES and (root_path / f).is_file()
                       and _inside(folder, root_path / f)]
        for path in candidates:
            title = path.relative_to(folder).as_posix()
            if title not in taken:
                found.append(Entry(title, path))
                taken.add(title)
    return found


def scan_loras(folder: Path | None) -> list[Entry]:
    """The built-in LoRAs, then every .safetensors file directly in `folder` (named by its stem; a built-in name
    wins). Only .safetensors: a LoRA from a request is never unpickled, even with a restricted loader."""
    found: dict[str, Entry] = {}
    for root, builtin in ((builtin_dir(), True), (folder, False)):
        if root is None or not Path(root).is_dir():
            continue
        for path in sorted(Path(root).glob("*.safetensors")):
            if path.is_file() and _inside(Path(root), path) and not path.name.startswith("."):
                found.setdefault(path.stem, Entry(path.stem, path, builtin))
    return list(found.values())


def lookup(entries: list[Entry], name, what: str) -> Entry:
    """The entry titled `name` (for a model, also its title without a " [hash]" suffix, or its stem when only one
    file has it); anything else is an SDTorchError listing what there is."""
    if not isinstance(name, str) or not name:
        raise SDTorchError(f"{what} name must be a non-empty string, got {name!r}")
    bare = name.rsplit(" [", 1)[0] if name.endswith("]") else name
    for e in entries:
        if e.title in (name, bare):
            return e
    by_stem = [e for e in entries if e.stem == bare]
    if len(by_stem) == 1:
        return by_stem[0]
    known = ", ".join(e.title for e in entries) or "none"
    raise SDTorchError(f"unknown {what} {name!r}; available: {known}")

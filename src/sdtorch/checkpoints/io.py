"""Reading weight files safely: safetensors lazily, pickles only through torch's weights-only unpickler.

A `.ckpt` can never run code here. `torch.load(weights_only=True)` accepts tensors, containers and
primitives only. Old Lightning checkpoints also pickle a callback object; for those (and only those)
we register inert stand-in classes under the exact names the file asks for, after listing them with
`torch.serialization.get_unsafe_globals_in_checkpoint`. Anything else is refused by name.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError

# Globals that old training checkpoints pickle beside their weights and that we may replace by inert
# stand-ins: they carry bookkeeping (callback state), never weights.
INERT_GLOBAL_PREFIXES = ("pytorch_lightning.callbacks.", "lightning.pytorch.callbacks.")


class StateDict(Mapping):
    """A read-only name -> tensor mapping over a file; tensors are read when asked for."""

    def __init__(self, path: Path, keys: list[str], get, shape, metadata: dict[str, str] | None = None):
        self.path, self._keys, self._get, self._shape = path, keys, get, shape
        self._keyset = set(keys)
        self.metadata = metadata or {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keyset:
            raise KeyError(key)
        return self._get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keyset

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape without reading its data."""
        return tuple(self._shape(key))


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def read_state_dict(path: str | Path) -> StateDict:
    """Open a `.safetensors`, `.ckpt`, `.pt`/`.pth` or `.bin` weight file (recognised by content)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    kind = _sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind in ("zip", "pickle"):
        return _read_torch(path, kind)
    raise CheckpointError(f"{path}: not a checkpoint (neither safetensors nor a PyTorch pickle/zip file)")


def _read_safetensors(path: Path) -> StateDict:
    try:
        f = safe_open(str(path), framework="pt")
        keys = list(f.keys())
        metadata = f.metadata()
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None

    def get(key):
        try:
            return f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e})") from None

    return StateDict(path, keys, get, lambda k: f.get_slice(k).get_shape(), metadata)


def _inert_class(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return type(name, (), {"__module__": module, "__setstate__": lambda self, state: None,
                           "__init__": lambda self, *a, **k: None})


def _torch_load(path: Path, kind: str) -> object:
    mmap = kind == "zip"  # memory-map zip checkpoints: no second copy of the weights in RAM
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            wanted = []
        inert = [g for g in wanted if g.startswith(INERT_GLOBAL_PREFIXES)]
        if not wanted or len(inert) != len(wanted):
            refused = [g for g in wanted if g not in inert] or [str(e).splitlines()[0]]
            raise CheckpointError(
                f"{path}: refused: the pickle asks for {', '.join(refused)}; only weights are loaded "
                "from .ckpt files (no code runs). Convert it to .safetensors with a trusted tool.") from None
        with torch.serialization.safe_globals([_inert_class(g) for g in inert]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _read_torch(path: Path, kind: str) -> StateDict:
    try:
        obj = _torch_load(path, kind)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(obj).__name__}, not a state dict)")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: not a checkpoint (no tensors in it)")
    return StateDict(path, list(tensors), tensors.__getitem__, lambda k: tensors[k].shape)


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a .safetensors file through a temporary file and an atomic rename."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)

"""Reading weight files safely: safetensors lazily, pickles only through torch's weights-only unpickler.

A `.ckpt` can never run code here. `torch.load(weights_only=True)` accepts tensors, containers and
primitives only. Old Lightning checkpoints also pickle a callback object; for those (and only those)
we register inert stand-in classes under the exact names the file asks for, after listing them with
`torch.serialization.get_unsafe_globals_in_checkpoint`. Anything else is refused by name.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import re
import warnings
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
    """A read-only name -> tensor mapping over a file; tensors are read when asked for. `copy(key)` reads a
    tensor into memory of its own, for a caller that converts it (see `_read_safetensors`)."""

    def __init__(self, path: Path, keys: list[str], get, shape, metadata: dict[str, str] | None = None,
                 copy=None, dtype=None):
        self.path, self._keys, self._get, self._shape = path, keys, get, shape
        self._copy, self._dtype = copy or get, dtype
        self._keyset = set(keys)
        self.metadata = metadata or {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keyset:
            raise KeyError(key)
        return self._get(key)

    def copy(self, key: str) -> torch.Tensor:
        if key not in self._keyset:
            raise KeyError(key)
        return self._copy(key)

    def dtype(self, key: str) -> torch.dtype | None:
        """The stored tensor's dtype without reading its data (None where the file's type has no torch name)."""
        return self._dtype(key) if self._dtype is not None else self[key].dtype

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
        raise CheckpointError(f"{path}: " + ("not a regular file" if path.exists() else "no such file"))
    kind = _sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind in ("zip", "pickle"):
        return _read_torch(path, kind)
    raise CheckpointError(f"{path}: not a checkpoint (neither safetensors nor a PyTorch pickle/zip file)")


def file_metadata(path: str | Path) -> dict[str, str]:
    """A `.safetensors` file's header metadata (no tensor is read); {} for a pickle, which has none."""
    path = Path(path)
    if not path.is_file() or _sniff(path) != "safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None


# safetensors' dtype names -> torch dtypes, for the tensors `_read_safetensors` reads itself (others: safetensors')
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def _read_safetensors(path: Path) -> StateDict:
    """safetensors' own reader checks the header (offsets, sizes, a truncated file) and gives tensors over its
    memory map, with no copy. `copy(key)` instead reads the tensor's bytes with plain file reads into a fresh
    tensor, for a tensor that is converted to another dtype at once: every page of a mapped file that is read
    counts in the process's resident memory until the file is closed, so loading an fp32 file into bf16
    through the map held the whole fp32 file beside the bf16 weights (5.0 GB peak for SD 1.5's 2.1 GB of bf16
    weights; read this way, one tensor beyond the weights)."""
    try:
        f = safe_open(str(path), framework="pt")
        keys = list(f.keys())
        metadata = f.metadata()
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header, base = json.loads(fh.read(size)), 8 + size
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None

    def get(key):
        try:
            return f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e})") from None

    def copy(key):
        info = header.get(key, {})
        try:
            if info.get("dtype") not in SAFETENSORS_DTYPES:
                return f.get_tensor(key)
            begin, end = info["data_offsets"]
            data = torch.empty(end - begin, dtype=torch.uint8)
            with open(path, "rb", buffering=0) as fh:
                fh.seek(base + begin)
                view, done = memoryview(data.numpy()), 0
                while done < len(view):
                    n = fh.readinto(view[done:])
                    if not n:
                        raise OSError(f"the file ends {len(view) - done} bytes early")
                    done += n
            return data.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e})") from None

    return StateDict(path, keys, get, lambda k: f.get_slice(k).get_shape(), metadata, copy,
                     lambda k: SAFETENSORS_DTYPES.get(header.get(k, {}).get("dtype")))


def _inert_class(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return type(name, (), {"__module__": module, "__setstate__": lambda self, state: None,
                           "__init__": lambda self, *a, **k: None})


def _pickle_globals(path: Path, pickles: int = 5) -> list[str]:
    """The `module.name` of every global the first `pickles` pickles of a legacy (non-zip) file import,
    read by decoding opcodes only (pickletools runs nothing). A legacy torch file holds five pickles before
    its raw tensor bytes; a plain pickle holds one. STACK_GLOBAL (protocol 4) takes the two strings pushed
    before it, directly or through the memo."""
    found, memo, recent = [], {}, [None, None]  # recent: the last two values pushed (None: not a string)
    with open(path, "rb") as f:
        for _ in range(pickles):
            try:
                for op, arg, _pos in pickletools.genops(f):
                    pushed = None
                    if op.name in ("GLOBAL", "INST"):  # protocol 2 names Python 3's builtins "__builtin__"
                        found.append(re.sub(r"^__builtin__ ", "builtins ", arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and None not in recent:
                        found.append(".".join(recent))
                    elif isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                        pushed = arg
                    elif op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "FRAME"):
                        if op.name != "FRAME":
                            memo[len(memo) if op.name == "MEMOIZE" else arg] = recent[-1]
                        continue  # these push nothing
                    elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                        pushed = memo.get(arg)
                    recent = [recent[-1], pushed]
            except (ValueError, EOFError, UnicodeDecodeError):  # past the last pickle: raw bytes or the end
                break
            if not f.peek(1):
                break
    return list(dict.fromkeys(g for g in found if not g.startswith("torch.") and g != "collections.OrderedDict"))


def _unsafe_globals(path: Path, kind: str) -> list[str]:
    """The globals of a pickle that torch's weights-only unpickler does not allow by default."""
    if kind != "zip":
        return _pickle_globals(path)
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return []


def _refusal(path: Path, wanted: list[str], error: Exception) -> CheckpointError:
    """Why the weights-only unpickler refused `path`, naming the callables it asked for."""
    if wanted:
        return CheckpointError(f"{path}: refused: the pickle asks for {', '.join(wanted)[:300]}; only weights "
                               "are loaded from .ckpt files (no code runs). Convert it to .safetensors with a "
                               "trusted tool.")
    # No foreign callable: say what torch's loader met (its message also repeats advice we do not give).
    details = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if "Unsupported" in ln]
    reason = f" ({details[0][:200]})" if details else ""
    return CheckpointError(f"{path}: refused: the pickle holds more than weights{reason}; only weights are loaded "
                           "from .ckpt files (no code runs). Convert it to .safetensors with a trusted tool.")


def _torch_load(path: Path, kind: str, mmap: bool | None = None) -> object:
    if mmap is None:
        mmap = kind == "zip"  # memory-map zip checkpoints: no second copy of the weights in RAM
    with warnings.catch_warnings():  # torch warns of pickle protocols it was not written for; we report errors
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            wanted = _unsafe_globals(path, kind)
            inert = [g for g in wanted if g.startswith(INERT_GLOBAL_PREFIXES)]
            if not wanted or len(inert) != len(wanted):
                raise _refusal(path, [g for g in wanted if g not in inert], e) from None
            with torch.serialization.safe_globals([_inert_class(g) for g in inert]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def load_weights_only(path: Path, mmap: bool | None = None) -> object:
    """What a PyTorch file (zip or legacy pickle) holds, read with the weights-only unpickler (see the
    module doc); refused, corrupt or truncated files raise CheckpointError naming the file. `mmap`
    defaults to memory-mapping zip files."""
    path = Path(path)
    kind = _sniff(path)
    if kind not in ("zip", "pickle"):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip nor a pickle file)")
    try:
        return _torch_load(path, kind, mmap)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        reason = (re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path}: corrupt or truncated PyTorch checkpoint ({reason})") from None


def _read_torch(path: Path, kind: str) -> StateDict:
    obj = load_weights_only(path)
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
    """Write tensors to a .safetensors file through a temporary file and an atomic rename (`fileio`)."""
    from safetensors.torch import save_file

    from ..fileio import atomic_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)

"""Training data: a folder of captioned images as square crops in [-1, 1], and a disk cache of VAE latents.

The dataset reads two layouts; if `metadata.jsonl` exists at the root, it wins:
- kohya style: images anywhere under the root (.png .jpg .jpeg .webp .bmp; paths with a part that
  starts with "." are ignored), each captioned by a same-stem `.txt` (preferred) or `.caption` file;
- Hugging Face imagefolder: `metadata.jsonl`, one `{"file_name": relative path, "text": caption}`
  object a line; images it does not list are ignored.

For a class-conditional model (`conditioning="class"`) the labels come from `metadata.jsonl`'s "label"
field (class names, or integer indices 0..N-1), or else from the torchvision ImageFolder layout: each
subfolder of the root is a class, named by the folder, holding its images at any depth. Classes are
sorted by name, as torchvision numbers them. For an unconditional model (`conditioning="none"`) every
image under the root trains, and captions and labels are ignored.

An image is EXIF-rotated, converted to RGB (alpha dropped), resized with PIL's bicubic filter
(antialiased when shrinking) so its short side equals `resolution`, cropped to a square, and
optionally flipped. The crop offset and flip come from `random.Random("seed:epoch:index")` (a string
seed is hashed with SHA-512, so it is the same in every process and run) and never from global RNG
state: the same (seed, epoch, index) always gives the same tensor, and a resumed run sees the same data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import SDTorchError
from ..fileio import atomic_file
from ..images import to_tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")  # the first that exists is the caption
METADATA = "metadata.jsonl"
SHOWN_NAMES = 5  # unreadable files named in the warning
# What PIL raises for a file that is not an image, is corrupt or truncated, or is a decompression bomb.
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


CONDITIONING = ("text", "class", "none")  # what a dataset's items are labelled with


class ImageCaptionDataset(Dataset):
    """Items `{"pixels": [3, R, R] in [-1, 1], "caption": str, "index": int}` from a folder of images; with
    `conditioning="class"` also `"label": int` (the caption is then the class name), and with "none" every
    caption is empty. `class_names` lists a class dataset's classes (None for integer labels or no classes)."""

    def __init__(self, root, resolution: int, center_crop: bool = True, random_flip: bool = False,
                 seed: int = 0, verify: bool = True, conditioning: str = "text"):
        self.root = Path(root)
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.epoch, self.conditioning = seed, 0, conditioning
        if conditioning not in CONDITIONING:
            raise SDTorchError(f"conditioning must be one of {', '.join(CONDITIONING)}, got {conditioning!r}")
        if not self.root.is_dir():
            raise SDTorchError(f"{self.root}: no such dataset folder")
        has_metadata = (self.root / METADATA).is_file()
        self.labels: list[int] | None = None
        self.class_names: list[str] | None = None
        if conditioning == "class":
            pairs, classes = _read_labels(self.root) if has_metadata else _scan_classes(self.root)
        else:
            pairs = _read_metadata(self.root) if has_metadata else _scan_folder(self.root)
        pairs, bad = _check(pairs, verify)
        self.skipped: list[Path] = [path for path, _ in bad]
        if bad:
            names = ", ".join(f"{os.path.relpath(p, self.root)} ({why})" for p, why in bad[:SHOWN_NAMES])
            more = f" and {len(bad) - SHOWN_NAMES} more" if len(bad) > SHOWN_NAMES else ""
            warnings.warn(f"{self.root}: skipped {len(bad)} unreadable image(s): {names}{more}", stacklevel=2)
        if not pairs:
            where = f"the files listed in {METADATA}" if has_metadata else f"{'/'.join(IMAGE_EXTENSIONS)} files"
            raise SDTorchError(f"{self.root}: no usable images (looked for {where}; {len(bad)} unreadable)")
        self.files: list[Path] = [path for path, _ in pairs]
        if conditioning == "class":
            self.labels = [label for _, label in pairs]
            self._classes = classes
            self.class_names = _check_classes(self.root, classes, self.labels, has_metadata)
            pairs = [(path, classes[label]) for path, label in pairs]  # a class's name is its images' caption
        elif conditioning == "none":
            pairs = [(path, "") for path, _ in pairs]
        self._captions = [caption or "" for _, caption in pairs]
        self.missing_captions = sum(caption is None for _, caption in pairs)
        self._bad: set[int] = set()  # indices that failed in __getitem__ (per worker process)

    @property
    def num_classes(self) -> int | None:
        """How many classes a class dataset has (labels 0 to num_classes - 1); None for text or no labels."""
        return None if self.labels is None else len(self._classes)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def captions(self) -> list[str]:
        """Every caption, in item order ("" where an image has none)."""
        return list(self._captions)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that seeds crops and flips (call before each epoch, as with DistributedSampler)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for j in ((index + k) % n for k in range(n)):  # an unreadable image is replaced by the next one
            if j in self._bad:
                continue
            try:
                image = _load_rgb(self.files[j])
            except READ_ERRORS as e:
                self._bad.add(j)
                self.skipped.append(self.files[j])
                warnings.warn(f"{self.files[j]}: unreadable ({e}); using the next image instead", stacklevel=2)
                continue
            item = {"pixels": self.transform(image, j), "caption": self._captions[j], "index": j}
            if self.labels is not None:
                item["label"] = self.labels[j]
            return item
        raise SDTorchError(f"{self.root}: none of the {n} images can be read any more")

    def transform(self, image: Image.Image, index: int) -> torch.Tensor:
        """RGB image -> [3, R, R] in [-1, 1]: short side to R, crop, maybe flip (seeded by seed, epoch, index)."""
        R = self.resolution
        w, h = image.size
        scale = R / min(w, h)
        w, h = max(R, round(w * scale)), max(R, round(h * scale))
        if image.size != (w, h):
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        if self.center_crop:
            left, top = (w - R) // 2, (h - R) // 2
        else:
            left, top = rng.randint(0, w - R), rng.randint(0, h - R)
        image = image.crop((left, top, left + R, top + R))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(image)[0]


def warn_missing_captions(dataset: ImageCaptionDataset) -> int:
    """Warn when images have no caption (no caption file, no "text" in metadata.jsonl, or an empty one):
    they train the model on the empty prompt. Returns how many have none."""
    n = sum(not caption for caption in dataset.captions)
    if n:
        what = "training on empty captions" if n == len(dataset) else "those train as the empty prompt"
        warnings.warn(f"{dataset.root}: {n} of {len(dataset)} images have no caption; {what}", stacklevel=2)
    return n


def collate(batch: list[dict]) -> dict:
    """Stack a list of items: tensors are stacked, strings kept as a list, numbers made a tensor."""
    out = {}
    for key, first in batch[0].items():
        values = [item[key] for item in batch]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, str):
            out[key] = values
        else:
            out[key] = torch.tensor(values)
    return out


def _scan_folder(root: Path) -> list[tuple[Path, str | None]]:
    images = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
              and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    images.sort(key=lambda p: p.relative_to(root).as_posix())
    return [(p, _caption_beside(p)) for p in images]


def _caption_beside(image: Path) -> str | None:
    for ext in CAPTION_EXTENSIONS:
        path = image.with_suffix(ext)
        if path.is_file():
            try:
                return path.read_text(encoding="utf-8-sig").strip()
            except UnicodeDecodeError as e:
                raise SDTorchError(f"{path}: caption is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return None


def _read_metadata(root: Path) -> list[tuple[Path, str | None]]:
    captions = {}
    for _, row in _metadata_rows(root / METADATA):
        text = row.get("text")
        captions[Path(row["file_name"]).as_posix()] = text.strip() if isinstance(text, str) else None
    return [(root / name, captions[name]) for name in sorted(captions)]


def _metadata_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a metadata.jsonl; each must name its "file_name"."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise SDTorchError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SDTorchError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise SDTorchError(f'{path}:{n}: each line must be an object with a "file_name" string')
        rows.append((n, row))
    return rows


def _scan_classes(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """ImageFolder layout: (image, label) pairs and the classes, one per subfolder, sorted by name (or by
    number, where every folder is named by an integer)."""
    images = [p for p, _ in _scan_folder(root)]
    folders = [d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not folders:
        raise SDTorchError(f"{root}: no class folders; the layout is {root.name}/CLASS/image.png, or a {METADATA} "
                           f"with a \"label\" field")
    loose = [p for p in images if p.parent == root]
    if loose:
        raise SDTorchError(f"{root}: {len(loose)} image(s) ({loose[0].name}, ...) lie outside any class folder; the "
                           f"layout is {root.name}/CLASS/image.png, or a {METADATA} with a \"label\" field")
    numbered = all(name.isdigit() for name in folders)
    if numbered:  # folders 0, 1, ...: labels by number, with no names
        classes = [str(n) for n in range(max(int(name) for name in folders) + 1)]
        label = {name: int(name) for name in folders}
    else:
        classes = sorted(folders)
        label = {name: i for i, name in enumerate(classes)}
    return [(p, label[p.relative_to(root).parts[0]]) for p in images], classes


def _read_labels(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """metadata.jsonl's (image, label) pairs and classes: "label" is a class name (classes sorted by name) or an
    integer index (classes 0 to the largest); every line must have one, and of one kind."""
    path = root / METADATA
    rows = _metadata_rows(path)
    missing = [n for n, row in rows if not _is_label(row.get("label"))]
    if missing:
        raise SDTorchError(f"{path}: {len(missing)} line(s) have no \"label\" (a class name or an integer index), "
                           f"the first line {missing[0]}; a class-conditional model needs every image's class")
    kinds = {isinstance(row["label"], int) for _, row in rows}
    if len(kinds) > 1:
        raise SDTorchError(f"{path}: \"label\" mixes class names and integer indices; use one or the other")
    labels = {Path(row["file_name"]).as_posix(): row["label"] for _, row in rows}
    if kinds == {True}:
        negative = [v for v in labels.values() if v < 0]
        if negative:
            raise SDTorchError(f"{path}: label {negative[0]} is negative; integer labels run from 0")
        classes = [str(n) for n in range(max(labels.values(), default=-1) + 1)]
        return [(root / name, labels[name]) for name in sorted(labels)], classes
    classes = sorted({v.strip() for v in labels.values()})
    number = next((c for c in classes if c.isdigit()), None)
    if number is not None:
        raise SDTorchError(f"{path}: label {number!r} is a number written as a string; write integer labels as "
                           f"numbers, or give every class a name")
    index = {c: i for i, c in enumerate(classes)}
    return [(root / name, index[labels[name].strip()]) for name in sorted(labels)], classes


def _is_label(value) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and bool(value.strip()))


def _check_classes(root: Path, classes: list[str], labels: list[int], has_metadata: bool) -> list[str] | None:
    """Every class has an image and there are at least two; the class names, or None for integer labels."""
    counts = [0] * len(classes)
    for label in labels:
        counts[label] += 1
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        where = f"label {empty[0]} in {METADATA}" if has_metadata else f"the class folder {root.name}/{empty[0]}"
        raise SDTorchError(f"{root}: {where} has no usable images ({len(empty)} class(es) without any); every "
                           f"class needs images")
    if len(classes) < 2:
        raise SDTorchError(f"{root}: a single class ({classes[0]}): a class-conditional model needs at least two; "
                           f"train with --conditioning none for one kind of image")
    return None if all(c.isdigit() for c in classes) else classes


def _check(pairs: list, verify: bool) -> tuple[list, list[tuple[Path, str]]]:
    """Split pairs into usable ones and (path, reason) for the rest; `verify` decodes every image."""
    good, bad = [], []
    for path, caption in pairs:
        if not path.is_file():
            bad.append((path, "no such file"))
            continue
        if verify:
            try:
                with Image.open(path) as im:
                    im.load()
            except READ_ERRORS as e:
                bad.append((path, str(e) or type(e).__name__))
                continue
        good.append((path, caption))
    return good, bad


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


class LatentCache(Dataset):
    """The VAE posterior (mean, std) of every dataset item, encoded once into safetensors shards.

    Items are `{"mean", "std": [C, h, w] float32, "caption", "index"}` (and "label" for a class
    dataset); the trainer draws `mean + std * noise` with its own generator. Each shard
    `latents-NNNNN.safetensors` is written atomically (temp file, then rename) and carries a fingerprint of the
    file list (relative paths and sizes), resolution, crop, `vae_id`, dtype and shard size: shards that
    match are reused (so an interrupted run resumes), others are deleted and re-encoded.
    `encode_fn(pixels [B, 3, R, R])` returns `(mean, std)` or a posterior with `.mean` and `.std`; it
    moves the pixels to its device. Only a fixed crop can be cached, so the dataset must use
    center_crop=True and random_flip=False. Build the cache in one process (rank 0) before other
    processes open it. `dtype=torch.float16` halves the disk, but a VAE's std (often below 1e-3) then
    loses precision.
    """

    def __init__(self, folder, dataset: ImageCaptionDataset, encode_fn, batch_size: int = 16,
                 progress: bool = True, vae_id: str = "", dtype: torch.dtype = torch.float32,
                 shard_size: int = 1024):
        if dataset.random_flip or not dataset.center_crop:
            raise SDTorchError("LatentCache needs a dataset with center_crop=True and random_flip=False "
                               "(a cached latent is one fixed crop); train from pixels for random crops/flips")
        self.folder, self.dataset, self.shard_size = Path(folder), dataset, shard_size
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint = _fingerprint(dataset, vae_id, dtype, shard_size)
        self._len = len(dataset)
        self._captions, self._labels = dataset.captions, dataset.labels
        self.shards = [self.folder / f"latents-{k:05d}.safetensors" for k in range(math.ceil(self._len / shard_size))]
        self._sweep()
        todo = [k for k, path in enumerate(self.shards) if not path.exists()]
        total = sum(len(self._span(k)) for k in todo)
        with tqdm(total=total, desc="caching latents", unit="img", disable=not progress or not todo) as bar:
            for k in todo:
                self._encode_shard(k, encode_fn, batch_size, dtype, bar)
        self._handles: dict = {}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} cached latents")
        k, j = divmod(i % self._len, self.shard_size)
        if k not in self._handles:
            self._handles[k] = safe_open(str(self.shards[k]), framework="pt")
        f = self._handles[k]
        index = int(f.get_slice("index")[j:j + 1][0])
        item = {"mean": f.get_slice("mean")[j:j + 1][0].float(), "std": f.get_slice("std")[j:j + 1][0].float(),
                "caption": self._captions[index], "index": index}
        if self._labels is not None:
            item["label"] = self._labels[index]
        return item

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}  # open files stay in their process (DataLoader workers)

    def _span(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self._len))

    def _sweep(self) -> None:
        """Delete leftover temp files (of a killed write) and shards that are not part of this cache."""
        keep = set(self.shards)
        for path in self.folder.glob(".latents-*.tmp"):
            path.unlink(missing_ok=True)
        for path in self.folder.glob("latents-*"):
            if path not in keep or _shard_fingerprint(path) != self.fingerprint \
                    or not _shard_holds(path, len(self._span(self.shards.index(path)))):
                path.unlink()

    def _encode_shard(self, k: int, encode_fn, batch_size: int, dtype: torch.dtype, bar) -> None:
        span = self._span(k)
        means, stds, indices = [], [], []
        for start in range(span.start, span.stop, batch_size):
            batch = collate([self.dataset[i] for i in range(start, min(start + batch_size, span.stop))])
            with torch.no_grad():
                mean, std = _moments(encode_fn(batch["pixels"]))
            B = len(batch["index"])
            if mean.shape != std.shape or mean.shape[0] != B:
                raise SDTorchError(f"encode_fn gave mean {tuple(mean.shape)} and std {tuple(std.shape)} "
                                   f"for a batch of {B} images; both must be [{B}, C, h, w]")
            means.append(mean.detach().to("cpu", dtype))
            stds.append(std.detach().to("cpu", dtype))
            indices.append(batch["index"])
            bar.update(B)
        tensors = {"mean": torch.cat(means), "std": torch.cat(stds), "index": torch.cat(indices)}
        with atomic_file(self.shards[k]) as tmp:
            save_file(tensors, str(tmp), metadata={"fingerprint": self.fingerprint})


def _moments(out) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return out[0], out[1]
    mean, std = getattr(out, "mean", None), getattr(out, "std", None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):  # a tensor's .mean is a method
        return mean, std
    raise SDTorchError(f"encode_fn must return (mean, std) or a posterior with .mean and .std, "
                       f"not {type(out).__name__}")


def _fingerprint(dataset: ImageCaptionDataset, vae_id: str, dtype: torch.dtype, shard_size: int) -> str:
    files = [(Path(os.path.relpath(p, dataset.root)).as_posix(), p.stat().st_size) for p in dataset.files]
    spec = dict(version=1, files=files, resolution=dataset.resolution, center_crop=dataset.center_crop,
                random_flip=dataset.random_flip, vae_id=vae_id, dtype=str(dtype), shard_size=shard_size)
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def _shard_fingerprint(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except (SafetensorError, OSError, ValueError):  # a temp file, a torn write: not a readable shard
        return None


def _shard_holds(path: Path, n: int) -> bool:
    """Whether a shard has the mean, std and index of `n` items (a fingerprint alone does not say it is whole)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError, ValueError):
        return False
    return all(len(shapes.get(k, ())) >= 1 and shapes[k][0] == n for k in ("mean", "std", "index"))

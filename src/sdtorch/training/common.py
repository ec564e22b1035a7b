"""What both trainers share: their argument fields (default, group, help), distributed setup, config
loading, the validation split, per-sample seeds, data order and the resumable batch stream, EMA, the
learning-rate schedule, atomic checkpoints and the JSONL log with its PNG plot."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import MISSING, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

REQUIRED = MISSING  # `option`'s default for a field that has none


def option(default, group: str, help: str):
    """A trainer argument's dataclass field: its default (REQUIRED for none; a list is copied for each
    instance), and the group and one-line help that `sdtorch train --help` shows it under (cli/train.py)."""
    meta = {"group": group, "help": help}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class RunArgs:
    """The fields every trainer has (`sdtorch train`, `train-vae`, `train-lora`); a trainer redeclares a field
    to give it its own help, and keeps its place in `--help`."""

    data: str = option(REQUIRED, "data", "training images: a folder of images with same-name .txt captions, or "
                       "one with a metadata.jsonl")
    output: str = option(REQUIRED, "output", "the run folder, made once every input is good")
    resolution: int = option(64, "data", "training side in pixels, a multiple of 8: the short side is resized to "
                             "it, then a square is cropped")
    center_crop: bool = option(True, "data", "crop the middle square; --no-center-crop takes a random one")
    random_flip: bool = option(False, "data", "flip images left to right at random")
    batch_size: int = option(8, "optimisation", "images per step and process")
    warmup: int = option(100, "optimisation", "steps of linear learning-rate warm-up")
    max_steps: int = option(1000, "optimisation", "optimizer steps to train for")
    log_every: int = option(10, "output", "steps between lines of log.jsonl")
    checkpoint_every: int = option(200, "checkpoints", "steps between checkpoints in checkpoints/, and one at "
                                   "the last step")
    keep_checkpoints: int = option(3, "checkpoints", "the newest checkpoints kept on disk, at least 1")
    resume: bool = option(False, "checkpoints", "continue from the run folder's latest checkpoint; an error if "
                          "there is none")
    resume_or_start: bool = option(False, "checkpoints", "resume if the run folder has a checkpoint, else start a "
                                   "new run")
    progress: bool = option(True, "output", "show a progress bar")

    def check(self) -> None:
        """The shared fields' types and ranges; a trainer's `check` adds its own after these."""
        from . import checks
        from ..errors import SDTorchError

        checks.check_types(self)
        checks.data_folder(self.data)
        checks.new_folder(self.output)
        checks.at_least(self, 1, "batch_size", "max_steps", "log_every", "checkpoint_every", "keep_checkpoints")
        checks.at_least(self, 0, "warmup")
        if self.resume and self.resume_or_start:
            raise SDTorchError("--resume and --resume-or-start: give one (--resume requires a checkpoint)")


CKPT = re.compile(r"^ckpt-(\d{8})\.pt$")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the torchrun process group (gloo on the CPU, nccl on GPUs) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(int(os.environ.get("RANK", "0")), world)


def mean_over_ranks(value: float, dist: Dist) -> float:
    """The mean of a per-process number over all processes (itself with one process)."""
    if dist.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch_dist.all_reduce(t)
    return t.item() / dist.world


def sample_generator(seed: int, epoch: int, index: int, purpose: int) -> torch.Generator:
    """A generator for one training sample's randomness (timestep, noise, caption dropout), fixed by
    (seed, epoch, dataset index), so it does not depend on the batch, the rank or a resume."""
    state = np.random.SeedSequence([seed, epoch, index, purpose]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def epoch_batches(n: int, batch: int, epoch: int, seed: int, dist: Dist) -> list[list[int]]:
    """This rank's batches of dataset indices for an epoch: a seeded permutation sharded by
    DistributedSampler (rank r takes every world-th index), incomplete batches dropped. The union of the
    ranks' batch k is the single-process batch k of size world * batch."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=dist.world, rank=dist.rank,
                                                  shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)]


def load_config(spec: str):
    """A ModelConfig from a preset name or a JSON file (as `sdtorch info` prints and train writes)."""
    from ..checkpoints.detect import config_from_json
    from ..config import PRESETS, ConfigError
    from ..errors import SDTorchError

    if spec.lower() in PRESETS:
        return PRESETS[spec.lower()]
    path = Path(spec)
    if not path.is_file():
        raise SDTorchError(f"{spec}: not a preset ({', '.join(PRESETS)}) or a ModelConfig JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SDTorchError(f"{spec}: not a readable ModelConfig JSON file ({e})") from None
    config = config_from_json(data, spec)
    try:
        config.check_parts()
    except ConfigError as e:
        raise SDTorchError(f"{spec}: the networks do not fit together: {e}") from None
    return config


def split(dataset, data: str, val_size: int, batch_size: int, seed: int, dist: Dist) -> tuple[list[int], list[int]]:
    """(validation, training) dataset indices: a seeded permutation, up to `val_size` (at most a tenth of
    the data) held out; an error when fewer than one batch per process is left to train on."""
    from ..errors import SDTorchError

    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(val_size, len(dataset) // 10)
    val_idx, train_idx = order[:n_val], order[n_val:]
    if len(train_idx) < batch_size * dist.world:
        raise SDTorchError(f"{data}: {len(train_idx)} training images, fewer than one batch "
                           f"({batch_size} x {dist.world} processes)")
    return val_idx, train_idx


def batch_stream(source, dataset, train_idx: list[int], batch_size: int, seed: int, dist: Dist,
                 epoch: int = 0, pos: int = 0):
    """(epoch, position after this batch, batch) from batch `pos` of `epoch` on, one epoch after another;
    `source[i]` gives samples (the dataset, or its latent cache), `dataset.set_epoch` seeds crops and flips.
    The position is what a checkpoint stores to resume at the next batch."""
    from .data import collate

    while True:
        plan = epoch_batches(len(train_idx), batch_size, epoch, seed, dist)
        dataset.set_epoch(epoch)
        for k in range(pos, len(plan)):
            yield epoch, k + 1, collate([source[train_idx[i]] for i in plan[k]])
        epoch, pos = epoch + 1, 0


class EMA:
    """Exponential moving average of parameters, theta_ema <- d theta_ema + (1 - d) theta, with the
    warm-up d_t = min(decay, (1 + t) / (10 + t)) (Polyak & Juditsky 1992; the LDM/diffusers schedule)."""

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.0):
    """Learning-rate factor: linear warm-up, then a cosine decay to `min_ratio` (Loshchilov & Hutter 2017)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def adamw(params, **kw) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) with the fused kernel, which updates every tensor in one call:
    on this 2-core CPU the optimizer step of the shapes UNet took 31 ms against 76 ms unfused (one
    measurement). A checkpoint written by the unfused optimizer still resumes (it then steps unfused)."""
    return torch.optim.AdamW(params, fused=True, **kw)


def autocast(bf16: bool):
    """bfloat16 autocast for a training forward on the CPU when asked for, else nothing."""
    import contextlib

    return torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()


def attention_kernel(bf16: bool):
    """The context a whole training step (forward and backward) runs in, on the CPU where the trainers
    run: with bfloat16, attention goes through PyTorch's math kernel. Its CPU backward at these short
    sequences (16 to 77 tokens) is far cheaper than the fused flash kernel's: a shapes UNet training
    step measured 0.71x the time. In float32 the two kernels measured the same, so the default is kept
    there. The backward must run inside it too: gradient checkpointing recomputes the forward there."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH]) if bf16 else contextlib.nullcontext()


def compiled(module: nn.Module) -> nn.Module:
    """`module` compiled by TorchInductor (`torch.compile`), for the training forward and its backward, in
    float32 only. On the CPU Inductor writes C++/OpenMP kernels for the elementwise work between
    convolutions and matmuls; the first step compiles, and a new input shape compiles again. Under bf16
    autocast its backward was wrong with PyTorch 2.13 on the CPU: on the shapes UNet + text encoder the
    text encoder got zero gradients and 342 of 378 gradient tensors differed from eager by over 5% (relative
    norm), and a full shapes run trained so (8,000 steps) ignored its prompts (0% exact match); so
    `sdtorch train` refuses --compile with --bf16 (scripts/compile_grad_check.py tells whether a PyTorch
    still gets it wrong). It needs a C++ compiler."""
    require_compiler()
    return torch.compile(module)


def require_compiler() -> None:
    """An error unless a C++ compiler is on PATH: Inductor's CPU kernels are C++."""
    import shutil

    from ..errors import SDTorchError

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise SDTorchError("--compile needs a C++ compiler on PATH (g++, c++ or clang++) for torch.compile's "
                           "CPU kernels; install one (Debian: apt install g++) or train without --compile")


def save_checkpoint(folder: Path, step: int, state: dict, keep: int) -> Path:
    """Write `ckpt-STEP.pt` under a unique temporary name and rename it into place (flushed to disk), then
    point `latest` at it the same way, then prune. A kill at any moment leaves `latest` naming a complete
    checkpoint. Pruning keeps the one just written (the one `latest` names) and the `keep` - 1 others of
    highest step, and removes temporary files an earlier killed write left."""
    from ..errors import SDTorchError
    from ..fileio import atomic_file, write_text

    if keep < 1:
        raise SDTorchError(f"--keep-checkpoints must be at least 1 (the checkpoint `latest` names), got {keep}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ckpt-{step:08d}.pt"
    with atomic_file(path, durable=True) as tmp:
        torch.save(state, tmp)
    write_text(folder / "latest", path.name, durable=True)
    others = sorted((p for p in folder.iterdir() if CKPT.match(p.name) and p.name != path.name),
                    key=lambda p: int(CKPT.match(p.name).group(1)))
    for old in others[:max(0, len(others) - (keep - 1))]:
        old.unlink()
    for stale in [*folder.glob(".ckpt-*.tmp"), *folder.glob(".latest.*.tmp")]:
        stale.unlink(missing_ok=True)
    return path


class Checkpoint(dict):
    """A training checkpoint as `load_latest` read it: a dict that knows its file, so a key it lacks and a
    state that does not fit (`restore`) are errors naming the file."""

    def __init__(self, path: Path, state: dict):
        super().__init__(state)
        self.path = path

    def __missing__(self, key):
        from ..errors import SDTorchError

        raise SDTorchError(f"{self.path}: the checkpoint lacks {key!r} (not written by this trainer?)")

    def restore(self, target, key: str) -> None:
        """`target.load_state_dict(self[key])` for a module, optimizer or scheduler; a mismatch is one line."""
        from ..errors import SDTorchError

        try:
            target.load_state_dict(self[key])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise SDTorchError(f"{self.path}: {key!r} does not fit this run ({reason})") from None


    def shadow_like(self, reference: dict, key: str) -> dict:
        """`self[key]`, a {name: tensor} dict such as EMA weights, checked to have `reference`'s names and
        shapes; a mismatch is one line."""
        from ..errors import SDTorchError

        got = self[key]
        if not isinstance(got, dict) or got.keys() != reference.keys():
            raise SDTorchError(f"{self.path}: {key!r} does not fit this run (other parameter names)")
        for name, tensor in reference.items():
            if not isinstance(got[name], torch.Tensor) or got[name].shape != tensor.shape:
                raise SDTorchError(f"{self.path}: {key!r} does not fit this run ({name} has another shape)")
        return got


class RunData:
    """What every trainer's run object starts with: its arguments, the process group, the run folder, the
    checkpoint to resume (read before anything is made), the dataset and its validation split; and a warning
    where --bf16 is asked for on a CPU that emulates bf16 (the trainers autocast on the CPU)."""

    def __init__(self, args):
        from .. import precision
        from . import checks
        from .data import ImageCaptionDataset

        self.args, self.dist, self.out = args, init_distributed(), Path(args.output)
        self.checkpoint = checks.resume_state(args, self.out / "checkpoints")
        if args.bf16 and self.dist.main:
            precision.check_dtype(torch.bfloat16, "cpu", "--bf16")
        self.dataset = ImageCaptionDataset(args.data, args.resolution, center_crop=args.center_crop,
                                           random_flip=args.random_flip, seed=args.seed,
                                           conditioning=getattr(args, "conditioning", "text"))
        self.val_idx, self.train_idx = split(self.dataset, args.data, args.val_size, args.batch_size, args.seed,
                                             self.dist)


class TrainState:
    """A run's resumable state, written once for every trainer: the named parts (modules, optimizers,
    schedulers, EMAs; each saved as its state dict, an EMA as its shadow), the global RNG and the data
    position (step, epoch, batch_pos). `state()` is what a checkpoint holds; `load()` restores it exactly."""

    def __init__(self, parts: dict, args):
        self.parts, self.args = parts, args
        self.step, self.epoch, self.batch_pos = 0, 0, 0

    def state(self) -> dict:
        from dataclasses import asdict

        saved = {k: (v.shadow if isinstance(v, EMA) else v.state_dict()) for k, v in self.parts.items()}
        return {**saved, "rng": rng_state(), "step": self.step, "epoch": self.epoch, "batch_pos": self.batch_pos,
                "args": asdict(self.args)}

    def load(self, checkpoint: "Checkpoint") -> None:
        """Every part from `checkpoint` (a `load_latest` result), checked to fit; then the RNG and position."""
        for key, part in self.parts.items():
            if isinstance(part, EMA):
                part.shadow = checkpoint.shadow_like(part.shadow, key)
            else:
                checkpoint.restore(part, key)
        set_rng_state(checkpoint["rng"])
        self.step, self.epoch, self.batch_pos = checkpoint["step"], checkpoint["epoch"], checkpoint["batch_pos"]

    def save(self, folder: Path, keep: int) -> Path:
        return save_checkpoint(folder, self.step, self.state(), keep)


def start_log(path: Path, checkpoint, dist: Dist) -> "JsonlLog | None":
    """The run's log on the main process: kept up to the resumed step, or started anew."""
    if not dist.main:
        return None
    return JsonlLog(path, checkpoint["step"] if checkpoint is not None else None)


# What every trainer's checkpoint holds beside its networks' state dicts, and the type each must have.
CHECKPOINT_FIELDS = {"step": int, "epoch": int, "batch_pos": int, "rng": dict, "optimizer": dict, "scheduler": dict}
STATE_DICTS = ("model", "ema", "vae", "disc")  # name -> {parameter name: tensor}, where present


def load_latest(folder: Path) -> Checkpoint | None:
    """The checkpoint `latest` names, read with the weights-only unpickler; None if there is none. A
    `latest` that is not a checkpoint's name, names a missing file, or a checkpoint that is truncated,
    refused or of the wrong structure raises SDTorchError naming the file."""
    from ..checkpoints.io import load_weights_only
    from ..errors import SDTorchError

    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not CKPT.match(name):
        raise SDTorchError(f"{pointer}: does not name a checkpoint (ckpt-NNNNNNNN.pt)")
    path = folder / name
    if not path.is_file():
        there = sorted(p.name for p in folder.iterdir() if CKPT.match(p.name))
        raise SDTorchError(f"{pointer}: names {name}, which does not exist (checkpoints there: "
                           f"{', '.join(there[-3:]) or 'none'})")
    state = load_weights_only(path, mmap=False)
    if not isinstance(state, dict):
        raise SDTorchError(f"{path}: not a training checkpoint (holds a {type(state).__name__})")
    for key, kind in CHECKPOINT_FIELDS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            what = "a non-negative integer" if kind is int else "a dict"
            raise SDTorchError(f"{path}: the checkpoint's {key!r} is {repr(value)[:40]}, not {what}")
    if not isinstance(state["rng"].get("torch"), torch.Tensor) or state["rng"]["torch"].dtype != torch.uint8:
        raise SDTorchError(f"{path}: the checkpoint's 'rng' lacks the torch generator state (a uint8 tensor)")
    for key in STATE_DICTS:
        value = state.get(key)
        if key in state and not (isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())):
            raise SDTorchError(f"{path}: the checkpoint's {key!r} is not a state dict of tensors")
    return Checkpoint(path, state)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])


def log_records(path: Path) -> list[dict]:
    """The JSON objects of a JSONL log, one per line; a line that is not one (the last line, cut by a kill
    mid-write) is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class JsonlLog:
    """Appends one JSON object per line, each in one write (`fileio.append_line`); when a run resumes, the
    log is rewritten atomically without the lines past `step`."""

    def __init__(self, path: Path, resume_step: int | None = None):
        from ..fileio import write_text

        self.path = path
        if resume_step is not None and path.is_file():
            kept = [r for r in log_records(path) if isinstance(r.get("step", 0), (int, float))
                    and r.get("step", 0) <= resume_step]
            write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        elif path.is_file():
            path.unlink()

    def write(self, **record) -> None:
        from ..fileio import append_line

        append_line(self.path, json.dumps(record))


def plot_curves(log: Path, out: Path, keys=("loss", "val_loss"), size=(640, 360)) -> None:
    """A PNG line plot of the logged curves against step (drawn with Pillow; log-scale y)."""
    from PIL import Image, ImageDraw

    records = log_records(log) if log.is_file() else []
    series = {k: [(r["step"], r[k]) for r in records if k in r and r[k] and r[k] > 0] for k in keys}
    series = {k: v for k, v in series.items() if len(v) >= 1}
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    if series:
        points = [p for v in series.values() for p in v]
        x0, x1 = min(p[0] for p in points), max(max(p[0] for p in points), min(p[0] for p in points) + 1)
        y0, y1 = math.log10(min(p[1] for p in points)), math.log10(max(p[1] for p in points))
        y1 = y1 if y1 > y0 else y0 + 1
        W, H, m = size[0], size[1], 40
        to_xy = lambda s, v: (m + (s - x0) / (x1 - x0) * (W - 2 * m),  # noqa: E731
                              H - m - (math.log10(v) - y0) / (y1 - y0) * (H - 2 * m))
        d.rectangle([m, m, W - m, H - m], outline="black")
        for (k, v), colour in zip(series.items(), ("#1f77b4", "#d62728", "#2ca02c")):
            if len(v) > 1:
                d.line([to_xy(s, y) for s, y in v], fill=colour, width=2)
            d.text((m + 5, m + 5 + 14 * list(series).index(k)), f"{k} (last {v[-1][1]:.4g})", fill=colour)
        d.text((m, H - m + 5), f"step {x0}", fill="black")
        d.text((W - m - 60, H - m + 5), f"step {x1}", fill="black")
        d.text((5, 5), f"log10 y in [{y0:.2f}, {y1:.2f}]", fill="black")
    from ..fileio import atomic_file

    with atomic_file(out) as tmp:
        img.save(tmp, format="PNG")

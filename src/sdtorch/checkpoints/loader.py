"""Strict loading of checkpoint tensors into sdtorch modules, with a report of what matched.

Modules are built on the `meta` device and the file's tensors are assigned into them one by one
(`load_state_dict(assign=True)`), so only one copy of the weights is ever held in memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from .io import StateDict
from .keymaps import Source

SHOW = 8  # names listed per category in an error message


@dataclass
class ComponentReport:
    name: str
    file: str
    matched: int = 0
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    dtype: str = ""

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched


@dataclass
class LoadReport:
    source: str
    format: str  # "original" or "diffusers"
    components: list[ComponentReport] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    detected: dict[str, tuple[object, str]] = field(default_factory=dict)  # property -> (value, how decided)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.components) and not self.unexpected

    def problems(self) -> str:
        parts = []
        for c in self.components:
            for what, names in (("missing", c.missing), ("mis-shaped", c.mismatched)):
                if names:
                    shown = "; ".join(names[:SHOW]) + (f"; ... {len(names) - SHOW} more" if len(names) > SHOW else "")
                    parts.append(f"{len(names)} {what} in {c.name}: {shown}")
        if self.unexpected:
            n = len(self.unexpected)
            parts.append(f"{n} unexpected: " + ", ".join(self.unexpected[:SHOW]) + (" ..." if n > SHOW else ""))
        return " | ".join(parts)

    def __str__(self) -> str:
        lines = [f"loaded {self.source} ({self.format} layout)"]
        for c in self.components:
            status = "ok" if c.ok else f"{len(c.missing)} missing, {len(c.mismatched)} mis-shaped"
            lines.append(f"  {c.name:<13} {c.matched:>5} tensors matched, {status}, {c.dtype}  [{c.file}]")
        lines.append(f"  unexpected keys: {len(self.unexpected)}; known non-weight keys ignored: {len(self.ignored)}")
        for prop, (value, how) in self.detected.items():
            lines.append(f"  {prop}: {value}  ({how})")
        return "\n".join(lines)


def _shape_after(shape: tuple[int, ...], transform) -> tuple[int, ...]:
    if transform == "conv1x1":
        return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape
    if isinstance(transform, tuple):
        return (shape[0] // transform[1],) + tuple(shape[1:])
    return shape


def _apply(t: torch.Tensor, transform) -> torch.Tensor:
    if transform == "conv1x1" and t.dim() == 4:
        return t[:, :, 0, 0]
    if isinstance(transform, tuple):
        return t.chunk(transform[1], dim=0)[transform[0]]
    return t


@contextlib.contextmanager
def on_meta():
    """Build modules empty on the meta device, with torch.nn.init's random fills skipped: there is
    nothing to fill, and `normal_` on a meta tensor imports torch._dynamo, about 1 s of a cold start.
    The fills are swapped out process-wide while the block runs (as transformers' no_init_weights)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def load_component(name: str, factory: Callable[[], nn.Module], sources: Mapping[str, Source],
                   sd: StateDict, dtype: torch.dtype | None, strict: bool) -> tuple[nn.Module, ComponentReport]:
    """Build the module and fill it from `sd`; `sources` maps each parameter to its stored tensor."""
    report = ComponentReport(name, str(sd.path))
    # Strict: an empty (meta) module to fill. Partial: what the file lacks keeps its fresh initialisation.
    with on_meta() if strict else torch.device("cpu"):
        module = factory()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    plan = {}
    for key, shape in expected.items():
        src = sources[key]
        if src.key not in sd:
            report.missing.append(key if src.key == key else f"{src.key} (for {key})")
            continue
        stored = sd.shape(src.key)
        if _shape_after(stored, src.transform) != shape:
            report.mismatched.append(f"{src.key}: file {list(stored)} vs model {list(shape)}")
            continue
        plan[key] = src
    if strict and not report.ok:
        return None, report

    tensors = {}
    for key, src in plan.items():
        # a tensor converted to another dtype is read into memory of its own, not through the file's map,
        # so the file's pages do not stay resident beside the converted weights (io._read_safetensors)
        converted = dtype is not None and sd.dtype(src.key) not in (dtype, None)
        t = _apply(sd.copy(src.key) if converted else sd[src.key], src.transform)
        if dtype is None and t.is_floating_point():
            dtype = t.dtype  # the checkpoint's own dtype, taken from the component's first tensor
        tensors[key] = t.to(dtype) if t.is_floating_point() else t
        report.matched += 1
    module.load_state_dict(tensors, strict=False, assign=True)
    del tensors
    report.dtype = str(dtype or torch.float32).replace("torch.", "")
    if not strict:
        module.to(dtype or torch.float32)
    return module.eval().requires_grad_(False), report


def check(report: LoadReport, strict: bool) -> None:
    """Raise with every problem named unless the load is clean or the caller allowed a partial load."""
    if strict and not report.ok:
        raise CheckpointError(f"{report.source}: checkpoint does not match the model: {report.problems()}. "
                              "Pass strict=False (CLI: --partial) to load what matches.")

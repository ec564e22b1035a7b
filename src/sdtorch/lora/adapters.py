"""Low-rank adapters on a built model: LoRA (Hu et al. 2021, arXiv:2106.09685), LoCon on convs, LoHa (FedPara,
Hyeon-Woo et al. 2022, arXiv:2108.06098) and LoKr (LyCORIS, Yeh et al. 2023, arXiv:2309.14859).

An adapter never edits model code (`models/`) nor the model's state_dict: a forward hook on each base
`nn.Linear`/`nn.Conv2d` adds `scale * adapter(x)` for every attached network, so several networks stack, each with
its own scale. `merge_lora` folds them into the base weights instead (hooks off) and keeps the originals so that
`unmerge_lora` restores them bit for bit.

Dtypes: an adapter computes in its own parameters' dtype (the input is cast to it, the result back to the base
output's dtype). Loaded adapters take the base weight's dtype, as A1111 computes its deltas in the weight's dtype;
adapters made by `create_network` for training are fp32, whatever the base, so small updates are not lost.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SDTorchError

PARTS = ("unet", "text_encoder")
USER_LORAS = "~/.local/share/sdtorch/loras"  # the LoRA folder when $SDTORCH_LORAS is not set


def _check_base(base: nn.Module, where: str) -> None:
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise SDTorchError(f"{where}: a grouped conv (groups {base.groups}) cannot take an adapter")
    elif not isinstance(base, nn.Linear):
        raise SDTorchError(f"{where}: a {type(base).__name__} cannot take an adapter (only Linear and Conv2d)")


def _conv_args(base: nn.Module) -> dict:
    return dict(stride=base.stride, padding=base.padding, dilation=base.dilation)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """W[p, q, k, l] = sum_ij t[i, j, k, l] wa[i, p] wb[j, q]: the CP/Tucker rebuild LyCORIS uses for convs
    (t [r, r, kh, kw], wa [r, out], wb [r, in])."""
    return torch.einsum("ijkl,ip,jq->pqkl", t, wa, wb)


class LoraModule(nn.Module):
    """LoRA for one Linear or Conv2d: adapter(x) = (alpha/rank) * up(down(dropout(x))), so the adapted layer is
    W x + (alpha/rank) B A x (Hu et al. eq. 3, with B = up, A = down). On a conv (LoCon), down is a conv with the
    base's kernel, stride, padding and dilation and up a 1x1 conv; `mid=True` adds LoCon's Tucker/CP core: down and
    up 1x1, a rank-to-rank conv with the base's kernel between them. alpha None means alpha = rank (scale 1)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 mid: bool = False):
        super().__init__()
        _check_base(base, "LoRA")
        self.rank, self.alpha = int(rank), float(rank if alpha is None else alpha)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.is_conv = isinstance(base, nn.Conv2d)
        self.mid = None
        if not self.is_conv:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        elif mid:
            self.down = nn.Conv2d(base.in_channels, rank, 1, bias=False)
            self.mid = nn.Conv2d(rank, rank, base.kernel_size, bias=False, **_conv_args(base))
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, bias=False, **_conv_args(base))
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(self.drop(x))
        if self.mid is not None:
            h = self.mid(h)
        return self.up(h) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """(alpha/rank) * up @ down, shaped like the base weight ([out, in] or [out, in, kh, kw])."""
        up = self.up.weight.flatten(1)  # [out, r]
        if self.mid is not None:
            # delta[o, i] = sum_ab up[o, a] mid[a, b] down[b, i]: mid [r, r, kh, kw] -> [out, in, kh, kw]
            return _tucker(self.mid.weight, up.T, self.down.weight.flatten(1)) * self.scale
        delta = up @ self.down.weight.flatten(1)  # [out, in * kh * kw]
        return (delta * self.scale).reshape(self.up.weight.shape[0], *self.down.weight.shape[1:])


class _DeltaModule(nn.Module):
    """An adapter defined by its weight delta: forward is the base's op with delta_weight() as its weight."""

    def __init__(self, base: nn.Module, tensors: dict[str, torch.Tensor], names: tuple[str, ...]):
        super().__init__()
        _check_base(base, type(self).__name__)
        self.shape = tuple(base.weight.shape)
        self.conv = _conv_args(base) if isinstance(base, nn.Conv2d) else None  # the base's stride/padding/dilation
        for n in names:
            if n in tensors:
                self.register_parameter(n, nn.Parameter(tensors[n].detach().clone()))
            else:
                setattr(self, n, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return F.conv2d(x, self.delta_weight(), None, **self.conv)
        return F.linear(x, self.delta_weight())


class LohaModule(_DeltaModule):
    """LoHa: delta = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) * alpha/rank (FedPara eq. 2, the Hadamard product of two
    low-rank products: rank r^2 for 2r parameters per side). With Tucker cores t1/t2 (convs), each factor is
    rebuilt as t ×1 w_a ×2 w_b. rank = w1_b's first dimension, as A1111 reads it; alpha None: scale 1."""

    NAMES = ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")

    def __init__(self, base: nn.Module, tensors: dict[str, torch.Tensor], alpha: float | None = None):
        super().__init__(base, tensors, self.NAMES)
        if (self.t1 is None) != (self.t2 is None):
            raise SDTorchError("LoHa: a Tucker core t1 without t2 (or t2 without t1)")
        self.rank = self.w1_b.shape[0]
        self.alpha = float(self.rank if alpha is None else alpha)

    def _factor(self, a, b, t) -> torch.Tensor:
        return _tucker(t, a, b) if t is not None else a @ b.flatten(1)

    def delta_weight(self) -> torch.Tensor:
        w1 = self._factor(self.w1_a, self.w1_b, self.t1)
        w2 = self._factor(self.w2_a, self.w2_b, self.t2)
        return (w1 * w2).reshape(self.shape) * (self.alpha / self.rank)


class LokrModule(_DeltaModule):
    """LoKr: delta = kron(w1, w2) * scale (LyCORIS, Yeh et al. 2023, sec. 3.3), each factor stored whole or as a
    low-rank product (w1_a @ w1_b, w2_a @ w2_b; w2 may be a Tucker rebuild from t2 on convs). A conv's w2 is
    [o2, i2, kh, kw] or its flattening [o2, i2*kh*kw]; kron of w1 [o1, i1] with the flattened w2 reshaped to
    [o1*o2, i1*i2, kh, kw] is the 4-d Kronecker product.

    Scale, as LyCORIS and A1111 read a file: rank = w1_b's first dimension if w1 is factorised, else w2_b's if w2
    is; scale = alpha/rank; when neither is factorised there is no rank and the scale is 1 whatever alpha says
    (LyCORIS `LokrModule.__init__`: "if self.use_w2 and self.use_w1: alpha = lora_dim"; A1111 `network_lokr.py`
    leaves dim None so `calc_scale` returns 1). alpha None: scale 1."""

    NAMES = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")

    def __init__(self, base: nn.Module, tensors: dict[str, torch.Tensor], alpha: float | None = None):
        super().__init__(base, tensors, self.NAMES)
        for i in (1, 2):
            whole, a, b = (getattr(self, f"w{i}{s}") for s in ("", "_a", "_b"))
            if (whole is None) == (a is None or b is None):
                raise SDTorchError(f"LoKr: w{i} must be given whole or as w{i}_a and w{i}_b")
        rank = self.w1_b.shape[0] if self.w1 is None else self.w2_b.shape[0] if self.w2 is None else None
        self.rank = rank
        self.alpha = None if alpha is None else float(alpha)

    @property
    def scale(self) -> float:
        return 1.0 if self.rank is None or self.alpha is None else self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        w1 = self.w1 if self.w1 is not None else self.w1_a @ self.w1_b
        if self.w2 is not None:
            w2 = self.w2
        elif self.t2 is not None:
            w2 = _tucker(self.t2, self.w2_a, self.w2_b)
        else:
            w2 = self.w2_a @ self.w2_b.flatten(1)
        return torch.kron(w1, w2.flatten(1)).reshape(self.shape) * self.scale


def _fit(t: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """A stored tensor in the shape the module wants: [r, in] and [r, in, 1, 1] are the same 1x1 weight."""
    if tuple(t.shape) == tuple(shape):
        return t
    if t.numel() == math.prod(shape) and [d for d in t.shape if d != 1] == [d for d in shape if d != 1]:
        return t.reshape(shape)
    raise SDTorchError(f"{what} has shape {list(t.shape)}; the target module needs {list(shape)}")


def adapter_module(weights, base: nn.Module) -> nn.Module:
    """The adapter for one `formats.AdapterWeights` on `base`, in the base weight's dtype and on its device; every
    shape is checked against the base (SDTorchError naming the tensor)."""
    _check_base(base, f"{weights.kind} adapter")
    t = {k: v.to(base.weight.device, base.weight.dtype) for k, v in weights.tensors.items()}
    if weights.kind == "lora":
        if "down" not in t or "up" not in t:
            raise SDTorchError(f"a LoRA needs down and up tensors, got {sorted(t)}")
        rank, up_rank = t["down"].shape[0], t["up"].shape[1] if t["up"].dim() > 1 else -1
        if rank != up_rank:
            raise SDTorchError(f"LoRA rank mismatch: down has rank {rank}, up {up_rank}")
        m = LoraModule(base, rank, weights.alpha, mid="mid" in t)
        with torch.no_grad():
            for part in ("down", "up", "mid"):
                if part in t:
                    layer = getattr(m, part)
                    layer.weight.copy_(_fit(t[part], tuple(layer.weight.shape), f"lora {part}"))
        return m.to(base.weight.device, base.weight.dtype)
    if weights.kind not in ("loha", "lokr"):
        raise SDTorchError(f"unknown adapter kind {weights.kind!r} (lora, loha, lokr)")
    m = (LohaModule if weights.kind == "loha" else LokrModule)(base, t, weights.alpha)
    try:
        delta = m.delta_weight()
    except RuntimeError as e:  # inconsistent factor shapes
        raise SDTorchError(f"{weights.kind} tensors do not fit together: {str(e).splitlines()[0]}") from None
    if delta.shape != base.weight.shape:  # pragma: no cover - reshape in delta_weight raises first
        raise SDTorchError(f"{weights.kind} delta has shape {list(delta.shape)}, the module {list(base.weight.shape)}")
    return m


class LoraNetwork(nn.Module):
    """One named set of adapters: `adapters` over target ids ("unet.<path>", dots written "|" since module names
    cannot hold dots), its `scale`, the file's `metadata`, `path` and `hash` (see `lora_hash`)."""

    def __init__(self, name: str, adapters: dict[str, nn.Module], scale: float = 1.0, metadata: dict | None = None,
                 path: Path | None = None, hash: str = ""):
        super().__init__()
        self.name, self.scale = name, float(scale)
        self.adapters = nn.ModuleDict({k.replace(".", "|"): m for k, m in adapters.items()})
        self.metadata, self.path, self.hash = dict(metadata or {}), path, hash
        self.merged = False  # True while its delta is folded into the base weights (its hooks then add nothing)
        self._handles: list = []

    @property
    def target_ids(self) -> list[str]:
        return [k.replace("|", ".") for k in self.adapters]

    def adapter(self, target_id: str) -> nn.Module:
        return self.adapters[target_id.replace(".", "|")]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, scale={self.scale}, adapters={len(self.adapters)}"


@dataclass
class _State:
    """What a StableDiffusion holds of its LoRAs: the attached networks and, while merged, the original weights."""
    networks: dict[str, LoraNetwork] = field(default_factory=dict)
    originals: dict[str, torch.Tensor] | None = None


def _state(model) -> _State:
    if "_lora_state" not in model.__dict__:
        model._lora_state = _State()
    return model._lora_state


def base_module(model, target_id: str) -> nn.Module:
    """The Linear/Conv2d that a target id names ("unet.<path>" or "text_encoder.<path>")."""
    part, _, path = target_id.partition(".")
    if part not in PARTS or not path:
        raise SDTorchError(f"bad target id {target_id!r}: expected unet.<module path> or text_encoder.<module path>")
    try:
        module = getattr(model, part).get_submodule(path)
    except AttributeError:
        raise SDTorchError(f"the model has no module {target_id!r}") from None
    _check_base(module, target_id)
    return module


def _hook(network: LoraNetwork, adapter: nn.Module):
    def add(module, args, output):
        if network.merged or network.scale == 0:
            return None
        p = next(adapter.parameters())
        return output + network.scale * adapter(args[0].to(p.dtype)).to(output.dtype)
    return add


def attach(model, network: LoraNetwork) -> None:
    """Hook `network` onto its target modules of `model` (a StableDiffusion); folded in at once if merged."""
    state = _state(model)
    if network.name in state.networks:
        raise SDTorchError(f"a LoRA named {network.name!r} is already loaded; unload it or choose another name")
    bases = {t: base_module(model, t) for t in network.target_ids}  # all resolved before any hook is added
    network._handles = [bases[t].register_forward_hook(_hook(network, network.adapter(t))) for t in bases]
    state.networks[network.name] = network
    if state.originals is not None:
        _remerge(model)
    _changed(model)


def detach(model, name: str) -> LoraNetwork:
    """Remove the network `name` (its hooks, and its share of merged weights); returns it."""
    state = _state(model)
    network = _get(model, name)
    for h in network._handles:
        h.remove()
    network._handles, network.merged = [], False
    del state.networks[name]
    if state.originals is not None:
        _remerge(model)
    _changed(model)
    return network


def _changed(model) -> None:
    """Tell the model its weights or hooks changed (a compiled UNet compiles again on its next run)."""
    changed = getattr(model, "weights_changed", None)
    if changed is not None:
        changed()


def _get(model, name: str) -> LoraNetwork:
    networks = _state(model).networks
    if name not in networks:
        loaded = ", ".join(networks) or "none"
        raise SDTorchError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
    return networks[name]


# UNet and text-encoder module names (suffixes of sdtorch module paths) that each option of `targets` adds.
ATTENTION = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0"))
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
CONV = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
TEXT_ATTENTION = tuple(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj"))


def targets(model, unet: bool = True, text_encoder: bool = False, feed_forward: bool = False,
            conv: bool = False) -> list[str]:
    """Target ids to train, in module order: the UNet's attention q/k/v/out, optionally its feed-forward and
    projections, its resnet and resampler convs (LoCon), and the text encoder's self-attention."""
    suffixes = {"unet": (ATTENTION if unet else ()) + (FEED_FORWARD if feed_forward else ()) + (CONV if conv else ()),
                "text_encoder": TEXT_ATTENTION if text_encoder else ()}
    found = []
    for part, ends in suffixes.items():
        for path, m in getattr(model, part).named_modules():
            if ends and isinstance(m, (nn.Linear, nn.Conv2d)) and any(path == e or path.endswith("." + e)
                                                                      for e in ends):
                found.append(f"{part}.{path}")
    return found


def create_network(model, target_ids, rank: int, alpha: float, dropout: float = 0.0, name: str = "lora",
                   seed: int = 0) -> LoraNetwork:
    """A trainable LoRA (fp32, on the base's device; not attached): up zero, as Hu et al. sec. 4.1, so the delta is
    0 at step 0; down Kaiming-uniform (a = sqrt(5), nn.Linear's default, as loralib and kohya do; the paper says
    Gaussian) drawn from `seed`."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise SDTorchError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not _finite(alpha) or alpha <= 0:
        raise SDTorchError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if not _finite(dropout) or not 0 <= dropout < 1:
        raise SDTorchError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    target_ids = list(target_ids)
    if not target_ids or len(set(target_ids)) != len(target_ids):
        raise SDTorchError("create_network needs a non-empty list of distinct target ids")
    g = torch.Generator().manual_seed(seed)
    adapters = {}
    for t in target_ids:
        base = base_module(model, t)
        m = LoraModule(base, rank, alpha, dropout)
        with torch.no_grad():
            nn.init.kaiming_uniform_(m.down.weight, a=math.sqrt(5), generator=g)
            nn.init.zeros_(m.up.weight)
        adapters[t] = m.to(base.weight.device)
    return LoraNetwork(name, adapters, metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})


def network_weights(network: LoraNetwork) -> dict:
    """{target id: formats.AdapterWeights} with CPU copies of the tensors, as `formats.write_lora` takes them."""
    from .formats import AdapterWeights

    out = {}
    for t in network.target_ids:
        m = network.adapter(t)
        if isinstance(m, LoraModule):
            parts = ("down", "up", "mid") if m.mid is not None else ("down", "up")
            tensors, kind, alpha = {p: getattr(m, p).weight for p in parts}, "lora", m.alpha
        else:
            tensors = {n: getattr(m, n) for n in m.NAMES if getattr(m, n) is not None}
            kind, alpha = ("loha" if isinstance(m, LohaModule) else "lokr"), m.alpha
        out[t] = AdapterWeights(kind=kind, tensors={k: v.detach().to("cpu", copy=True).contiguous()
                                                    for k, v in tensors.items()}, alpha=alpha, file_keys=())
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_scale(scale) -> float:
    if not _finite(scale):
        raise SDTorchError(f"a LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


def lora_dir() -> Path:
    """The user's LoRA folder: $SDTORCH_LORAS, else ~/.local/share/sdtorch/loras."""
    return Path(os.environ.get("SDTORCH_LORAS") or USER_LORAS).expanduser()


def builtin_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("sdtorch") / "data" / "loras"))


def find_lora(path_or_name, folder=None) -> Path:
    """A LoRA file: the path itself if it is a file, else the built-in LoRA NAME (sdtorch/data/loras), else
    NAME or NAME.safetensors in `folder` (default `lora_dir()`). Not found: one line naming where it looked."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    folder = Path(folder).expanduser() if folder is not None else lora_dir()
    name = str(path_or_name)
    candidates = []
    if path.name == name:  # a bare name, not a path
        candidates = [builtin_dir() / f"{name}.safetensors", folder / name, folder / f"{name}.safetensors"]
        for c in candidates:
            if c.is_file():
                return c
    looked = ", ".join(str(c) for c in [path] + candidates)
    raise SDTorchError(f"LoRA {name!r} not found (looked at {looked}; the LoRA folder is set by $SDTORCH_LORAS)")


def lora_hash(path) -> str:
    """The short hash A1111 writes in "Lora hashes": for a .safetensors, kohya's `addnet_hash_safetensors` (the
    sha256 of the file after its 8-byte header length and JSON header, i.e. of the tensor bytes alone, so editing
    metadata does not change it), as A1111's `NetworkOnDisk` computes with use_addnet_hash=True; for other files
    the sha256 of the whole file. A1111 keeps the first 12 hex digits (`shorthash = hash[0:12]`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if Path(path).suffix.lower() == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def load_lora(model, path_or_name, scale=1.0, name: str | None = None, partial: bool = False, *, folder=None):
    """Read, resolve, build and check every adapter of a LoRA file, then attach it as `name` (default: the file's
    stem; a network of that name already loaded is replaced). Returns the formats.MatchReport. On any error the
    model is unchanged: nothing is attached or replaced until everything has been validated."""
    scale = _check_scale(scale)
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise SDTorchError(f"a LoRA name must be a non-empty string, got {name!r}")
    path = find_lora(path_or_name, folder)
    from . import formats
    lora = formats.read_lora(path)
    resolved, report = formats.resolve(lora, model, partial=partial)
    adapters = {}
    for t, w in resolved.items():
        try:
            adapters[t] = adapter_module(w, base_module(model, t))
        except SDTorchError as e:
            raise SDTorchError(f"{path}: {t}: {e}") from None
    network = LoraNetwork(name or path.stem, adapters, scale, lora.metadata, path, lora_hash(path))
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.requires_grad_(False)
    if network.name in _state(model).networks:
        detach(model, network.name)
    attach(model, network)
    return report


def loras(model) -> dict[str, LoraNetwork]:
    return dict(_state(model).networks)


def set_lora_scale(model, name: str, scale) -> None:
    """Change one network's scale; on a merged model the weights are merged again from the originals."""
    scale = _check_scale(scale)
    _get(model, name).scale = scale
    if _state(model).originals is not None:
        _remerge(model)
    _changed(model)


def unload_lora(model, name: str) -> None:
    detach(model, name)


def merge_lora(model) -> None:
    """Fold every network's scaled delta into its base weights, W' = W + sum_n s_n dW_n (summed in fp32, rounded
    once to the weight's dtype), keeping exact copies of the originals; the hooks then add nothing. Networks
    loaded, rescaled or unloaded while merged are merged again from the originals, so nothing accumulates."""
    state = _state(model)
    if state.originals is None:
        state.originals = {}
    _remerge(model)
    _changed(model)


def unmerge_lora(model) -> None:
    """Restore the original base weights bit for bit and turn the hooks back on."""
    state = _state(model)
    if state.originals is None:
        return
    with torch.no_grad():
        for t, w in state.originals.items():
            base_module(model, t).weight.copy_(w)
    state.originals = None
    for n in state.networks.values():
        n.merged = False
    _changed(model)


@torch.no_grad()
def _remerge(model) -> None:
    state = _state(model)
    deltas: dict[str, torch.Tensor] = {}
    for network in state.networks.values():
        for t in network.target_ids:
            d = network.adapter(t).delta_weight().float() * network.scale
            deltas[t] = deltas[t] + d if t in deltas else d
        network.merged = True
    for t in set(state.originals) | set(deltas):
        weight = base_module(model, t).weight
        if t not in state.originals:
            state.originals[t] = weight.detach().clone()
        original = state.originals[t]
        weight.copy_(original if t not in deltas else (original.float() + deltas[t].to(weight.device)).to(weight.dtype))

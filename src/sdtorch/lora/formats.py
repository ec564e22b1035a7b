"""LoRA files: read kohya/AUTOMATIC1111, LyCORIS (LoCon, LoHa, LoKr) and diffusers/PEFT files, match their names
to the modules of a model, and write kohya or PEFT files. Names and tensors only; the modules are in `adapters`.

Adapters (LoRA: Hu et al. 2021, arXiv:2106.09685; LoHa: FedPara, Hyeon-Woo et al. 2022, arXiv:2108.06098; LoKr:
LyCORIS, Yeh et al. 2023, arXiv:2309.14859) are kept exactly as stored. Names are resolved through a table of every
way each Linear/Conv2d of the model can be written (kohya's underscores in diffusers or original LDM layout,
diffusers/PEFT dotted names with or without the part prefix), built from the model's own modules, never by guessing
which underscores were dots. Every file key is either matched and shape-checked or reported.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import SDTorchError
from ..fileio import check_file_destination, shown

PARTS = ("unet", "text_encoder")
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: JSON of peft LoraConfig fields
# (file suffix, kind, role): kohya/LoCon, PEFT and LyCORIS tensor names. `None` kind: the alpha scalar.
SUFFIXES = ([(".lora_down.weight", "lora", "down"), (".lora_up.weight", "lora", "up"),
             (".lora_mid.weight", "lora", "mid"), (".lora_A.weight", "lora", "down"), (".lora_B.weight", "lora", "up")]
            + [(f".hada_{r}", "loha", r) for r in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")]
            + [(f".lokr_{r}", "lokr", r) for r in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")]
            + [(".alpha", None, "alpha")])
# Old diffusers attention processors: `<attn>.processor.to_q_lora.down.weight` adapts `<attn>.to_q`.
PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 1280: "sdxl", 2048: "sdxl"}  # cross-attention / text widths


@dataclass
class AdapterWeights:
    """One module's adapter as stored: kind "lora" | "loha" | "lokr", tensors by role (see the module doc of
    `lora_api`), alpha (None: alpha = rank) and the file keys they came from."""
    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None
    file_keys: tuple[str, ...] = ()


@dataclass
class LoraFile:
    """A parsed file: groups keyed by the module name as written in it; `unknown`: keys that are no adapter
    tensor sdtorch reads (DoRA scales, full diffs, ...), reported as unmatched by `resolve`."""
    format: str  # "kohya" | "lycoris" | "peft"
    groups: dict[str, AdapterWeights]
    metadata: dict[str, str]
    family: str  # "sd1" | "sd2" | "sdxl" | "unknown"
    path: Path | None = None
    unknown: list[str] = field(default_factory=list)


@dataclass
class MatchReport:
    matched: dict[str, int]  # adapter tensors matched, per part
    unmatched: list[str]
    total: int

    def summary(self) -> str:
        n = sum(self.matched.values())
        parts = ", ".join(f"{p.replace('_', ' ')} {self.matched.get(p, 0)}" for p in PARTS)
        return f"matched {n} of {self.total} adapter tensors ({parts})"


def _src(path) -> str:
    return shown(path) if path is not None else "LoRA"


# ---- reading ----

def read_lora(path) -> LoraFile:
    """Read a LoRA file safely (safetensors, or torch's weights-only unpickler); one-line SDTorchError if bad."""
    from ..checkpoints.io import read_state_dict

    path = Path(path)
    sd = read_state_dict(path)
    return parse_lora({k: sd[k] for k in sd}, sd.metadata, path=path)


def parse_lora(state_dict, metadata=None, path=None) -> LoraFile:
    """Group a LoRA state dict by module name and kind; raises SDTorchError for an incomplete or mixed group."""
    src, metadata = _src(path), dict(metadata or {})
    raw: dict[str, dict] = {}
    unknown, peft_names = [], set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise SDTorchError(f"{src}: {key!r} is not a tensor")
        hit = next(((key[:-len(s)], kind, role) for s, kind, role in SUFFIXES if key.endswith(s)), None)
        if hit is None and (m := PROCESSOR.match(key)):
            hit = (f"{m[1]}.{'to_out.0' if m[2] == 'to_out' else m[2]}", "lora", m[3])
        if hit is None or not hit[0]:
            unknown.append(key)
            continue
        name, kind, role = hit
        if key.endswith((".lora_A.weight", ".lora_B.weight")) or PROCESSOR.match(key):
            peft_names.add(name)
        g = raw.setdefault(name, {"kinds": set(), "tensors": {}, "alpha": None, "keys": []})
        g["keys"].append(key)
        if role == "alpha":
            if value.numel() != 1 or not value.is_floating_point() and value.dtype not in (torch.int32, torch.int64):
                raise SDTorchError(f"{src}: {key} must be one number, not a {list(value.shape)} tensor")
            g["alpha"] = float(value.reshape(()).item())
        else:
            g["kinds"].add(kind)
            g["tensors"][role] = value
    peft_cfg = _peft_config(metadata, src)
    groups = {}
    for name, g in raw.items():
        if not g["kinds"]:  # an alpha with no adapter beside it
            unknown.extend(g["keys"])
            continue
        if len(g["kinds"]) > 1:
            raise SDTorchError(f"{src}: {name} mixes {' and '.join(sorted(g['kinds']))} tensors")
        kind = g["kinds"].pop()
        missing = _missing_roles(kind, g["tensors"])
        if missing:
            raise SDTorchError(f"{src}: {name} has {', '.join(sorted(g['tensors']))} but no {missing}")
        alpha = g["alpha"]
        if alpha is None and name in peft_names:
            alpha = _peft_alpha(peft_cfg, name)
        groups[name] = AdapterWeights(kind, g["tensors"], alpha, tuple(g["keys"]))
    if not groups and not unknown:
        raise SDTorchError(f"{src}: holds no tensors")
    kinds = {g.kind for g in groups.values()}
    fmt = "lycoris" if kinds & {"loha", "lokr"} else "peft" if peft_names else "kohya"
    return LoraFile(fmt, groups, metadata, _file_family(groups, metadata), Path(path) if path else None, unknown)


def _missing_roles(kind: str, tensors: dict) -> str:
    need = {"lora": [("down",), ("up",)], "loha": [("w1_a",), ("w1_b",), ("w2_a",), ("w2_b",)],
            "lokr": [("w1", "w1_a"), ("w2", "w2_a")]}[kind]
    if kind == "lokr":
        need += [(f"{w}_b",) for w in ("w1", "w2") if f"{w}_a" in tensors]
    return ", ".join("/".join(opts) for opts in need if not any(o in tensors for o in opts))


def _peft_config(metadata: dict, src: str) -> dict[str, dict]:
    """diffusers' LoRA metadata, {part prefix ("" for none): LoraConfig fields}."""
    text = metadata.get(PEFT_METADATA_KEY)
    if not text:
        return {}
    try:
        flat = json.loads(text)
        assert isinstance(flat, dict)
    except (ValueError, AssertionError):
        raise SDTorchError(f"{src}: metadata {PEFT_METADATA_KEY!r} is not a JSON object") from None
    out: dict[str, dict] = {}
    for key, value in flat.items():
        part, dot, rest = key.partition(".")
        part, rest = (part, rest) if dot else ("", key)
        out.setdefault(part, {})[rest] = value
    return out


def _peft_alpha(cfg: dict[str, dict], name: str) -> float | None:
    """The alpha peft would give module `name`: the first alpha_pattern key that matches its end, else lora_alpha
    (as peft's get_pattern_key)."""
    part, _, module = name.partition(".")
    fields = cfg.get(part) if part in cfg else cfg.get("")
    if not fields:
        return None
    module = module if part in cfg else name
    for key, alpha in (fields.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(alpha)
    alpha = fields.get("lora_alpha")
    return None if alpha is None else float(alpha)


# ---- shapes ----

class _Misfit(Exception):
    pass


def _dims(t: torch.Tensor, ndims: tuple[int, ...], what: str) -> tuple[int, ...]:
    if t.dim() not in ndims:
        raise _Misfit(f"{what} is {list(t.shape)}, expected {' or '.join(f'{n}-d' for n in ndims)}")
    return tuple(t.shape)


def _factor(a, b, t, names: tuple[str, str, str]) -> tuple[int, int, tuple | None]:
    """(out, flattened in, kernel or None) of a @ b, or of a CP/Tucker product with core t (LyCORIS make_weight_cp:
    t [r1, r2, kh, kw], a [r1, out], b [r2, in])."""
    na, nb, nt = names
    a_s, b_s = _dims(a, (2,), na), _dims(b, (2,) if t is not None else (2, 4), nb)
    if t is None:
        if a_s[1] != b_s[0]:
            raise _Misfit(f"rank mismatch: {na} {list(a_s)} has rank {a_s[1]}, {nb} {list(b_s)} rank {b_s[0]}")
        return a_s[0], math.prod(b_s[1:]), (b_s[2:] if len(b_s) == 4 else None)
    t_s = _dims(t, (4,), nt)
    if t_s[0] != a_s[0] or t_s[1] != b_s[0]:
        raise _Misfit(f"rank mismatch: {nt} {list(t_s)} against {na} {list(a_s)} and {nb} {list(b_s)}")
    return a_s[1], b_s[1] * math.prod(t_s[2:]), t_s[2:]


def _delta_shape(aw: AdapterWeights) -> tuple[int, int, tuple | None]:
    """(out, in * kh * kw, kernel or None) of the weight update an adapter makes; _Misfit if its tensors disagree."""
    t = aw.tensors
    if aw.kind == "lora":
        down, up = _dims(t["down"], (2, 4), "lora_down"), _dims(t["up"], (2, 4), "lora_up")
        if len(down) != len(up) or len(up) == 4 and up[2:] != (1, 1):
            raise _Misfit(f"lora_up {list(up)} does not go with lora_down {list(down)}")
        if "mid" in t:
            mid = _dims(t["mid"], (4,), "lora_mid")
            if len(down) != 4 or down[2:] != (1, 1) or mid[:2] != (up[1], down[0]):
                raise _Misfit(f"rank mismatch: lora_mid {list(mid)} against lora_down {list(down)}, "
                              f"lora_up {list(up)}")
            return up[0], down[1] * math.prod(mid[2:]), mid[2:]
        if up[1] != down[0]:
            raise _Misfit(f"rank mismatch: lora_down {list(down)} has rank {down[0]}, lora_up {list(up)} rank {up[1]}")
        return up[0], math.prod(down[1:]), (down[2:] if len(down) == 4 else None)
    if aw.kind == "loha":
        f1 = _factor(t["w1_a"], t["w1_b"], t.get("t1"), ("hada_w1_a", "hada_w1_b", "hada_t1"))
        f2 = _factor(t["w2_a"], t["w2_b"], t.get("t2"), ("hada_w2_a", "hada_w2_b", "hada_t2"))
        if f1[:2] != f2[:2] or None not in (f1[2], f2[2]) and f1[2] != f2[2]:
            raise _Misfit(f"the two Hadamard factors differ: [{f1[0]}, {f1[1]}] and [{f2[0]}, {f2[1]}]")
        return f1[0], f1[1], f1[2] or f2[2]
    if "w1" in t:
        a, b = _dims(t["w1"], (2,), "lokr_w1")
    else:
        a, b, _ = _factor(t["w1_a"], t["w1_b"], None, ("lokr_w1_a", "lokr_w1_b", ""))
    if "w2" in t:
        w2 = _dims(t["w2"], (2, 4), "lokr_w2")
        c, flat, kernel = w2[0], math.prod(w2[1:]), (w2[2:] if len(w2) == 4 else None)
    else:
        c, flat, kernel = _factor(t["w2_a"], t["w2_b"], t.get("t2"), ("lokr_w2_a", "lokr_w2_b", "lokr_t2"))
    return a * c, b * flat, kernel  # Kronecker product: [a, b] (x) [c, d, ...] is [a*c, b*d, ...]


def rank(aw: AdapterWeights) -> int | None:
    """The adapter's rank (None for a LoKr made of full matrices)."""
    t = aw.tensors
    if aw.kind == "lora":
        return t["down"].shape[0]
    if aw.kind == "loha":
        return t["w1_b"].shape[0]
    for name in ("w2_b", "w1_b"):
        if name in t:
            return t[name].shape[0]
    return None


def check_adapter(aw: AdapterWeights, weight_shape: tuple[int, ...]) -> str | None:
    """Why `aw` does not fit a module whose weight has `weight_shape` (Linear [out, in], Conv2d [out, in, kh, kw]),
    or None when it fits."""
    if any(not v.is_floating_point() for v in aw.tensors.values()):
        return "holds non-float tensors"
    if aw.alpha is not None and not math.isfinite(aw.alpha):
        return f"alpha is {aw.alpha}"
    try:
        out, flat, kernel = _delta_shape(aw)
    except _Misfit as e:
        return str(e)
    conv = len(weight_shape) == 4
    wrong_kind = aw.kind == "lora" and (aw.tensors["down"].dim() == 4) != conv
    if (wrong_kind or out != weight_shape[0] or flat != math.prod(weight_shape[1:])
            or kernel is not None and (not conv or tuple(kernel) != tuple(weight_shape[2:]))):
        shape = [out, flat] if kernel is None else [out, flat // max(1, math.prod(kernel)), *kernel]
        return f"makes a {list(shape)} update for a {'Conv2d' if conv else 'Linear'} weight of {list(weight_shape)}"
    return None


# ---- families ----

def _file_family(groups: dict[str, AdapterWeights], metadata: dict) -> str:
    """What base a file fits: SDXL names or metadata, else cross-attention / text widths, else sd_v1/sd_v2 metadata."""
    base = str(metadata.get("ss_base_model_version", "")).lower()
    if base.startswith("sdxl") or any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for n in groups):
        return "sdxl"
    family = _shape_family(groups)
    if family != "unknown":
        return family
    if base.startswith("sd_v1"):
        return "sd1"
    return "sd2" if base.startswith("sd_v2") or metadata.get("ss_v2") == "True" else "unknown"


def _shape_family(groups: dict[str, AdapterWeights]) -> str:
    """The family the cross-attention key/value and text-encoder attention input widths point to."""
    widths = Counter()
    for name, aw in groups.items():
        cross = re.search(r"attn2[._]to_[kv]$", name)
        text = re.search(r"(lora_te|text).*(q|k|v)_proj$", name)
        if cross or text:
            try:
                widths[_delta_shape(aw)[1]] += 1
            except _Misfit:
                pass
    found = {WIDTH_FAMILY[w] for w in widths if w in WIDTH_FAMILY}
    return found.pop() if len(found) == 1 else "unknown"


def model_family(config) -> str:
    """"sd1" (768-wide cross-attention), "sd2" (1024) or "custom" (any other: a file fits if its shapes fit)."""
    return {768: "sd1", 1024: "sd2"}.get(config.unet.context_dim, "custom")


def _check_family(lora: LoraFile, model, src: str) -> None:
    ours = model_family(model.config)
    theirs = lora.family if ours != "custom" or lora.family == "sdxl" else _shape_family(lora.groups)
    if theirs in FAMILY_NAMES and theirs != ours:
        where = (f"an {FAMILY_NAMES[ours]} model" if ours in FAMILY_NAMES
                 else f"this model (cross-attention width {model.config.unet.context_dim})")
        raise SDTorchError(f"{src}: an {FAMILY_NAMES[theirs]} LoRA cannot load into {where}")


# ---- names ----

def name_table(model) -> dict[str, str | tuple[str, ...]]:
    """Every way a file may name each Linear/Conv2d of `model` (unet and text encoder) -> its target id; a tuple
    of ids where one spelling could mean several modules."""
    from ..checkpoints.keymaps import UNET_PREFIX, original_sources

    table: dict[str, str | tuple[str, ...]] = {}

    def add(spelling: str, target: str) -> None:
        prev = table.setdefault(spelling, target)
        if prev != target and target not in (prev if isinstance(prev, tuple) else (prev,)):
            table[spelling] = (*(prev if isinstance(prev, tuple) else (prev,)), target)

    for part, prefixes in (("unet", ("unet.", "")), ("text_encoder", ("text_encoder.text_model.", "text_encoder.",
                                                                      "text_model.", ""))):
        for path, module in getattr(model, part).named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            target, kohya = f"{part}.{path}", [path]
            if part == "unet":
                try:  # original LDM layout (input_blocks/middle_block/output_blocks), from the checkpoint rename table
                    key = original_sources("unet", [path + ".weight"], model.config)[path + ".weight"].key
                    kohya.append(key[len(UNET_PREFIX):-len(".weight")])
                except KeyError:
                    pass
            else:
                kohya.append("text_model." + path)
            for name in kohya:
                add(f"lora_{'unet' if part == 'unet' else 'te'}_" + name.replace(".", "_"), target)
            for prefix in prefixes:
                add(prefix + path, target)
    return table


@functools.lru_cache(maxsize=None)
def _preset_table(families: tuple[str, ...]) -> dict:
    """The name table of every preset of these families, built on the meta device (for conversions without a
    model); spellings that mean different modules in different presets are ambiguous."""
    from ..checkpoints.loader import on_meta
    from ..config import PRESETS
    from ..models import CLIPTextModel, UNet

    merged: dict = {}
    for config in PRESETS.values():
        if model_family(config) not in families:
            continue
        with on_meta():
            fake = SimpleNamespace(unet=UNet(config.unet), text_encoder=CLIPTextModel(config.text), config=config)
        for spelling, target in name_table(fake).items():
            prev = merged.setdefault(spelling, target)
            if prev != target:
                merged[spelling] = tuple(dict.fromkeys((*_as_tuple(prev), *_as_tuple(target))))
    return merged


def _as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _match(lora: LoraFile, table: dict, weight_shape, src: str) -> tuple[dict[str, AdapterWeights], list[str]]:
    """{target id: adapter} and the unmatched file keys; raises SDTorchError naming the first adapters that do not
    fit (`weight_shape(target)` gives the module's weight shape, or None to check only the adapter itself)."""
    adapters, owner, unmatched, bad = {}, {}, list(lora.unknown), []
    for name, aw in lora.groups.items():
        target = table.get(name)
        if target is None:
            unmatched.extend(aw.file_keys)
            continue
        if isinstance(target, tuple):
            bad.append(f"{name} could name any of {', '.join(target)}")
            continue
        if target in adapters:
            bad.append(f"{owner[target]} and {name} both adapt {target}")
            continue
        problem = check_adapter(aw, weight_shape(target)) if weight_shape else _self_check(aw)
        if problem:
            bad.append(f"{name}: {problem}")
        adapters[target], owner[target] = aw, name
    if bad:
        raise SDTorchError(f"{src}: {len(bad)} adapter{'s' if len(bad) > 1 else ''} do not fit: {_first(bad)}")
    return adapters, unmatched


def _self_check(aw: AdapterWeights) -> str | None:
    try:
        _delta_shape(aw)
    except _Misfit as e:
        return str(e)
    return None if aw.alpha is None or math.isfinite(aw.alpha) else f"alpha is {aw.alpha}"


def resolve(lora: LoraFile, model, partial: bool = False) -> tuple[dict[str, AdapterWeights], MatchReport]:
    """Map the file's adapters to target ids of `model` and check each against its module; SDTorchError on a
    family mismatch, any misfit, or (unless `partial`, which warns with the counts) any unmatched key."""
    src = _src(lora.path)
    _check_family(lora, model, src)

    def weight_shape(target: str) -> tuple[int, ...]:
        part, _, path = target.partition(".")
        return tuple(getattr(model, part).get_submodule(path).weight.shape)

    adapters, unmatched = _match(lora, name_table(model), weight_shape, src)
    matched = dict.fromkeys(PARTS, 0)
    for target, aw in adapters.items():
        matched[target.partition(".")[0]] += len(aw.file_keys)
    report = MatchReport(matched, unmatched, sum(matched.values()) + len(unmatched))
    if not adapters:
        raise SDTorchError(f"{src}: none of its {report.total} adapter tensors match a module of the model "
                           f"(first: {_first(unmatched)})")
    if unmatched and not partial:
        raise SDTorchError(f"{src}: {len(unmatched)} of {report.total} adapter tensors match no module of the "
                           f"model: {_first(unmatched)}; load the rest with partial=True (--lora-partial)")
    if unmatched:
        warnings.warn(f"{src}: loading only part of the LoRA: {report.summary()}; {len(unmatched)} unmatched, "
                      f"e.g. {_first(unmatched)}", stacklevel=2)
    return adapters, report


# ---- writing ----

def to_state_dict(adapters: dict[str, AdapterWeights], to: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata in kohya names (diffusers-style, LyCORIS names for LoHa/LoKr) or diffusers' PEFT layout
    (alphas in its `lora_adapter_metadata` JSON: r, lora_alpha, rank_pattern, alpha_pattern, target_modules)."""
    if to not in ("kohya", "peft"):
        raise SDTorchError(f"unknown LoRA format {to!r}; expected kohya or peft")
    tensors, per_part = {}, {}
    for target, aw in adapters.items():
        part, _, path = target.partition(".")
        if part not in PARTS or not path:
            raise SDTorchError(f"{target!r} is not a target id (unet.<module> or text_encoder.<module>)")
        if to == "kohya":
            name = ("lora_unet_" if part == "unet" else "lora_te_text_model_") + path.replace(".", "_")
            for role, t in aw.tensors.items():
                suffix = {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight"}.get(role) \
                    if aw.kind == "lora" else f"{'hada' if aw.kind == 'loha' else 'lokr'}_{role}"
                tensors[f"{name}.{suffix}"] = t
            if aw.alpha is not None:
                tensors[f"{name}.alpha"] = _alpha_tensor(aw)
            continue
        if aw.kind != "lora" or "mid" in aw.tensors:
            raise SDTorchError(f"{target}: a {'Tucker LoCon' if aw.kind == 'lora' else aw.kind} adapter has no "
                               "PEFT form; write it in kohya (LyCORIS) format")
        name = ("unet." if part == "unet" else "text_encoder.text_model.") + path
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = aw.tensors["down"], aw.tensors["up"]
        per_part.setdefault(part, {})[path] = (rank(aw), aw.alpha)
    if to == "kohya" or all(a is None for p in per_part.values() for _, a in p.values()):
        return tensors, {}
    meta = {}
    for part, mods in per_part.items():
        ranks = {p: r for p, (r, _) in mods.items()}
        alphas = {p: _plain(r if a is None else a) for p, (r, a) in mods.items()}
        r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
        meta.update({f"{part}.r": r, f"{part}.lora_alpha": alpha, f"{part}.target_modules": sorted(mods),
                     f"{part}.rank_pattern": {p: v for p, v in ranks.items() if v != r},
                     f"{part}.alpha_pattern": {p: v for p, v in alphas.items() if v != alpha}})
    return tensors, {"format": "pt", PEFT_METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}


def _plain(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _alpha_tensor(aw: AdapterWeights) -> torch.Tensor:
    """kohya's scalar alpha, in the weights' dtype (as kohya saves it) where that holds the value exactly."""
    dtype = next(iter(aw.tensors.values())).dtype
    t = torch.tensor(aw.alpha, dtype=dtype)
    return t if float(t) == aw.alpha else torch.tensor(aw.alpha, dtype=torch.float32)


def write_lora(path, adapters: dict[str, AdapterWeights], to: str = "kohya", metadata=None) -> Path:
    """Write `adapters` (by target id) as a .safetensors in `to` format, atomically; `metadata`: extra str -> str."""
    from ..checkpoints.io import write_safetensors

    path = check_file_destination(path, (".safetensors",))
    tensors, meta = to_state_dict(adapters, to)
    extra = dict(metadata or {})
    bad = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise SDTorchError(f"{shown(path)}: metadata must map text to text; {bad[0]!r} does not")
    write_safetensors(tensors, path, {**extra, **meta})
    return path


def convert_lora(src, dst, to: str, model=None) -> Path:
    """Rewrite a LoRA file in kohya or PEFT format; the tensors are kept as they are, so converting back gives
    identical ones. Names resolve against `model`, or without one against the presets of the file's family."""
    lora = read_lora(src)
    if model is not None:
        adapters, _ = resolve(lora, model)
    else:
        families = (lora.family,) if lora.family in ("sd1", "sd2") else ("sd1", "sd2", "custom")
        if lora.family == "sdxl":
            raise SDTorchError(f"{_src(src)}: an SDXL LoRA; sdtorch has no SDXL model to convert its names for")
        adapters, unmatched = _match(lora, _preset_table(families), None, _src(src))
        if unmatched:
            raise SDTorchError(f"{_src(src)}: {len(unmatched)} tensors name no module sdtorch knows: "
                               f"{_first(unmatched)}; convert with the model they are for")
    keep = {k: v for k, v in lora.metadata.items() if k not in (PEFT_METADATA_KEY, "format")}
    return write_lora(dst, adapters, to, keep)


def _part_of(name: str) -> str:
    if name.startswith(("lora_te2_", "text_encoder_2.")):
        return "text_encoder_2"
    return "text_encoder" if name.startswith(("lora_te", "text_encoder", "text_model.", "encoder.")) else "unet"


def lora_info(path) -> dict:
    """What `sdtorch lora-info` shows: format, family, kinds, ranks, alphas, targets by part and kind, counts and
    metadata."""
    lora = read_lora(path)
    targets: dict[str, Counter] = {}
    for name, aw in lora.groups.items():
        targets.setdefault(_part_of(name), Counter())[aw.kind] += 1
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for aw in lora.groups.values() for t in aw.tensors.values())
    return {"path": str(lora.path), "format": lora.format, "family": lora.family,
            "kinds": dict(Counter(aw.kind for aw in lora.groups.values())),
            "ranks": dict(sorted(Counter(rank(aw) for aw in lora.groups.values()).items(), key=str)),
            "alphas": dict(sorted(Counter(aw.alpha for aw in lora.groups.values()).items(), key=str)),
            "targets": {p: dict(c) for p, c in targets.items()},
            "modules": {p: sorted(n for n in lora.groups if _part_of(n) == p) for p in targets},
            "counts": {"adapters": len(lora.groups), "tensors": sum(len(aw.file_keys) for aw in lora.groups.values())
                       + len(lora.unknown), "unknown": len(lora.unknown)},
            "unknown_keys": lora.unknown, "dtypes": dict(dtypes), "metadata": lora.metadata}

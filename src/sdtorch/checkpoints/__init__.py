"""Every checkpoint format sdtorch reads and writes, in one place.

- Original single files (`.safetensors`, `.ckpt`): SD1 and SD2 CompVis layouts, with or without EMA.
- diffusers folders: `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`; for
  class-conditional and unconditional models no text encoder or tokenizer (`diffusers_folder` doc).

A model without a text encoder (`ModelConfig.text` is None) reads as modules {"unet", "vae",
"text_encoder": None} and tokenizer None, and writes without them.

Reading is strict: every missing, unexpected or mis-shaped key is reported by name, and the load fails
unless `strict=False`. See `detect` for how family, architecture and prediction type are decided.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..config import PRESETS, ConfigError, ModelConfig
from ..errors import CheckpointError
from ..fileio import atomic_folder, check_file_destination, check_folder_destination, make_parents, shown
from ..models import AutoencoderKL, CLIPTextModel, UNet
from ..tokenizer import CLIPTokenizer
from . import detect, diffusers_folder, keymaps
from .io import StateDict, read_state_dict, write_safetensors  # noqa: F401 (StateDict: re-exported)
from .keymaps import SD1_TEXT_PREFIX, Source
from .loader import LoadReport, check, load_component, on_meta

__all__ = ["LoadReport", "components", "load_vae", "on_meta", "read_checkpoint", "read_state_dict",
           "save_diffusers", "save_single_file", "save_vae"]

FACTORIES = {"unet": lambda c: UNet(c.unet), "vae": lambda c: AutoencoderKL(c.vae),
             "text_encoder": lambda c: CLIPTextModel(c.text)}


def components(config: ModelConfig) -> tuple[str, ...]:
    """The networks a model of this config has: no text encoder for a class-conditional or unconditional UNet."""
    return tuple(name for name in FACTORIES if name != "text_encoder" or config.text is not None)


def _keys(component: str, config: ModelConfig) -> list[str]:
    with on_meta():
        return list(FACTORIES[component](config).state_dict())


def _resolve_config(config) -> ModelConfig | None:
    if config is None or isinstance(config, ModelConfig):
        return config
    if isinstance(config, str) and config.lower() in PRESETS:
        return PRESETS[config.lower()]
    if diffusers_folder.is_diffusers_folder(Path(config)):
        return diffusers_folder.read_config(Path(config))
    raise CheckpointError(f"{config}: config must be a ModelConfig, a preset ({', '.join(PRESETS)}) "
                          "or a diffusers folder")


def read_checkpoint(path, dtype=None, prediction_type=None, config=None, use_ema=False, strict=True):
    """Read a single file or a diffusers folder.

    Returns (config, {"unet", "vae", "text_encoder"} modules, tokenizer, LoadReport). A model without a text
    encoder (config.text None: class-conditional or unconditional) gives modules["text_encoder"] = None and
    tokenizer None. `dtype` may be a function of the model's config, called once the config is known (for a
    dtype that depends on the model's size).
    """
    path = Path(path)
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise CheckpointError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    config = _resolve_config(config)
    if path.is_dir():
        if not diffusers_folder.is_diffusers_folder(path):
            raise CheckpointError(f"{path}: folder has no model_index.json (not a diffusers model folder)")
        return _read_folder(path, dtype, prediction_type, config, strict)
    return _read_single(path, dtype, prediction_type, config, use_ema, strict)


def _read_folder(path, dtype, prediction_type, config, strict):
    report = LoadReport(str(path), "diffusers")
    folder_config = diffusers_folder.read_config(path)
    how = "scheduler/scheduler_config.json" if (path / "scheduler" / "scheduler_config.json").is_file() else "default"
    config = config or folder_config
    _check_parts(config, str(path))
    if prediction_type:
        config, how = config.replace(prediction_type=prediction_type), "set by caller"
    family_how = "from the text encoder config" if config.text else "no text encoder"
    report.detected = {"family": (config.family, family_how),
                       "prediction_type": (config.prediction_type, how),
                       "inpainting": (config.inpainting, f"UNet in_channels={config.unet.in_channels}")}
    _detect_conditioning(report, config, "unet/config.json")
    dtype = dtype(config) if callable(dtype) else dtype
    modules = dict.fromkeys(FACTORIES)  # a text encoder stays None where the model has none
    for name in components(config):
        sd = read_state_dict(diffusers_folder.weight_file(path, name))
        hf_text = name == "text_encoder" and "text_model.embeddings.token_embedding.weight" in sd
        prefix = "text_model." if hf_text else ""
        sources = {k: Source(prefix + k) for k in _keys(name, config)}
        modules[name], comp = load_component(name, lambda: FACTORIES[name](config), sources, sd, dtype, strict)
        report.components.append(comp)
        used = {s.key for s in sources.values()}
        report.unexpected += [f"{name}/{k}" for k in sd if k not in used and not k.endswith("position_ids")]
    check(report, strict)
    tok_dir = path / "tokenizer"
    if config.text is None:
        return config, modules, None, report
    if tok_dir.is_dir():
        tokenizer = CLIPTokenizer.from_folder(tok_dir)
        check_tokenizer(tokenizer, config, f"{tok_dir}: the tokenizer")
    else:
        tokenizer = CLIPTokenizer.bundled(config.pad_token)
        check_tokenizer(tokenizer, config,
                        f"{path}: the folder has no tokenizer/, so the bundled CLIP one is used, and")
    return config, modules, tokenizer, report


def _read_single(path, dtype, prediction_type, config, use_ema, strict):
    sd = read_state_dict(path)
    report = LoadReport(str(path), "original")
    # without text encoder keys (class-conditional, unconditional) the family is the config's
    family = config.family if config is not None and config.text is None else detect.detect_family(sd)
    meta_config = detect.config_from_metadata(sd.metadata, str(path))
    if config is not None:
        how = "set by caller"
    elif meta_config is not None:
        config, how = meta_config, "sdtorch_config in the file's metadata"
    else:
        config, how = detect.infer_config(sd, family), "inferred from tensor shapes and the family's head rule"
    _check_parts(config, f"{path}: {how}")
    report.detected["family"] = (family, "text encoder keys" if config.text else "the config (no text encoder)")
    report.detected["architecture"] = (f"UNet {config.unet.block_channels} x{config.unet.layers_per_block}, "
                                       f"context {config.unet.context_dim}", how)
    report.detected["inpainting"] = (config.inpainting, f"UNet in_channels={config.unet.in_channels}")
    _detect_conditioning(report, config, how)

    has_ema = any(k.startswith(keymaps.EMA_PREFIX + "diffusion_model") for k in sd)
    if use_ema and not has_ema:
        raise CheckpointError(f"{path}: use_ema was asked for but the file has no EMA weights (model_ema.*)")
    report.detected["ema"] = ("used" if use_ema else ("present, not used" if has_ema else "absent"),
                              "model_ema.* keys")
    dtype = dtype(config) if callable(dtype) else dtype
    modules, used = dict.fromkeys(FACTORIES), set()
    for name in components(config):
        sources = keymaps.original_sources(name, _keys(name, config), config)
        if (name == "text_encoder" and family == "sd1"
                and f"{SD1_TEXT_PREFIX}embeddings.token_embedding.weight" not in sd):
            sources = {k: Source("cond_stage_model.transformer." + k) for k in sources}  # pre-4.x transformers
        if name == "unet" and use_ema:
            sources = {k: Source(keymaps.ema_name(s.key), s.transform) if s.key.startswith(keymaps.UNET_PREFIX)
                       else s for k, s in sources.items()}  # LDM's EMA holds the diffusion model only
        modules[name], comp = load_component(name, lambda: FACTORIES[name](config), sources, sd, dtype, strict)
        report.components.append(comp)
        used |= {s.key for s in sources.values()}
    for k in sd:
        if k in used:
            continue
        (report.ignored if keymaps.is_ignored_original(k, config) or k.startswith("model.diffusion_model.")
         and use_ema else report.unexpected).append(k)
    check(report, strict)

    pred, phow = prediction_type, "set by caller"
    if pred is None:
        pred, phow = detect.prediction_from_metadata(sd.metadata), "the file's metadata"
    if pred is None and config.text is None:
        pred, phow = config.prediction_type, "the config"
    if pred is None and family == "sd1":
        pred, phow = "epsilon", "rule: SD1 checkpoints predict noise"
    if pred is None:
        v = detect.probe_v_prediction(modules["unet"], config.unet.context_dim)
        pred = "v_prediction" if v else "epsilon"
        phow = "rule: SD2 UNet probe at t=999 (override with prediction_type)"
    config = config.replace(prediction_type=pred)
    report.detected["prediction_type"] = (pred, phow)
    if config.text is None:
        return config, modules, None, report
    tokenizer = CLIPTokenizer.from_metadata(sd.metadata, str(path))
    if tokenizer is None:
        tokenizer = CLIPTokenizer.bundled(config.pad_token)
        check_tokenizer(tokenizer, config, f"{path}: the file carries no tokenizer, so the bundled CLIP one is used, "
                        "and", "; convert the model's diffusers folder with this sdtorch (it stores its tokenizer), "
                        "or load the folder")
    else:
        check_tokenizer(tokenizer, config, f"{path}: its tokenizer")
    return config, modules, tokenizer, report


def _detect_conditioning(report: LoadReport, config: ModelConfig, how: str) -> None:
    """Report what a class-conditional or unconditional UNet is conditioned on (text models stay unreported)."""
    u = config.unet
    if u.conditioning == "class":
        report.detected["conditioning"] = (f"{u.num_classes} classes ({u.class_conditioning} mode), null class "
                                           f"{u.null_class}", how)
    elif u.conditioning == "none":
        report.detected["conditioning"] = ("none (no cross-attention)", how)


def _check_parts(config: ModelConfig, where: str) -> None:
    """CheckpointError naming `where` unless the config's networks fit together (ModelConfig.check_parts)."""
    try:
        config.check_parts()
    except ConfigError as e:
        raise CheckpointError(f"{where}: the networks do not fit together: {e}") from None


def check_tokenizer(tokenizer: CLIPTokenizer, config: ModelConfig, where: str, hint: str = "") -> None:
    """Refuse a tokenizer whose ids index past the text encoder's token table, or whose rows are longer
    than its position table (either would fail, or read garbage, at the first prompt)."""
    top = max(tokenizer.vocab.values())
    if top >= config.text.vocab_size:
        raise CheckpointError(f"{where} gives token ids up to {top}, beyond the text encoder's "
                              f"{config.text.vocab_size} token embeddings{hint}")
    if tokenizer.max_length > config.text.max_positions:
        raise CheckpointError(f"{where} makes rows of {tokenizer.max_length} tokens, more than the text encoder's "
                              f"{config.text.max_positions} positions{hint}")


def _state(module: torch.nn.Module, dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu()
            for k, v in module.state_dict().items()}


def save_single_file(modules: dict, config: ModelConfig, path, dtype=None,
                     tokenizer: CLIPTokenizer | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write one `.safetensors` in the original CompVis layout (what AUTOMATIC1111 and ComfyUI load).
    A tokenizer other than the bundled CLIP one is stored in the metadata (`CLIPTokenizer.to_metadata`).
    A model without a text encoder writes the UNet and VAE only (`modules["text_encoder"]` may be absent).
    `metadata` adds string entries to the header (a class model's names, say).
    The destination is checked before any tensor is converted; a file there is replaced atomically."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{shown(path)}: single files are written as .safetensors only (pickles can run code)")
    check_file_destination(path)
    out: dict[str, torch.Tensor] = {}
    for name in components(config):
        state = _state(modules[name], dtype)
        parts: dict[str, list] = {}
        for key, src in keymaps.original_sources(name, list(state), config).items():
            t = state[key]
            if src.transform == "conv1x1":
                t = t[:, :, None, None]
            if isinstance(src.transform, tuple):
                parts.setdefault(src.key, [None] * src.transform[1])[src.transform[0]] = t
            else:
                out[src.key] = t
        out.update({k: torch.cat(chunks, dim=0) for k, chunks in parts.items()})
    meta = {"sdtorch_config": json.dumps(dataclasses.asdict(config)), "prediction_type": config.prediction_type,
            "format": "pt", **(tokenizer.to_metadata() if tokenizer is not None else {}), **(metadata or {})}
    write_safetensors(out, path, metadata=meta)
    return path


def is_model_folder(folder: Path) -> bool:
    """A diffusers pipeline folder (it holds model_index.json): what `save_diffusers` may replace."""
    return (folder / "model_index.json").is_file()


def is_vae_folder(folder: Path) -> bool:
    """An AutoencoderKL folder (config.json beside its weights, no model_index.json): what `save_vae`
    may replace."""
    return ((folder / "config.json").is_file() and not is_model_folder(folder)
            and any((folder / name).is_file() for name in diffusers_folder.WEIGHT_FILES["vae"]))


def check_model_destination(folder) -> Path:
    """`folder` can take a diffusers folder: see `save_diffusers`."""
    return check_folder_destination(folder, replaceable=is_model_folder,
                                    what="a diffusers model folder (no model_index.json)")


def save_diffusers(modules: dict, config: ModelConfig, tokenizer: CLIPTokenizer | None, folder, dtype=None,
                   extra_files: dict[str, str] | None = None) -> Path:
    """Write a diffusers folder that `diffusers.StableDiffusionPipeline.from_pretrained` opens (a text model),
    `LDMPipeline.from_pretrained` (an unconditional one), or, for a class-conditional model, whose UNet, VAE
    and scheduler diffusers' classes open one by one (`diffusers_folder` doc); `tokenizer` is None for these.

    The folder is built under a temporary name beside `folder` and renamed into place, so it appears
    whole or not at all. An existing `folder` is replaced as a whole, but only when it is empty or a
    model folder (it holds model_index.json); any other existing folder, or a file there, is refused
    before any tensor is converted. (diffusers' save_pretrained writes into an existing folder and
    keeps whatever else it holds, stale weights included; here the result holds exactly this model.)
    `extra_files`: more files for the folder's top level, name -> text (e.g. the generation defaults).
    Missing folders above `folder` are created, as save_pretrained does.
    """
    make_parents(folder)
    folder = check_model_destination(folder)
    configs = diffusers_folder.component_configs(config)
    with atomic_folder(folder) as tmp:
        for name, sub in diffusers_folder.subfolders(config).items():
            (tmp / sub).mkdir()
            state = _state(modules[name], dtype)
            if name == "text_encoder":
                state = {"text_model." + k: v for k, v in state.items()}
            (tmp / sub / "config.json").write_text(json.dumps(configs[name], indent=2))
            write_safetensors(state, tmp / sub / diffusers_folder.WEIGHT_FILES[name][0], metadata={"format": "pt"})
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"], indent=2))
        if config.text is not None:
            tokenizer.save(tmp / "tokenizer")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "model_index.json").write_text(json.dumps(configs["model_index"], indent=2))
    return folder


def save_vae(vae: AutoencoderKL, folder, sample_size: int) -> Path:
    """Write an autoencoder alone as diffusers' AutoencoderKL folder (`config.json` + weights), built
    under a temporary name and renamed into place. An existing `folder` is replaced as a whole only
    when it is empty or such a folder (`is_vae_folder`); anything else there is refused first. Missing
    folders above `folder` are created, as save_pretrained does."""
    make_parents(folder)
    folder = check_folder_destination(folder, replaceable=is_vae_folder,
                                      what="an autoencoder folder (config.json and its weights)")
    config = ModelConfig(family="sd1", vae=vae.config, sample_size=sample_size)
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(diffusers_folder.component_configs(config)["vae"], indent=2))
        write_safetensors(_state(vae, None), tmp / diffusers_folder.WEIGHT_FILES["vae"][0], metadata={"format": "pt"})
    return folder


def load_vae(path, dtype=None) -> AutoencoderKL:
    """An autoencoder from an AutoencoderKL folder (`save_vae`), or the VAE of any model `read_checkpoint`
    opens (a diffusers folder or a single file)."""
    path = Path(path)
    if (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        cfg = diffusers_folder.vae_config(diffusers_folder.read_json(path / "config.json"), path / "config.json")
        sd = read_state_dict(path / diffusers_folder.WEIGHT_FILES["vae"][0])
        sources = {k: Source(k) for k in _keys("vae", ModelConfig(family="sd1", vae=cfg))}
        vae, report = load_component("vae", lambda: AutoencoderKL(cfg), sources, sd, dtype, True)
        full = LoadReport(str(path), "diffusers", [report], unexpected=[k for k in sd if k not in sources])
        check(full, True)
        return vae
    return read_checkpoint(path, dtype)[1]["vae"]

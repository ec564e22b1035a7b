"""The diffusers folder layout: `model_index.json` plus `unet/`, `vae/`, `text_encoder/`, `tokenizer/`
and `scheduler/`, each with a `config.json` (translated here to and from sdtorch's dataclasses).

Three layouts, decided by the UNet (`UNetConfig.conditioning`):
- text: StableDiffusionPipeline's (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer).
- none (no cross-attention): LDMPipeline's, diffusers' unconditional latent diffusion: `unet/` a UNet2DModel,
  `vqvae/` the autoencoder (LDMPipeline names it so and only calls `decode` and `config.scaling_factor`,
  which an AutoencoderKL has), a DDIMScheduler; no text encoder, no tokenizer.
- class: no diffusers pipeline takes a class-conditional UNet (DiTPipeline's is a transformer), so
  model_index.json names sdtorch's own (SDTorchClassConditionalPipeline) over `unet/`, `vae/` and
  `scheduler/`, each of which diffusers' own classes open. The class table is the UNet's
  `class_embedding.weight` in "time" mode (diffusers' `num_class_embeds` = num_classes + 1, in
  UNet2DConditionModel or UNet2DModel); in "context" mode it is `class_context.weight`, counted by the
  sdtorch-only key `sdtorch_class_context_embeds` (diffusers has no such model: it ignores the key and
  reports the tensor as unexpected). In both, the last row is the null class.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError, ModelConfig, TextConfig, UNetConfig, VAEConfig
from ..errors import CheckpointError

DIFFUSERS_VERSION = "0.30.0"  # the config schema we write; later diffusers releases read it
WEIGHT_FILES = {  # component -> candidate weight file names, preferred first
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def read_json(path: Path) -> dict:
    """A component's config file as a JSON object; anything else is an error naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent.parent}: missing component file {path.parent.name}/{path.name}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, not {type(data).__name__}")
    return data


def _required(cfg: dict, key: str, path: Path):
    if key not in cfg:
        raise CheckpointError(f"{path}: missing key {key!r}")
    return cfg[key]


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


CLASS_CONTEXT_KEY = "sdtorch_class_context_embeds"  # rows of a "context"-mode class table (sdtorch only)
UNET_CLASSES = ("UNet2DConditionModel", "UNet2DModel")  # with cross-attention, without
SUPPORTED_UNETS = "supported: SD 1.x and SD 2.x UNet2DConditionModel, with or without num_class_embeds, and UNet2DModel"
# config.json keys of diffusers' UNets that sdtorch's UNet reads only at these values
UNET_FIXED = {"time_embedding_type": ("positional",), "resnet_time_scale_shift": ("default",),
              "flip_sin_to_cos": (True,), "freq_shift": (0,), "center_input_sample": (False,),
              "act_fn": ("silu", "swish"), "norm_eps": (1e-5,), "downsample_padding": (1,),
              "downsample_type": ("conv",), "upsample_type": ("conv",), "mid_block_scale_factor": (1,),
              "attn_norm_num_groups": (None,), "class_embeddings_concat": (False,)}

# sdtorch's config field -> the key of diffusers' or transformers' config.json that sets it
UNET_KEYS = {"block_channels": "block_out_channels", "attention_levels": "down_block_types",
             "context_dim": "cross_attention_dim", "transformer_depth": "transformer_layers_per_block",
             "linear_projection": "use_linear_projection", "norm_groups": "norm_num_groups",
             "num_heads": "attention_head_dim", "head_dim": "attention_head_dim", "num_classes": "num_class_embeds",
             "class_conditioning": CLASS_CONTEXT_KEY, "mid_attention": "add_attention",
             "time_embed_mult": "time_embedding_dim"}
VAE_KEYS = {"block_channels": "block_out_channels", "norm_groups": "norm_num_groups",
            "mid_attention": "mid_block_add_attention"}
TEXT_KEYS = {"vocab_size": "vocab_size", "max_positions": "max_position_embeddings", "width": "hidden_size",
             "layers": "num_hidden_layers", "heads": "num_attention_heads", "mlp_width": "intermediate_size",
             "activation": "hidden_act", "layer_norm_eps": "layer_norm_eps"}


def _build(kind: type, path: Path, keys: dict[str, str], **fields):
    """`kind(**fields)`, an impossible value reported by the config.json key that set it."""
    try:
        return kind(**fields)
    except ConfigError as e:
        name = e.field.partition(".")[2] or e.field
        raise CheckpointError(f"{path}: {keys.get(name, name)} ({e})") from None


def subfolder(folder: Path, component: str) -> str:
    """The subfolder holding `component`: LDMPipeline's folders call the autoencoder `vqvae`."""
    if component == "vae" and not (folder / "vae").is_dir() and (folder / "vqvae").is_dir():
        return "vqvae"
    return component


def subfolders(cfg: ModelConfig) -> dict[str, str]:
    """component -> subfolder, for the components of a model of this config (see the module doc)."""
    names = {"unet": "unet", "vae": "vqvae" if cfg.unet.conditioning == "none" else "vae"}
    return names if cfg.text is None else {**names, "text_encoder": "text_encoder"}


def weight_file(folder: Path, component: str) -> Path:
    sub = subfolder(folder, component)
    for name in WEIGHT_FILES[component]:
        if (folder / sub / name).is_file():
            return folder / sub / name
    raise CheckpointError(f"{folder}: missing component weights {sub}/{WEIGHT_FILES[component][0]}")


def _heads(cfg: dict, channels: tuple[int, ...], path: Path) -> dict:
    """diffusers' `attention_head_dim` for SD is really a head *count* (a historical misnomer);
    newer configs may set `num_attention_heads` instead."""
    key = "num_attention_heads" if cfg.get("num_attention_heads") else "attention_head_dim"
    value = cfg.get(key, 8)
    counts = list(value) if isinstance(value, (list, tuple)) else [value] * len(channels)
    if len(counts) != len(channels) or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0
                                               for h in counts):
        raise CheckpointError(f"{path}: {key} = {repr(value)[:80]}: expected a positive head count, or one per "
                              f"level of block_out_channels {list(channels)}")
    if len(set(counts)) == 1:
        return dict(num_heads=counts[0], head_dim=None)
    widths = {c // h for c, h in zip(channels, counts)}
    if len(widths) == 1 and all(c % h == 0 for c, h in zip(channels, counts)):
        return dict(num_heads=None, head_dim=widths.pop())
    raise CheckpointError(f"{path}: {key} = {counts}: unsupported attention heads for block_out_channels "
                          f"{list(channels)} (sdtorch needs one head count, or one head width, at every level)")


def _head_width(cfg: dict, path: Path) -> dict:
    """UNet2DModel's `attention_head_dim` is a head *width* (None: one head as wide as the channels)."""
    value = cfg.get("attention_head_dim", 8)
    if value is None:
        return dict(num_heads=1, head_dim=None)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{path}: attention_head_dim = {repr(value)[:80]}: expected a positive head width")
    return dict(num_heads=None, head_dim=value)


def _unet_levels(u: dict, kinds: list[str], cross: bool, path: Path) -> tuple[bool, ...]:
    """Which levels attend, from the block types; a UNet2DModel's must be plain or self-attention blocks,
    mirrored on the way up."""
    if cross:
        return tuple("CrossAttn" in b for b in kinds)
    known = {"DownBlock2D": False, "AttnDownBlock2D": True}
    if any(b not in known for b in kinds):
        raise CheckpointError(f"{path}: down_block_types = {kinds}: unsupported block (supported: {', '.join(known)})")
    levels = tuple(known[b] for b in kinds)
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)]
    if u.get("up_block_types", up) != up:
        raise CheckpointError(f"{path}: up_block_types = {repr(u['up_block_types'])[:80]}: expected {up}, "
                              "the mirror of down_block_types")
    return levels


def _classes(u: dict, path: Path) -> dict:
    """num_classes and class_conditioning from `num_class_embeds` ("time") or the sdtorch key ("context")."""
    found = {k: u[k] for k in ("num_class_embeds", CLASS_CONTEXT_KEY) if u.get(k) is not None}
    if len(found) > 1:
        raise CheckpointError(f"{path}: both num_class_embeds and {CLASS_CONTEXT_KEY} are set (one class table)")
    if not found:
        return {}
    (key, rows), = found.items()
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 2:
        raise CheckpointError(f"{path}: {key} = {repr(rows)[:80]}: expected an integer of at least 2 "
                              "(the classes, then the null class)")
    return dict(num_classes=rows - 1, class_conditioning="time" if key == "num_class_embeds" else "context")


def unet_config(u: dict, path: Path) -> UNetConfig:
    """A UNetConfig from diffusers' UNet2DConditionModel or UNet2DModel config.json (`path` names it)."""
    kind = u.get("_class_name", "UNet2DConditionModel")
    if kind not in UNET_CLASSES:
        raise CheckpointError(f"{path}: _class_name = {repr(kind)[:80]}: unsupported UNet ({SUPPORTED_UNETS})")
    cross = kind == "UNet2DConditionModel"
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim"):
        if u.get(key):
            raise CheckpointError(f"{path.parent}: unsupported UNet feature {key}={u[key]!r} ({SUPPORTED_UNETS})")
    mid = "UNetMidBlock2DCrossAttn" if cross else "UNetMidBlock2D"
    for key, allowed in {**UNET_FIXED, "mid_block_type": (mid,)}.items():
        if key in u and u[key] not in allowed:
            raise CheckpointError(f"{path.parent}: unsupported UNet feature {key}={repr(u[key])[:80]} "
                                  f"(sdtorch's {kind} has {key}={allowed[0]!r})")
    channels = _tuple(_required(u, "block_out_channels", path))
    if not isinstance(channels, tuple) or not all(isinstance(c, int) and not isinstance(c, bool) for c in channels):
        raise CheckpointError(f"{path}: block_out_channels = {repr(channels)[:80]}: expected a list of channel counts")
    kinds = _required(u, "down_block_types", path)
    if not isinstance(kinds, list) or not all(isinstance(b, str) for b in kinds):
        raise CheckpointError(f"{path}: down_block_types = {repr(kinds)[:80]}: expected a list of block names")
    temb = u.get("time_embedding_dim")
    if temb is not None and (not isinstance(temb, int) or not channels or not channels[0] or temb % channels[0]):
        raise CheckpointError(f"{path}: time_embedding_dim = {repr(temb)[:80]}: expected a multiple of "
                              "block_out_channels[0]")
    depth = u.get("transformer_layers_per_block", 1)
    attention = dict(context_dim=u.get("cross_attention_dim", 768),
                     transformer_depth=depth[0] if isinstance(depth, list) and depth else depth,
                     linear_projection=u.get("use_linear_projection", False)) if cross else {}
    return _build(UNetConfig, path, UNET_KEYS,
                  in_channels=u.get("in_channels", 4), out_channels=u.get("out_channels", 4), block_channels=channels,
                  attention_levels=_unet_levels(u, kinds, cross, path), layers_per_block=u.get("layers_per_block", 2),
                  norm_groups=u.get("norm_num_groups", 32), time_embed_mult=(temb or 4 * channels[0]) // channels[0],
                  cross_attention=cross, mid_attention=u.get("add_attention", True) if not cross else True,
                  **attention, **_classes(u, path), **(_heads(u, channels, path) if cross else _head_width(u, path)))


def vae_config(v: dict, path: Path = Path("config.json")) -> VAEConfig:
    """A VAEConfig from diffusers' AutoencoderKL config.json (`path` names it in errors)."""
    if v.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"{path}: _class_name = {repr(v['_class_name'])[:80]}: unsupported autoencoder "
                              "(sdtorch reads AutoencoderKL, the KL autoencoder)")
    return _build(VAEConfig, path, VAE_KEYS, in_channels=v.get("in_channels", 3),
                  latent_channels=v.get("latent_channels", 4),
                  block_channels=_tuple(_required(v, "block_out_channels", path)),
                  layers_per_block=v.get("layers_per_block", 2), norm_groups=v.get("norm_num_groups", 32),
                  scaling_factor=v.get("scaling_factor", 0.18215), mid_attention=v.get("mid_block_add_attention", True))


def text_config(t: dict, path: Path) -> TextConfig:
    """A TextConfig from transformers' CLIPTextModel config.json."""
    return _build(TextConfig, path, TEXT_KEYS, vocab_size=_required(t, "vocab_size", path),
                  max_positions=t.get("max_position_embeddings", 77), width=_required(t, "hidden_size", path),
                  layers=_required(t, "num_hidden_layers", path), heads=_required(t, "num_attention_heads", path),
                  mlp_width=_required(t, "intermediate_size", path), activation=t.get("hidden_act", "quick_gelu"),
                  layer_norm_eps=t.get("layer_norm_eps", 1e-5))


def read_config(folder: Path) -> ModelConfig:
    """Translate the component configs of a diffusers folder into a ModelConfig; a missing, mistyped or
    impossible value is an error naming the file and its key. A class-conditional or unconditional UNet
    has no text encoder (`ModelConfig.text` is None); any text_encoder/ beside it is not read."""
    read_json(folder / "model_index.json")
    uf, vf = folder / "unet" / "config.json", folder / subfolder(folder, "vae") / "config.json"
    u, v = read_json(uf), read_json(vf)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    s = read_json(sched_file) if sched_file.is_file() else {}
    unet = unet_config(u, uf)
    vae = vae_config(v, vf)
    text = None
    if unet.conditioning == "text":
        tf = folder / "text_encoder" / "config.json"
        text = text_config(read_json(tf), tf)
    # The text encoder's lineage decides the family: OpenAI CLIP (quick_gelu) is SD1, OpenCLIP (gelu) SD2.
    family = "custom" if text is None else "sd2" if text.activation == "gelu" else "sd1"
    latent = u.get("sample_size") or 64
    if not isinstance(latent, int) or isinstance(latent, bool) or latent < 1:
        raise CheckpointError(f"{uf}: sample_size = {repr(latent)[:80]}: expected a positive integer (latent pixels)")
    return _build(ModelConfig, sched_file, {}, family=family, unet=unet, vae=vae, text=text,
                  prediction_type=s.get("prediction_type", "epsilon"),
                  pad_token="!" if family == "sd2" else "<|endoftext|>",
                  sample_size=latent * vae.downsampling,
                  num_train_timesteps=s.get("num_train_timesteps", 1000), beta_start=s.get("beta_start", 0.00085),
                  beta_end=s.get("beta_end", 0.012), beta_schedule=s.get("beta_schedule", "scaled_linear"))


def _unet_json(cfg: ModelConfig) -> dict:
    u = cfg.unet
    n = len(u.block_channels)
    ch0 = u.block_channels[0]
    latent_scale = cfg.vae.downsampling
    out = {"_class_name": "UNet2DConditionModel" if u.cross_attention else "UNet2DModel",
           "_diffusers_version": DIFFUSERS_VERSION, "sample_size": cfg.sample_size // latent_scale,
           "in_channels": u.in_channels, "out_channels": u.out_channels, "block_out_channels": list(u.block_channels)}
    if u.cross_attention:
        heads = [u.heads_for(c) for c in u.block_channels]
        out.update({
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention_levels],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention_levels)],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "layers_per_block": u.layers_per_block,
            "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
            "cross_attention_dim": u.context_dim, "transformer_layers_per_block": u.transformer_depth,
            "use_linear_projection": u.linear_projection})
    else:
        out.update({
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in u.attention_levels],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention_levels)],
            "mid_block_type": "UNetMidBlock2D", "add_attention": u.mid_attention,
            "layers_per_block": u.layers_per_block, "attention_head_dim": u.head_dim,  # None: one head (num_heads 1)
            "time_embedding_type": "positional", "resnet_time_scale_shift": "default", "downsample_type": "conv",
            "upsample_type": "conv", "mid_block_scale_factor": 1, "attn_norm_num_groups": None})
    out.update({"norm_num_groups": u.norm_groups, "norm_eps": 1e-5, "act_fn": "silu", "center_input_sample": False,
                "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1})
    if u.cross_attention:
        out["upcast_attention"] = cfg.family == "sd2" and n == 4
    if u.time_embed_mult != 4:
        out["time_embedding_dim"] = ch0 * u.time_embed_mult
    if u.num_classes is not None:  # the classes, then the null class
        out["num_class_embeds" if u.class_conditioning == "time" else CLASS_CONTEXT_KEY] = u.num_classes + 1
    return out


def component_configs(cfg: ModelConfig) -> dict[str, dict]:
    """The config.json of each component, in the schema diffusers and transformers read, and the
    folder's model_index.json (see the module doc for the three layouts)."""
    v, t = cfg.vae, cfg.text
    vae = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "in_channels": v.in_channels,
           "out_channels": v.in_channels, "latent_channels": v.latent_channels,
           "block_out_channels": list(v.block_channels),
           "down_block_types": ["DownEncoderBlock2D"] * len(v.block_channels),
           "up_block_types": ["UpDecoderBlock2D"] * len(v.block_channels), "layers_per_block": v.layers_per_block,
           "norm_num_groups": v.norm_groups, "act_fn": "silu", "sample_size": cfg.sample_size,
           "scaling_factor": v.scaling_factor, "mid_block_add_attention": v.mid_attention}
    sched = "PNDMScheduler" if t is not None else "DDIMScheduler"  # LDM samples class and unconditional models by DDIM
    scheduler = {"_class_name": sched, "_diffusers_version": DIFFUSERS_VERSION,
                 "beta_start": cfg.beta_start, "beta_end": cfg.beta_end, "beta_schedule": cfg.beta_schedule,
                 "num_train_timesteps": cfg.num_train_timesteps, "prediction_type": cfg.prediction_type,
                 "set_alpha_to_one": False, **({"skip_prk_steps": True} if t is not None else {}), "steps_offset": 1,
                 "timestep_spacing": "leading", "clip_sample": False, "trained_betas": None}
    unet = _unet_json(cfg)
    parts = {"unet": unet, "vae": vae, "scheduler": scheduler}
    folders = subfolders(cfg)
    if t is None:
        pipeline = "LDMPipeline" if cfg.unet.conditioning == "none" else "SDTorchClassConditionalPipeline"
        index = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION,
                 "scheduler": ["diffusers", sched], "unet": ["diffusers", unet["_class_name"]],
                 folders["vae"]: ["diffusers", "AutoencoderKL"]}
        return {**parts, "model_index": index}
    text = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": t.vocab_size,
            "hidden_size": t.width, "intermediate_size": t.mlp_width, "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads, "max_position_embeddings": t.max_positions, "hidden_act": t.activation,
            "layer_norm_eps": t.layer_norm_eps, "projection_dim": t.width, "bos_token_id": 49406,
            "eos_token_id": 49407, "pad_token_id": 1, "torch_dtype": "float32"}
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "image_encoder": [None, None],
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    return {**parts, "text_encoder": text, "model_index": index}

"""The diffusers folder layout: `model_index.json` plus `unet/`, `vae/`, `text_encoder/`, `tokenizer/`
and `scheduler/`, each with a `config.json` (translated here to and from sdtorch's dataclasses)."""

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


# sdtorch's config field -> the key of diffusers' or transformers' config.json that sets it
UNET_KEYS = {"block_channels": "block_out_channels", "attention_levels": "down_block_types",
             "context_dim": "cross_attention_dim", "transformer_depth": "transformer_layers_per_block",
             "linear_projection": "use_linear_projection", "norm_groups": "norm_num_groups",
             "num_heads": "attention_head_dim", "head_dim": "attention_head_dim"}
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


def weight_file(folder: Path, component: str) -> Path:
    for name in WEIGHT_FILES[component]:
        if (folder / component / name).is_file():
            return folder / component / name
    raise CheckpointError(f"{folder}: missing component weights {component}/{WEIGHT_FILES[component][0]}")


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


def vae_config(v: dict, path: Path = Path("config.json")) -> VAEConfig:
    """A VAEConfig from diffusers' AutoencoderKL config.json (`path` names it in errors)."""
    return _build(VAEConfig, path, VAE_KEYS, in_channels=v.get("in_channels", 3),
                  latent_channels=v.get("latent_channels", 4),
                  block_channels=_tuple(_required(v, "block_out_channels", path)),
                  layers_per_block=v.get("layers_per_block", 2), norm_groups=v.get("norm_num_groups", 32),
                  scaling_factor=v.get("scaling_factor", 0.18215), mid_attention=v.get("mid_block_add_attention", True))


def read_config(folder: Path) -> ModelConfig:
    """Translate the component configs of a diffusers folder into a ModelConfig; a missing, mistyped or
    impossible value is an error naming the file and its key."""
    read_json(folder / "model_index.json")
    files = {c: folder / c / "config.json" for c in ("unet", "vae", "text_encoder")}
    u, v, t = (read_json(f) for f in files.values())
    sched_file = folder / "scheduler" / "scheduler_config.json"
    s = read_json(sched_file) if sched_file.is_file() else {}
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim"):
        if u.get(key):
            raise CheckpointError(f"{folder}/unet: unsupported UNet feature {key}={u[key]!r} "
                                  "(supported: SD 1.x and SD 2.x)")
    uf = files["unet"]
    channels = _tuple(_required(u, "block_out_channels", uf))
    if not isinstance(channels, tuple) or not all(isinstance(c, int) and not isinstance(c, bool) for c in channels):
        raise CheckpointError(f"{uf}: block_out_channels = {repr(channels)[:80]}: expected a list of channel counts")
    kinds = _required(u, "down_block_types", uf)
    if not isinstance(kinds, list) or not all(isinstance(b, str) for b in kinds):
        raise CheckpointError(f"{uf}: down_block_types = {repr(kinds)[:80]}: expected a list of block names")
    depth = u.get("transformer_layers_per_block", 1)
    unet = _build(UNetConfig, uf, UNET_KEYS,
                  in_channels=u.get("in_channels", 4), out_channels=u.get("out_channels", 4), block_channels=channels,
                  attention_levels=tuple("CrossAttn" in b for b in kinds),
                  layers_per_block=u.get("layers_per_block", 2), context_dim=u.get("cross_attention_dim", 768),
                  transformer_depth=depth[0] if isinstance(depth, list) and depth else depth,
                  linear_projection=u.get("use_linear_projection", False), norm_groups=u.get("norm_num_groups", 32),
                  **_heads(u, channels, uf))
    vae = vae_config(v, files["vae"])
    tf = files["text_encoder"]
    text = _build(TextConfig, tf, TEXT_KEYS, vocab_size=_required(t, "vocab_size", tf),
                  max_positions=t.get("max_position_embeddings", 77), width=_required(t, "hidden_size", tf),
                  layers=_required(t, "num_hidden_layers", tf), heads=_required(t, "num_attention_heads", tf),
                  mlp_width=_required(t, "intermediate_size", tf), activation=t.get("hidden_act", "quick_gelu"),
                  layer_norm_eps=t.get("layer_norm_eps", 1e-5))
    # The text encoder's lineage decides the family: OpenAI CLIP (quick_gelu) is SD1, OpenCLIP (gelu) SD2.
    family = "sd2" if text.activation == "gelu" else "sd1"
    latent = u.get("sample_size") or 64
    if not isinstance(latent, int) or isinstance(latent, bool) or latent < 1:
        raise CheckpointError(f"{uf}: sample_size = {repr(latent)[:80]}: expected a positive integer (latent pixels)")
    return _build(ModelConfig, sched_file, {}, family=family, unet=unet, vae=vae, text=text,
                  prediction_type=s.get("prediction_type", "epsilon"),
                  pad_token="!" if family == "sd2" else "<|endoftext|>",
                  sample_size=latent * 2 ** (len(vae.block_channels) - 1),
                  num_train_timesteps=s.get("num_train_timesteps", 1000), beta_start=s.get("beta_start", 0.00085),
                  beta_end=s.get("beta_end", 0.012), beta_schedule=s.get("beta_schedule", "scaled_linear"))


def component_configs(cfg: ModelConfig) -> dict[str, dict]:
    """The config.json of each component, in the schema diffusers and transformers read."""
    u, v, t = cfg.unet, cfg.vae, cfg.text
    n = len(u.block_channels)
    heads = [u.heads_for(c) for c in u.block_channels]
    latent_scale = 2 ** (len(v.block_channels) - 1)
    unet = {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
            "sample_size": cfg.sample_size // latent_scale, "in_channels": u.in_channels,
            "out_channels": u.out_channels, "block_out_channels": list(u.block_channels),
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention_levels],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention_levels)],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "layers_per_block": u.layers_per_block,
            "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
            "cross_attention_dim": u.context_dim, "transformer_layers_per_block": u.transformer_depth,
            "use_linear_projection": u.linear_projection, "norm_num_groups": u.norm_groups,
            "norm_eps": 1e-5, "act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True,
            "freq_shift": 0, "downsample_padding": 1, "upcast_attention": cfg.family == "sd2" and n == 4}
    vae = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "in_channels": v.in_channels,
           "out_channels": v.in_channels, "latent_channels": v.latent_channels,
           "block_out_channels": list(v.block_channels),
           "down_block_types": ["DownEncoderBlock2D"] * len(v.block_channels),
           "up_block_types": ["UpDecoderBlock2D"] * len(v.block_channels), "layers_per_block": v.layers_per_block,
           "norm_num_groups": v.norm_groups, "act_fn": "silu", "sample_size": cfg.sample_size,
           "scaling_factor": v.scaling_factor, "mid_block_add_attention": v.mid_attention}
    text = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": t.vocab_size,
            "hidden_size": t.width, "intermediate_size": t.mlp_width, "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads, "max_position_embeddings": t.max_positions, "hidden_act": t.activation,
            "layer_norm_eps": t.layer_norm_eps, "projection_dim": t.width, "bos_token_id": 49406,
            "eos_token_id": 49407, "pad_token_id": 1, "torch_dtype": "float32"}
    scheduler = {"_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                 "beta_start": cfg.beta_start, "beta_end": cfg.beta_end, "beta_schedule": cfg.beta_schedule,
                 "num_train_timesteps": cfg.num_train_timesteps, "prediction_type": cfg.prediction_type,
                 "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                 "timestep_spacing": "leading", "clip_sample": False, "trained_betas": None}
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
             "image_encoder": [None, None],
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler, "model_index": index}

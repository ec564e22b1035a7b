"""Working out what an original single-file checkpoint holds, from its keys and shapes alone.

Rules, in order, for each property (each decision is reported with the rule that made it):
- family: OpenAI CLIP text keys (`cond_stage_model.transformer.`) mean SD1, OpenCLIP keys
  (`cond_stage_model.model.`) mean SD2. A file without text encoder keys (a class-conditional or
  unconditional model) takes the family of the `sdtorch_config` in its metadata. SDXL and other layouts are
  refused by name.
- architecture: channel counts, levels, blocks per level, context width, linear projections and the
  input channel count (9 = inpainting) are read from tensor shapes. Head counts are not stored in
  weights: SD1 uses 8 heads, SD2 heads of width 64. A config stored in the file's metadata by sdtorch
  (`sdtorch_config`) wins over all of this, and the caller's `config=` wins over that.
- prediction type: the caller's choice; else the file's metadata (`prediction_type`, or ModelSpec's
  `modelspec.prediction_type`); else epsilon for SD1; else for SD2 a probe of the UNet (the rule
  AUTOMATIC1111 uses: at t=999 on a constant input, a v-model's output sits far below its input).
"""

from __future__ import annotations

import dataclasses
import json
import re

import torch

from ..config import SD15, SD21, ConfigError, ModelConfig, TextConfig, UNetConfig, VAEConfig
from ..errors import CheckpointError
from .io import StateDict
from .keymaps import SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX

SUPPORTED = "supported: SD 1.x (OpenAI CLIP text encoder) and SD 2.x (OpenCLIP ViT-H text encoder)"


def detect_family(sd: StateDict) -> str:
    keys = list(sd)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(f"{sd.path}: unsupported family SDXL; {SUPPORTED}")
    has_unet = f"{UNET_PREFIX}input_blocks.0.0.weight" in sd
    if has_unet and any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if has_unet and any(k.startswith(SD2_TEXT_PREFIX) for k in keys):
        return "sd2"
    meta = config_from_metadata(sd.metadata, str(sd.path)) if has_unet else None
    if meta is not None and meta.text is None:
        return meta.family
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        raise CheckpointError(f"{sd.path}: unsupported or incomplete Stable Diffusion layout "
                              f"(UNet or text encoder keys missing); {SUPPORTED}")
    raise CheckpointError(f"{sd.path}: not a Stable Diffusion checkpoint (no UNet/VAE/text keys in "
                          f"{len(keys)} tensors); {SUPPORTED}")


def _count(sd: StateDict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _dims(sd: StateDict, key: str, layout: str) -> tuple[int, ...]:
    """The shape of tensor `key`, which must have as many dimensions as `layout` (e.g. "[out, in, 3, 3]")
    names; anything else is an error naming the file, the key and the layout expected."""
    if key not in sd:
        raise CheckpointError(f"{sd.path}: tensor {key} is missing (expected shape {layout})")
    shape = tuple(sd.shape(key))
    if len(shape) != layout.count(",") + 1 or 0 in shape:
        raise CheckpointError(f"{sd.path}: tensor {key} has shape {list(shape)}; expected {layout}")
    return shape


def infer_config(sd: StateDict, family: str) -> ModelConfig:
    """Build the ModelConfig of an original single file from its tensor shapes (see module doc)."""
    try:
        return _infer_config(sd, family)
    except ConfigError as e:
        raise CheckpointError(f"{sd.path}: the architecture read from its tensor shapes is impossible ({e}); "
                              "pass --config (config=) to describe it") from None


def _infer_config(sd: StateDict, family: str) -> ModelConfig:
    u = UNET_PREFIX
    conv = "[out, in, kh, kw]"
    ch0, in_ch = _dims(sd, f"{u}input_blocks.0.0.weight", conv)[:2]
    levels = _count(sd, rf"^{re.escape(u)}input_blocks\.(\d+)\.0\.op\.weight$") + 1
    blocks = _count(sd, rf"^{re.escape(u)}input_blocks\.(\d+)\.")  # conv_in + levels*L + (levels-1)
    L = (blocks - 1 - (levels - 1)) // levels
    first = [1 + i * (L + 1) for i in range(levels)]
    channels = tuple(_dims(sd, f"{u}input_blocks.{k}.0.out_layers.3.weight", conv)[0] for k in first)
    attention = tuple(f"{u}input_blocks.{k}.1.proj_in.weight" in sd for k in first)
    proj_in = f"{u}middle_block.1.proj_in.weight"
    depth = _count(sd, rf"^{re.escape(u)}middle_block\.1\.transformer_blocks\.(\d+)\.")
    ctx = _dims(sd, f"{u}middle_block.1.transformer_blocks.0.attn2.to_k.weight", "[channels, context]")[1]
    heads = dict(num_heads=8, head_dim=None) if family == "sd1" else dict(num_heads=None, head_dim=64)
    if proj_in not in sd:
        raise CheckpointError(f"{sd.path}: tensor {proj_in} is missing")
    unet = UNetConfig(in_channels=in_ch, out_channels=_dims(sd, f"{u}out.2.weight", conv)[0], block_channels=channels,
                      attention_levels=attention, layers_per_block=L, context_dim=ctx, transformer_depth=depth,
                      linear_projection=len(sd.shape(proj_in)) == 2,
                      time_embed_mult=_dims(sd, f"{u}time_embed.0.weight", "[width, channels]")[0] // ch0, **heads)

    v = VAE_PREFIX
    vl = _count(sd, rf"^{re.escape(v)}encoder\.down\.(\d+)\.block\.0\.conv1\.weight$")
    vae = VAEConfig(in_channels=_dims(sd, f"{v}encoder.conv_in.weight", conv)[1],
                    latent_channels=_dims(sd, f"{v}post_quant_conv.weight", conv)[0],
                    block_channels=tuple(_dims(sd, f"{v}encoder.down.{i}.block.0.conv2.weight", conv)[0]
                                         for i in range(vl)),
                    layers_per_block=_count(sd, rf"^{re.escape(v)}encoder\.down\.0\.block\.(\d+)\."),
                    mid_attention=f"{v}decoder.mid.attn_1.q.weight" in sd)

    table = "[tokens, width]"
    if family == "sd1":
        t = SD1_TEXT_PREFIX if f"{SD1_TEXT_PREFIX}embeddings.token_embedding.weight" in sd \
            else "cond_stage_model.transformer."
        vocab, width = _dims(sd, f"{t}embeddings.token_embedding.weight", table)
        text = TextConfig(vocab_size=vocab, width=width,
                          max_positions=_dims(sd, f"{t}embeddings.position_embedding.weight", table)[0],
                          layers=_count(sd, rf"^{re.escape(t)}encoder\.layers\.(\d+)\."), heads=width // 64,
                          mlp_width=_dims(sd, f"{t}encoder.layers.0.mlp.fc1.weight", "[mlp_width, width]")[0])
        return SD15.replace(unet=unet, vae=vae, text=text)
    t = SD2_TEXT_PREFIX
    vocab, width = _dims(sd, f"{t}token_embedding.weight", table)
    layers = _count(sd, rf"^{re.escape(t)}transformer\.resblocks\.(\d+)\.")
    text = TextConfig(vocab_size=vocab, max_positions=_dims(sd, f"{t}positional_embedding", table)[0], width=width,
                      layers=layers - 1 if layers == 24 else layers,  # SD2 reads the penultimate layer of 24
                      heads=width // 64, activation="gelu",
                      mlp_width=_dims(sd, f"{t}transformer.resblocks.0.mlp.c_fc.weight", "[mlp_width, width]")[0])
    return SD21.replace(unet=unet, vae=vae, text=text)


def metadata_json(metadata: dict[str, str], key: str, where: str = "file"):
    """The JSON value a file's metadata holds under `key` (None where it has none); `where` names the file."""
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{where}: its {key} metadata is not JSON ({e})") from None


def config_from_metadata(metadata: dict[str, str], where: str = "file") -> ModelConfig | None:
    """The `sdtorch_config` a file's metadata holds (None where it has none); `where` names the file."""
    data = metadata_json(metadata, "sdtorch_config", where)
    return None if data is None else config_from_json(data, f"{where}: sdtorch_config metadata")


PARTS = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig}


def _fields(kind: type, value, where: str, part: str) -> dict:
    """The fields of one dataclass from a JSON object: every name known, lists made tuples."""
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: {part or 'the config'} must be a JSON object, not {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(map(str, set(value) - known))
    if unknown:
        names = ", ".join(f"{part}.{k}" if part else k for k in unknown)
        raise CheckpointError(f"{where}: unknown field(s) {names[:200]}")
    return {k: tuple(x) if isinstance(x, list) else x for k, x in value.items()}


def config_from_json(d, where: str = "config") -> ModelConfig:
    """Inverse of `dataclasses.asdict` for ModelConfig (tuples come back from JSON lists). `family` and the
    unet, vae and text objects must be there; a field left out of them takes its default (files of earlier
    versions lack later fields); text may be null (no text encoder). Anything else malformed raises
    CheckpointError naming `where` and the field."""
    top = _fields(ModelConfig, d, where, "")
    missing = [name for name in ("family", *PARTS) if name not in top]
    if missing:
        raise CheckpointError(f"{where}: missing field(s) {', '.join(missing)}")
    try:
        parts = {name: None if name == "text" and top[name] is None else kind(**_fields(kind, top[name], where, name))
                 for name, kind in PARTS.items()}
        return ModelConfig(**{**top, **parts})
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def prediction_from_metadata(metadata: dict[str, str]) -> str | None:
    value = metadata.get("prediction_type") or metadata.get("modelspec.prediction_type")
    return {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}.get(value)


@torch.no_grad()
def probe_v_prediction(unet: torch.nn.Module, context_dim: int) -> bool:
    """AUTOMATIC1111's test for SD2 checkpoints: run the UNet at t=999 on x = c = 0.5; a v-predicting
    model returns roughly -x there (v = alpha eps - sigma x0 with sigma ~ 1), an eps model roughly noise."""
    p = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=p.dtype, device=p.device)
    ctx = torch.full((1, 2, context_dim), 0.5, dtype=p.dtype, device=p.device)
    out = unet(x, torch.tensor([999.0], device=p.device), ctx)
    return (out[:, :4] - x[:, :4]).float().mean().item() < -1.0

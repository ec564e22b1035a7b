"""Rename tables between sdtorch's parameter names (the diffusers layout) and the original CompVis
single-file layout that AUTOMATIC1111 and ComfyUI read.

Each table is a list of (sdtorch prefix, original prefix, inner renames), generated in loops from the
config. Inner renames are (sdtorch suffix, original suffix, transform), where the transform says how
the stored tensor differs: "conv1x1" (a [O, I, 1, 1] conv used as a [O, I] linear) or (i, n), the
i-th of n equal chunks along dim 0 (OpenCLIP stores q, k and v fused as `in_proj_weight`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import ModelConfig, UNetConfig, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
# A "context"-mode class table is LDM's ClassEmbedder, the cond_stage_model of its class-conditional models.
CLASS_CONTEXT = ("class_context.", "cond_stage_model.embedding.")


@dataclass(frozen=True)
class Source:
    key: str  # name in the original file
    transform: object = None  # None, "conv1x1" or (chunk index, chunk count)


UNET_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
               ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]
VAE_RESNET = [("conv_shortcut.", "nin_shortcut.")]
VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.weight", "q.weight", "conv1x1"), ("to_q.bias", "q.bias"),
                 ("to_k.weight", "k.weight", "conv1x1"), ("to_k.bias", "k.bias"),
                 ("to_v.weight", "v.weight", "conv1x1"), ("to_v.bias", "v.bias"),
                 ("to_out.0.weight", "proj_out.weight", "conv1x1"), ("to_out.0.bias", "proj_out.bias")]
OPENCLIP_LAYER = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                  ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj.")] + [
    (f"self_attn.{p}_proj.{w}", f"attn.in_proj_{w}", (i, 3)) for i, p in enumerate("qkv") for w in ("weight", "bias")]


def unet_table(cfg: UNetConfig) -> list[tuple]:
    """The UNet's rows (openaimodel.py's names). A "time"-mode class table is its `label_emb`. Without
    cross-attention the self-attention blocks keep sdtorch's (diffusers') inner names: LDM's AttentionBlock
    fuses q, k and v per head into one conv1d, and no released LDM checkpoint of this architecture exists."""
    L, n = cfg.layers_per_block, len(cfg.block_channels)
    mid = 2 if cfg.mid_attention else 1  # the second middle ResBlock's slot
    table = [("time_embedding.linear_1.", "time_embed.0.", None), ("time_embedding.linear_2.", "time_embed.2.", None),
             ("class_embedding.", "label_emb.", None),
             ("conv_in.", "input_blocks.0.0.", None), ("conv_norm_out.", "out.0.", None), ("conv_out.", "out.2.", None),
             ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET),
             ("mid_block.attentions.0.", "middle_block.1.", None),
             ("mid_block.resnets.1.", f"middle_block.{mid}.", UNET_RESNET)]
    for i in range(n):
        for j in range(L):
            k = 1 + i * (L + 1) + j
            table += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", UNET_RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", None)]
        table.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (L + 1)}.0.op.", None))
    for i in range(n):
        for j in range(L + 1):
            k = i * (L + 1) + j
            table += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", UNET_RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", None)]
        slot = 2 if cfg.attention_levels[n - 1 - i] else 1
        table.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (L + 1) + L}.{slot}.", None))
    return table


def vae_table(cfg: VAEConfig) -> list[tuple]:
    n, table = len(cfg.block_channels), []
    for part in ("encoder", "decoder"):
        table += [(f"{part}.conv_in.", f"{part}.conv_in.", None), (f"{part}.conv_out.", f"{part}.conv_out.", None),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out.", None),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION)]
    for i in range(n):
        for j in range(cfg.layers_per_block + 1):
            table += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET),
                      (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", VAE_RESNET)]
        table += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", None),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.", None)]
    return table + [("quant_conv.", "quant_conv.", None), ("post_quant_conv.", "post_quant_conv.", None)]


def openclip_table(layers: int) -> list[tuple]:
    table = [("embeddings.token_embedding.", "token_embedding.", None),
             ("embeddings.position_embedding.weight", "positional_embedding", None),
             ("final_layer_norm.", "ln_final.", None)]
    return table + [(f"encoder.layers.{i}.", f"transformer.resblocks.{i}.", OPENCLIP_LAYER) for i in range(layers)]


def _rename(key: str, table: list[tuple], prefix: str) -> Source:
    best = max((row for row in table if key.startswith(row[0])), key=lambda row: len(row[0]), default=None)
    if best is None:
        raise KeyError(f"no original-layout name for parameter {key!r}")
    ours, theirs, inner = best
    rest, transform = key[len(ours):], None
    for rule in inner or ():
        if rest.startswith(rule[0]):
            rest, transform = rule[1] + rest[len(rule[0]):], (rule[2] if len(rule) > 2 else None)
            break
    return Source(prefix + theirs + rest, transform)


def original_sources(component: str, keys: list[str], config: ModelConfig) -> dict[str, Source]:
    """Map each sdtorch parameter name of `component` to where it lives in an original single file."""
    ours, theirs = CLASS_CONTEXT
    if component == "unet":
        table, prefix = unet_table(config.unet), UNET_PREFIX
        return {k: Source(theirs + k[len(ours):]) if k.startswith(ours) else _rename(k, table, prefix) for k in keys}
    if component == "vae":
        table, prefix = vae_table(config.vae), VAE_PREFIX
    elif config.family == "sd2":
        table, prefix = openclip_table(config.text.layers), SD2_TEXT_PREFIX
    else:
        table, prefix = [("", "", None)], SD1_TEXT_PREFIX
    return {k: _rename(k, table, prefix) for k in keys}


def ema_name(original_unet_key: str) -> str:
    """LDM stores EMA weights as `model_ema.` + the name after `model.` with its dots removed."""
    return EMA_PREFIX + original_unet_key[len("model."):].replace(".", "")


# Keys that original files carry beside the weights we use: the DDPM schedule buffers, EMA copies,
# training-only losses, OpenCLIP's contrastive head, HF's position_ids buffer, and the last OpenCLIP
# layer, which SD2 never reads (it conditions on the penultimate one).
_IGNORED = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_.*|log_one_minus_alphas_cumprod|posterior_.*|logvar"
    r"|model_ema\..*|first_stage_model\.loss\..*|cond_stage_model\.model\.(text_projection|logit_scale|attn_mask)"
    r"|cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids"
    r"|cond_stage_model\.model\.visual\..*)$")


def is_ignored_original(key: str, config: ModelConfig) -> bool:
    """True for keys that are known not to be weights sdtorch needs."""
    if _IGNORED.match(key):
        return True
    m = re.match(r"^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.", key)
    return bool(m) and config.family == "sd2" and int(m.group(1)) >= config.text.layers

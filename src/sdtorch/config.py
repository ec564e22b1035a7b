"""Frozen configs for the three networks and the named presets (SD15, SD21, SD21_BASE, TINY).

Every model in sdtorch is built from one of these dataclasses; nothing else decides a shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 4 latent channels; 9 for inpainting (latent + mask + masked-image latent)
    out_channels: int = 4
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels at each resolution level
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # spatial transformer at this level?
    layers_per_block: int = 2  # ResBlocks per level on the way down (one more on the way up)
    num_heads: int | None = 8  # SD1: a fixed head count at every level
    head_dim: int | None = None  # SD2: a fixed head width (64); exactly one of the two is set
    context_dim: int = 768  # width of the text encoder's hidden states
    transformer_depth: int = 1  # BasicTransformerBlocks per spatial transformer
    linear_projection: bool = False  # SD2 projects in/out of the transformer with Linear, SD1 with 1x1 conv
    norm_groups: int = 32
    time_embed_mult: int = 4  # time embedding width = block_channels[0] * this

    def __post_init__(self):
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("UNetConfig: set exactly one of num_heads and head_dim")
        if len(self.attention_levels) != len(self.block_channels):
            raise ValueError("UNetConfig: attention_levels and block_channels differ in length")

    def heads_for(self, channels: int) -> int:
        """Number of attention heads for a transformer of this width."""
        return self.num_heads if self.num_heads is not None else channels // self.head_dim


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (128, 256, 512, 512)  # encoder order; the decoder reverses it
    layers_per_block: int = 2  # encoder ResBlocks per level (decoder uses one more)
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # latents are multiplied by this before diffusion (LDM sec. 4.3.2)
    mid_attention: bool = True  # self-attention in the middle blocks (diffusers' mid_block_add_attention)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"  # OpenAI CLIP (SD1); "gelu" for OpenCLIP ViT-H (SD2)
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "sd1", "sd2" or "custom"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon" or "v_prediction"
    pad_token: str = "<|endoftext|>"  # SD1 pads prompts with end-of-text, SD2 with "!"
    sample_size: int = 512  # default image side in pixels
    # Noise schedule of training (DDPM sec. 4, "scaled_linear" as in LDM).
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    @property
    def inpainting(self) -> bool:
        return self.unet.in_channels == 9

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (unet/vae/text accept dicts of their own fields)."""
        for part in ("unet", "vae", "text"):
            if isinstance(changes.get(part), dict):
                changes[part] = dataclasses.replace(getattr(self, part), **changes[part])
        return dataclasses.replace(self, **changes)


SD15 = ModelConfig(family="sd1")

SD21 = ModelConfig(  # stable-diffusion-2(-1) 768-v: OpenCLIP ViT-H penultimate layer, v-prediction
    family="sd2",
    unet=UNetConfig(num_heads=None, head_dim=64, context_dim=1024, linear_projection=True),
    text=TextConfig(width=1024, layers=23, heads=16, mlp_width=4096, activation="gelu"),
    prediction_type="v_prediction",
    pad_token="!",
    sample_size=768,
)

SD21_BASE = SD21.replace(prediction_type="epsilon", sample_size=512)  # stable-diffusion-2(-1)-base

TINY = ModelConfig(  # runs in milliseconds on a CPU; for tests
    family="custom",
    unet=UNetConfig(block_channels=(32, 64), attention_levels=(False, True), layers_per_block=1,
                    num_heads=2, context_dim=32, norm_groups=8),
    vae=VAEConfig(block_channels=(32, 64), layers_per_block=1, norm_groups=8),
    text=TextConfig(width=32, layers=2, heads=2, mlp_width=64),
    sample_size=64,
)

SHAPES = ModelConfig(  # the built-in model of the shapes world (sdtorch.data.shapes), 64 px
    family="sd1",
    # no attention at 16x16 (as SDXL drops it at its top level): 1.7x the training throughput, and
    # one 20-step image in well under 0.5 s on a 2-core CPU
    unet=UNetConfig(block_channels=(64, 128, 192), attention_levels=(False, True, True), layers_per_block=1,
                    num_heads=None, head_dim=32, context_dim=128),
    # 4x down: 16x16x4 latents. No self-attention in the middle blocks: with it, the encoder mapped small
    # orange and yellow squares on gray (pairs held out of training) to latents decoded as circles; a
    # purely local encoder reads every held-out pair back (README: "Why the autoencoder has no self-attention")
    vae=VAEConfig(block_channels=(32, 64, 64), layers_per_block=1, norm_groups=16, mid_attention=False),
    text=TextConfig(width=128, layers=3, heads=4, mlp_width=512),  # vocab_size comes from the caption tokenizer
    prediction_type="v_prediction",
    sample_size=64,
    beta_schedule="linear",  # DDPM's schedule: a lower terminal SNR than SD's, so backgrounds can go dark or light
    beta_start=1e-4,
    beta_end=0.02,
)

PRESETS: dict[str, ModelConfig] = {"sd15": SD15, "sd21": SD21, "sd21-base": SD21_BASE, "tiny": TINY,
                                   "shapes": SHAPES}

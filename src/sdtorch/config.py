"""Frozen configs for the three networks and the named presets (SD15, SD21, SD21_BASE, TINY).

Every model in sdtorch is built from one of these dataclasses; nothing else decides a shape.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import SDTorchError

ACTIVATIONS = ("quick_gelu", "gelu")  # the text encoder's MLP activations (models/clip.py)
CLASS_CONDITIONING = ("context", "time")  # how a class label enters the UNet (models/unet.py)
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2")  # sampling/schedules.py


class ConfigError(SDTorchError, ValueError):
    """An impossible architecture: `field` (e.g. "unet.num_heads") holds `value`, and `why` says what is wrong.
    Readers put the file's name in front; the message alone names the config field."""

    def __init__(self, field: str, value, why: str):
        self.field, self.value, self.why = field, value, why
        shown = repr(value)
        super().__init__(f"{field} = {shown if len(shown) <= 80 else shown[:77] + '...'}: {why}")


def _positive_ints(part: str, obj, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{part}.{name}" if part else name, value, "must be a positive integer")


def _positive_real(part: str, name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{part}.{name}" if part else name, value, "must be a positive finite number")


def _flag(part: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{part}.{name}", value, "must be true or false")


def _channels(part: str, value, groups: int) -> None:
    """A non-empty tuple of positive channel counts, each a multiple of the GroupNorm group count."""
    name = f"{part}.block_channels"
    if not isinstance(value, tuple) or not value:
        raise ConfigError(name, value, "must be a non-empty list of channel counts")
    for c in value:
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ConfigError(name, value, f"channel count {c!r} is not a positive integer")
        if c % groups:
            raise ConfigError(f"{part}.norm_groups", groups,
                              f"{c} channels of {name} do not split into {groups} groups")


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
    # Class conditioning: a learned table of num_classes + 1 rows, the last one the "null" class that
    # classifier-free guidance contrasts against. None: no classes (a text or an unconditional UNet).
    num_classes: int | None = None
    # "context": the class's row (width context_dim) is a one-token context for the cross-attention, as
    # LDM's ClassEmbedder; "time": the row (the time embedding's width) is added to the time embedding,
    # as diffusers' num_class_embeds.
    class_conditioning: str = "context"
    # False: no cross-attention at all (diffusers' UNet2DModel): the attention levels and the middle block
    # get self-attention blocks with heads of width head_dim, and the UNet takes no context.
    cross_attention: bool = True
    mid_attention: bool = True  # self-attention in the middle block (UNet2DModel's add_attention)

    def __post_init__(self):
        _positive_ints("unet", self, ("in_channels", "out_channels", "layers_per_block", "context_dim",
                                      "transformer_depth", "norm_groups", "time_embed_mult"))
        self._check_conditioning()
        _channels("unet", self.block_channels, self.norm_groups)
        if self.block_channels[0] % 2:
            raise ConfigError("unet.block_channels", self.block_channels, "the first level's channel count must be "
                              "even (it is the width of the sinusoidal time embedding)")
        levels = self.attention_levels
        if not isinstance(levels, tuple) or len(levels) != len(self.block_channels) \
                or not all(isinstance(a, bool) for a in levels):
            raise ConfigError("unet.attention_levels", levels, f"must be {len(self.block_channels)} true/false "
                              "values, one per level of unet.block_channels")
        _flag("unet", "linear_projection", self.linear_projection)
        if (self.num_heads is None) == (self.head_dim is None):
            raise ConfigError("unet.num_heads", self.num_heads, "set exactly one of unet.num_heads and unet.head_dim")
        name, value = ("num_heads", self.num_heads) if self.num_heads is not None else ("head_dim", self.head_dim)
        _positive_ints("unet", self, (name,))
        if not self.cross_attention and self.num_heads not in (None, 1):
            raise ConfigError("unet.num_heads", self.num_heads, "a UNet without cross-attention (diffusers' "
                              "UNet2DModel) sets its heads by their width: set unet.head_dim (or num_heads = 1)")
        # Attention runs at the levels that ask for it and in the middle block (the last level's width).
        mid = {self.block_channels[-1]} if self.mid_attention else set()
        for ch in sorted({c for c, a in zip(self.block_channels, levels) if a} | mid):
            if ch % value:
                why = f"{value} heads" if name == "num_heads" else f"heads of width {value}"
                raise ConfigError(f"unet.{name}", value, f"{ch} attention channels do not split into {why}")

    def _check_conditioning(self) -> None:
        _flag("unet", "cross_attention", self.cross_attention)
        _flag("unet", "mid_attention", self.mid_attention)
        if self.num_classes is not None:
            _positive_ints("unet", self, ("num_classes",))
        if self.class_conditioning not in CLASS_CONDITIONING:
            raise ConfigError("unet.class_conditioning", self.class_conditioning,
                              f"expected one of {', '.join(CLASS_CONDITIONING)}")
        if self.num_classes is not None and self.class_conditioning == "context" and not self.cross_attention:
            raise ConfigError("unet.class_conditioning", "context", "feeds the class to the cross-attention, and "
                              "unet.cross_attention is false: use 'time'")
        if not self.mid_attention and self.cross_attention:
            raise ConfigError("unet.mid_attention", False, "the middle block of a cross-attention UNet always "
                              "attends; only a UNet without cross-attention (unet.cross_attention = false) drops it")

    @property
    def null_class(self) -> int | None:
        """The label of the "null" class (the unconditional row for guidance), or None without classes."""
        return self.num_classes

    @property
    def conditioning(self) -> str:
        """What the UNet is conditioned on: "text", "class" or "none"."""
        if self.num_classes is not None:
            return "class"
        return "text" if self.cross_attention else "none"

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

    def __post_init__(self):
        _positive_ints("vae", self, ("in_channels", "latent_channels", "layers_per_block", "norm_groups"))
        _channels("vae", self.block_channels, self.norm_groups)
        _positive_real("vae", "scaling_factor", self.scaling_factor)
        _flag("vae", "mid_attention", self.mid_attention)

    @property
    def downsampling(self) -> int:
        """Image pixels per latent pixel along a side: each level after the first halves the size (8 for SD's)."""
        return 2 ** (len(self.block_channels) - 1)


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

    def __post_init__(self):
        _positive_ints("text", self, ("vocab_size", "max_positions", "width", "layers", "heads", "mlp_width"))
        if self.width % self.heads:
            raise ConfigError("text.heads", self.heads,
                              f"text.width = {self.width} does not split into {self.heads} heads")
        if self.activation not in ACTIVATIONS:
            raise ConfigError("text.activation", self.activation, f"expected one of {', '.join(ACTIVATIONS)}")
        _positive_real("text", "layer_norm_eps", self.layer_norm_eps)


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "sd1", "sd2" or "custom"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig | None = field(default_factory=TextConfig)  # None: no text encoder (class or unconditional UNet)
    prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon" or "v_prediction"
    pad_token: str = "<|endoftext|>"  # SD1 pads prompts with end-of-text, SD2 with "!"
    sample_size: int = 512  # default image side in pixels
    # Noise schedule of training (DDPM sec. 4, "scaled_linear" as in LDM).
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    def __post_init__(self):
        for name, kind in (("unet", UNetConfig), ("vae", VAEConfig), ("text", TextConfig)):
            if not isinstance(getattr(self, name), kind) and not (name == "text" and self.text is None):
                raise ConfigError(name, getattr(self, name), f"must be a {kind.__name__}")
        for name, allowed in (("family", ("sd1", "sd2", "custom")), ("prediction_type", ("epsilon", "v_prediction")),
                              ("beta_schedule", BETA_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, getattr(self, name), f"expected one of {', '.join(allowed)}")
        if not isinstance(self.pad_token, str) or not self.pad_token:
            raise ConfigError("pad_token", self.pad_token, "must be a non-empty string")
        _positive_ints("", self, ("sample_size", "num_train_timesteps"))
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            _positive_real("", name, value)
            if value >= 1:
                raise ConfigError(name, value, "a noise-schedule beta must lie in (0, 1)")

    def check_parts(self) -> None:
        """Raise ConfigError unless the networks fit together (each one is checked on its own when it is
        made): a text UNet attends to the text encoder's width, a class-conditional or unconditional one
        has no text encoder, and the UNet denoises the VAE's latents."""
        u, v, t = self.unet, self.vae, self.text
        if t is None and u.conditioning == "text":
            raise ConfigError("text", None, "a UNet with cross-attention and no classes needs a text encoder")
        if t is not None and u.conditioning != "text":
            kind = "class-conditional" if u.conditioning == "class" else "unconditional"
            raise ConfigError("text", "TextConfig(...)", f"a {kind} UNet takes no text encoder: set text to None")
        if t is not None and u.context_dim != t.width:
            raise ConfigError("unet.context_dim", u.context_dim, f"must equal the text encoder's width {t.width}")
        if u.out_channels != v.latent_channels:
            raise ConfigError("unet.out_channels", u.out_channels,
                              f"must equal the VAE's latent channels {v.latent_channels}")
        if u.in_channels not in (v.latent_channels, 2 * v.latent_channels + 1):
            raise ConfigError("unet.in_channels", u.in_channels, f"must be the VAE's {v.latent_channels} latent "
                              f"channels, or {2 * v.latent_channels + 1} for inpainting (latent, mask, masked image)")

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
    # purely local encoder reads every held-out pair back (docs/shapes-model.md, "The architecture")
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

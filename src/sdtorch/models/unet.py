"""The UNet of latent diffusion (Rombach et al. 2022, sec. 3.3 and appendix E).

A time-embedded ResNet UNet (Ho et al. 2020) whose levels interleave spatial transformers that
cross-attend to a context: the text encoder's hidden states, or a class label's learned embedding as a
one-token context (LDM's class-conditional models). A class can instead be added to the time embedding
(diffusers' `num_class_embeds`), and without cross-attention the levels self-attend only (LDM's
unconditional models, diffusers' `UNet2DModel`). Skip connections are an explicit stack: pushed on the
way down, popped on the way up.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import UNetConfig
from .blocks import Attention, Downsample, ResBlock, SelfAttention2d, Upsample


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t w_i), sin(t w_i)] with w_i = max_period^(-i / (dim/2))
    (Vaswani et al. 2017, sec. 3.5, as used by DDPM). Returns [B, dim] in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class GEGLU(nn.Module):
    """Gated GELU feed-forward input, x W * GELU(x V) (Shazeer 2020, eq. 5)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the context, then GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, project in, transformer blocks over the H*W tokens, project out, add the input."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        self.linear = cfg.linear_projection
        self.norm = nn.GroupNorm(cfg.norm_groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch) if self.linear else nn.Conv2d(ch, ch, 1)
        heads = cfg.heads_for(ch)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(ch, heads, cfg.context_dim) for _ in range(cfg.transformer_depth))
        self.proj_out = nn.Linear(ch, ch) if self.linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # [B, C, H, W] -> [B, HW, C]
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # [B, HW, C] -> [B, C, H, W]
        if not self.linear:
            h = self.proj_out(h)
        return h + x


class Level(nn.Module):
    """One resolution level: ResBlocks, each optionally followed by a spatial transformer, then an
    optional resampler (`downsamplers` on the way down, `upsamplers` on the way up)."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module] | None,
                 resampler: nn.Module | None, kind: str):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)
        else:
            self.attentions = None
        self.kind = kind
        if resampler is not None:
            setattr(self, f"{kind}samplers", nn.ModuleList([resampler]))

    @property
    def resampler(self) -> nn.Module | None:
        samplers = getattr(self, f"{self.kind}samplers", None)
        return samplers[0] if samplers is not None else None


class UNet(nn.Module):
    """eps- or v-predicting UNet: `unet(x, timesteps, context, class_labels)` -> tensor shaped like x[:, :out].

    context: [B, T, context_dim] for a text UNet; None for a UNet without cross-attention and for a class-
    conditional one ("context" mode builds it from the class; "time" mode with cross-attention attends to one
    zero token unless given a context). class_labels: long [B] for a class-conditional UNet, with
    `config.null_class` for the unconditional row of guidance."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch0 = cfg.block_channels[0]
        temb = ch0 * cfg.time_embed_mult
        res = lambda i, o: ResBlock(i, o, cfg.norm_groups, 1e-5, temb)  # noqa: E731
        if cfg.cross_attention:
            attn = lambda c: SpatialTransformer(c, cfg)  # noqa: E731
        else:
            attn = lambda c: SelfAttention2d(c, cfg.heads_for(c), cfg.norm_groups, 1e-5)  # noqa: E731
        n = len(cfg.block_channels)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)
        self.time_embedding = TimestepMLP(ch0, temb)
        if cfg.num_classes is not None:  # one row per class and the null class last
            if cfg.class_conditioning == "time":  # added to the time embedding (diffusers' num_class_embeds)
                self.class_embedding = nn.Embedding(cfg.num_classes + 1, temb)
            else:  # a one-token context for the cross-attention (LDM's ClassEmbedder)
                self.class_context = nn.Embedding(cfg.num_classes + 1, cfg.context_dim)

        skip_channels, ch = [ch0], ch0
        self.down_blocks = nn.ModuleList()
        for i, out in enumerate(cfg.block_channels):
            resnets, attns = [], []
            for _ in range(cfg.layers_per_block):
                resnets.append(res(ch, out))
                attns.append(attn(out)) if cfg.attention_levels[i] else None
                ch = out
                skip_channels.append(ch)
            down = Downsample(ch) if i < n - 1 else None
            if down is not None:
                skip_channels.append(ch)
            self.down_blocks.append(Level(resnets, attns, down, "down"))

        self.mid_block = Level([res(ch, ch), res(ch, ch)], [attn(ch)] if cfg.mid_attention else None, None, "mid")

        self.up_blocks = nn.ModuleList()
        for i, out in enumerate(reversed(cfg.block_channels)):
            resnets, attns = [], []
            for _ in range(cfg.layers_per_block + 1):
                resnets.append(res(ch + skip_channels.pop(), out))
                attns.append(attn(out)) if cfg.attention_levels[n - 1 - i] else None
                ch = out
            up = Upsample(ch) if i < n - 1 else None
            self.up_blocks.append(Level(resnets, attns, up, "up"))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=1e-5)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False  # recompute block activations in backward to save memory

    def _block(self, module: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _condition(self, emb: torch.Tensor, context: torch.Tensor | None, class_labels: torch.Tensor | None,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The time embedding with the class added ("time" mode), and the context the attention reads."""
        cfg = self.config
        if (class_labels is None) != (cfg.num_classes is None):
            raise ValueError("a class-conditional UNet needs class_labels" if class_labels is None
                             else "class_labels given to a UNet without classes")
        if cfg.num_classes is not None and cfg.class_conditioning == "time":
            emb = emb + self.class_embedding(class_labels).to(dtype)
        if not cfg.cross_attention:
            if context is not None:
                raise ValueError("context given to a UNet without cross-attention")
            return emb, None
        if cfg.num_classes is not None and cfg.class_conditioning == "context":
            if context is not None:
                raise ValueError("context given to a UNet whose context is its class embedding")
            return emb, self.class_context(class_labels).to(dtype)[:, None]  # [B] -> [B, 1, context_dim]
        if context is None:
            if cfg.num_classes is None:
                raise ValueError("a text-conditioned UNet needs a context")
            # "time" mode with cross-attention: one zero token (diffusers' UNet2DConditionModel takes any
            # encoder_hidden_states beside class_labels; a given context is used as it is)
            return emb, emb.new_zeros(emb.shape[0], 1, cfg.context_dim, dtype=dtype)
        return emb, context.to(dtype)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(B)
        emb = self.time_embedding(timestep_embedding(t, self.config.block_channels[0]).to(x.dtype))
        emb, context = self._condition(emb, context, class_labels, x.dtype)
        ctx = () if context is None else (context,)  # what the attention blocks take beside the features

        block = self._block
        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            for i, resnet in enumerate(level.resnets):
                h = block(resnet, h, emb)
                if level.attentions is not None:
                    h = block(level.attentions[i], h, *ctx)
                skips.append(h)
            if level.resampler is not None:
                h = level.resampler(h)
                skips.append(h)

        h = block(self.mid_block.resnets[0], h, emb)
        if self.mid_block.attentions is not None:
            h = block(self.mid_block.attentions[0], h, *ctx)
        h = block(self.mid_block.resnets[1], h, emb)

        for level in self.up_blocks:
            for i, resnet in enumerate(level.resnets):
                h = block(resnet, torch.cat([h, skips.pop()], dim=1), emb)
                if level.attentions is not None:
                    h = block(level.attentions[i], h, *ctx)
            if level.resampler is not None:
                h = level.resampler(h, size=skips[-1].shape[-2:])  # match the skip for odd sizes

        return self.conv_out(F.silu(self.conv_norm_out(h)))

"""The CLIP text transformer that conditions Stable Diffusion (Radford et al. 2021, sec. 2.4).

A GPT-2-style pre-LayerNorm transformer with a causal mask. SD1 uses OpenAI's ViT-L/14 text tower
(quick_gelu); SD2 uses OpenCLIP ViT-H/14 (gelu) read at its penultimate layer, which is why the SD21
preset keeps only 23 of its 24 layers. Attribute names follow `transformers.CLIPTextModel`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), the GELU approximation OpenAI CLIP was trained with (Hendrycks &
    Gimpel 2016, sec. 2)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)[None]


class SelfAttention(nn.Module):
    """Causal multi-head self-attention (Vaswani et al. 2017, eq. 1, with a lower-triangular mask)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # [B, T, C] -> [B, heads, T, C // heads]
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextModel(nn.Module):
    """`text_encoder(ids, clip_skip=1)` -> [B, T, width] hidden states after the final LayerNorm.

    clip_skip=1 reads the last layer; clip_skip=2 the one before it (AUTOMATIC1111's "clip skip").
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {cfg.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def all_hidden_states(self, ids: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """The embeddings' output and every layer's output (before the final LayerNorm)."""
        h = self.embeddings(ids)
        states = [h]
        for layer in self.encoder.layers[:upto]:
            h = layer(h)
            states.append(h)
        return states

    def forward(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        n = len(self.encoder.layers)
        if not 1 <= clip_skip <= n:
            raise ValueError(f"clip_skip must be between 1 and {n}, got {clip_skip}")
        h = self.all_hidden_states(ids, upto=n - clip_skip + 1)[-1]
        return self.final_layer_norm(h)

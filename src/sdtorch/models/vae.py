"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3.1 and appendix G).

`encode(images in [-1, 1])` returns a diagonal Gaussian posterior over latents; `decode(latents)`
returns images in [-1, 1]. Both work in the raw latent space: multiplying by
`config.scaling_factor` (and dividing before decoding) is the pipeline's job, as in diffusers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from .blocks import Downsample, ResBlock, SelfAttention2d, Upsample

EPS = 1e-6  # GroupNorm epsilon of the LDM autoencoder


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)); `kl()` is KL(q || N(0, I)) per sample (Kingma & Welling 2014,
    appendix B)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class Block(nn.Module):
    """A level of the encoder or decoder: ResBlocks then an optional resampler."""

    def __init__(self, resnets: list[nn.Module], resampler: nn.Module | None, kind: str):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if resampler is not None:
            setattr(self, f"{kind}samplers", nn.ModuleList([resampler]))
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        samplers = getattr(self, f"{self.kind}samplers", None)
        return samplers[0](x) if samplers is not None else x


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(ch, ch, groups, EPS), ResBlock(ch, ch, groups, EPS)])
        self.attentions = nn.ModuleList([SelfAttention2d(ch, 1, groups, EPS)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, chs = cfg.norm_groups, cfg.block_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        ch = chs[0]
        for i, out in enumerate(chs):
            resnets = [ResBlock(ch if j == 0 else out, out, g, EPS) for j in range(cfg.layers_per_block)]
            down = Downsample(out, asymmetric_pad=True) if i < len(chs) - 1 else None
            self.down_blocks.append(Block(resnets, down, "down"))
            ch = out
        self.mid_block = MidBlock(ch, g, cfg.mid_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch, eps=EPS)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, chs = cfg.norm_groups, tuple(reversed(cfg.block_channels))
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], g, cfg.mid_attention)
        self.up_blocks = nn.ModuleList()
        ch = chs[0]
        for i, out in enumerate(chs):
            resnets = [ResBlock(ch if j == 0 else out, out, g, EPS) for j in range(cfg.layers_per_block + 1)]
            up = Upsample(out) if i < len(chs) - 1 else None
            self.up_blocks.append(Block(resnets, up, "up"))
            ch = out
        self.conv_norm_out = nn.GroupNorm(g, ch, eps=EPS)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        L = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1)
        self.post_quant_conv = nn.Conv2d(L, L, 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents))

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """Reconstruct: encode, sample the posterior, decode. Returns (images, posterior)."""
        posterior = self.encode(images)
        return self.decode(posterior.sample(generator)), posterior

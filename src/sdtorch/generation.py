"""Text-to-image, image-to-image and inpainting: encode the prompt, sample, decode.

Reproducibility: image i of a batch starts from noise drawn on the CPU from its own seed (seed + i),
and its ancestral/SDE noise comes from the same per-image generator. Images are denoised one at a
time (each as one guided batch of two), so an image does not depend on the batch it was made in.
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import prompts
from .errors import SDTorchError
from .sampling import SAMPLERS, CFGDenoiser, denoiser_for, get_sigmas, init_noise_sigma


@dataclass(frozen=True)
class Request:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance: float = 7.5
    sampler: str = "dpmpp_2m"
    seed: int = 0
    batch_size: int = 1
    karras: bool = False
    strength: float = 1.0  # img2img: how much of the schedule to run (1 = all of it)
    clip_skip: int = 1
    guidance_rescale: float = 0.0

    def validate(self) -> None:
        if self.width % 8 or self.height % 8 or self.width <= 0 or self.height <= 0:
            raise SDTorchError(f"width and height must be positive multiples of 8, got {self.width}x{self.height}")
        if self.steps < 1:
            raise SDTorchError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 <= self.strength <= 1.0:
            raise SDTorchError(f"strength must be in [0, 1], got {self.strength}")
        if self.sampler not in SAMPLERS:
            raise SDTorchError(f"unknown sampler {self.sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
        if self.batch_size < 1:
            raise SDTorchError(f"batch size must be at least 1, got {self.batch_size}")


def new_seed() -> int:
    return secrets.randbelow(2**32)


class PerImageNoise:
    """Noise source for ancestral/SDE steps, drawn from the image's own CPU generator."""

    def __init__(self, generator: torch.Generator, shape, dtype, device):
        self.generator, self.shape, self.dtype, self.device = generator, shape, dtype, device

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, dtype=torch.float32).to(self.device, self.dtype)


class InpaintBlend(nn.Module):
    """For models without inpainting channels: keep the known region (mask = 0) equal to the source
    latents re-noised to the current level, at every step (the RePaint-style blend of Lugmayr et al.
    2022, sec. 4, without resampling), and return the source there."""

    def __init__(self, denoiser: nn.Module, source: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor):
        super().__init__()
        self.inner_model, self.source, self.mask, self.noise = denoiser, source, mask, noise

    def forward(self, x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        x = self.mask * x + (1 - self.mask) * (self.source + self.noise * sigma)
        return self.mask * self.inner_model(x, sigma.flatten(), **kwargs) + (1 - self.mask) * self.source


def _unet_fn(unet, extra: torch.Tensor | None):
    """The network call, in the UNet's own dtype and returning float32 (the sampler's state stays in
    float32); a 9-channel inpainting UNet also gets [mask, masked-image latents]."""
    dtype = next(unet.parameters()).dtype

    def call(x, t, context, **kwargs):
        if extra is not None:
            x = torch.cat([x, extra.expand(x.shape[0], -1, -1, -1).to(x.dtype)], 1)
        return unet(x.to(dtype), t, context.to(dtype), **kwargs).float()
    return call


@torch.no_grad()
def generate(model, req: Request, source: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             progress: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Run one request. `source`: image in [-1, 1], [1, 3, H, W] (img2img/inpaint); `mask`: [1, 1, H, W]
    in [0, 1], 1 = repaint. Returns (images in [0, 1] as [B, 3, H, W], seeds)."""
    req.validate()
    unet, vae = model.unet, model.vae
    # The sampler's state is float32 whatever the network's dtype: on the variance-exploding axis x reaches
    # sigma_max * 4 (over 500 for a linear schedule), and in fp16 a product like sigma * x overflows (PLMS at
    # 50 steps gave inf, then black images, for 6 of 32 prompts of the built-in model loaded in fp16).
    device, dtype = next(unet.parameters()).device, torch.float32
    scale = model.config.vae.scaling_factor
    factor = 2 ** (len(model.config.vae.block_channels) - 1)  # 8 for SD's VAE
    latent_shape = (1, model.config.unet.out_channels, req.height // factor, req.width // factor)
    cond, uncond = prompts.encode_pair(model.text_encoder, model.tokenizer, [req.prompt], [req.negative_prompt],
                                       clip_skip=req.clip_skip)
    vp = next(vae.parameters())
    encode = lambda img: vae.encode(img.to(vp.device, vp.dtype)).mode().to(device, dtype) * scale  # noqa: E731
    init = extra = latent_mask = None
    if source is not None:
        init = encode(source)
    if mask is not None:
        latent_mask = F.interpolate(mask.float(), size=latent_shape[2:], mode="nearest").to(device, dtype)
        if model.config.inpainting:
            extra = torch.cat([latent_mask, encode(source * (mask < 0.5))], dim=1)

    denoiser = denoiser_for(_unet_fn(unet, extra), model.config)
    guided = CFGDenoiser(denoiser, req.guidance, req.guidance_rescale)
    sigmas = get_sigmas(denoiser, req.steps, req.sampler, karras=req.karras).to(device)
    if init is not None and mask is None:  # img2img: skip the first (1 - strength) of the schedule
        run = min(int(req.steps * req.strength), req.steps)
        sigmas = sigmas[req.steps - run:]
    seed = new_seed() if req.seed is None else req.seed
    seeds = [seed + i for i in range(req.batch_size)]
    images = []
    bar = tqdm(total=(len(sigmas) - 1) * len(seeds), desc="sampling", disable=not progress, unit="step")
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        noise = torch.randn(latent_shape, generator=g, dtype=torch.float32).to(device, dtype)
        x = noise * init_noise_sigma(sigmas, req.sampler) if init is None else init + noise * sigmas[0]
        den = guided
        if latent_mask is not None and extra is None:
            den = InpaintBlend(guided, init, latent_mask, noise)
        if len(sigmas) > 1:
            x = SAMPLERS[req.sampler](den, x, sigmas, extra_args={"context": cond, "uncond": uncond},
                                      callback=lambda info: bar.update(1),
                                      noise=PerImageNoise(g, latent_shape, dtype, device))
        if latent_mask is not None and extra is None:
            x = latent_mask * x + (1 - latent_mask) * init
        images.append(decode(vae, x / scale))
    bar.close()
    return torch.cat(images), seeds


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode to [0, 1]; if reduced precision overflows to NaN/inf, decode again in fp32 and warn."""
    p = next(vae.parameters())
    device, dtype = p.device, p.dtype  # read now: .float() below converts p itself
    image = vae.decode(latents.to(device, dtype))
    if not torch.isfinite(image).all() and dtype != torch.float32:
        warnings.warn(f"VAE decode in {dtype} gave NaN/inf; decoding again in float32", stacklevel=2)
        vae.float()
        image = vae.decode(latents.float().to(device))
        vae.to(dtype)
    return ((image.float() + 1) / 2).clamp(0, 1).cpu()

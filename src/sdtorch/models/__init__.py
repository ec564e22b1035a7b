"""The three networks of Stable Diffusion, each a pure nn.Module built from a frozen config."""

from .clip import CLIPTextModel
from .unet import UNet
from .vae import AutoencoderKL, DiagonalGaussian

__all__ = ["AutoencoderKL", "CLIPTextModel", "DiagonalGaussian", "UNet"]

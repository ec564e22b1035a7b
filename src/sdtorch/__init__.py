"""sdtorch: Stable Diffusion written from scratch in readable PyTorch."""

from .config import SD15, SD21, SD21_BASE, TINY, ModelConfig, TextConfig, UNetConfig, VAEConfig
from .errors import CheckpointError, SDTorchError
from .pipeline import StableDiffusion, build, load

__version__ = "0.1.0"

__all__ = ["SD15", "SD21", "SD21_BASE", "TINY", "CheckpointError", "ModelConfig", "SDTorchError",
           "StableDiffusion", "TextConfig", "UNetConfig", "VAEConfig", "build", "load"]

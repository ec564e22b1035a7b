"""Conversions between PIL images and tensors, with clear errors for unreadable files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import SDTorchError


def open_image(image, mode: str = "RGB") -> Image.Image:
    """A PIL image from a PIL image or a path; unreadable files raise SDTorchError naming the file."""
    if isinstance(image, Image.Image):
        return image.convert(mode)
    try:
        with Image.open(Path(image)) as im:
            return im.convert(mode)
    except (FileNotFoundError, IsADirectoryError):
        raise SDTorchError(f"{image}: no such image file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SDTorchError(f"{image}: unreadable image ({e})") from None


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] in [-1, 1]."""
    a = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return a.permute(2, 0, 1)[None]


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """L-mode PIL mask -> [1, 1, H, W] in [0, 1]; white (1) marks the region to repaint."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> PIL images (rounded to 8 bits)."""
    arr = (images.permute(0, 2, 3, 1).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def pad_for_outpaint(image: Image.Image, left: int = 0, top: int = 0, right: int = 0,
                     bottom: int = 0) -> tuple[Image.Image, Image.Image]:
    """Extend the canvas by repeating the edge pixels; the mask is white over the new area only."""
    if min(left, top, right, bottom) < 0:
        raise SDTorchError(f"outpaint padding must be non-negative, got {(left, top, right, bottom)}")
    a = np.asarray(image.convert("RGB"))
    padded = np.pad(a, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(padded.shape[:2], 255, dtype=np.uint8)
    mask[top:top + a.shape[0], left:left + a.shape[1]] = 0
    return Image.fromarray(padded), Image.fromarray(mask)

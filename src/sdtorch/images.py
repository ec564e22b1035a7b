"""Conversions between PIL images and tensors, with clear errors for unreadable files.

Every image sdtorch reads goes through `open_image`, which turns anything wrong with the file into one
SDTorchError line naming it and converts every PIL mode the same way:

- 16-bit and 32-bit integer grayscale ("I;16*", "I") is scaled from 0..65535 to 0..255 (PIL's own
  conversion clips at 255, so a 16-bit image turns white); "F" (float) is read as 0..1 (NaN as 0);
- transparency (RGBA, LA, palette with a transparent colour) is composited onto a background: white for
  a source image (A1111's default img2img background), black for a mask (transparent = keep);
- the EXIF orientation is applied, so the image is used the way viewers show it.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import SDTorchError
from .fileio import shown
from .generation import Limits

DEFAULT_MAX_PIXELS = Limits.max_image_pixels

# What a malformed or truncated file raises inside PIL's decoders.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error,
                  zlib.error)
# PIL refuses a header that claims more than Image.MAX_IMAGE_PIXELS (about 89 M) before sdtorch's own
# limit is checked; the default limit is below it, so both say the same.
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def open_image(image, mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A PIL image in `mode` ("RGB" or "L") from a PIL image or a path; any problem with the file is an
    SDTorchError naming it."""
    if isinstance(image, Image.Image):
        _check_pixels(image.size, "the image", max_pixels)
        return _normalise(image, mode)
    if not isinstance(image, (str, Path)):
        raise SDTorchError(f"expected an image path or a PIL image, got {type(image).__name__}")
    with _loaded(Path(image), max_pixels) as im:
        return _normalise(ImageOps.exif_transpose(im), mode)


@contextlib.contextmanager
def _opened_bytes(data: bytes, name: str, max_pixels: int) -> Iterator[Image.Image]:
    """An image file's bytes opened and decoded within `max_pixels`, anything wrong one SDTorchError naming `name`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                _check_pixels(im.size, name, max_pixels)
                im.load()
                yield im
    except UnidentifiedImageError:
        raise SDTorchError(f"{name}: not an image file (PNG, JPEG, WebP, ...)") from None
    except _BOMB as e:
        raise SDTorchError(f"{name}: the image is too large to read ({_reason(e)})") from None
    except _DECODE_ERRORS as e:
        raise SDTorchError(f"{name}: unreadable image ({_reason(e)})") from None


def open_bytes(data: bytes, name: str, mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`open_image` for an image file's bytes (a server's upload), with the same checks; `name` says which one in
    the error (e.g. "init_images[0]")."""
    with _opened_bytes(data, name, max_pixels) as im:
        return _normalise(ImageOps.exif_transpose(im), mode)


def text_chunks(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, str]:
    """The text chunks of an image file's bytes (a PNG's `parameters` among them), read with `open_bytes`' checks."""
    with _opened_bytes(data, name, max_pixels) as im:
        return {k: v for k, v in im.info.items() if isinstance(v, str)}


def read_text_chunk(image, key: str) -> str | None:
    """The PNG text chunk `key` of an image file (e.g. A1111's "parameters"), or None."""
    with _loaded(Path(image)) as im:  # text chunks after the image data are read with it
        text = im.info.get(key)
    if text is not None and not isinstance(text, str):
        text = bytes(text).decode("utf-8", "replace")
    return text


@contextlib.contextmanager
def _loaded(path: Path, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """The image file at `path`, opened and decoded, within `max_pixels` if given; a missing, irregular,
    oversized (PIL's decompression-bomb guard included) or undecodable file is an SDTorchError naming it,
    and so is a decoding error raised while the caller reads it."""
    _check_regular(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if max_pixels is not None:
                    _check_pixels(im.size, shown(path), max_pixels)
                im.load()
                yield im
    except _BOMB as e:
        raise SDTorchError(f"{shown(path)}: the image is too large to read ({_reason(e)})") from None
    except _DECODE_ERRORS as e:
        raise SDTorchError(f"{shown(path)}: unreadable image ({_reason(e)})") from None


def _check_regular(path: Path) -> None:
    """A file to read exists and is a regular file (a FIFO or device would block or never end)."""
    if not path.exists():
        raise SDTorchError(f"{shown(path)}: no such image file")
    if path.is_dir():
        raise SDTorchError(f"{shown(path)}: is a folder, not an image file")
    if not path.is_file():
        raise SDTorchError(f"{shown(path)}: not a regular file")


def _check_pixels(size, name: str, max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise SDTorchError(f"{name}: {w}x{h} is {w * h} pixels, over the limit of {max_pixels} "
                           "(SDTORCH_MAX_IMAGE_PIXELS)")
    if w < 1 or h < 1:
        raise SDTorchError(f"{name}: the image is empty ({w}x{h})")


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if text.isprintable() else repr(text)


def _normalise(im: Image.Image, mode: str) -> Image.Image:
    """8-bit `mode` ("RGB" or "L") from any PIL mode (see the module docstring)."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        a = np.asarray(im.convert("I"), dtype=np.float64)
        im = Image.fromarray((a.clip(0, 65535) / 257).round().astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
        im = Image.fromarray((a.clip(0, 1) * 255).round().astype(np.uint8), "L")
    elif im.mode == "La":
        im = im.convert("LA")
    elif (im.mode == "P" and "transparency" in im.info) or im.mode in ("PA", "RGBa"):
        im = im.convert("RGBA")
    elif im.mode in ("1", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    if im.mode in ("LA", "RGBA"):
        background = Image.new("RGBA", im.size, (0, 0, 0, 255) if mode == "L" else (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    if im.mode not in ("L", "RGB", "RGBA"):
        raise SDTorchError(f"unsupported image mode {im.mode!r}")
    return im.convert(mode)


def open_pair(image, mask, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, Image.Image]:
    """(RGB source, L mask) of the same size, for inpainting."""
    source, mask_img = open_image(image, max_pixels=max_pixels), open_image(mask, "L", max_pixels)
    if source.size != mask_img.size:
        where = f"{shown(mask)}: " if isinstance(mask, (str, Path)) else ""
        raise SDTorchError(f"{where}mask size {mask_img.size[0]}x{mask_img.size[1]} does not match image size "
                           f"{source.size[0]}x{source.size[1]}")
    return source, mask_img


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


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """A PNG file's bytes, with A1111's `parameters` text chunk where given."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def check_padding(size, pads, max_side: int) -> tuple[int, int]:
    """The canvas size after outpaint padding `pads` = (left, top, right, bottom), checked before any
    pixel is allocated: every pad an integer in [0, max_side], the new sides within max_side."""
    for p in pads:
        if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p <= max_side:
            raise SDTorchError(f"outpaint padding must be non-negative integers of at most {max_side} pixels, "
                               f"got {tuple(pads)}")
    left, top, right, bottom = pads
    width, height = size[0] + left + right, size[1] + top + bottom
    if max(width, height) > max_side:
        raise SDTorchError(f"outpaint: the padded image would be {width}x{height}, a side over the limit of "
                           f"{max_side} pixels (SDTORCH_MAX_SIDE)")
    return width, height


def pad_for_outpaint(image: Image.Image, left: int = 0, top: int = 0, right: int = 0,
                     bottom: int = 0, max_side: int = Limits.max_side) -> tuple[Image.Image, Image.Image]:
    """Extend the canvas by repeating the edge pixels; the mask is white over the new area only."""
    check_padding(image.size, (left, top, right, bottom), max_side)
    a = np.asarray(image.convert("RGB"))
    padded = np.pad(a, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(padded.shape[:2], 255, dtype=np.uint8)
    mask[top:top + a.shape[0], left:left + a.shape[1]] = 0
    return Image.fromarray(padded), Image.fromarray(mask)


def blur_mask(mask: Image.Image, radius_x: int, radius_y: int) -> Image.Image:
    """A1111's mask blur: a Gaussian of standard deviation `radius_x` across and `radius_y` down (0: none), so
    the repainted area fades into the kept one."""
    from PIL import ImageFilter

    if radius_x == radius_y:
        return mask.filter(ImageFilter.GaussianBlur(radius_x)) if radius_x > 0 else mask
    return mask.filter(ImageFilter.GaussianBlur((radius_x, radius_y)))


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's inpainting_fill 0 ("fill") made simple: the area to repaint starts as the mean colour of the kept
    pixels, so none of what was there shows through (A1111 smears the surrounding colours in instead)."""
    a = np.asarray(image, dtype=np.float32)
    m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    kept = (1 - m).sum()
    mean = (a * (1 - m)).sum((0, 1)) / kept if kept > 0 else np.full(3, 127.5, dtype=np.float32)
    return Image.fromarray((a * (1 - m) + mean * m).round().clip(0, 255).astype(np.uint8))


def masked_box(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """A1111's "only masked" crop: the box (left, top, right, bottom) around the mask's non-black pixels, grown
    by `padding` and then to the aspect ratio width:height, within the image; None for an empty mask."""
    a = np.asarray(mask) > 0
    if not a.any():
        return None
    rows, cols = np.nonzero(a.any(1))[0], np.nonzero(a.any(0))[0]
    w_img, h_img = mask.size
    left, top = max(int(cols[0]) - padding, 0), max(int(rows[0]) - padding, 0)
    right, bottom = min(int(cols[-1]) + 1 + padding, w_img), min(int(rows[-1]) + 1 + padding, h_img)
    want = width / height
    bw, bh = right - left, bottom - top
    if bw / bh < want:  # too narrow: widen around the centre, then shift back inside
        bw = min(round(bh * want), w_img)
    else:
        bh = min(round(bw / want), h_img)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    left = int(min(max(round(cx - bw / 2), 0), w_img - bw))
    top = int(min(max(round(cy - bh / 2), 0), h_img - bh))
    return left, top, left + bw, top + bh


def paste_masked(original: Image.Image, generated: Image.Image, mask: Image.Image,
                 box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The generated pixels where `mask` (original's size) is white, the original's elsewhere, blending where it
    is grey; `generated` is resized to `box` (default: the whole image) and placed there first."""
    left, top, right, bottom = box or (0, 0, *original.size)
    canvas = original.convert("RGB").copy()
    canvas.paste(generated.convert("RGB").resize((right - left, bottom - top), Image.Resampling.LANCZOS),
                 (left, top))
    return Image.composite(canvas, original.convert("RGB"), mask.convert("L"))

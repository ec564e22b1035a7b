"""Text-to-image, image-to-image and inpainting: encode the prompt, sample, decode.

The one path every front end takes (the Python API, the CLI, a server):

    req = resolve(prompt, model, **options)   # defaults filled in once (the model's, else sdtorch's), validated
    result = generate(model, req, source, mask, callback=ProgressBar())
    result.images, result.seeds, result.parameters, result.png(0)

A callback sees every step (`Step`: which image, which step, the latents, a preview on request) and stops
the run by returning False or raising `Interrupted`; `generate` then returns what it has.

Reproducibility: image i of a batch starts from noise drawn on the CPU from its own seed (seed + i),
and its ancestral/SDE noise comes from the same per-image generator. By default (batch mode "per-image")
images are denoised one at a time (each as one guided batch of two), so an image does not depend on the
batch it was made in: it is bit-identical to a run of that seed alone. Batch mode "batched" denoises the
whole batch in one network call a step (a guided batch of 2B), as diffusers does: the same noise, so the
same images within float rounding (the matrix products are blocked differently for another batch size,
so they are not bit-identical), and faster where one image leaves the machine's cores idle.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
import re
import secrets
import warnings
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from . import infotext, prompts, tiling
from .errors import SDTorchError
from .sampling import SAMPLERS, CFGDenoiser, InpaintBlend, denoiser_for, get_sigmas, init_noise_sigma


@dataclass(frozen=True)
class Limits:
    """Bounds that protect the machine rather than follow from the model (the model's own bounds, such
    as the steps its schedule supports, are checked by `Request.validate` once its config is known).

    Python: `model.txt2img(..., limits=Limits(max_side=8192))`. CLI and server: the environment
    variables SDTORCH_MAX_SIDE, SDTORCH_MAX_PIXELS, ... (`Limits.from_env`)."""

    max_side: int = 4096  # pixels on either side of an output image
    max_pixels: int = 2048 * 2048  # width * height of an output image (A1111's largest slider setting)
    max_batch: int = 100  # images per request (A1111's batch count limit)
    max_steps: int = 1000  # sampling steps; a model's schedule may support fewer (`schedule_max_steps`)
    max_prompt_chars: int = 10_000  # characters in a prompt or negative prompt (some 30 chunks of 75 tokens)
    max_image_pixels: int = 8192 * 8192  # pixels of an image read (source, mask, replayed PNG); under PIL's bomb limit

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not _is_int(value) or value < 1:
                raise SDTorchError(f"limit {f.name} must be a positive integer, got {value!r}")

    @classmethod
    def of(cls, limits) -> "Limits":
        """`limits` itself, or the defaults for None; anything else is an SDTorchError."""
        if limits is None:
            return cls()
        if not isinstance(limits, cls):
            raise SDTorchError(f"limits must be a generation.Limits, got {type(limits).__name__}")
        return limits

    @classmethod
    def from_env(cls, environ=None) -> "Limits":
        """Limits with each field overridden by SDTORCH_<FIELD> (e.g. SDTORCH_MAX_SIDE=8192) where set."""
        environ = os.environ if environ is None else environ
        given = {}
        for f in fields(cls):
            name = f"SDTORCH_{f.name.upper()}"
            if name in environ:
                text = environ[name].strip().replace("_", "")
                if not text.isdigit() or int(text) < 1:
                    raise SDTorchError(f"{name}: must be a positive integer, got {environ[name]!r}")
                given[f.name] = int(text)
        return cls(**given)


ENV_HELP = ("limits (environment variables): " + ", ".join(
    f"SDTORCH_{f.name.upper()} (default {f.default})" for f in fields(Limits)) + ".")

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
MAX_GUIDANCE = 100.0  # A1111's UI stops at 30; this bound still refuses typos such as 750
BATCH_MODES = ("per-image", "batched")  # see the module docstring


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_text(name: str, value, limits: Limits) -> None:
    """A prompt: a str of valid Unicode (non-UTF-8 bytes in argv arrive as lone surrogates) within the limit."""
    if not isinstance(value, str):
        raise SDTorchError(f"{name} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SDTorchError(f"{name} is not valid UTF-8 text (undecodable byte at character {e.start}); "
                           "give the prompt in UTF-8") from None
    if len(value) > limits.max_prompt_chars:
        raise SDTorchError(f"{name} has {len(value)} characters, more than the limit of {limits.max_prompt_chars} "
                           "(SDTORCH_MAX_PROMPT_CHARS)")


def unknown_words(prompt: str, vocabulary) -> list[str]:
    """The prompt's words that are not in `vocabulary`, each once in order of appearance. Words are runs
    of letters compared lower-case; A1111's weighting syntax ((word:1.2), [word]) and BREAK are not words."""
    known = {w.lower() for w in vocabulary}
    runs = prompts.parse_weights(prompt)
    text = " ".join(t for t, w in runs if (t, w) != ("BREAK", prompts.BREAK_WEIGHT))
    return list(dict.fromkeys(w for w in re.findall(r"[^\W\d_]+", text.lower()) if w not in known))


def check_size(width, height, limits: Limits, what: str = "width and height") -> None:
    """An output size: positive multiples of 8 within the limits on each side and on the pixel count."""
    for v in (width, height):
        if not _is_int(v):
            raise SDTorchError(f"{what} must be integers, got {width!r}x{height!r}")
    if width % 8 or height % 8 or width <= 0 or height <= 0:
        raise SDTorchError(f"{what} must be positive multiples of 8, got {width}x{height}")
    if max(width, height) > limits.max_side:
        raise SDTorchError(f"{what} {width}x{height}: a side is over the limit of {limits.max_side} pixels "
                           "(SDTORCH_MAX_SIDE)")
    if width * height > limits.max_pixels:
        raise SDTorchError(f"{what} {width}x{height}: {width * height} pixels, over the limit of "
                           f"{limits.max_pixels} (SDTORCH_MAX_PIXELS)")


def schedule_max_steps(num_train_timesteps: int, sampler: str, karras: bool = False) -> int | None:
    """The most steps for which `get_sigmas` (leading spacing, steps_offset 1, as `generate` uses it) gives
    strictly decreasing noise levels inside the training range; None where any count does (Karras
    sigmas of the DPM-Solver samplers span the training range whatever the count).

    Leading spacing visits t = k * (T // n) + 1: for n = T the last one is T, past the table, so two steps
    share sigma_max and the solvers divide by a zero step (black images); DPM-Solver spaces n + 1 points,
    so it runs out one step sooner. Karras sigmas of the others span the spaced schedule's extremes,
    which coincide past T steps."""
    if sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
        return None if karras else num_train_timesteps - 2
    return num_train_timesteps if karras else num_train_timesteps - 1


@dataclass(frozen=True)
class Request:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance: float = 7.5
    sampler: str = "dpmpp_2m"
    seed: int | None = 0  # None: a random one
    batch_size: int = 1
    karras: bool = False
    strength: float = 1.0  # img2img and inpainting: how much of the schedule to run (1 = all)
    clip_skip: int = 1
    guidance_rescale: float = 0.0
    batch_mode: str = "per-image"  # or "batched": one network call a step for the whole batch
    vae_tiling: bool = False  # encode and decode in overlapping tiles (`tiling`): less memory for large images
    class_label: int | None = None  # a class-conditional model's class (`resolve` maps a name to its index)

    def validate(self, limits: Limits | None = None, config=None) -> None:
        """The one check of a request (CLI, Python API, server): every field's type and range, before
        anything loads. With the model's `config`, also what depends on it (schedule, text layers, VAE)."""
        limits = limits or Limits()
        check_text("prompt", self.prompt, limits)
        check_text("negative prompt", self.negative_prompt, limits)
        check_size(self.width, self.height, limits)
        if not _is_int(self.steps):
            raise SDTorchError(f"steps must be an integer, got {self.steps!r}")
        if not 1 <= self.steps <= limits.max_steps:
            raise SDTorchError(f"steps must be at least 1 and at most {limits.max_steps} (SDTORCH_MAX_STEPS), "
                               f"got {self.steps}")
        _check_real("guidance", self.guidance, 0.0, MAX_GUIDANCE)
        _check_real("guidance rescale", self.guidance_rescale, 0.0, 1.0)
        _check_real("strength", self.strength, 0.0, 1.0)
        if not isinstance(self.sampler, str) or self.sampler not in SAMPLERS:
            raise SDTorchError(f"unknown sampler {self.sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
        if not isinstance(self.karras, bool):
            raise SDTorchError(f"karras must be True or False, got {self.karras!r}")
        if not _is_int(self.batch_size):
            raise SDTorchError(f"batch size must be an integer, got {self.batch_size!r}")
        if not 1 <= self.batch_size <= limits.max_batch:
            raise SDTorchError(f"batch size must be at least 1 and at most {limits.max_batch} (SDTORCH_MAX_BATCH), "
                               f"got {self.batch_size}")
        if self.seed is not None:
            if not _is_int(self.seed):
                raise SDTorchError(f"seed must be an integer, got {self.seed!r}")
            if not 0 <= self.seed <= MAX_SEED - (self.batch_size - 1):
                raise SDTorchError(f"seed must be in [0, 2**64 - 1] for every image (seed + batch size - 1), "
                                   f"got {self.seed} with batch size {self.batch_size}")
        if not _is_int(self.clip_skip) or self.clip_skip < 1:
            raise SDTorchError(f"clip skip must be a positive integer, got {self.clip_skip!r}")
        if self.class_label is not None and (not _is_int(self.class_label) or self.class_label < 0):
            raise SDTorchError(f"class label must be a non-negative integer index, got {self.class_label!r}")
        if not isinstance(self.vae_tiling, bool):
            raise SDTorchError(f"vae_tiling must be True or False, got {self.vae_tiling!r}")
        if not isinstance(self.batch_mode, str) or self.batch_mode not in BATCH_MODES:
            raise SDTorchError(f"unknown batch mode {self.batch_mode!r}; choose one of {', '.join(BATCH_MODES)}")
        if config is not None:
            self._validate_for(config)

    def _validate_for(self, config) -> None:
        kind = config.unet.conditioning
        if kind != "text":
            self._validate_untexted(config, kind)
        elif self.class_label is not None:
            raise SDTorchError("a class was given, but the model is text-conditioned: give a prompt instead")
        elif self.clip_skip > config.text.layers:
            raise SDTorchError(f"clip skip {self.clip_skip}: the model's text encoder has only "
                               f"{config.text.layers} layers")
        most = schedule_max_steps(config.num_train_timesteps, self.sampler, self.karras)
        if most is not None and self.steps > most:
            raise SDTorchError(f"steps {self.steps}: the model's schedule of {config.num_train_timesteps} training "
                               f"steps supports at most {most} with sampler {self.sampler}"
                               + ("" if self.karras else " (more with --karras)"))
        factor = config.vae.downsampling
        if self.width % factor or self.height % factor:
            raise SDTorchError(f"width and height must be multiples of {factor} for this model's VAE, "
                               f"got {self.width}x{self.height}")

    def _validate_untexted(self, config, kind: str) -> None:
        """A class-conditional or unconditional model's request: no prompt, the class where one is needed."""
        what = "a class-conditional" if kind == "class" else "an unconditional"
        if self.prompt or self.negative_prompt:
            raise SDTorchError(f"{what} model takes no prompt" + (" (ask for a class instead)" if kind == "class"
                                                                  else ""))
        if self.clip_skip != 1:
            raise SDTorchError(f"{what} model has no text encoder, so no clip skip")
        if kind == "none":
            if self.class_label is not None:
                raise SDTorchError("a class was given, but the model is unconditional")
            if self.guidance != 1:
                raise SDTorchError(f"an unconditional model has nothing to guide by: guidance must be 1, "
                                   f"got {self.guidance:g}")
        elif self.class_label is None:
            raise SDTorchError("the model is class-conditional: ask for a class (by name or index)")
        elif self.class_label >= config.unet.num_classes:
            n = config.unet.num_classes
            raise SDTorchError(f"class index {self.class_label} is out of range: the model has {n} classes "
                               f"(0 to {n - 1})")


def _check_real(name: str, value, low: float, high: float) -> None:
    if not _is_real(value):
        raise SDTorchError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        raise SDTorchError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")


def size_for_image(image_width: int, image_height: int, width=None, height=None, name: str = "the image"):
    """(width, height) of a request that starts from an image: those given, else the image's own rounded
    down to a multiple of 8 (as diffusers' image processor does); the image is resized to them."""
    if (width is None and image_width < 8) or (height is None and image_height < 8):
        raise SDTorchError(f"{name} is {image_width}x{image_height}, smaller than 8x8")
    return (image_width // 8 * 8 if width is None else width), (image_height // 8 * 8 if height is None else height)


def make_request(**kw) -> Request:
    """A Request from keyword arguments; an unknown one is an SDTorchError naming it."""
    known = {f.name for f in fields(Request)}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise SDTorchError(f"unknown generation option {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return Request(**kw)


def new_seed() -> int:
    return secrets.randbelow(2**32)


class PerImageNoise:
    """Noise for a batch of images ([len(generators), ...]), each image's drawn on the CPU from its own
    generator: the initial noise, then the ancestral/SDE steps' draws. `shape` is one image's ([1, C, h, w])."""

    def __init__(self, generators: list[torch.Generator], shape, dtype, device):
        self.generators, self.shape, self.dtype, self.device = generators, shape, dtype, device

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        draws = [torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self.generators]
        return (draws[0] if len(draws) == 1 else torch.cat(draws)).to(self.device, self.dtype)


def resolve(prompt: str, model=None, image_size=None, *, image_name: str = "the image", limits: Limits | None = None,
            stacklevel: int = 2, warn: bool = True, **options) -> Request:
    """The request `options` describe (Request's fields; None or left out: not given), with every default
    resolved here and only here, and validated: steps, guidance and sampler from the model's defaults (sdtorch's
    without a model); width and height from the source image's `image_size` (rounded down to a multiple of 8;
    the image is resized to what is given) or else the model's size. A seed left out stays None (a random one).

    Without a model (a check before it loads), a size left to the model is checked as 8x8. With one, the checks
    that depend on it run too, and a prompt with words it was not trained on, or a size asked for other than
    its own, warns (`stacklevel` as for warnings.warn, counted from this function; `warn=False`: not again, for
    a request resolved a second time)."""
    from .pipeline import GENERATION_DEFAULTS

    options = {k: v for k, v in options.items() if v is not None or k == "seed"}
    given_size = "width" in options or "height" in options
    if "class_label" in options:  # a name needs the model's names: without a model it is checked after loading
        options["class_label"] = model.class_label(options.pop("class_label")) if model is not None else None
    if model is not None and model.config.unet.conditioning == "none":
        options.setdefault("guidance", 1.0)  # nothing to guide by
    for key in GENERATION_DEFAULTS:
        if key not in options:
            options[key] = model.default(key) if model is not None else GENERATION_DEFAULTS[key]
    if image_size is not None:
        options["width"], options["height"] = size_for_image(*image_size, options.get("width"),
                                                             options.get("height"), name=image_name)
    side = model.config.sample_size if model is not None else 8
    options.setdefault("width", side)
    options.setdefault("height", side)
    req = make_request(prompt=prompt, **options)
    req.validate(limits, None if model is None else model.config)
    if model is not None and warn:
        _warn(model, req, given_size, stacklevel + 1)
    return req


def _warn(model, req: Request, given_size: bool, stacklevel: int) -> None:
    """Warn about a prompt with words the model was not trained on, and about a size asked for that is not the
    model's training size: both give poor images, not errors."""
    from .pipeline import BUILTIN_DOCS

    vocabulary = model.known_words()
    unknown = unknown_words(req.prompt, vocabulary) if vocabulary else []
    if unknown:
        see = f" (see {BUILTIN_DOCS[model.name]})" if model.name in BUILTIN_DOCS else ""
        warnings.warn(f"the model {model.name} does not know {', '.join(map(repr, unknown))}; it knows: "
                      f"{', '.join(vocabulary)}{see}", stacklevel=stacklevel)
    side = model.config.sample_size
    if given_size and (req.width, req.height) != (side, side):
        warnings.warn(f"{req.width}x{req.height} differs from the {side}x{side} this model was trained at; "
                      "expect repeated or broken objects", stacklevel=stacklevel)


class Interrupted(Exception):
    """Raised by a step callback (or by `generate` when the callback returns False) to stop a run early."""


@dataclass(frozen=True)
class Step:
    """What a step callback sees: step `index` of `total` (0-based) of sampling pass `image` of `images`, the
    sampler's state `latents` before the step and its estimate `denoised` of the clean latents at noise level
    `sigma`. A pass is one image, or in batch mode "batched" the whole batch (then `images` is 1 and the
    tensors hold every image)."""

    image: int
    images: int
    index: int
    total: int
    sigma: float
    latents: torch.Tensor
    denoised: torch.Tensor
    decoder: Callable[[torch.Tensor], torch.Tensor]

    @property
    def done(self) -> int:
        """Steps finished over the whole run once this one is."""
        return self.image * self.total + self.index + 1

    def preview(self) -> torch.Tensor:
        """The current estimate decoded to images in [0, 1], [N, 3, H, W] (N images in the pass): a full VAE
        decode, so ask for it only when it is shown."""
        return self.decoder(self.denoised)


@dataclass(frozen=True)
class Result:
    """What `generate` returns: `images` in [0, 1] as [B, 3, H, W], the `seeds` they were made from, the
    `request` as run (every default resolved) and each image's A1111 `parameters` text. `interrupted`: the
    callback stopped the run; the images are those finished and the one in progress (decoded from its latest
    estimate, if it had taken a step)."""

    images: torch.Tensor
    seeds: list[int]
    request: Request
    parameters: list[str]
    interrupted: bool = False

    def pil(self) -> list:
        from .images import to_pil

        return to_pil(self.images)

    def png(self, i: int = 0) -> bytes:
        """Image `i` as PNG bytes carrying its parameters text (the chunk A1111 reads back)."""
        from .images import png_bytes, to_pil

        return png_bytes(to_pil(self.images[i:i + 1])[0], self.parameters[i])


class ProgressBar:
    """A step callback that shows one tqdm bar over every step of every image (the CLI's, and `progress=True`'s).
    Use it as a context manager, so the bar is closed however the run ends."""

    def __init__(self, desc: str = "sampling"):
        self.desc, self.bar = desc, None

    def __call__(self, step: Step) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=step.total * step.images, desc=self.desc, unit="step")
        self.bar.update(1)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _unet_fn(unet, extra: torch.Tensor | None):
    """The network call, in the UNet's own dtype and returning float32 (the sampler's state stays in
    float32); a 9-channel inpainting UNet also gets [mask, masked-image latents]. What the samplers pass as
    `context` is the text's hidden states, a class model's labels (long, [B]), or nothing an unconditional
    model reads (`_conditions`)."""
    dtype = next(unet.parameters()).dtype
    kind = unet.config.conditioning

    def call(x, t, context, **kwargs):
        if extra is not None:
            x = torch.cat([x, extra.expand(x.shape[0], -1, -1, -1).to(x.dtype)], 1)
        if kind == "class":
            return unet(x.to(dtype), t, None, class_labels=context, **kwargs).float()
        if kind == "none":
            return unet(x.to(dtype), t, **kwargs).float()
        return unet(x.to(dtype), t, context.to(dtype), **kwargs).float()
    return call


def _conditions(model, req: Request, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) as the guided denoiser takes them, one row each: the prompt's and the negative prompt's
    hidden states; a class model's label and its null class; for an unconditional model a placeholder
    (guidance 1 runs the conditional pass only, and the network reads no context)."""
    kind = model.config.unet.conditioning
    if kind == "class":
        labels = torch.tensor([req.class_label, model.config.unet.null_class], dtype=torch.long, device=device)
        return labels[:1], labels[1:]
    if kind == "none":
        empty = torch.zeros(1, 0, device=device)
        return empty, empty
    return prompts.encode_pair(model.text_encoder, model.tokenizer, [req.prompt], [req.negative_prompt],
                               clip_skip=req.clip_skip)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """One row repeated for n images (a view)."""
    return t.expand(n, *t.shape[1:])


def _fit(req: Request, source, mask):
    """`source` ([1, 3, h, w] in [-1, 1]) and `mask` ([1, 1, h, w] in [0, 1], 1 = repaint) checked, and resized
    to the request's size where it asks for another (bicubic, the mask nearest), as A1111 does."""
    for name, t, channels in (("source", source, 3), ("mask", mask, 1)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.ndim != 4 or tuple(t.shape[:2]) != (1, channels)):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise SDTorchError(f"{name} must be a tensor of shape [1, {channels}, H, W], got {got}")
    if mask is not None and source is None:
        raise SDTorchError("a mask needs a source image")
    if mask is not None and mask.shape[-2:] != source.shape[-2:]:
        raise SDTorchError(f"mask size {mask.shape[-1]}x{mask.shape[-2]} does not match image size "
                           f"{source.shape[-1]}x{source.shape[-2]}")
    if source is not None and tuple(source.shape[-2:]) != (req.height, req.width):
        source = F.interpolate(source, size=(req.height, req.width), mode="bicubic", align_corners=False)
        if mask is not None:
            mask = F.interpolate(mask, size=(req.height, req.width), mode="nearest")
    return source, mask


@torch.no_grad()
def generate(model, req: Request, source: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
             callback: Callable[[Step], bool | None] | None = None, limits: Limits | None = None,
             origin: infotext.Origin | None = None) -> Result:
    """Run one request (see `resolve`). `source`: image in [-1, 1], [1, 3, H, W] (img2img/inpaint); `mask`:
    [1, 1, H, W] in [0, 1], 1 = repaint; both are resized to the request's size. `callback(step)` is called at
    every step; returning False or raising Interrupted stops the run. `origin`: what the parameters text says
    about the model and the run (default: the model's name, no hash). A run whose sampling or decoding comes
    out non-finite raises SDTorchError rather than return a black image."""
    if not isinstance(req, Request):
        raise SDTorchError(f"expected a generation.Request, got {type(req).__name__}")
    req.validate(limits, model.config)
    source, mask = _fit(req, source, mask)
    unet, vae = model.unet, model.vae
    # The sampler's state is float32 whatever the network's dtype: on the variance-exploding axis x reaches
    # sigma_max * 4 (over 500 for a linear schedule), and in fp16 a product like sigma * x overflows (PLMS at
    # 50 steps gave inf, then black images, for 6 of 32 prompts of the built-in model loaded in fp16).
    device, dtype = next(unet.parameters()).device, torch.float32
    scale = model.config.vae.scaling_factor
    factor = model.config.vae.downsampling
    latent_shape = (1, model.config.unet.out_channels, req.height // factor, req.width // factor)
    cond, uncond = _conditions(model, req, device)
    vp = next(vae.parameters())

    def encode(img):
        img = img.to(vp.device, vp.dtype)
        return (tiling.encode(vae, img) if req.vae_tiling else vae.encode(img).mode()).to(device, dtype) * scale
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
    if init is not None:  # img2img and inpainting: skip the first (1 - strength) of the schedule
        run = min(int(req.steps * req.strength), req.steps)
        sigmas = sigmas[req.steps - run:]
    seed = new_seed() if req.seed is None else req.seed
    seeds = [seed + i for i in range(req.batch_size)]
    passes = [seeds] if req.batch_mode == "batched" else [[s] for s in seeds]
    blend = latent_mask is not None and extra is None
    keep = (lambda x: latent_mask * x + (1 - latent_mask) * init) if blend else (lambda x: x)  # noqa: E731
    preview = lambda x: decode(vae, keep(x) / scale, req.vae_tiling)  # noqa: E731
    images, interrupted = [], False
    for n, group in enumerate(passes):
        draw = PerImageNoise([torch.Generator().manual_seed(s) for s in group], latent_shape, dtype, device)
        noise = draw()
        x = noise * init_noise_sigma(sigmas, req.sampler) if init is None else init + noise * sigmas[0]
        den = InpaintBlend(guided, init, latent_mask, noise) if blend else guided
        context = {"context": _rows(cond, len(group)), "uncond": _rows(uncond, len(group))}
        latest = []  # the x_0 estimate of the last step taken, for an interrupted image

        def report(info, n=n):
            latest[:] = [info["denoised"]]
            if callback is not None and callback(Step(n, len(passes), info["i"], len(sigmas) - 1,
                                                      float(info["sigma"]), info["x"], info["denoised"],
                                                      preview)) is False:
                raise Interrupted

        if len(sigmas) > 1:
            try:
                x = SAMPLERS[req.sampler](den, x, sigmas, extra_args=context, callback=report, noise=draw)
            except Interrupted:
                interrupted = True
                if not latest:
                    break
                x = latest[0]
        x = keep(x)
        if not torch.isfinite(x).all():
            which = f"seed {group[0]}" if len(group) == 1 else f"seeds {group[0]} to {group[-1]}"
            raise SDTorchError(f"sampling produced NaN/inf latents ({which}, sampler {req.sampler}, {req.steps} "
                               f"steps, guidance {req.guidance:g}); nothing was written")
        images.append(decode(vae, x / scale, req.vae_tiling))
        if interrupted:
            break
    out = torch.cat(images) if images else torch.zeros(0, 3, req.height, req.width)
    seeds = seeds[:len(out)]
    origin = origin or infotext.Origin(model=model.name)
    mode = origin.mode or ("txt2img" if source is None else "img2img" if mask is None else "inpaint")
    hashes = {name: net.hash for name, net in model.loras.items()}
    label = None if req.class_label is None else model.class_name(req.class_label)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(next(unet.parameters()).dtype)
    texts = [infotext.parameters(req, s, origin, mode, hashes, label, precision) for s in seeds]
    return Result(out, seeds, dataclasses.replace(req, seed=seed), texts, interrupted)


def decode(vae, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """VAE decode to [0, 1] (`tiled`: in overlapping tiles, `tiling.decode`); if reduced precision overflows to
    NaN/inf, decode again with a float32 copy of the VAE (the model's own is left as it is) and warn. An image
    that is still not finite raises SDTorchError (it would be saved as black)."""
    run = (lambda v, z: tiling.decode(v, z)) if tiled else (lambda v, z: v.decode(z))  # noqa: E731
    p = next(vae.parameters())
    image = run(vae, latents.to(p.device, p.dtype))
    if not torch.isfinite(image).all() and p.dtype != torch.float32:
        warnings.warn(f"VAE decode in {p.dtype} gave NaN/inf; decoding again in float32", stacklevel=2)
        image = run(copy.deepcopy(vae).float(), latents.float().to(p.device))
    if not torch.isfinite(image).all():
        raise SDTorchError("the VAE decoded NaN/inf pixels from finite latents (in float32); nothing was written")
    return ((image.float() + 1) / 2).clamp(0, 1).cpu()

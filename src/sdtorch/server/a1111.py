"""AUTOMATIC1111's API shapes: the request bodies of /sdapi/v1/txt2img and /img2img with A1111's field names and
defaults, what they mean for sdtorch (`options`), and the `info` JSON A1111 returns.

Fields a request leaves out take the loaded model's defaults where it declares them (the built-in model: 10
steps, guidance 1.5, DPM++ 2M, as `sdtorch generate`), else A1111's (50 steps, CFG 7, Euler a); the size defaults
to the model's training size (64x64 for the built-in model, 512x512 for SD 1.x). A field that asks for a
feature sdtorch does not have (hires fix, face restoration, tiling, variation seeds, scripts, styles) is refused
with a 422 naming it, rather than ignored: the image would not be what the client asked for. Sampler tuning
fields (eta, s_churn, s_tmin, s_tmax, s_noise) are accepted at A1111's defaults only, for the same reason.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .. import infotext
from ..errors import SDTorchError
from ..sampling import SAMPLERS

A1111_DEFAULTS = {"steps": 50, "cfg_scale": 7.0, "sampler_name": "Euler a"}  # the size defaults to the model's
SCHEDULERS = {"automatic": False, "karras": True, "uniform": False}  # A1111's scheduler name -> karras
VERSION = "sdtorch"
MAX_BLUR = 256  # pixels: A1111's slider stops at 64


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img, as A1111 names it. Unknown fields (extensions' own) are ignored, as A1111 does."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float = 0.0
    s_churn: float = 0.0
    s_tmax: float | None = None
    s_tmin: float = 0.0
    s_noise: float = 1.0
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    enable_hr: bool = False
    denoising_strength: float | None = None


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: txt2img's fields and the source image, mask and inpainting options."""

    init_images: list[str] = Field(default_factory=list)
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur: int | None = Field(default=None, ge=0, le=MAX_BLUR)
    mask_blur_x: int = Field(default=4, ge=0, le=MAX_BLUR)
    mask_blur_y: int = Field(default=4, ge=0, le=MAX_BLUR)
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(default=0, ge=0)
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


def sampler_list() -> list[dict]:
    """GET /sdapi/v1/samplers: A1111's names, with sdtorch's as an alias."""
    return [{"name": infotext.A1111_NAMES[name], "aliases": [name], "options": {}} for name in SAMPLERS]


def defaults_for(model) -> dict:
    """Steps, guidance and sampler for fields a request leaves out: the model's own where it declares defaults
    (the built-in model: 10, 1.5, dpmpp_2m, the same as `sdtorch generate`), else A1111's."""
    if model.defaults:
        return {key: model.default(key) for key in ("steps", "guidance", "sampler")}
    return {"steps": A1111_DEFAULTS["steps"], "guidance": A1111_DEFAULTS["cfg_scale"],
            "sampler": infotext.SDTORCH_NAMES[A1111_DEFAULTS["sampler_name"]]}


def sampler_of(body: Txt2ImgRequest, model) -> tuple[str, bool | None]:
    """(sdtorch sampler, karras or None if not asked) from sampler_name (else the deprecated sampler_index) and
    scheduler. Old A1111 names such as "DPM++ 2M Karras" carry the schedule in the name."""
    name = body.sampler_name or body.sampler_index
    karras = None
    if body.scheduler is not None:
        if body.scheduler.lower() not in SCHEDULERS:
            raise SDTorchError(f"unknown scheduler {body.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        karras = SCHEDULERS[body.scheduler.lower()] if body.scheduler.lower() != "automatic" else None
    if name is None:
        return defaults_for(model)["sampler"], karras
    if name.endswith(" Karras"):
        name, karras = name[: -len(" Karras")], True
    if name in infotext.SDTORCH_NAMES:
        return infotext.SDTORCH_NAMES[name], karras
    if name in SAMPLERS:
        return name, karras
    raise SDTorchError(f"unknown sampler {name!r}; valid: {', '.join(infotext.A1111_NAMES.values())}")


def _unsupported(body: Txt2ImgRequest) -> None:
    """A 422 for each asked-for feature sdtorch lacks (see the module docstring)."""
    asks = {
        "enable_hr (hires fix)": body.enable_hr, "restore_faces": bool(body.restore_faces),
        "tiling": bool(body.tiling), "subseed_strength (variation seeds)": body.subseed_strength != 0,
        "script_name": body.script_name not in (None, ""), "alwayson_scripts": bool(body.alwayson_scripts),
        "styles": bool(body.styles), "eta other than 1": body.eta not in (None, 1.0),
        "s_churn": body.s_churn != 0, "s_tmin": body.s_tmin != 0, "s_tmax": body.s_tmax not in (None, 0.0),
        "s_noise other than 1": body.s_noise != 1.0, "s_min_uncond": body.s_min_uncond != 0,
    }
    if isinstance(body, Img2ImgRequest):
        asks["resize_mode other than 0 (just resize)"] = body.resize_mode != 0
        asks["inpainting_fill 2 or 3 (latent noise, latent nothing)"] = body.inpainting_fill not in (0, 1)
        asks["initial_noise_multiplier other than 1"] = body.initial_noise_multiplier not in (None, 1.0)
    for what, asked in asks.items():
        if asked:
            raise SDTorchError(f"{what} is not supported by sdtorch")
    unknown = set(body.override_settings or {}) - {"CLIP_stop_at_last_layers", "sd_model_checkpoint"}
    if unknown:
        raise SDTorchError(f"override_settings {sorted(unknown)[0]!r} is not supported by sdtorch (only "
                           "CLIP_stop_at_last_layers and sd_model_checkpoint)")


def options(body: Txt2ImgRequest, model, clip_skip: int, strength: float | None = None) -> dict:
    """The generation options (generation.resolve's keywords, without the prompt) a request asks for; a field left
    out is None, so the model's default applies, or A1111's where the model has none."""
    _unsupported(body)
    given = body.model_fields_set
    sampler, karras = sampler_of(body, model)

    defaults = defaults_for(model)

    def pick(field: str, key: str):
        value = getattr(body, field)
        return value if field in given and value is not None else defaults[key]

    override = body.override_settings or {}
    return dict(
        negative_prompt=body.negative_prompt, width=body.width, height=body.height, steps=pick("steps", "steps"),
        guidance=pick("cfg_scale", "guidance"), sampler=sampler, karras=bool(karras),
        seed=None if body.seed == -1 else body.seed, batch_size=body.batch_size * body.n_iter,
        strength=1.0 if strength is None else strength,
        clip_skip=override.get("CLIP_stop_at_last_layers", clip_skip),
    )


def decode_image(data, what: str) -> bytes:
    """The bytes of a base64 image, with or without a `data:image/...;base64,` prefix (A1111 takes both)."""
    if not isinstance(data, str) or not data:
        raise SDTorchError(f"{what}: expected a base64-encoded image")
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if ";base64" not in head:
            raise SDTorchError(f"{what}: a data URL must be base64-encoded")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SDTorchError(f"{what}: not valid base64") from None


def encode_png(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def info_json(req, seeds: list[int], infotexts: list[str], interrupted: bool, model_title: str,
              model_hash: str | None, prompt: str, body: Txt2ImgRequest, job_timestamp: str) -> str:
    """The `info` string A1111 returns: a JSON object of the run `req` (a generation.Request, defaults resolved),
    with every image's seed and parameters text. `interrupted` is sdtorch's: the run was stopped early."""
    n = len(seeds)
    return json.dumps({
        "prompt": prompt, "all_prompts": [prompt] * n, "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * n, "seed": seeds[0] if n else req.seed,
        "all_seeds": list(seeds), "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": req.width, "height": req.height, "sampler_name": infotext.A1111_NAMES[req.sampler],
        "cfg_scale": req.guidance, "steps": req.steps, "batch_size": body.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model_title, "sd_model_hash": model_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": req.strength if isinstance(body, Img2ImgRequest) else None,
        "extra_generation_params": {"Schedule type": "Karras"} if req.karras else {},
        "index_of_first_image": 0, "infotexts": list(infotexts), "styles": [],
        "job_timestamp": job_timestamp, "clip_skip": req.clip_skip, "is_using_inpainting_conditioning": False,
        "version": VERSION, "interrupted": interrupted,
    })


def timestamp() -> str:
    """A1111's job timestamp: local time as YYYYmmddHHMMSS."""
    return time.strftime("%Y%m%d%H%M%S")


def png_info(items: dict[str, str]) -> dict:
    """POST /sdapi/v1/png-info from an image's text chunks (`images.text_chunks`): its `parameters` text, the
    other chunks, and the text parsed into A1111's fields (Prompt, Negative prompt, Steps, ..., Size-1, Size-2)."""
    items = dict(items)
    text = items.pop("parameters", "")
    parsed: dict = {}
    if text:
        try:
            prompt, negative, fields = infotext.parse(text)
            parsed = {"Prompt": prompt, "Negative prompt": negative, **fields}
            if "x" in fields.get("Size", ""):
                parsed["Size-1"], parsed["Size-2"] = fields["Size"].split("x", 1)
        except SDTorchError:
            parsed = {}
    return {"info": text, "items": items, "parameters": parsed}

"""AUTOMATIC1111's generation parameters text (the PNG `parameters` chunk): writing and reading it.

Format, as A1111 writes it:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, ...

Values that contain a comma, colon or quote are written as JSON strings, as A1111 does. LoRAs: the prompt keeps its
`<lora:NAME:SCALE>` tags and `Lora hashes: "name: hash, name2: hash2"` holds their short hashes (A1111's
`extra_networks_lora.py`); sdtorch adds `Lora files`, a JSON object {name: path} for LoRAs given as files.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SDTorchError

A1111_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "plms": "PLMS", "euler": "Euler", "euler_a": "Euler a",
               "heun": "Heun", "dpm2": "DPM2", "lms": "LMS", "dpmpp_2m": "DPM++ 2M",
               "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE"}
SDTORCH_NAMES = {v: k for k, v in A1111_NAMES.items()}


MAX_HASH_BYTES = 64 << 30  # larger than any Stable Diffusion checkpoint; bounds the work of hashing


def model_hash(path) -> str:
    """A1111's "AutoV2" hash: the first 10 hex digits of the file's SHA-256 (for a diffusers folder,
    of its UNet weights file). Only a regular file of at most MAX_HASH_BYTES is hashed (a device such as
    /dev/zero or a FIFO would never end), and no more than its size is read."""
    from .fileio import shown
    from .pipeline import builtin_path

    path = builtin_path(str(path)) or Path(path)
    if path.is_dir():
        from .checkpoints.diffusers_folder import weight_file

        path = weight_file(path, "unet")
    if not path.exists():
        raise SDTorchError(f"{shown(path)}: no such model file or folder")
    if not path.is_file():
        raise SDTorchError(f"{shown(path)}: not a regular file or a folder, so not a model")
    size = path.stat().st_size
    if size > MAX_HASH_BYTES:
        raise SDTorchError(f"{shown(path)}: {size} bytes, larger than any model ({MAX_HASH_BYTES} bytes at most)")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()[:10]


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def build(prompt: str, negative_prompt: str, fields: dict) -> str:
    """The parameters text for one image; `fields` in A1111 order (Steps, Sampler, CFG scale, ...)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


@dataclass(frozen=True)
class Origin:
    """What a parameters text records beyond the request: the model as the user named it (a path or a built-in
    name) and its `model_hash`, the `mode` where the front end knows better than the run (outpaint is an
    inpaint of a padded image), the `prompt` as written where it differs from the one encoded (LoRA tags kept,
    --lora flags added as tags), and the LoRAs given as files ({name: path}, the "Lora files" field)."""

    model: str = ""
    model_hash: str | None = None
    mode: str | None = None
    prompt: str | None = None
    lora_files: dict = field(default_factory=dict)


def parameters(req, seed: int, origin: Origin, mode: str, lora_hashes: dict[str, str],
               class_name: str | None = None, precision: str | None = None) -> str:
    """The parameters text of one image of the request `req` (a generation.Request with its defaults resolved),
    made from `seed` by a run of `mode` (txt2img, img2img, inpaint, outpaint) with the LoRAs `lora_hashes`;
    a class-conditional model's class is recorded as `class_name` (its name, or its index), and a UNet that ran
    in reduced precision as `precision` ("bf16", "fp16"), so that `replay` runs it so again."""
    return build(req.prompt if origin.prompt is None else origin.prompt, req.negative_prompt, {
        "Steps": req.steps, "Sampler": A1111_NAMES[req.sampler], "Schedule type": "Karras" if req.karras else None,
        "CFG scale": req.guidance, "Seed": seed, "Size": f"{req.width}x{req.height}", "Model hash": origin.model_hash,
        "Model": origin.model.encode("utf-8", "backslashreplace").decode("utf-8"),
        "Denoising strength": req.strength if mode == "img2img" or req.strength < 1 else None,
        "Clip skip": req.clip_skip if req.clip_skip != 1 else None, "Mode": None if mode == "txt2img" else mode,
        "Batch mode": req.batch_mode if req.batch_mode != "per-image" else None,
        "VAE tiling": "True" if req.vae_tiling else None,
        "Class": class_name,
        "Precision": precision,
        **lora_fields(lora_hashes, origin.lora_files),
    })


def lora_fields(hashes: dict[str, str], files: dict[str, str]) -> dict:
    """The "Lora hashes" field as A1111 writes it (names without ':' or ',') and sdtorch's "Lora files"."""
    text = ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in hashes.items() if h)
    return {"Lora hashes": text or None, "Lora files": json.dumps(files) if files else None}


def lora_records(fields: dict) -> dict:
    """{"lora_hashes": {name: hash}, "lora_files": {name: path}} read back from those fields; SDTorchError if bad."""
    hashes, files = {}, {}
    for item in filter(None, (s.strip() for s in fields.get("Lora hashes", "").split(","))):
        name, sep, digest = item.rpartition(":")
        if not sep or not name.strip() or not digest.strip():
            raise SDTorchError(f"malformed 'Lora hashes' entry {item!r} (expected NAME: HASH)")
        hashes[name.strip()] = digest.strip()
    if fields.get("Lora files"):
        try:
            files = json.loads(fields["Lora files"])
            assert isinstance(files, dict) and all(isinstance(v, str) for v in files.values())
        except (ValueError, AssertionError):
            raise SDTorchError("malformed 'Lora files' field (expected a JSON object of name: path)") from None
    return {"lora_hashes": hashes, "lora_files": files}


_FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, fields) from a parameters text; a malformed one is an SDTorchError."""
    if not isinstance(text, str):
        raise SDTorchError("the PNG parameters text is not text")
    *head, last = text.strip().split("\n")
    if not _FIELD.match(last) or "Steps:" not in last:
        raise SDTorchError("the PNG parameters text has no 'Steps: ...' line (not written by sdtorch or A1111)")
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    fields = {}
    for m in _FIELD.finditer(last):
        key, value = m.group(1).strip(), m.group(2).strip()
        try:
            fields[key] = json.loads(value) if value.startswith('"') else value
        except ValueError:
            raise SDTorchError(f"the PNG parameters text has a malformed quoted value for {key!r}") from None
        if not isinstance(fields[key], str):
            raise SDTorchError(f"the PNG parameters text has a malformed quoted value for {key!r}")
    return "\n".join(prompt_lines), "\n".join(negative_lines), fields

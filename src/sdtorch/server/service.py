"""What the server does, below its routes: the loaded model, its folders, and the jobs that generate.

A request is checked here, in the handler's thread, before it is queued (a bad one is a 422 at once, and never
waits behind other jobs); the job then checks it again against the model loaded when it runs, since a model
switch may have come between. Images run one at a time through `generation.generate`, each from its own seed
(seed + i), which gives the same pixels as one batched call and lets `skip` end one image and go on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .. import generation, images, infotext
from ..errors import SDTorchError
from ..fileio import write_all
from ..lora.prompt import LoraRef, applied_loras, split_lora_tags
from . import a1111
from .folders import Entry, lookup, scan_loras, scan_models
from .jobs import Worker


@dataclass(frozen=True)
class ServerConfig:
    """How `sdtorch serve` runs: the model at start (a title in `models_dir`, a built-in name, or a path the
    operator gives), the folders requests may name things in, the queue, the API key and the request limits."""

    model: str = "shapes"
    models_dir: Path | None = None
    lora_dir: Path | None = None
    output_dir: Path | None = None
    queue_size: int = 8
    api_key: str | None = None
    limits: generation.Limits = field(default_factory=generation.Limits)
    max_body_bytes: int = 64 << 20
    dtype: str | None = "auto"  # as `sdtorch.load` takes it; None: the file's
    device: str | None = None  # None: the CPU


@dataclass
class Prepared:
    """A checked generation request: what the job needs to run it."""

    kind: str  # txt2img, img2img, inpaint
    body: a1111.Txt2ImgRequest
    prompt: str  # without LoRA tags
    loras: list[LoraRef]
    options: dict
    source: object = None  # PIL image as given
    mask: object = None  # PIL L mask, blurred, inverted as asked


class Service:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.models = scan_models(config.models_dir)
        self.loras = scan_loras(config.lora_dir)
        self.clip_skip = 1
        self.entry, self.model, self.model_hash = self._load(self._startup_entry(config.model))
        self.worker = Worker(config.queue_size)

    # -- models -----------------------------------------------------------------------------------------------
    def _startup_entry(self, model: str) -> Entry:
        try:
            return lookup(self.models, model, "model")
        except SDTorchError:
            path = Path(model)  # a path on the operator's command line, not from a request
            if not path.exists():
                raise
            entry = Entry(str(model), path)
            self.models.append(entry)
            return entry

    def _load(self, entry: Entry):
        from ..pipeline import load

        model = load(entry.title if entry.builtin else str(entry.path), dtype=self.config.dtype,
                     device=self.config.device)
        return entry, model, infotext.model_hash(entry.title if entry.builtin else entry.path)

    def switch_model(self, title: str):
        """Load the model titled `title` (from the folder's list) as a job, so it waits for the running one; its
        future, or None when that model is already loaded."""
        entry = lookup(self.models, title, "model")
        if entry.title == self.entry.title:
            return

        def job(worker):
            self.entry, self.model, self.model_hash = self._load(entry)
            self.clip_skip = 1
        return self.worker.submit(job, "load model")

    def refresh_models(self) -> None:
        self.models = scan_models(self.config.models_dir)
        if all(e.title != self.entry.title for e in self.models):
            self.models.append(self.entry)

    def refresh_loras(self) -> None:
        self.loras = scan_loras(self.config.lora_dir)

    # -- requests ---------------------------------------------------------------------------------------------
    def prepare(self, body: a1111.Txt2ImgRequest) -> Prepared:
        """Check a txt2img or img2img body against the loaded model and the limits, decoding its images; a bad
        request is an SDTorchError (422) here, before it is queued."""
        limits = self.config.limits
        if body.save_images and self.config.output_dir is None:
            raise SDTorchError("save_images needs the server started with --output-dir")
        if body.n_iter < 1 or body.batch_size < 1:
            raise SDTorchError(f"batch_size and n_iter must be at least 1, got {body.batch_size} and {body.n_iter}")
        prompt, tags = split_lora_tags(body.prompt)
        refs = [LoraRef(name, lookup(self.loras, name, "LoRA").path, scale) for name, scale in tags]
        kind, source, mask, strength = "txt2img", None, None, None
        if isinstance(body, a1111.Img2ImgRequest):
            if len(body.init_images) != 1:
                raise SDTorchError(f"init_images must hold one image, got {len(body.init_images)}")
            source = images.open_bytes(a1111.decode_image(body.init_images[0], "init_images[0]"), "init_images[0]",
                                       max_pixels=limits.max_image_pixels)
            strength = 0.75 if body.denoising_strength is None else body.denoising_strength
            kind = "img2img"
            if body.mask:
                mask = images.open_bytes(a1111.decode_image(body.mask, "mask"), "mask", "L", limits.max_image_pixels)
                if mask.size != source.size:
                    raise SDTorchError(f"mask size {mask.size[0]}x{mask.size[1]} does not match image size "
                                       f"{source.size[0]}x{source.size[1]}")
                if body.inpainting_mask_invert:
                    from PIL import ImageOps

                    mask = ImageOps.invert(mask)
                both = body.mask_blur is not None
                mask = images.blur_mask(mask, body.mask_blur if both else body.mask_blur_x,
                                        body.mask_blur if both else body.mask_blur_y)
                kind = "inpaint"
        options = a1111.options(body, self.model, self.clip_skip, strength)
        prepared = Prepared(kind, body, prompt, refs, options, source, mask)
        self._resolve(prepared)
        return prepared

    def _resolve(self, p: Prepared, warn: bool = True) -> generation.Request:
        size = None if p.source is None else p.source.size
        if p.kind == "inpaint" and p.body.inpaint_full_res:
            size = None  # the crop is resized to the request's size, the model's by default
        return generation.resolve(p.prompt, self.model, size, image_name="init_images[0]",
                                  limits=self.config.limits, stacklevel=3, warn=warn, **p.options)

    def run(self, p: Prepared, worker: Worker) -> dict:
        """The job: generate every image of `p` (on the worker's thread) and build A1111's response."""
        req = self._resolve(p, warn=False)  # warned when it was prepared
        seed = generation.new_seed() if req.seed is None else req.seed
        origin = infotext.Origin(model=self.entry.title, model_hash=self.model_hash, mode=p.kind,
                                 prompt=p.body.prompt)
        source_t = mask_t = box = None
        source, mask = p.source, p.mask
        if p.kind == "inpaint" and p.body.inpaint_full_res:
            box = images.masked_box(mask, p.body.inpaint_full_res_padding, req.width, req.height)
            if box is not None:
                source = source.crop(box).resize((req.width, req.height), images.Image.Resampling.LANCZOS)
                mask = mask.crop(box).resize((req.width, req.height), images.Image.Resampling.LANCZOS)
        if source is not None:
            if p.kind == "inpaint" and p.body.inpainting_fill == 0:
                source = images.fill_masked(source, mask)
            source_t = images.to_tensor(source)
        if mask is not None:
            mask_t = images.mask_to_tensor(mask)
        if p.kind == "inpaint":  # A1111's overlay: the kept area keeps the original's own pixels
            size = (req.width, req.height)
            overlay = (p.source, p.mask) if box else (p.source.resize(size, images.Image.Resampling.LANCZOS),
                                                     p.mask.resize(size))
        pictures, seeds, texts, interrupted = [], [], [], False
        ts = a1111.timestamp()
        worker.begin(req.batch_size, req.steps, ts)
        with applied_loras(self.model, p.loras):
            for i in range(req.batch_size):
                if worker.interrupted:
                    interrupted = True
                    break
                worker.next_image(i)
                one = dataclasses.replace(req, seed=seed + i, batch_size=1)
                result = generation.generate(self.model, one, source_t, mask_t, callback=worker.step,
                                             limits=self.config.limits, origin=origin)
                if not result.seeds:
                    interrupted = True
                    break
                picture = result.pil()[0]
                if p.kind == "inpaint":
                    picture = images.paste_masked(overlay[0], picture, overlay[1], box)
                pictures.append(picture)
                seeds.append(seed + i)
                texts.append(result.parameters[0])
                interrupted = interrupted or (result.interrupted and worker.interrupted)
        pngs = [images.png_bytes(pic, text) for pic, text in zip(pictures, texts)]
        if p.body.save_images:
            self._save(pngs, seeds, ts)
        params = p.body.model_dump()
        if isinstance(p.body, a1111.Img2ImgRequest) and not p.body.include_init_images:
            params["init_images"], params["mask"] = None, None
        info = a1111.info_json(dataclasses.replace(req, seed=seed), seeds, texts, interrupted, self.entry.title,
                               self.model_hash, p.body.prompt, p.body, ts)
        return {"images": [a1111.encode_png(b) for b in pngs] if p.body.send_images else [],
                "parameters": params, "info": info}

    def _save(self, pngs: list[bytes], seeds: list[int], ts: str) -> None:
        """Write the PNGs into --output-dir, each under a temporary name renamed into place (none on failure)."""
        folder = self.config.output_dir
        folder.mkdir(parents=True, exist_ok=True)
        write_all([(folder / f"{ts}-{i:02d}-{seed}.png", data) for i, (data, seed) in enumerate(zip(pngs, seeds))])

    def close(self) -> None:
        self.worker.stop(timeout=30)

"""The loaded model: the three networks, the tokenizer and the config, plus how they were loaded."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import torch

from . import checkpoints, precision
from .config import PRESETS, ModelConfig
from .errors import SDTorchError
from .lora import adapters
from .models import AutoencoderKL, CLIPTextModel, UNet
from .tokenizer import CLIPTokenizer

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


# What a request leaves out, unless the model's folder recommends otherwise (A1111's and diffusers' usual
# values). A diffusers folder may carry its own in generation_defaults.json (written by
# `sdtorch convert --default-guidance ...`), as transformers' generation_config.json does for LLMs.
GENERATION_DEFAULTS = {"steps": 20, "guidance": 7.5, "sampler": "dpmpp_2m"}
DEFAULTS_FILE = "generation_defaults.json"
# The words a model was trained on, where its folder lists them (a JSON list of strings): a prompt with
# other words gets a warning, since the model cannot draw what it never read (`generation.unknown_words`).
VOCABULARY_FILE = "prompt_vocabulary.json"
# A class-conditional model's class names, label i the i-th (a JSON list of strings), so a request may name a class.
CLASS_NAMES_FILE = "class_names.json"
CLASS_NAMES_KEY = "sdtorch_class_names"  # the same list in a single file's metadata
SHOWN_CLASSES = 20  # an unknown-class error lists this many names (an ImageNet model has 1,000)


def class_index(value, num_classes: int, names: list[str] | None) -> int:
    """The label of class `value` in a model of `num_classes` classes named `names` (or unnamed): one of the
    names, or an index (an int, or a string of digits) in [0, num_classes). Anything else is an SDTorchError
    that says what is known."""
    names = names or []
    if isinstance(value, str) and value in names:
        return names.index(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < num_classes:
            return value
        raise SDTorchError(f"class index {value} is out of range: the model has {num_classes} classes "
                           f"(0 to {num_classes - 1})")
    shown = ", ".join(names[:SHOWN_CLASSES]) + (f", ... ({len(names)} in all)" if len(names) > SHOWN_CLASSES else "")
    known = f"its classes are {shown}" if names else f"it names no classes; give an index 0 to {num_classes - 1}"
    raise SDTorchError(f"unknown class {value!r}: {known}")


class StableDiffusion:
    """`unet`, `vae`, `text_encoder`, `tokenizer` and `config` of one Stable Diffusion model, and the model's
    own generation `defaults` (a subset of GENERATION_DEFAULTS' keys) and prompt `vocabulary` (the words
    it was trained on, or None where it does not say). A class-conditional or unconditional model
    (`config.unet.conditioning` "class" or "none") has no text encoder or tokenizer (None); a class model may
    name its classes (`class_names`, label i the i-th)."""

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel | None,
                 tokenizer: CLIPTokenizer | None, config: ModelConfig, report: checkpoints.LoadReport | None = None,
                 name: str = "", defaults: dict | None = None, vocabulary: list[str] | None = None,
                 class_names: list[str] | None = None):
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.config, self.report, self.name = tokenizer, config, report, name
        self.defaults = check_defaults(defaults or {}, "defaults")
        self.vocabulary = vocabulary
        self.class_names = check_class_names(class_names, config, "class names")

    def default(self, key: str):
        """The model's default for `key` (steps, guidance, sampler), else sdtorch's."""
        return self.defaults.get(key, GENERATION_DEFAULTS[key])

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        """The networks by name; a model without a text encoder has only "unet" and "vae"."""
        present = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        return {name: m for name, m in present.items() if m is not None}

    def class_label(self, value) -> int:
        """A class-conditional model's label for `value` (`class_index`'s rule); a text or unconditional model
        takes no class, which is an SDTorchError."""
        n = self.config.unet.num_classes
        if n is None:
            raise SDTorchError(f"the model {self.name} is not class-conditional "
                               f"({self.config.unet.conditioning}-conditioned): it takes no class")
        return class_index(value, n, self.class_names)

    def class_name(self, label: int) -> str:
        """How the PNG parameters and the CLI show label `label`: its name, or the index."""
        return self.class_names[label] if self.class_names else str(label)

    def to(self, device=None, dtype=None) -> "StableDiffusion":
        """Move every network; `dtype` is a torch dtype, fp32/bf16/fp16 (warns where the device emulates it) or
        "auto" (`precision.auto_dtype` for the device and this UNet's size)."""
        if device is not None:
            device = _device(device)
        if isinstance(dtype, str) and dtype.lower() == "auto":
            dtype = precision.auto_dtype(device or next(self.unet.parameters()).device,
                                         self.parameter_counts()["unet"])
        dtype = _dtype(dtype)
        if dtype is not None:
            precision.check_dtype(dtype, device or next(self.unet.parameters()).device, f"{_name(dtype)} weights")
        for m in self.modules.values():
            m.to(device=device, dtype=dtype)
        self.weights_changed()
        return self

    def compile(self, freeze: bool = True, **options) -> "StableDiffusion":
        """Compile the UNet with torch.compile (Inductor; `options` as torch.compile takes them) for the runs that
        follow: in place (`nn.Module.compile`), so its weights, state dict and LoRAs are the same objects. The
        first run compiles (tens of seconds on a CPU); a new size or batch compiles again. For inference only.

        `freeze` (default) turns on Inductor's freezing: the weights become constants of the compiled graph, so
        it can fold them and pack them once for oneDNN's convolutions and matmuls. On the built-in model's UNet
        (batch 2, 16x16 latents, 2 AVX512 threads) a call took 12.3 ms against 20.8 ms eager, where compiling
        without freezing was slower than eager. A frozen graph cannot see later changes to the weights, and no
        compiled graph sees LoRA hooks added after it, so every LoRA change (load, scale, unload, merge, unmerge)
        and every `to()` throws the compiled code away (`torch._dynamo.reset()`, for the whole process) and the
        next run compiles again."""
        self.unet.compile(**options)
        self._compiled_with = (freeze, options)
        if freeze:  # Inductor reads `freezing` from its config when it compiles, so it is set around each call
            import torch._inductor.config as inductor

            compiled = self.unet._compiled_call_impl

            def frozen(*args, **kwargs):
                with inductor.patch(freezing=True):
                    return compiled(*args, **kwargs)
            self.unet._compiled_call_impl = frozen
        return self

    def weights_changed(self) -> None:
        """Called after the weights or LoRA hooks change (LoRAs, `to()`): a compiled UNet compiles again on its
        next run. Frozen weights need it, and so do LoRA hooks added after compiling, which the compiled code
        does not see (without this, a LoRA loaded after `compile(freeze=False)` left the image unchanged)."""
        compiled = self.__dict__.get("_compiled_with")
        if compiled is not None:
            torch._dynamo.reset()
            self.compile(compiled[0], **compiled[1])

    def use_vae(self, vae: AutoencoderKL) -> "StableDiffusion":
        """Swap in another autoencoder ("bake in a VAE"), e.g. one whose decoder was fine-tuned with
        `sdtorch train-vae --decoder-only`. Its latent channels must be the UNet's; its scaling factor
        replaces the model's."""
        if vae.config.latent_channels != self.config.unet.out_channels:
            raise SDTorchError(f"the VAE has {vae.config.latent_channels} latent channels and the UNet "
                               f"{self.config.unet.out_channels}: they do not fit together")
        p = next(self.vae.parameters())
        self.vae = vae.to(p.device, p.dtype).eval()
        self.config = dataclasses.replace(self.config, vae=vae.config)
        return self

    def load_lora(self, path_or_name, scale: float = 1.0, name: str | None = None, partial: bool = False, *,
                  folder=None):
        """Attach a LoRA file or named LoRA (see `lora.adapters.load_lora`); returns its match report."""
        return adapters.load_lora(self, path_or_name, scale, name, partial, folder=folder)

    def set_lora_scale(self, name: str, scale: float) -> None:
        adapters.set_lora_scale(self, name, scale)

    def unload_lora(self, name: str) -> None:
        adapters.unload_lora(self, name)

    @property
    def loras(self) -> dict:
        """The attached LoRA networks by name, in load order."""
        return adapters.loras(self)

    def merge_lora(self) -> None:
        """Fold the LoRAs into the base weights (`unmerge_lora` restores them bit for bit)."""
        adapters.merge_lora(self)

    def unmerge_lora(self) -> None:
        adapters.unmerge_lora(self)

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.modules.items()}

    def save_diffusers(self, folder, dtype=None) -> Path:
        """Write a diffusers folder with the model's generation defaults and vocabulary, whole or not at all.
        An existing `folder` is replaced only if it is empty or a model folder (see `checkpoints.save_diffusers`)."""
        extra = {DEFAULTS_FILE: json.dumps(self.defaults, indent=2) + "\n"} if self.defaults else {}
        if self.vocabulary is not None:
            extra[VOCABULARY_FILE] = json.dumps(self.vocabulary) + "\n"
        if self.class_names is not None:
            extra[CLASS_NAMES_FILE] = json.dumps(self.class_names) + "\n"
        return checkpoints.save_diffusers(self.modules, self.config, self.tokenizer, folder, _dtype(dtype), extra)

    def save_single_file(self, path, dtype=None) -> Path:
        """Write one original-layout `.safetensors` (a file there is replaced atomically); a class model's names
        go in its metadata (CLASS_NAMES_KEY)."""
        extra = {CLASS_NAMES_KEY: json.dumps(self.class_names)} if self.class_names is not None else None
        return checkpoints.save_single_file(self.modules, self.config, path, _dtype(dtype), self.tokenizer, extra)

    def _run(self, prompt, source, mask, output_type, progress, limits=None, **kw):
        from . import generation, images

        if output_type not in ("pil", "tensor"):
            raise SDTorchError(f"output_type must be 'pil' or 'tensor', got {output_type!r}")
        limits = generation.Limits.of(limits)
        size = None if source is None else (source.shape[-1], source.shape[-2])
        req = generation.resolve(prompt, self, size, limits=limits, stacklevel=4, **kw)
        with generation.ProgressBar() if progress else contextlib.nullcontext() as bar:
            result = generation.generate(self, req, source, mask, callback=bar, limits=limits)
        return result.images if output_type == "tensor" else images.to_pil(result.images)

    def known_words(self) -> list[str] | None:
        """The model's prompt vocabulary and the caption words of its loaded LoRAs (their sdtorch_vocabulary
        metadata, as `sdtorch train-lora` writes it); None where the model does not say what it knows."""
        if self.vocabulary is None:
            return None
        words = list(self.vocabulary)
        for net in self.loras.values():
            try:
                extra = json.loads((net.metadata or {}).get("sdtorch_vocabulary", "[]"))
            except ValueError:
                extra = []
            words += [w for w in extra if isinstance(w, str) and w not in words]
        return words

    def txt2img(self, prompt: str = "", *, negative_prompt: str = "", width: int | None = None,
                height: int | None = None, steps: int | None = None, guidance: float | None = None,
                sampler: str | None = None, seed: int | None = None, batch_size: int = 1, output_type: str = "pil",
                progress: bool = False, **opts):
        """Images for a prompt. `opts`: karras, clip_skip, guidance_rescale, batch_mode, vae_tiling, class_label
        (a class-conditional model's class, by name or index; its prompt stays ""), and `limits` (a
        generation.Limits; bad values raise SDTorchError). Seeds: seed, seed + 1, ...
        steps, guidance and sampler left as None take the model's defaults (`self.default`)."""
        return self._run(prompt, None, None, output_type, progress, negative_prompt=negative_prompt, width=width,
                         height=height, steps=steps, guidance=guidance, sampler=sampler, seed=seed,
                         batch_size=batch_size, **opts)

    def img2img(self, image, prompt: str, *, strength: float = 0.75, output_type: str = "pil",
                progress: bool = False, **kw):
        """Start from `image` (PIL or path) noised to the level `strength` selects, then denoise. Without
        width and height the image's own size is used, rounded down to a multiple of 8."""
        from . import generation, images

        limits = generation.Limits.of(kw.get("limits"))
        source = images.to_tensor(images.open_image(image, max_pixels=limits.max_image_pixels))
        return self._run(prompt, source, None, output_type, progress, strength=strength, **kw)

    def inpaint(self, image, mask, prompt: str, *, output_type: str = "pil", progress: bool = False, **kw):
        """Repaint where `mask` is white; a 9-channel model gets the mask as input, others blend."""
        from . import generation, images

        limits = generation.Limits.of(kw.get("limits"))
        source_img, mask_img = images.open_pair(image, mask, limits.max_image_pixels)
        return self._run(prompt, images.to_tensor(source_img), images.mask_to_tensor(mask_img), output_type,
                         progress, **kw)

    def outpaint(self, image, prompt: str, *, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
                 **kw):
        """Extend the image by the given pixels on each side: pad it, then inpaint the new area."""
        from . import generation, images

        limits = generation.Limits.of(kw.get("limits"))
        padded, mask = images.pad_for_outpaint(images.open_image(image, max_pixels=limits.max_image_pixels),
                                               left, top, right, bottom, max_side=limits.max_side)
        return self.inpaint(padded, mask, prompt, **kw)

    def summary(self) -> str:
        c = self.config
        counts = self.parameter_counts()
        lines = [f"model: {self.name}", f"family: {c.family}", f"prediction type: {c.prediction_type}",
                 f"UNet input channels: {c.unet.in_channels}" + (" (inpainting)" if c.inpainting else ""),
                 f"default size: {c.sample_size}x{c.sample_size}"]
        if self.defaults:
            lines.append("generation defaults: " + ", ".join(f"{k} {v}" for k, v in self.defaults.items()))
        lines += [f"{name} parameters: {n / 1e6:.1f} M" for name, n in counts.items()]
        lines.append(f"total parameters: {sum(counts.values()) / 1e6:.1f} M")
        return "\n".join(lines)


def check_defaults(defaults: dict, where: str) -> dict:
    """Validate generation defaults (from a file or a caller): known keys, and values a Request accepts."""
    from .sampling import SAMPLERS

    if not isinstance(defaults, dict):
        raise SDTorchError(f"{where}: expected a JSON object of generation defaults")
    unknown = sorted(set(defaults) - set(GENERATION_DEFAULTS))
    if unknown:
        raise SDTorchError(f"{where}: unknown generation defaults {unknown}; known: {', '.join(GENERATION_DEFAULTS)}")
    steps, guidance, sampler = (defaults.get(k) for k in GENERATION_DEFAULTS)
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise SDTorchError(f"{where}: steps must be a positive integer, got {steps!r}")
    if guidance is not None and (not isinstance(guidance, (int, float)) or isinstance(guidance, bool)
                                 or not math.isfinite(guidance)):
        raise SDTorchError(f"{where}: guidance must be a number (finite), got {guidance!r}")
    if sampler is not None and (not isinstance(sampler, str) or sampler not in SAMPLERS):
        raise SDTorchError(f"{where}: unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    return dict(defaults)


def read_defaults(folder: Path) -> dict:
    """A diffusers folder's generation_defaults.json, or {} where there is none."""
    path = Path(folder) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not UTF-8 or not JSON
        raise SDTorchError(f"{path}: not readable JSON ({e})") from None
    return check_defaults(data, str(path))


def read_vocabulary(folder: Path) -> list[str] | None:
    """A diffusers folder's prompt_vocabulary.json (a JSON list of words), or None where there is none."""
    return _read_words(Path(folder) / VOCABULARY_FILE)


def check_class_names(names, config: ModelConfig, where: str) -> list[str] | None:
    """`names` (None, or one distinct non-empty string per class of a class-conditional model) checked."""
    if names is None:
        return None
    n = config.unet.num_classes
    if n is None:
        raise SDTorchError(f"{where}: the model is not class-conditional, so it has no class names")
    if (not isinstance(names, list) or len(names) != n or len(set(names)) != n
            or not all(isinstance(w, str) and w.strip() and not w.strip().isdigit() for w in names)):
        raise SDTorchError(f"{where}: expected {n} distinct class names (non-empty, not numbers), one per class")
    return list(names)


def _class_names(path: Path, config: ModelConfig, folder: bool) -> list[str] | None:
    """A model's class names: a folder's class_names.json, or a single file's CLASS_NAMES_KEY metadata."""
    if folder:
        return check_class_names(_read_words(path / CLASS_NAMES_FILE), config, str(path / CLASS_NAMES_FILE))
    names = checkpoints.detect.metadata_json(checkpoints.io.file_metadata(path), CLASS_NAMES_KEY, str(path))
    return None if names is None else check_class_names(names, config, f"{path}: {CLASS_NAMES_KEY} metadata")


def _read_words(path: Path) -> list[str] | None:
    """A JSON list of strings from `path`, or None where there is no such file."""
    if not path.is_file():
        return None
    try:
        words = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not UTF-8 or not JSON
        raise SDTorchError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise SDTorchError(f"{path}: expected a JSON list of words")
    return words


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise SDTorchError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16")
    return DTYPES[str(dtype).lower()]


def _unet_parameters(config: ModelConfig) -> int:
    """The UNet's parameter count from its config alone (built on the meta device: nothing is allocated)."""
    with checkpoints.on_meta():
        return sum(p.numel() for p in UNet(config.unet).parameters())


def _device(device) -> torch.device:
    """A torch device from a name ("cpu", "cuda", "cuda:1") or device; None is the CPU. One that does not exist
    here is an SDTorchError, not a failure halfway through a load."""
    try:
        device = torch.device(device or "cpu")
    except (RuntimeError, TypeError):
        raise SDTorchError(f"unknown device {device!r}; use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SDTorchError(f"device {str(device)!r}: no CUDA GPU is visible to PyTorch here (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SDTorchError(f"device {str(device)!r}: there are only {torch.cuda.device_count()} CUDA GPUs")
    if device.type not in ("cpu", "cuda"):
        raise SDTorchError(f"device {str(device)!r}: sdtorch runs on cpu or cuda")
    return device


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def build(config: ModelConfig | str, seed: int = 0, device: str | None = None) -> StableDiffusion:
    """A randomly initialised model from a config or preset name (`device="meta"` allocates nothing)."""
    name = config if isinstance(config, str) else config.family
    if isinstance(config, str):
        if config.lower() not in PRESETS:
            raise SDTorchError(f"unknown preset {config!r}; presets are {', '.join(PRESETS)}")
        config = PRESETS[config.lower()]
    config.check_parts()
    torch.manual_seed(seed)
    with checkpoints.on_meta() if device == "meta" else torch.device(device or "cpu"):
        unet, vae = UNet(config.unet), AutoencoderKL(config.vae)
    text = CLIPTextModel(config.text).eval() if config.text is not None else None
    tokenizer = CLIPTokenizer.bundled(config.pad_token) if config.text is not None else None
    return StableDiffusion(unet.eval(), vae.eval(), text, tokenizer, config, name=f"{name} (random init)")


BUILTIN = {"shapes": "shapes-model"}  # name -> folder in sdtorch/data (trained by scripts/train_shapes.sh)
BUILTIN_DOCS = {"shapes-model": "docs/shapes-model.md"}  # folder -> its model card, named in warnings


def builtin_path(name: str) -> Path | None:
    """The folder of a model shipped inside the package, if `name` names one and it is installed."""
    from importlib import resources

    if name not in BUILTIN:
        return None
    path = Path(str(resources.files("sdtorch") / "data" / BUILTIN[name]))
    return path if (path / "model_index.json").is_file() else None


def load(path_or_name, dtype=None, prediction_type=None, *, config=None, use_ema=False,
         strict=True, device=None) -> StableDiffusion:
    """Load a single-file checkpoint (`.safetensors`/`.ckpt`) or a diffusers folder.

    dtype: None keeps the checkpoint's dtype; or fp32/bf16/fp16 (a string or torch dtype); or "auto", the fastest
    dtype that keeps the pictures for the device and the model (`precision.auto_dtype`: fp16 on CUDA; bf16 on a CPU
    with native bf16 for an SD-sized UNet; else fp32, as for the built-in model on a CPU).
    device: where the networks go ("cpu", "cuda", "cuda:1"; None: the CPU).
    prediction_type: override "epsilon"/"v_prediction" when the file does not say (see `checkpoints.detect`).
    config: a ModelConfig, preset name or diffusers folder describing the architecture of a single file.
    use_ema: take the UNet's EMA weights from an original checkpoint that has them.
    strict: False loads what matches and keeps fresh weights for the rest (the report says what).
    """
    device = _device(device)
    auto = isinstance(dtype, str) and dtype.lower() == "auto"
    if dtype is not None and not auto:
        precision.check_dtype(_dtype(dtype), device, f"{_name(_dtype(dtype))} weights")
    if str(path_or_name) in BUILTIN and not Path(path_or_name).exists():
        found = builtin_path(str(path_or_name))
        if found is None:
            raise SDTorchError(f"the built-in model {path_or_name!r} is not installed in this copy of sdtorch "
                               "(train it with scripts/train_shapes.sh); pass a model path")
        path_or_name = found
        dtype = dtype or torch.float32  # shipped in fp16 to stay small; fp16 is slow on CPUs
    if auto:
        dtype = lambda cfg: precision.auto_dtype(device, _unet_parameters(cfg))  # noqa: E731
    config_, modules, tokenizer, report = checkpoints.read_checkpoint(
        path_or_name, dtype if auto else _dtype(dtype), prediction_type, config, use_ema, strict)
    folder = Path(path_or_name).is_dir()
    defaults = read_defaults(path_or_name) if folder else {}
    vocabulary = read_vocabulary(path_or_name) if folder else None
    names = _class_names(Path(path_or_name), config_, folder)
    model = StableDiffusion(modules["unet"], modules["vae"], modules.get("text_encoder"), tokenizer, config_, report,
                            name=Path(path_or_name).name, defaults=defaults, vocabulary=vocabulary,
                            class_names=names)
    return model if device.type == "cpu" else model.to(device)

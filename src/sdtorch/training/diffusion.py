"""`sdtorch train`: the UNet on latents of a frozen autoencoder (LDM sec. 3.3, eq. 2), conditioned on text
(captions through a text encoder), on a class label (a learned embedding, as LDM's class-conditional
ImageNet models, sec. 4.3) or on nothing, with captions (labels) dropped at random, to the empty prompt
(the null class), for classifier-free guidance (Ho & Salimans 2022, sec. 3.2).

One loop, read top to bottom. Every sample's randomness (timestep, noise, posterior draw, caption
dropout) comes from a generator seeded by (seed, epoch, dataset index), so a run gives the same
result on 1 process with batch 2B as on 2 processes with batch B, and a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checkpoints
from ..config import ModelConfig
from ..errors import SDTorchError
from ..models import CLIPTextModel, UNet
from ..sampling import denoiser_for
from ..tokenizer import CLIPTokenizer
from . import checks, common
from .common import REQUIRED, option
from .data import CONDITIONING, collate, warn_missing_captions


DEFAULT_SAMPLE_PROMPTS = ["", "a photo"]  # --sample-prompts' default (a class model's default grid when left so)


@dataclass(kw_only=True)
class DiffusionArgs(common.RunArgs):
    """The fields of every trainer of a denoising UNet on latents: `sdtorch train` and `train-lora`."""

    output: str = option(REQUIRED, "output", "the run folder, made once every input is good: checkpoints/, model/ "
                         "(the EMA weights as a diffusers folder), samples/, log.jsonl, loss.png")
    batch_size: int = option(8, "optimisation", "images per step and process; a step sees this times "
                             "--grad-accum times the number of processes")
    grad_accum: int = option(1, "optimisation", "batches whose gradients are summed per optimizer step")
    lr: float = option(1e-4, "optimisation", "AdamW's peak learning rate, reached after --warmup, then a cosine "
                       "decay to 0 at --max-steps")
    weight_decay: float = option(0.01, "optimisation", "AdamW's decoupled weight decay")
    clip_grad: float = option(1.0, "optimisation", "the largest gradient norm, of all parameters together; "
                              "a larger gradient is scaled down to it")
    ema_decay: float = option(0.999, "optimisation", "decay of the moving average of the weights that the samples "
                              "and the exported model use, in [0, 1)")
    caption_dropout: float = option(0.1, "loss", "the share of captions replaced by the empty prompt (of class "
                                    "labels by the null class), which classifier-free guidance needs, 0 to 1")
    min_snr_gamma: float | None = option(None, "loss", "Min-SNR-gamma loss weighting of Hang et al. 2023, 5 is "
                                         "usual (default: off, every timestep weighs the same)")
    bf16: bool = option(False, "performance", "bfloat16 autocast in the forward pass")
    gradient_checkpointing: bool = option(False, "performance", "recompute the UNet's activations in the backward "
                                          "pass: less memory, slower steps")
    cache_latents: bool = option(False, "performance", "encode every image once, to latent-cache/ in the run "
                                 "folder; needs --center-crop and --no-random-flip")
    val_size: int = option(16, "data", "images held out for the validation loss, at most a tenth of them")
    seed: int = option(0, "optimisation", "seeds the weights, the validation split, the data order and every "
                       "sample's noise, so a run repeats exactly")
    val_every: int = option(100, "output", "steps between validation losses and redraws of loss.png")
    sample_every: int = option(0, "output", "steps between sample grids in samples/; 0: only the final one")
    sample_prompts: list[str] = option(DEFAULT_SAMPLE_PROMPTS, "output", "the sample grid's prompts, one image each; "
                                       "for a class model its class names or indices (left at the default: up to 8 "
                                       "of its classes), for an unconditional one 4 seeds whatever is given")
    sample_steps: int = option(20, "output", "sampler steps for each sample image")

    def check(self) -> None:
        """Every shared field's type and range; the trainer's own fields are checked by its subclass."""
        super().check()
        checks.at_least(self, 1, "grad_accum", "val_every", "sample_steps")
        checks.at_least(self, 0, "val_size", "sample_every")
        checks.positive(self, "lr", "clip_grad", "min_snr_gamma")
        checks.non_negative(self, "weight_decay")
        checks.fraction(self, "ema_decay", one=False)
        checks.fraction(self, "caption_dropout")
        checks.resolution(self, "resolution")
        checks.seed(self, "seed")
        if not self.sample_prompts:
            checks.fail("sample_prompts", "at least one prompt", self.sample_prompts)
        if self.cache_latents and not (self.center_crop and not self.random_flip):
            raise SDTorchError("--cache-latents stores one fixed crop of each image: it needs --center-crop and "
                               "--no-random-flip")


CLASS_EMBEDDINGS = ("context", "time")
UNTEXTED_GRID = 4  # images in an unconditional model's sample grid (seeds 0..3)
CLASS_GRID = 8  # classes in a class model's default sample grid, evenly spread over its labels


@dataclass(kw_only=True)
class TrainArgs(DiffusionArgs):
    data: str = option(REQUIRED, "data", "training images: a folder of images with same-name .txt captions, or one "
                       "with a metadata.jsonl; for --conditioning class, a folder of class subfolders "
                       "(DATA/CLASS/image.png) or a metadata.jsonl with a \"label\" field")
    conditioning: str = option("text", "model", "what the UNet is conditioned on: 'text' (the captions, through a "
                               "text encoder), 'class' (a learned embedding of each image's class, with a null class "
                               "for guidance) or 'none' (unconditional: no text encoder, no cross-attention)")
    class_embedding: str = option("context", "model", "how a class model takes its class: 'context' (a one-token "
                                  "context for the cross-attention, as LDM) or 'time' (added to the time embedding, "
                                  "as diffusers' num_class_embeds)")
    vae: str = option(REQUIRED, "model", "the frozen autoencoder: a `sdtorch train-vae` output or any model "
                      "sdtorch.load opens")
    config: str = option("tiny", "model", "UNet and text-encoder architecture: a preset (sd15, sd21, sd21-base, "
                         "tiny, shapes) or a ModelConfig JSON file")
    text_encoder: str = option("scratch", "model", "'scratch' trains a text encoder jointly (as LDM); a model "
                               "path takes that model's text encoder and tokenizer, frozen")
    tokenizer: str = option("clip", "model", "'clip' (CLIP's bundled BPE), 'captions' (a BPE trained on the "
                            "captions) or a tokenizer folder (a run's or a model's folder is looked into)")
    tokenizer_vocab: int = option(1024, "model", "vocabulary size in tokens of the BPE that --tokenizer captions "
                                  "trains")
    # The text encoder and every cross-attention run over all positions, so fewer make each step cheaper;
    # the number is saved in the tokenizer and the text encoder's position table, so inference pads to it too
    max_length: int | None = option(None, "model", "token positions per caption, start and end included; every "
                                    "caption must fit (default: the tokenizer's, 77 for CLIP's)")
    prediction_type: str | None = option(None, "model", "what the UNet predicts, 'epsilon' or 'v_prediction' "
                                         "(default: the config's)")
    compile: bool = option(False, "performance", "torch.compile the training forward and backward; float32 "
                           "only, needs a C++ compiler")

    def check(self) -> None:
        """Every field's type and range, and that the named files exist: a bad value is one line naming its
        flag, before anything is loaded or written."""
        super().check()
        if self.text_encoder != "scratch":
            checks.existing_path(self, "text_encoder")
        checks.existing_path(self, "vae")
        checks.at_least(self, 2 * 256 + 2, "tokenizer_vocab")  # every byte, alone and ending a word, bos, eos
        if self.max_length is not None and not 3 <= self.max_length <= MAX_POSITIONS:
            checks.fail("max_length", f"from 3 (start, one token, end) to {MAX_POSITIONS}", self.max_length)
        checks.one_of(self, "prediction_type", (None, "epsilon", "v_prediction"))
        checks.one_of(self, "conditioning", CONDITIONING)
        checks.one_of(self, "class_embedding", CLASS_EMBEDDINGS)
        self._check_untexted()
        if self.max_length is not None and self.text_encoder != "scratch":
            raise SDTorchError("--max-length is for a text encoder trained from scratch; a pretrained one keeps "
                               "its own tokenizer and positions")
        if self.compile and self.bf16:
            raise SDTorchError("--compile with --bf16 is refused: with PyTorch's CPU compiler the bf16 autocast "
                               "backward came out wrong (the text encoder got no gradients); use one or the other")


    def _check_untexted(self) -> None:
        """A class or unconditional run has no text encoder, so no text flags; a class embedding is for a class
        model only."""
        if self.class_embedding != "context" and self.conditioning != "class":
            raise SDTorchError("--class-embedding is for --conditioning class")
        if self.conditioning == "text":
            return
        given = [flag for flag, on in (("--text-encoder", self.text_encoder != "scratch"),
                                       ("--tokenizer", self.tokenizer != "clip"),
                                       ("--max-length", self.max_length is not None)) if on]
        if given:
            raise SDTorchError(f"{given[0]} is for a text-conditioned model; --conditioning {self.conditioning} has "
                               f"no text encoder")


MAX_POSITIONS = 1024  # --max-length: token positions a caption may have (CLIP has 77)


class Trainable(nn.Module):
    """The trained networks; its forward returns per-sample losses so DistributedDataParallel wraps it."""

    def __init__(self, unet: UNet, text_encoder: CLIPTextModel | None, adapters: nn.Module | None = None):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        if adapters is not None:  # a LoRA network hooked onto unet/text_encoder: a submodule, so DDP syncs it
            self.adapters = adapters

    def forward(self, denoiser, latents, noise, t, text=None, min_snr_gamma=None, class_labels=None) -> torch.Tensor:
        """Per-sample losses; `text` is token ids (for the trained text encoder) or hidden states, `class_labels`
        a class model's labels ([B] long), and neither is given for an unconditional model."""
        if class_labels is not None:
            return denoiser.loss(latents, noise, t, min_snr_gamma, class_labels=class_labels)
        if text is None:
            return denoiser.loss(latents, noise, t, min_snr_gamma)
        context = self.text_encoder(text) if self.text_encoder is not None else text
        return denoiser.loss(latents, noise, t, min_snr_gamma, context=context)


def model_config(args: TrainArgs, vae_config, tokenizer: CLIPTokenizer | None,
                 num_classes: int | None = None) -> ModelConfig:
    """The --config preset with the tokenizer's vocabulary and length (the text encoder's position table); for
    a class or unconditional run, without a text encoder and with the UNet of `untexted_unet`."""
    cfg = common.load_config(args.config)
    common_fields = dict(vae=vae_config, prediction_type=args.prediction_type or cfg.prediction_type,
                         sample_size=args.resolution)
    if args.conditioning != "text":
        unet = untexted_unet(cfg.unet, args.conditioning, num_classes, args.class_embedding)
        return cfg.replace(text=None, unet=unet, **common_fields)
    text = dataclasses.replace(cfg.text, vocab_size=tokenizer.vocab_size, max_positions=tokenizer.max_length)
    return cfg.replace(text=text, family="sd2" if text.activation == "gelu" else "sd1", **common_fields)


def untexted_unet(unet, conditioning: str, num_classes: int | None, class_embedding: str = "context"):
    """A preset's UNet made class-conditional (`num_classes` rows plus the null one, taken as `class_embedding`
    says) or unconditional (no cross-attention: self-attention where the preset attends, with heads of the
    width the preset's first attending level has)."""
    if conditioning == "class":
        return dataclasses.replace(unet, num_classes=num_classes, class_conditioning=class_embedding)
    if unet.num_heads is not None:  # a UNet without cross-attention sets its heads by their width
        first = next((c for c, a in zip(unet.block_channels, unet.attention_levels) if a), unet.block_channels[-1])
        unet = dataclasses.replace(unet, num_heads=None, head_dim=first // unet.num_heads)
    return dataclasses.replace(unet, cross_attention=False)


def tokenizer_source(spec: str) -> str | Path:
    """--tokenizer: "clip", "captions", or the folder of a saved tokenizer (a run's or a model's folder is
    looked into for tokenizer/); checked when training starts, before any encoding."""
    if spec in ("clip", "captions"):
        return spec
    folder = Path(spec) / "tokenizer" if (Path(spec) / "tokenizer").is_dir() else Path(spec)
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        return folder
    raise SDTorchError(f"--tokenizer must be 'clip', 'captions' or a tokenizer folder (vocab.json and merges.txt, "
                       f"or tokenizer.json), got {spec!r}")


def make_tokenizer(source: str | Path, vocab_size: int, dataset, out: Path,
                   max_length: int | None = None) -> CLIPTokenizer:
    """CLIP's BPE, one trained on the captions, or a saved one (`source`, from `tokenizer_source`), or the
    run's own when `out / "tokenizer"` exists (a resume); the caller saves a new one there. `max_length`
    (positions per caption, start and end included) replaces the tokenizer's; every caption must then fit
    in it, since a cut caption would lose words."""
    folder = out / "tokenizer"
    if (folder / "vocab.json").is_file():
        tok = CLIPTokenizer.from_folder(folder)
        if max_length is not None and tok.max_length != max_length:
            raise SDTorchError(f"--max-length {max_length} differs from the run's tokenizer ({tok.max_length} "
                               f"positions, in {folder}); resume with the same value")
        return tok
    if source == "clip":
        tok = CLIPTokenizer.bundled()
    elif source == "captions":
        tok = CLIPTokenizer.train(dataset.captions, vocab_size)
    else:  # a saved tokenizer, its ids kept
        tok = CLIPTokenizer.from_folder(source)
    if max_length is not None:
        tok = CLIPTokenizer(tok.vocab, tok.merges, pad_token=tok.pad_token, max_length=max_length)
        longest = max((len(tok.encode(c)) + 2 for c in dataset.captions), default=0)
        if longest > max_length:
            raise SDTorchError(f"the longest caption is {longest} tokens with start and end, more than "
                               f"--max-length {max_length}: it would be cut")
    return tok


def prepare_batch(batch, epoch: int, args: TrainArgs, vae, scale: float, T: int, purpose: int = 0,
                  null_class: int | None = None):
    """Latents (posterior draws), noise, timesteps and the (possibly dropped) condition, each from the sample's
    own generator (purpose 0: training, 1: validation). The condition is the captions, or for a class model
    (`null_class` given) the labels, a dropped one being the null class; an unconditional model ignores it."""
    gens = [common.sample_generator(args.seed, epoch, int(i), purpose) for i in batch["index"]]
    if "mean" in batch:  # from the latent cache
        mean, std = batch["mean"], batch["std"]
    else:
        with torch.no_grad():
            post = vae.encode(batch["pixels"])
        mean, std = post.mean, post.std
    shape = mean.shape[1:]
    eps_post = torch.stack([torch.randn(shape, generator=g) for g in gens])
    latents = (mean + std * eps_post) * scale
    keep = [torch.rand(1, generator=g).item() >= args.caption_dropout for g in gens]
    if null_class is not None:
        cond = torch.tensor([int(label) if k else null_class for label, k in zip(batch["label"], keep)])
    else:
        cond = [c if k else "" for c, k in zip(batch["caption"], keep)]
    t = torch.cat([torch.randint(0, T, (1,), generator=g) for g in gens])
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return latents, noise, t, cond


def check_samples(args: TrainArgs, config: ModelConfig) -> None:
    """The sample grids' generations (each prompt at --sample-steps, --resolution) are ones the model's
    schedule and VAE support, so a run does not fail at its first sample. A class or unconditional run's
    grid (`sample_items`) is checked by `setup` once the classes are known."""
    from ..generation import Request

    if getattr(args, "conditioning", "text") != "text":
        config = config.replace(text=None, unet=untexted_unet(config.unet, args.conditioning, 2))
    kind = config.unet.conditioning
    extra = {"class": {"class_label": 0}, "none": {"guidance": 1.0}}.get(kind, {})
    for prompt in args.sample_prompts if kind == "text" else [""]:
        try:
            Request(prompt, steps=args.sample_steps, width=args.resolution, height=args.resolution,
                    **extra).validate(config=config)
        except SDTorchError as e:
            raise SDTorchError(f"--sample-prompts/--sample-steps/--resolution: {e}") from None


def sample_items(args: TrainArgs, config: ModelConfig, class_names: list[str] | None) -> list[tuple[str, dict]]:
    """The sample grid: (caption, txt2img keywords) per image. A text model draws each prompt; a class model
    the classes --sample-prompts names (by name or index), by default up to CLASS_GRID spread over its labels;
    an unconditional one UNTEXTED_GRID seeds. Guidance is the pipeline's default, 1 without a condition."""
    kind = config.unet.conditioning
    if kind == "text":
        return [(p, {"prompt": p}) for p in args.sample_prompts]
    if kind == "none":
        return [(f"seed {i}", {"prompt": "", "guidance": 1.0}) for i in range(UNTEXTED_GRID)]
    n = config.unet.num_classes
    names = class_names or [str(i) for i in range(n)]
    if args.sample_prompts == DEFAULT_SAMPLE_PROMPTS:
        labels = sorted({round(k * (n - 1) / max(1, min(n, CLASS_GRID) - 1)) for k in range(min(n, CLASS_GRID))})
    else:
        from ..pipeline import class_index

        labels = []
        for value in args.sample_prompts:
            try:
                labels.append(class_index(value, n, class_names))
            except SDTorchError as e:
                raise SDTorchError(f"--sample-prompts: {e}") from None
    return [(names[label], {"prompt": "", "class_label": label}) for label in labels]


class Run(common.RunData):
    """A diffusion training run, built once by `setup` (or `training.lora.setup`): the data, the frozen
    autoencoder, the tokenizer, the trained networks and their optimizer, and the resumable state.
    `model` computes the losses (wrapped as `ddp` for torchrun and --compile); `trained` is what learns,
    is averaged and is checkpointed: `model` itself here, a LoRA network in `train-lora`."""

    def __init__(self, args: DiffusionArgs):
        super().__init__(args)
        if self.dist.main and self.dataset.conditioning == "text":
            warn_missing_captions(self.dataset)
        self.source = self.dataset  # where samples come from: the dataset or its latent cache
        self.frozen_text = None  # a frozen text encoder run outside `model`, or None
        self.class_names = self.dataset.class_names  # a class run's names (None: integer labels, or no classes)

    def cache_latents(self, vae, vae_id: str) -> None:
        """With --cache-latents, samples come from latents encoded once (by rank 0; the others then read them)."""
        if not self.args.cache_latents:
            return
        from .data import LatentCache

        folder = self.out / "latent-cache"
        if self.dist.main:
            LatentCache(folder, self.dataset, vae.encode, vae_id=vae_id, progress=self.args.progress)
        if self.dist.world > 1:
            torch.distributed.barrier()
        self.source = LatentCache(folder, self.dataset, vae.encode, vae_id=vae_id, progress=False)

    def finish_setup(self, model: Trainable, trained: nn.Module, vae, tokenizer, config: ModelConfig,
                     compile: bool = False, extra: dict | None = None) -> None:
        """The DDP wrapper, denoiser, EMA, optimizer and schedule over `trained`; then the resume (of those and
        of the `extra` parts, objects with state_dict and load_state_dict)."""
        args = self.args
        self.model, self.trained, self.vae, self.tokenizer, self.config = model, trained, vae, tokenizer, config
        self.ddp = torch.nn.parallel.DistributedDataParallel(model) if self.dist.world > 1 else model
        if compile:
            self.ddp = common.compiled(self.ddp)
        self.denoiser = denoiser_for(model.unet, config)
        self.ema = common.EMA(trained, args.ema_decay)
        self.opt = common.adamw(trained.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, common.warmup_cosine(args.warmup, args.max_steps))
        self.state = common.TrainState({"model": trained, "ema": self.ema, "optimizer": self.opt,
                                        "scheduler": self.sched, **(extra or {})}, args)
        if self.checkpoint is not None:
            self.state.load(self.checkpoint)
        self.log = common.start_log(self.out / "log.jsonl", self.checkpoint, self.dist)

    def inputs(self, cond) -> dict:
        """`model`'s condition keywords for a batch's `cond` (`prepare_batch`): token ids for the trained text
        encoder inside it, or the frozen one's output; a class model's labels; nothing for an unconditional one."""
        kind = self.config.unet.conditioning
        if kind == "class":
            return {"class_labels": cond}
        if kind == "none":
            return {}
        ids = self.tokenizer(cond)
        if self.frozen_text is None:
            return {"text": ids}
        with torch.no_grad():
            return {"text": self.frozen_text(ids)}

    @contextlib.contextmanager
    def ema_pipeline(self):
        """A StableDiffusion with the EMA weights, for the sample grids and the export."""
        from ..pipeline import StableDiffusion

        config = self.config
        shadow = Trainable(UNet(config.unet),
                           CLIPTextModel(config.text) if self.model.text_encoder is not None else None)
        self.ema.copy_to(shadow)
        text = shadow.text_encoder if shadow.text_encoder is not None else self.frozen_text
        yield StableDiffusion(shadow.unet.eval(), self.vae, text.eval() if text is not None else None, self.tokenizer,
                              config, name="ema", class_names=self.class_names)


def setup(args: TrainArgs) -> Run:
    """Every input (arguments, data, VAE, text encoder, tokenizer, checkpoint to resume) checked and read,
    then the run folder made and the networks built."""
    args.check()
    texted = args.conditioning == "text"
    tok_source = tokenizer_source(args.tokenizer) if texted else None
    if args.compile:
        common.require_compiler()
    check_samples(args, common.load_config(args.config))  # a bad --config fails here, before any image is read
    run = Run(args)
    dist, out = run.dist, run.out
    vae = checkpoints.load_vae(args.vae, dtype=torch.float32).eval().requires_grad_(False)
    pre = checkpoints.read_checkpoint(args.text_encoder, torch.float32) if args.text_encoder != "scratch" else None
    tokenizer = None
    if dist.main and texted:
        tokenizer = make_tokenizer(tok_source, args.tokenizer_vocab, run.dataset, out, args.max_length)
    if not texted:
        config = model_config(args, vae.config, None, run.dataset.num_classes)
        sample_items(args, config, run.class_names)  # --sample-prompts names classes the data has
        check_classes(out, run.class_names, run.dataset.num_classes, run.checkpoint is not None)

    out.mkdir(parents=True, exist_ok=True)  # every input is good: the run folder may be made
    if not texted and dist.main:
        save_classes(out, run.class_names, run.dataset.num_classes)
    if texted and dist.main and not (out / "tokenizer" / "vocab.json").is_file():
        tokenizer.save(out / "tokenizer")
    if texted and dist.world > 1:
        torch.distributed.barrier()  # rank 0 has written the tokenizer
        tokenizer = CLIPTokenizer.from_folder(out / "tokenizer")
    if texted:
        config = model_config(args, vae.config, tokenizer)
    run.cache_latents(vae, str(Path(args.vae).resolve()))
    text_encoder = None
    if pre is not None:  # a frozen pretrained text encoder, with its own tokenizer and width
        config = config.replace(text=pre[0].text, unet={"context_dim": pre[0].text.width})
        run.frozen_text, tokenizer = pre[1]["text_encoder"].eval(), pre[2]
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    unet = UNet(config.unet)
    unet.gradient_checkpointing = args.gradient_checkpointing
    if pre is None and texted:
        text_encoder = CLIPTextModel(config.text)
    model = Trainable(unet, text_encoder).train()
    run.finish_setup(model, model, vae, tokenizer, config, compile=args.compile)
    return run


CLASSES_FILE = "classes.json"  # a class or unconditional run's classes, checked when it resumes


def _classes_record(names: list[str] | None, num_classes: int | None) -> dict:
    return {"num_classes": num_classes, "class_names": names}


def check_classes(out: Path, names: list[str] | None, num_classes: int | None, resuming: bool) -> None:
    """A resumed class run's data has the classes it started with (a class added or renamed would shift the
    labels the checkpoint learnt)."""
    path = out / CLASSES_FILE
    if not resuming or not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SDTorchError(f"{path}: not readable JSON ({e})") from None
    if saved != _classes_record(names, num_classes):
        raise SDTorchError(f"{path}: the run started with {saved.get('num_classes')} classes "
                           f"({', '.join(saved.get('class_names') or []) or 'unnamed'}), and the data now has "
                           f"{num_classes} ({', '.join(names or []) or 'unnamed'}); resume with the same classes")


def save_classes(out: Path, names: list[str] | None, num_classes: int | None) -> None:
    from ..fileio import atomic_file

    with atomic_file(out / CLASSES_FILE) as tmp:
        tmp.write_text(json.dumps(_classes_record(names, num_classes)) + "\n", encoding="utf-8")


def train_step(run: Run, stream, meter: dict) -> dict:
    """One optimizer step: --grad-accum batches from `stream`, their gradients summed (synchronised across
    processes at the last), clipped, AdamW and the schedule stepped, the EMA updated. Returns the step's
    loss (over all processes) and gradient norm; `meter["seen"]` counts the samples of all processes."""
    args, dist, state = run.args, run.dist, run.state
    scale, T = run.config.vae.scaling_factor, run.config.num_train_timesteps
    total = 0.0
    for micro in range(args.grad_accum):
        state.epoch, state.batch_pos, batch = next(stream)
        latents, noise, t, cond = prepare_batch(batch, state.epoch, args, run.vae, scale, T,
                                                null_class=run.config.unet.null_class)
        sync = run.ddp.no_sync if dist.world > 1 and micro < args.grad_accum - 1 else contextlib.nullcontext
        with sync(), common.attention_kernel(args.bf16):  # no_sync must cover the backward too
            with common.autocast(args.bf16):
                loss = run.ddp(run.denoiser, latents, noise, t, min_snr_gamma=args.min_snr_gamma,
                               **run.inputs(cond)).mean()
            (loss / args.grad_accum).backward()
        total += loss.item() / args.grad_accum
        meter["seen"] += len(latents) * dist.world
    total = common.mean_over_ranks(total, dist)  # the loss over all processes' samples
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trained.parameters(), args.clip_grad)
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    state.step += 1
    run.ema.update(run.trained, state.step)
    return {"loss": total, "grad_norm": float(grad_norm)}


def loop(run: Run, desc: str = "train") -> None:
    """Train to --max-steps, logging, validating, drawing samples and checkpointing as the arguments say."""
    args, dist, state, out = run.args, run.dist, run.state, run.out
    stream = common.batch_stream(run.source, run.dataset, run.train_idx, args.batch_size, args.seed, dist,
                                 state.epoch, state.batch_pos)
    bar = tqdm(total=args.max_steps, initial=state.step, desc=desc, disable=not (args.progress and dist.main))
    started, meter = time.perf_counter(), {"seen": 0}
    while state.step < args.max_steps:
        stats = train_step(run, stream, meter)
        step, last = state.step, state.step == args.max_steps
        bar.update(1)
        rate = meter["seen"] / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", samples_per_s=f"{rate:.1f}")
        if not dist.main:
            continue
        if step % args.log_every == 0 or last:
            run.log.write(step=step, epoch=state.epoch, loss=stats["loss"], lr=run.sched.get_last_lr()[0],
                          grad_norm=stats["grad_norm"], samples_per_s=rate)
        if run.val_idx and (step % args.val_every == 0 or last):
            run.log.write(step=step, val_loss=validate(run))
            common.plot_curves(out / "log.jsonl", out / "loss.png")
        if args.sample_every and step % args.sample_every == 0:
            sample_grid(run, out / "samples" / f"step-{step:08d}.png")
        if step % args.checkpoint_every == 0 or last:
            state.save(out / "checkpoints", args.keep_checkpoints)
    bar.close()


def train(args: TrainArgs) -> Path:
    """Train as `args` says; returns the exported model folder. Every input (arguments, data, VAE, text
    encoder, tokenizer, checkpoint to resume) is checked and read before the run folder is created."""
    run = setup(args)
    loop(run)
    if run.dist.main:
        export(run, run.out / "model")
        sample_grid(run, run.out / "samples" / "final.png")
    if run.dist.world > 1:
        torch.distributed.barrier()
    return run.out / "model"


@torch.no_grad()
def validate(run: Run) -> float:
    """Mean loss on the held-out images, with fixed per-image timesteps and noise."""
    args, config, model = run.args, run.config, run.model
    model.eval()
    total = 0.0
    keep = dataclasses.replace(args, caption_dropout=0.0)
    for k in range(0, len(run.val_idx), args.batch_size):
        batch = collate([run.source[i] for i in run.val_idx[k:k + args.batch_size]])
        latents, noise, t, cond = prepare_batch(batch, 0, keep, run.vae, config.vae.scaling_factor,
                                                config.num_train_timesteps, purpose=1,
                                                null_class=config.unet.null_class)
        total += model(run.denoiser, latents, noise, t, **run.inputs(cond)).sum().item()
    model.train()
    return total / len(run.val_idx)


def export(run: Run, folder: Path) -> None:
    """The EMA weights as a diffusers folder that `sdtorch.load` and diffusers open, written whole under a
    temporary name and renamed into place (a model folder there from an earlier run is replaced)."""
    with run.ema_pipeline() as pipe:
        pipe.save_diffusers(folder)


def sample_grid(run: Run, path: Path) -> None:
    """Images for the fixed prompts (seeds 0..) from the EMA weights, in a row, captioned; written atomically."""
    from PIL import Image, ImageDraw

    from ..fileio import atomic_file

    args = run.args
    items = sample_items(args, run.config, run.class_names)
    with run.ema_pipeline() as pipe:
        images = [pipe.txt2img(steps=args.sample_steps, seed=i, width=args.resolution, height=args.resolution,
                               **kw)[0] for i, (_, kw) in enumerate(items)]
    R = args.resolution
    grid = Image.new("RGB", (R * len(images), R + 14), "white")
    for i, (im, (prompt, _)) in enumerate(zip(images, items)):
        grid.paste(im, (i * R, 14))
        ImageDraw.Draw(grid).text((i * R + 2, 1), prompt[: R // 6], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        grid.save(tmp, format="PNG")

"""`sdtorch train`: the text-conditioned UNet on latents of a frozen autoencoder (LDM sec. 3.3, eq. 2),
with captions dropped at random for classifier-free guidance (Ho & Salimans 2022, sec. 3.2).

One loop, read top to bottom. Every sample's randomness (timestep, noise, posterior draw, caption
dropout) comes from a generator seeded by (seed, epoch, dataset index), so a run gives the same
result on 1 process with batch 2B as on 2 processes with batch B, and a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from .data import collate, warn_missing_captions


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
    caption_dropout: float = option(0.1, "loss", "the share of captions replaced by the empty prompt, which "
                                    "classifier-free guidance needs, 0 to 1")
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
    sample_prompts: list[str] = option(["", "a photo"], "output", "the sample grid's prompts, one image each")
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


@dataclass(kw_only=True)
class TrainArgs(DiffusionArgs):
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
        if self.max_length is not None and self.text_encoder != "scratch":
            raise SDTorchError("--max-length is for a text encoder trained from scratch; a pretrained one keeps "
                               "its own tokenizer and positions")
        if self.compile and self.bf16:
            raise SDTorchError("--compile with --bf16 is refused: with PyTorch's CPU compiler the bf16 autocast "
                               "backward came out wrong (the text encoder got no gradients); use one or the other")


MAX_POSITIONS = 1024  # --max-length: token positions a caption may have (CLIP has 77)


class Trainable(nn.Module):
    """The trained networks; its forward returns per-sample losses so DistributedDataParallel wraps it."""

    def __init__(self, unet: UNet, text_encoder: CLIPTextModel | None, adapters: nn.Module | None = None):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        if adapters is not None:  # a LoRA network hooked onto unet/text_encoder: a submodule, so DDP syncs it
            self.adapters = adapters

    def forward(self, denoiser, latents, noise, t, text, min_snr_gamma=None) -> torch.Tensor:
        context = self.text_encoder(text) if self.text_encoder is not None else text
        return denoiser.loss(latents, noise, t, min_snr_gamma, context=context)


def model_config(args: TrainArgs, vae_config, tokenizer: CLIPTokenizer) -> ModelConfig:
    """The --config preset with the tokenizer's vocabulary and length (the text encoder's position table)."""
    cfg = common.load_config(args.config)
    text = dataclasses.replace(cfg.text, vocab_size=tokenizer.vocab_size, max_positions=tokenizer.max_length)
    return cfg.replace(vae=vae_config, text=text, prediction_type=args.prediction_type or cfg.prediction_type,
                       sample_size=args.resolution, family="sd2" if text.activation == "gelu" else "sd1")


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


def prepare_batch(batch, epoch: int, args: TrainArgs, vae, scale: float, T: int, purpose: int = 0):
    """Latents (posterior draws), noise, timesteps and (possibly dropped) captions, each from the
    sample's own generator (purpose 0: training, 1: validation)."""
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
    captions = [c if torch.rand(1, generator=g).item() >= args.caption_dropout else ""
                for c, g in zip(batch["caption"], gens)]
    t = torch.cat([torch.randint(0, T, (1,), generator=g) for g in gens])
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return latents, noise, t, captions


def check_samples(args: TrainArgs, config: ModelConfig) -> None:
    """The sample grids' generations (each prompt at --sample-steps, --resolution) are ones the model's
    schedule and VAE support, so a run does not fail at its first sample."""
    from ..generation import Request

    for prompt in args.sample_prompts:
        try:
            Request(prompt, steps=args.sample_steps, width=args.resolution, height=args.resolution).validate(
                config=config)
        except SDTorchError as e:
            raise SDTorchError(f"--sample-prompts/--sample-steps/--resolution: {e}") from None


class Run(common.RunData):
    """A diffusion training run, built once by `setup` (or `training.lora.setup`): the data, the frozen
    autoencoder, the tokenizer, the trained networks and their optimizer, and the resumable state.
    `model` computes the losses (wrapped as `ddp` for torchrun and --compile); `trained` is what learns,
    is averaged and is checkpointed: `model` itself here, a LoRA network in `train-lora`."""

    def __init__(self, args: DiffusionArgs):
        super().__init__(args)
        if self.dist.main:
            warn_missing_captions(self.dataset)
        self.source = self.dataset  # where samples come from: the dataset or its latent cache
        self.frozen_text = None  # a frozen text encoder run outside `model`, or None

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

    def encode_text(self, captions):
        """Token ids for the trained text encoder inside `model`, or the frozen one's output."""
        ids = self.tokenizer(captions)
        if self.frozen_text is None:
            return ids
        with torch.no_grad():
            return self.frozen_text(ids)

    @contextlib.contextmanager
    def ema_pipeline(self):
        """A StableDiffusion with the EMA weights, for the sample grids and the export."""
        from ..pipeline import StableDiffusion

        config = self.config
        shadow = Trainable(UNet(config.unet),
                           CLIPTextModel(config.text) if self.model.text_encoder is not None else None)
        self.ema.copy_to(shadow)
        text = shadow.text_encoder if shadow.text_encoder is not None else self.frozen_text
        yield StableDiffusion(shadow.unet.eval(), self.vae, text.eval(), self.tokenizer, config, name="ema")


def setup(args: TrainArgs) -> Run:
    """Every input (arguments, data, VAE, text encoder, tokenizer, checkpoint to resume) checked and read,
    then the run folder made and the networks built."""
    args.check()
    tok_source = tokenizer_source(args.tokenizer)
    if args.compile:
        common.require_compiler()
    check_samples(args, common.load_config(args.config))  # a bad --config fails here, before any image is read
    run = Run(args)
    dist, out = run.dist, run.out
    vae = checkpoints.load_vae(args.vae, dtype=torch.float32).eval().requires_grad_(False)
    pre = checkpoints.read_checkpoint(args.text_encoder, torch.float32) if args.text_encoder != "scratch" else None
    if dist.main:
        tokenizer = make_tokenizer(tok_source, args.tokenizer_vocab, run.dataset, out, args.max_length)

    out.mkdir(parents=True, exist_ok=True)  # every input is good: the run folder may be made
    if dist.main and not (out / "tokenizer" / "vocab.json").is_file():
        tokenizer.save(out / "tokenizer")
    if dist.world > 1:
        torch.distributed.barrier()  # rank 0 has written the tokenizer
        tokenizer = CLIPTokenizer.from_folder(out / "tokenizer")
    run.cache_latents(vae, str(Path(args.vae).resolve()))
    config = model_config(args, vae.config, tokenizer)
    text_encoder = None
    if pre is not None:  # a frozen pretrained text encoder, with its own tokenizer and width
        config = config.replace(text=pre[0].text, unet={"context_dim": pre[0].text.width})
        run.frozen_text, tokenizer = pre[1]["text_encoder"].eval(), pre[2]
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    unet = UNet(config.unet)
    unet.gradient_checkpointing = args.gradient_checkpointing
    if pre is None:
        text_encoder = CLIPTextModel(config.text)
    model = Trainable(unet, text_encoder).train()
    run.finish_setup(model, model, vae, tokenizer, config, compile=args.compile)
    return run


def train_step(run: Run, stream, meter: dict) -> dict:
    """One optimizer step: --grad-accum batches from `stream`, their gradients summed (synchronised across
    processes at the last), clipped, AdamW and the schedule stepped, the EMA updated. Returns the step's
    loss (over all processes) and gradient norm; `meter["seen"]` counts the samples of all processes."""
    args, dist, state = run.args, run.dist, run.state
    scale, T = run.config.vae.scaling_factor, run.config.num_train_timesteps
    total = 0.0
    for micro in range(args.grad_accum):
        state.epoch, state.batch_pos, batch = next(stream)
        latents, noise, t, captions = prepare_batch(batch, state.epoch, args, run.vae, scale, T)
        sync = run.ddp.no_sync if dist.world > 1 and micro < args.grad_accum - 1 else contextlib.nullcontext
        with sync(), common.attention_kernel(args.bf16):  # no_sync must cover the backward too
            with common.autocast(args.bf16):
                loss = run.ddp(run.denoiser, latents, noise, t, run.encode_text(captions), args.min_snr_gamma).mean()
            (loss / args.grad_accum).backward()
        total += loss.item() / args.grad_accum
        meter["seen"] += len(captions) * dist.world
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
        latents, noise, t, captions = prepare_batch(batch, 0, keep, run.vae, config.vae.scaling_factor,
                                                    config.num_train_timesteps, purpose=1)
        total += model(run.denoiser, latents, noise, t, run.encode_text(captions)).sum().item()
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
    with run.ema_pipeline() as pipe:
        images = [pipe.txt2img(p, steps=args.sample_steps, seed=i, width=args.resolution,
                               height=args.resolution)[0] for i, p in enumerate(args.sample_prompts)]
    R = args.resolution
    grid = Image.new("RGB", (R * len(images), R + 14), "white")
    for i, (im, prompt) in enumerate(zip(images, args.sample_prompts)):
        grid.paste(im, (i * R, 14))
        ImageDraw.Draw(grid).text((i * R + 2, 1), prompt[: R // 6], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        grid.save(tmp, format="PNG")

"""`sdtorch train-vae`: the KL autoencoder of LDM (Rombach et al. 2022, sec. 3.1 and appendix G).

Loss = reconstruction (L1 or MSE, + optional LPIPS) + kl_weight * KL, and, from `disc_start` on, a
PatchGAN hinge loss weighted adaptively at the decoder's last layer (Esser et al. 2021, eq. 7).
With `decoder_only` the encoder of an `init` autoencoder is frozen and only the decoder learns, as for
Stable Diffusion's ft-EMA/ft-MSE VAEs: the latents and their scaling factor do not change, so a UNet
already trained on them keeps working and is only decoded better.
Held-out PSNR and SSIM are logged at every evaluation. Checkpoints, resume, logs and torchrun work as
in `sdtorch train` (see `diffusion.py`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import checkpoints
from ..errors import SDTorchError
from ..models import AutoencoderKL
from . import checks, common, losses
from .common import REQUIRED, option
from .data import collate


@dataclass(kw_only=True)
class VAETrainArgs(common.RunArgs):
    data: str = option(REQUIRED, "data", "training images: a folder of images, or one with a metadata.jsonl "
                       "(captions are not used)")
    output: str = option(REQUIRED, "output", "the run folder, made once every input is good: checkpoints/, vae/ "
                         "(the autoencoder), log.jsonl, loss.png")
    config: str = option("tiny", "model", "architecture: a preset (sd15, sd21, sd21-base, tiny, shapes) or a "
                         "ModelConfig JSON file; its autoencoder part is used")
    init: str | None = option(None, "model", "start from this autoencoder (default: random weights)")
    decoder_only: bool = option(False, "model", "with --init: train only the decoder, so the latent space (and a "
                                "UNet trained on it) stays as it is")
    resolution: int = option(64, "data", "training side in pixels, a multiple of 8 (24 or more once the "
                             "discriminator is on): the short side is resized to it, then a square is cropped")
    lr: float = option(1e-4, "optimisation", "the autoencoder's peak AdamW learning rate, reached after --warmup, "
                       "then a cosine decay to 0 at --max-steps")
    disc_lr: float = option(1e-4, "optimisation", "the discriminator's AdamW learning rate, constant")
    clip_grad: float = option(1.0, "optimisation", "the largest gradient norm, of the autoencoder's "
                              "parameters together; a larger gradient is scaled down to it")
    rec_loss: str = option("l1", "loss", "pixel reconstruction loss, 'l1' or 'mse'")
    edge_weight: float = option(0.0, "loss", "weight of the gradient difference loss (Mathieu et al. 2016), for "
                                "sharper outlines; 0 turns it off")
    kl_weight: float = option(1e-6, "loss", "weight of the KL divergence of the posterior from a standard normal")
    lpips: str | None = option(None, "loss", "a local LPIPS weights file for the perceptual loss (default: none, "
                               "the perceptual loss is off)")
    lpips_weight: float = option(1.0, "loss", "weight of the LPIPS loss, with --lpips")
    disc_start: int = option(500, "loss", "step at which the PatchGAN hinge loss switches on")
    disc_weight: float = option(0.5, "loss", "factor on the adversarial loss's adaptive weight (Esser et al. 2021, "
                                "eq. 7)")
    disc_norm: str = option("group", "loss", "the discriminator's normalisation: 'group' (per sample, the same "
                            "under any batch split) or 'batch' (as pix2pix)")
    logvar_init: float | None = option(None, "model", "a new autoencoder's posterior log-variance at the start, "
                                       "-30 to 20; -6 gives a std of 0.05 (default: about 0, a std of about 1)")
    scaling_factor: float | None = option(None, "model", "the latent scaling factor saved with the autoencoder "
                                          "(default: 1 / std of the training latents, measured at the end; with "
                                          "--decoder-only, the --init one)")
    bf16: bool = option(False, "performance", "bfloat16 autocast in the forward passes")
    val_size: int = option(16, "data", "images held out for the validation loss, PSNR and SSIM, at most a tenth of "
                           "them")
    seed: int = option(0, "optimisation", "seeds the weights, the validation split, the data order and every "
                       "sample's posterior draw, so a run repeats exactly")
    val_every: int = option(100, "output", "steps between validation figures and redraws of loss.png")

    def check(self) -> None:
        """Every field's type and range, and that the named files exist: a bad value is one line naming its
        flag, before anything is loaded or written."""
        super().check()
        checks.existing_path(self, "init", "lpips")
        checks.at_least(self, 1, "val_every")
        checks.at_least(self, 0, "disc_start", "val_size")
        checks.positive(self, "lr", "disc_lr", "clip_grad", "scaling_factor")
        checks.non_negative(self, "edge_weight", "kl_weight", "lpips_weight", "disc_weight")
        checks.one_of(self, "rec_loss", ("l1", "mse"))
        checks.one_of(self, "disc_norm", ("group", "batch"))
        # the PatchGAN's three stride-2 convolutions and two 4x4 ones need 24 px once it switches on
        checks.resolution(self, "resolution", low=24 if self.disc_start < self.max_steps else 8)
        checks.seed(self, "seed")
        if self.logvar_init is not None and not -30 <= self.logvar_init <= 20:
            checks.fail("logvar_init", "in [-30, 20] (the posterior's log-variance is clamped there)",
                        self.logvar_init)
        if self.decoder_only and not self.init:
            raise SDTorchError("--decoder-only fine-tunes an existing autoencoder: give it with --init")
        if self.init and self.logvar_init is not None:
            raise SDTorchError("--logvar-init sets a new autoencoder's starting posterior; with --init the trained "
                               "one is kept, so leave out one of them")


class Reconstruct(torch.nn.Module):
    """Encode, draw from the posterior with the given standard-normal `eps`, decode: the forward pass
    that DistributedDataParallel wraps."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps_fn):
        post = self.vae.encode(x)
        return self.vae.decode(post.mean + post.std * eps_fn(post.mean.shape[1:])), post


@torch.no_grad()
def _start_logvar_at(vae: AutoencoderKL, value: float) -> None:
    """Make the encoder's posterior log-variance start at `value` for every input: the log-variance half of
    the moments convolution gets zero weights and bias `value`. With the default initialisation it starts
    near 0 (std 1, as large as the latents themselves), and with a small KL weight only the reconstruction
    loss pulls it down, slowly: after the shapes recipe's 2,000 steps the std was still 0.2 to 0.4."""
    L = vae.config.latent_channels
    vae.quant_conv.weight[L:].zero_()
    vae.quant_conv.bias[L:].fill_(value)


class VAERun(common.RunData):
    """An autoencoder training run, built once by `setup`: the data, the autoencoder and discriminator, their
    optimizers and the resumable state."""


def setup(args: VAETrainArgs) -> VAERun:
    """Every input (arguments, data, --init, the checkpoint to resume) checked and read, then the run folder
    made and the networks built."""
    args.check()
    config = common.load_config(args.config).vae
    run = VAERun(args)
    init = checkpoints.load_vae(args.init, torch.float32) if args.init else None
    run.out.mkdir(parents=True, exist_ok=True)  # every input is good: the run folder may be made

    torch.manual_seed(args.seed)
    if init is not None:
        vae = init
    else:
        vae = AutoencoderKL(config)
        if args.logvar_init is not None:
            _start_logvar_at(vae, args.logvar_init)
    vae.train().requires_grad_(True)
    if args.decoder_only:  # no gradients reach the encoder, so the KL term is a constant and only logged
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    run.vae, run.trainable = vae, [p for p in vae.parameters() if p.requires_grad]
    run.disc = losses.PatchDiscriminator(losses.DiscriminatorConfig(norm=args.disc_norm)).train()
    run.perceptual = losses.lpips_or_none(args.lpips, log=(print if run.dist.main else lambda m: None))
    wrap = (lambda m: torch.nn.parallel.DistributedDataParallel(m)) if run.dist.world > 1 else (lambda m: m)
    run.reconstruct, run.disc_ddp = wrap(Reconstruct(vae)), wrap(run.disc)
    run.opt = common.adamw(run.trainable, lr=args.lr, betas=(0.5, 0.9), weight_decay=0.0)
    run.opt_d = common.adamw(run.disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, common.warmup_cosine(args.warmup, args.max_steps))
    run.state = common.TrainState({"vae": vae, "disc": run.disc, "optimizer": run.opt,
                                   "disc_optimizer": run.opt_d, "scheduler": run.sched}, args)
    if run.checkpoint is not None:
        run.state.load(run.checkpoint)
    run.log = common.start_log(run.out / "log.jsonl", run.checkpoint, run.dist)
    return run


def train_step(run: VAERun, batch, epoch: int) -> dict:
    """One step: the autoencoder (reconstruction + KL, + the adaptive adversarial term once it is on), then
    the discriminator. Returns the step's loss terms as tensors."""
    args, vae, disc_ddp = run.args, run.vae, run.disc_ddp
    x = batch["pixels"]
    gens = [common.sample_generator(args.seed, epoch, int(i), 0) for i in batch["index"]]
    adversarial = run.state.step >= args.disc_start
    with common.autocast(args.bf16):
        rec, post = run.reconstruct(x, lambda shape: torch.stack([torch.randn(shape, generator=g) for g in gens]))
        rec_loss = losses.reconstruction_loss(rec.float(), x, args.rec_loss)
        if args.edge_weight:
            rec_loss = rec_loss + args.edge_weight * losses.gradient_difference_loss(rec.float(), x)
        if run.perceptual is not None:
            rec_loss = rec_loss + args.lpips_weight * run.perceptual(rec.float(), x).mean()
        kl = post.kl().mean()
        loss = rec_loss + args.kl_weight * kl
        g_loss = weight = torch.zeros(())
        if adversarial:
            g_loss = losses.hinge_g_loss(disc_ddp(rec))
            weight = args.disc_weight * losses.adaptive_weight(rec_loss, g_loss, vae.decoder.conv_out.weight)
            loss = loss + weight * g_loss
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.trainable, args.clip_grad)
    run.opt.step()
    run.sched.step()
    d_loss = torch.zeros(())
    if adversarial:
        with common.autocast(args.bf16):
            d_loss = losses.hinge_d_loss(disc_ddp(x), disc_ddp(rec.detach()))
        run.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        run.opt_d.step()
    run.state.step += 1
    return {"loss": loss, "rec_loss": rec_loss, "kl": kl, "g_loss": g_loss, "adaptive_weight": weight,
            "d_loss": d_loss}


def train(args: VAETrainArgs) -> Path:
    """Train as `args` says; returns the autoencoder folder. Every input (arguments, data, --init, the
    checkpoint to resume) is checked and read before the run folder is created."""
    run = setup(args)
    dist, state, out, vae = run.dist, run.state, run.out, run.vae
    stream = common.batch_stream(run.dataset, run.dataset, run.train_idx, args.batch_size, args.seed, dist,
                                 state.epoch, state.batch_pos)
    bar = tqdm(total=args.max_steps, initial=state.step, desc="train-vae", disable=not (args.progress and dist.main))
    started, seen = time.perf_counter(), 0
    while state.step < args.max_steps:
        state.epoch, state.batch_pos, batch = next(stream)
        terms = train_step(run, batch, state.epoch)
        step = state.step
        seen += len(batch["pixels"]) * dist.world
        rate = seen / (time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(rec=f"{terms['rec_loss'].item():.4f}", samples_per_s=f"{rate:.1f}")
        if step % args.log_every == 0 or step == args.max_steps:
            scalars = {k: common.mean_over_ranks(float(torch.as_tensor(v).detach()), dist) for k, v in terms.items()}
            if dist.main:
                run.log.write(step=step, **scalars, lr=run.sched.get_last_lr()[0], samples_per_s=rate)
        if dist.main and run.val_idx and (step % args.val_every == 0 or step == args.max_steps):
            run.log.write(step=step, **evaluate(vae, run.dataset, run.val_idx, args))
            common.plot_curves(out / "log.jsonl", out / "loss.png", keys=("rec_loss", "val_rec_loss", "kl"))
        if dist.main and (step % args.checkpoint_every == 0 or step == args.max_steps):
            state.save(out / "checkpoints", args.keep_checkpoints)
    bar.close()
    if dist.main:
        factor = args.scaling_factor or (vae.config.scaling_factor if args.decoder_only else
                                         latent_scaling_factor(vae.eval(), run.dataset, run.train_idx,
                                                               args.batch_size))
        vae.config = dataclasses.replace(vae.config, scaling_factor=factor)
        checkpoints.save_vae(vae, out / "vae", args.resolution)
    if dist.world > 1:
        torch.distributed.barrier()
    return out / "vae"


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, dataset, indices: list[int], batch: int, n: int = 512) -> float:
    """1 / std of the posterior means over (up to n of) the training images, so that the diffusion model
    sees latents of unit variance (LDM sec. 4.3.2 and appendix D.1)."""
    means = [vae.encode(collate([dataset[i] for i in indices[k:k + batch]])["pixels"]).mean
             for k in range(0, min(n, len(indices)), batch)]
    return float(1.0 / torch.cat(means).std())


@torch.no_grad()
def evaluate(vae: AutoencoderKL, dataset, val_idx: list[int], args: VAETrainArgs) -> dict:
    """Held-out reconstruction from the posterior mode: loss, PSNR and SSIM (dB and [0, 1], means)."""
    vae.eval()
    rec_l, p, s = [], [], []
    for k in range(0, len(val_idx), args.batch_size):
        x = collate([dataset[i] for i in val_idx[k:k + args.batch_size]])["pixels"]
        rec = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
        rec_l.append(losses.reconstruction_loss(rec, x, args.rec_loss, reduction="none").flatten(1).mean(1))
        p.append(losses.psnr(rec, x))
        s.append(losses.ssim(rec, x))
    vae.train()
    return {"val_rec_loss": torch.cat(rec_l).mean().item(), "val_psnr": torch.cat(p).mean().item(),
            "val_ssim": torch.cat(s).mean().item()}

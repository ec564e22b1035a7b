"""`sdtorch train-lora`: low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685, eq. 3: W x + (alpha/r) B A x)
trained on a frozen model's UNet (and optionally its text encoder), with the loss, data, logs, EMA, resume and
torchrun of `sdtorch train` (diffusion.py): only which parameters train and what is saved differ. The base
weights never change and are never written; the result is one kohya-format .safetensors with kohya's ss_* keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SDTorchError
from . import checks
from .common import REQUIRED, option
from .diffusion import DiffusionArgs, Run, Trainable, check_samples, loop, sample_grid


@dataclass(kw_only=True)
class LoraTrainArgs(DiffusionArgs):
    output: str = option(REQUIRED, "output", "the run folder, made once every input is good: NAME.safetensors "
                         "(the LoRA, from the EMA weights), checkpoints/, samples/, log.jsonl, loss.png")
    model: str = option(REQUIRED, "model", "the frozen base model: a path or built-in name that sdtorch.load opens")
    rank: int = option(4, "lora", "the adapters' rank r (kohya: --network-dim)")
    alpha: float | None = option(None, "lora", "LoRA alpha; the update is scaled by alpha / rank (kohya: "
                                 "--network-alpha, whose default is 1) (default: the rank, a scale of 1)")
    dropout: float = option(0.0, "lora", "dropout on each adapter's input while training, in [0, 1)")
    text_encoder: bool = option(False, "lora", "also adapt the text encoder's self-attention (q, k, v, out)")
    feed_forward: bool = option(False, "lora", "also adapt the UNet's feed-forward layers and proj_in/proj_out")
    conv: bool = option(False, "lora", "also adapt the UNet's resnet and resampling convolutions (LoCon)")
    name: str | None = option(None, "output", "the LoRA's name and file name, NAME.safetensors (default: the run "
                              "folder's name)")
    lr: float = option(1e-4, "optimisation", "AdamW's peak learning rate of the adapters, reached after --warmup, "
                       "then a cosine decay to 0 at --max-steps")
    ema_decay: float = option(0.999, "optimisation", "decay of the moving average of the adapters that the sample "
                              "grids and the saved LoRA file use, in [0, 1); 0 saves the last step's adapters")

    def check(self) -> None:
        """Every field's type and range: a bad value is one line naming its flag, before anything is loaded."""
        super().check()
        checks.at_least(self, 1, "rank")
        checks.positive(self, "alpha")
        checks.fraction(self, "dropout", one=False)
        name = self.lora_name
        if not name or name.startswith(".") or any(c in name for c in '/\\\0:'):
            checks.fail("name", "a file name without / \\ : or a leading dot", name)

    @property
    def lora_name(self) -> str:
        return self.name if self.name is not None else Path(self.output).resolve().name


class Clock:
    """When training started, kept in the checkpoint so that a resumed run reports the first start."""

    def __init__(self):
        self.started_at = time.time()

    def state_dict(self) -> dict:
        return {"started_at": self.started_at}

    def load_state_dict(self, state: dict) -> None:
        self.started_at = float(state["started_at"])


class LoraRun(Run):
    """A diffusion run whose trained module is a LoRA network attached to a frozen base model."""

    @contextlib.contextmanager
    def ema_pipeline(self):
        """The base model with the network's EMA weights in place (eval mode); the trained ones after."""
        kept = {k: v.clone() for k, v in self.trained.state_dict().items()}
        self.ema.copy_to(self.trained)
        self.model.eval()
        self.base.text_encoder.eval()
        try:
            yield self.base
        finally:
            self.trained.load_state_dict(kept)
            self.model.train()


def setup(args: LoraTrainArgs) -> LoraRun:
    """The arguments and base model checked and read, then the run folder made and the adapters attached."""
    from ..lora.adapters import attach, create_network, targets
    from ..pipeline import load

    args.check()
    base = load(args.model, dtype=torch.float32)
    if base.config.unet.conditioning != "text":
        raise SDTorchError(f"--model {args.model}: train-lora trains LoRAs on text-conditioned models, and this one is "
                           f"{base.config.unet.conditioning}-conditioned (no captions to learn from)")
    for module in (base.unet, base.text_encoder, base.vae):
        module.eval().requires_grad_(False)
    check_samples(args, base.config)
    run = LoraRun(args)
    ids = targets(base, unet=True, text_encoder=args.text_encoder, feed_forward=args.feed_forward, conv=args.conv)
    alpha = float(args.alpha if args.alpha is not None else args.rank)
    network = create_network(base, ids, args.rank, alpha, args.dropout, name=args.lora_name, seed=args.seed)
    # the captions' words are known words while training too (the sample grids warn about no caption word)
    network.metadata["sdtorch_vocabulary"] = json.dumps(caption_words(run.dataset.captions))
    attach(base, network)
    torch.manual_seed(args.seed)  # the adapters' dropout masks: the same run repeats exactly, in any process
    run.base, run.clock = base, Clock()
    run.out.mkdir(parents=True, exist_ok=True)  # every input is good: the run folder may be made
    run.cache_latents(base.vae, f"{Path(args.model).resolve()}#vae")
    base.unet.gradient_checkpointing = args.gradient_checkpointing
    if not args.text_encoder:
        run.frozen_text = base.text_encoder
    model = Trainable(base.unet, base.text_encoder if args.text_encoder else None, adapters=network).train()
    run.finish_setup(model, network, base.vae, base.tokenizer, base.config, extra={"clock": run.clock})
    return run


def summary(network, base) -> str:
    """What will train, as one line: the adapters by part and layer name, their rank, alpha and parameter count,
    against the frozen base's (kohya prints the same before training)."""
    by_part: dict[str, Counter] = {}
    for t in network.target_ids:
        part, path = t.split(".", 1)  # the layer's name within its block: attn2.to_q, ff.net.2, conv1, self_attn.q_proj
        leaf = re.sub(r"^.*\b(?:transformer_blocks|resnets|attentions|layers)\.\d+\.", "", path)
        leaf = re.sub(r"^.*\b((?:down|up)samplers)\.\d+\.", r"\1.", leaf)
        by_part.setdefault(part, Counter())[leaf] += 1
    parts = "; ".join(f"{'text encoder' if p == 'text_encoder' else 'UNet'} {sum(c.values())} "
                      f"({', '.join(f'{k} {n}' for k, n in c.items())})" for p, c in by_part.items())
    first = network.adapter(network.target_ids[0])
    trained = sum(p.numel() for p in network.parameters())
    frozen = sum(p.numel() for m in (base.unet, base.text_encoder) for p in m.parameters())
    return (f"train-lora: {len(network.target_ids)} adapters, rank {first.rank}, alpha {first.alpha:g}: {parts}; "
            f"{trained:,} trainable parameters, {100 * trained / frozen:.2f}% of the frozen UNet and text encoder's "
            f"{frozen:,}")


def tag_frequency(dataset_name: str, captions) -> dict:
    """kohya's ss_tag_frequency: {dataset: {tag: count}}, tags being the comma-separated parts of the captions."""
    counts = Counter(t.strip() for c in captions for t in c.split(",") if t.strip())
    return {dataset_name: dict(counts)}


def tensors_hash(tensors: dict) -> str:
    """kohya's sshs_model_hash: the SHA-256 of the safetensors file's tensor data (the bytes after the header)."""
    from safetensors.torch import save

    data = save(tensors)
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


def metadata(run: LoraRun, tensors: dict) -> dict[str, str]:
    """kohya's ss_* training metadata (all strings, as kohya writes them) and sdtorch's own sdtorch_* keys."""
    from .. import __version__
    from ..infotext import model_hash

    args, config = run.args, run.config
    try:
        sd_hash = model_hash(args.model)
    except (SDTorchError, OSError):
        sd_hash = ""
    alpha = float(args.alpha if args.alpha is not None else args.rank)  # written as kohya does: "1.0"
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(args.rank), "ss_network_alpha": str(alpha),
        "ss_network_dropout": str(args.dropout),
        "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2"}.get(config.family, config.family),
        "ss_v2": str(config.family == "sd2"), "ss_sd_model_name": Path(args.model).name, "ss_sd_model_hash": sd_hash,
        "ss_output_name": args.lora_name, "ss_steps": str(run.state.step), "ss_max_train_steps": str(args.max_steps),
        "ss_epoch": str(run.state.epoch), "ss_num_train_images": str(len(run.train_idx)),
        "ss_batch_size_per_device": str(args.batch_size), "ss_gradient_accumulation_steps": str(args.grad_accum),
        "ss_learning_rate": str(args.lr), "ss_unet_lr": str(args.lr),
        "ss_text_encoder_lr": str(args.lr if args.text_encoder else 0), "ss_lr_warmup_steps": str(args.warmup),
        "ss_lr_scheduler": "cosine_with_warmup", "ss_optimizer": f"torch.optim.AdamW(weight_decay={args.weight_decay})",
        "ss_mixed_precision": "bf16" if args.bf16 else "no", "ss_seed": str(args.seed),
        "ss_resolution": f"({args.resolution}, {args.resolution})",
        "ss_caption_dropout_rate": str(args.caption_dropout),
        "ss_min_snr_gamma": str(args.min_snr_gamma), "ss_network_train_unet_only": str(not args.text_encoder),
        "ss_tag_frequency": json.dumps(tag_frequency(Path(args.data).name, run.dataset.captions)),
        "ss_training_started_at": str(run.clock.started_at), "ss_training_finished_at": str(time.time()),
        "sshs_model_hash": tensors_hash(tensors),
        "sdtorch_version": __version__, "sdtorch_targets": json.dumps({"unet": True, "text_encoder": args.text_encoder,
                                                                      "feed_forward": args.feed_forward,
                                                                      "conv": args.conv}),
        "sdtorch_ema_decay": str(args.ema_decay),
        # the captions' words: a model that warns about prompt words it was not trained on knows these too
        "sdtorch_vocabulary": json.dumps(caption_words(run.dataset.captions)),
    }
    if args.conv:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(args.rank), "conv_alpha": str(alpha)})
    return meta


def caption_words(captions) -> list[str]:
    """The distinct words of the captions (runs of letters, lower-cased), sorted."""
    return sorted({w.lower() for c in captions for w in re.findall(r"[^\W\d_]+", c)})


def save(run: LoraRun, path: Path) -> Path:
    """The EMA adapters as a kohya .safetensors with kohya's metadata, written atomically."""
    from ..lora.adapters import network_weights
    from ..lora.formats import to_state_dict, write_lora

    with run.ema_pipeline():
        adapters = network_weights(run.trained)
    tensors, _ = to_state_dict(adapters, "kohya")
    return write_lora(path, adapters, to="kohya", metadata=metadata(run, tensors))


def train(args: LoraTrainArgs) -> Path:
    """Train as `args` says; returns the LoRA file. Every input is checked and read before the run folder is made."""
    run = setup(args)
    if run.dist.main:
        print(summary(run.trained, run.base), flush=True)
    loop(run, desc="train-lora")
    path = run.out / f"{args.lora_name}.safetensors"
    if run.dist.main:
        save(run, path)
        sample_grid(run, run.out / "samples" / "final.png")
    if run.dist.world > 1:
        torch.distributed.barrier()
    return path

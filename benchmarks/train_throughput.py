"""Training throughput of the UNet: sdtorch against diffusers' UNet2DConditionModel, same run.

For each configuration (TINY, and SMALL: ~17 M parameters) and precision (fp32, bf16 autocast), both
implementations start from the same weights and do the same step: forward on noisy latents, MSE to
the noise, backward, AdamW. Prints samples/s of each and the sdtorch / diffusers ratio, and then the
step as `sdtorch train` takes it (fused AdamW, and with bf16 attention through the math kernel:
`training.common.adamw` and `attention_kernel`) against the same diffusers step.

    python benchmarks/train_throughput.py [--batch 16] [--latent 16] [--steps 6]
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import torch

import sdtorch
from sdtorch.models import UNet
from sdtorch.precision import cpu_capability

warnings.filterwarnings("ignore")

SMALL = sdtorch.UNetConfig(block_channels=(64, 128, 256), attention_levels=(False, True, True), layers_per_block=1,
                           num_heads=None, head_dim=32, context_dim=256)


def diffusers_twin(cfg: sdtorch.UNetConfig):
    from diffusers import UNet2DConditionModel

    heads = [cfg.heads_for(c) for c in cfg.block_channels]
    return UNet2DConditionModel(
        sample_size=16, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=cfg.block_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)),
        cross_attention_dim=cfg.context_dim, attention_head_dim=heads, norm_num_groups=cfg.norm_groups,
        use_linear_projection=cfg.linear_projection)


def samples_per_s(model, call, batch: int, latent: int, ctx_dim: int, steps: int, bf16: bool,
                  trainer: bool = False) -> float:
    """trainer: the step as sdtorch's trainers take it, else plain AdamW and the default attention kernel."""
    from sdtorch.training import common

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(batch, 4, latent, latent, generator=g), torch.randn(batch, 77, ctx_dim, generator=g)
    t, noise = torch.randint(0, 1000, (batch,), generator=g), torch.randn(batch, 4, latent, latent, generator=g)
    opt = (common.adamw if trainer else torch.optim.AdamW)(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for i in range(steps + 1):  # the first step warms up and is not counted
        t0 = time.perf_counter()
        with common.attention_kernel(bf16) if trainer else contextlib.nullcontext():
            with common.autocast(bf16):
                loss = (call(model, x, t, ctx).float() - noise).pow(2).mean()
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return batch / (sum(times) / len(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    print(f"UNet training step (forward + backward + AdamW), batch {args.batch}, {args.latent}x{args.latent} "
          f"latents, {torch.get_num_threads()} threads, CPU {cpu_capability()}, mean of {args.steps} steps after one "
          "warm-up")
    print(f"{'config':<8}{'params':>9}{'precision':>11}{'sdtorch/s':>11}{'diffusers/s':>13}{'ratio':>8}"
          f"{'sdtorch train/s':>17}{'ratio':>8}")
    for name, cfg in (("TINY", sdtorch.TINY.unet), ("SMALL", SMALL)):
        torch.manual_seed(0)
        ours = UNet(cfg)
        theirs = diffusers_twin(cfg)
        theirs.load_state_dict(ours.state_dict())
        params = sum(p.numel() for p in ours.parameters())
        for bf16 in (False, True):
            a = samples_per_s(ours, lambda m, x, t, c: m(x, t, c), args.batch, args.latent, cfg.context_dim,
                              args.steps, bf16)
            b = samples_per_s(theirs, lambda m, x, t, c: m(x, t, c).sample, args.batch, args.latent,
                              cfg.context_dim, args.steps, bf16)
            c = samples_per_s(ours, lambda m, x, t, c: m(x, t, c), args.batch, args.latent, cfg.context_dim,
                              args.steps, bf16, trainer=True)
            print(f"{name:<8}{params / 1e6:>8.1f}M{'bf16' if bf16 else 'fp32':>11}{a:>11.1f}{b:>13.1f}{a / b:>8.2f}"
                  f"{c:>17.1f}{c / b:>8.2f}")


if __name__ == "__main__":
    main()

"""Losses and metrics for training the KL autoencoder the way LDM/VQGAN do (Esser et al. 2021, sec. 3;
Rombach et al. 2022, appendix G): L1/L2 reconstruction, the LPIPS perceptual distance, a PatchGAN
discriminator with hinge losses, and the adaptive weight that balances the adversarial term.
PSNR and SSIM are the evaluation metrics. Images are in [-1, 1] throughout.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.io import read_state_dict
from ..errors import CheckpointError

# ---------------------------------------------------------------------------------------------------
# Reconstruction


def reconstruction_loss(x: torch.Tensor, y: torch.Tensor, kind: Literal["l1", "mse"] = "l1",
                        reduction: Literal["mean", "none"] = "mean") -> torch.Tensor:
    """Pixel loss |x - y| or (x - y)^2; `reduction="none"` keeps the per-element map (LDM weights it
    per element by a learned log-variance before summing)."""
    if kind == "l1":
        loss = (x - y).abs()
    elif kind == "mse":
        loss = (x - y).square()
    else:
        raise ValueError(f"reconstruction loss kind must be 'l1' or 'mse', not {kind!r}")
    return loss.mean() if reduction == "mean" else loss


def gradient_difference_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean of | |d y| - |d x| | over horizontal and vertical neighbour differences d: the gradient
    difference loss of Mathieu, Couprie & LeCun 2016 ("Deep multi-scale video prediction beyond mean
    square error", eq. 5, alpha = 1). A pixel loss can settle for an edge smeared over a few pixels; this
    term asks for the target's edge strength, so an object keeps its outline."""
    return sum(((torch.diff(x, dim=d).abs() - torch.diff(y, dim=d).abs()).abs().mean() for d in (-1, -2)
                if x.shape[d] > 1), x.new_zeros(()))


# ---------------------------------------------------------------------------------------------------
# PatchGAN discriminator and adversarial losses


@dataclass(frozen=True)
class DiscriminatorConfig:
    in_channels: int = 3  # image channels
    channels: int = 64  # width of the first conv; doubles per layer up to 8x
    layers: int = 3  # stride-2 convs; 3 gives the 70x70-receptive-field PatchGAN of pix2pix
    norm: Literal["batch", "group"] = "batch"  # "batch" as in pix2pix/taming; "group" is batch-independent


class PatchDiscriminator(nn.Module):
    """PatchGAN "NLayerDiscriminator" (Isola et al. 2017, pix2pix, sec. 3.2.2; as used by
    taming-transformers): 4x4 convs, stride 2 then 1, LeakyReLU(0.2), output a map of patch logits
    (a 256 px image gives 30x30 logits for `layers=3`).

    Norm: BatchNorm by default, as in pix2pix and taming. In training mode each sample's logits depend on
    the rest of its batch (and real and fake batches are normalised separately), and under DDP each rank
    uses its own batch statistics unless converted to SyncBatchNorm, so results change with the batch split
    and world size. `norm="group"` (GroupNorm) is per-sample and avoids all of that.

    Init (pix2pix `init_weights`): conv weights N(0, 0.02), conv biases 0, norm scales N(1, 0.02), norm
    shifts 0, drawn from the caller's global RNG (seed with `torch.manual_seed`).
    """

    def __init__(self, config: DiscriminatorConfig = DiscriminatorConfig()):
        super().__init__()
        self.config = config
        c = config.channels

        def norm(ch: int) -> nn.Module:
            return nn.BatchNorm2d(ch) if config.norm == "batch" else nn.GroupNorm(math.gcd(32, ch), ch)

        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, c, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, config.layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < config.layers else 1  # the last one keeps the resolution
            layers += [nn.Conv2d(c * prev, c * mult, 4, stride, 1, bias=False), norm(c * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(c * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, H', W') patch logits


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss (Lim & Ye 2017, "Geometric GAN"; Miyato et al. 2018), halved as in taming:
    0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge loss: -E[D(G(z))]."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    delta: float = 1e-4, max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's adaptive adversarial weight (Esser et al. 2021, eq. 7):
    lambda = ||grad_{G_L}[L_rec]|| / (||grad_{G_L}[L_GAN]|| + delta), with G_L the decoder's last layer,
    clamped to [0, max_weight] and detached. Both graphs are kept for the backward pass that follows."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + delta)
    return weight.clamp(0.0, max_weight).detach()


# ---------------------------------------------------------------------------------------------------
# LPIPS


@dataclass(frozen=True)
class LPIPSConfig:
    channels: tuple[int, ...] = (64, 128, 256, 512, 512)  # VGG16 stage widths; smaller ones are for tests


VGG16_CONVS = (2, 2, 3, 3, 3)  # 3x3 convs per stage of VGG16 (Simonyan & Zisserman 2015, config D)
# ImageNet statistics rescaled to inputs in [-1, 1], the constants of the official lpips ScalingLayer.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class _ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE)[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class _VGG16Slices(nn.Module):
    """torchvision's `vgg16().features[:30]` cut into five slices that end at relu1_2, relu2_2, relu3_3,
    relu4_3 and relu5_3. Children keep their index in `features`, as in the lpips state dict."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        index, c_in = 0, 3
        for stage, (c, n_convs) in enumerate(zip(channels, VGG16_CONVS), start=1):
            layers = OrderedDict()
            if stage > 1:
                layers[str(index)] = nn.MaxPool2d(2, 2)
                index += 1
            for _ in range(n_convs):
                layers[str(index)] = nn.Conv2d(c_in, c, 3, padding=1)
                layers[str(index + 1)] = nn.ReLU()
                index, c_in = index + 2, c
            setattr(self, f"slice{stage}", nn.Sequential(layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i in range(1, len(VGG16_CONVS) + 1):
            x = getattr(self, f"slice{i}")(x)
            taps.append(x)
        return taps


class _Lin(nn.Module):
    """lpips' NetLinLayer: (dropout, 1x1 conv to one channel without bias). Dropout only mattered while
    the lin layers were being fitted, so index 0 is an identity here."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """The learned perceptual distance of Zhang et al. 2018 ("The Unreasonable Effectiveness of Deep
    Features as a Perceptual Metric", eq. 1) with a VGG16 trunk:
    d(x, y) = sum_l mean_{h,w} sum_c w_lc (f̂_lhwc(x) - f̂_lhwc(y))^2, where f̂_l are features at the five
    taps scaled to unit length over channels and w_l >= 0 the learned "lin" weights (the official code
    weights the squared difference by w, where eq. 1 writes ||w * diff||^2). One distance per image, (B,).

    Attribute names follow `lpips.LPIPS(net='vgg').state_dict()`, so `from_file` is a straight copy.
    The module is frozen and always in eval mode; gradients still flow to the inputs.
    """

    def __init__(self, config: LPIPSConfig = LPIPSConfig()):
        super().__init__()
        if len(config.channels) != len(VGG16_CONVS):
            raise ValueError(f"LPIPS needs {len(VGG16_CONVS)} stage widths, got {config.channels}")
        self.config = config
        self.scaling_layer = _ScalingLayer()
        self.net = _VGG16Slices(config.channels)
        for i, c in enumerate(config.channels):
            setattr(self, f"lin{i}", _Lin(c))
        with torch.no_grad():  # keep a freshly built (random) metric non-negative, like trained weights
            for lin in self.lins():
                lin.model[1].weight.abs_()
        self.requires_grad_(False)
        self.eval()

    def lins(self) -> list[_Lin]:
        return [getattr(self, f"lin{i}") for i in range(len(self.config.channels))]

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # a fixed metric: a trainer's .train() must not switch it

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feats_x, feats_y = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = 0.0
        for lin, fx, fy in zip(self.lins(), feats_x, feats_y):
            diff = (_unit_normalize(fx) - _unit_normalize(fy)).square()
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total

    @classmethod
    def from_file(cls, path: str | Path, config: LPIPSConfig = LPIPSConfig(),
                  vgg_path: str | Path | None = None) -> LPIPS:
        """Load weights saved from `lpips.LPIPS(net='vgg').state_dict()` (.safetensors, or .pth read
        weights-only). The lpips package's own `weights/v0.1/vgg.pth` holds only the lin layers: pass the
        VGG16 trunk too as `vgg_path`, a torchvision `vgg16` state dict (keys `features.N.*`)."""
        model = cls(config)
        main = read_state_dict(path)
        vgg = read_state_dict(vgg_path) if vgg_path is not None else None
        expected = model.state_dict()
        tensors, missing, misshaped = {}, [], []
        for key, ref in expected.items():
            src, src_key = main, key
            if key not in main and key.startswith("net.") and vgg is not None:
                src, src_key = vgg, "features." + key.split(".", 2)[2]  # net.slice2.5.weight -> features.5.weight
            if src_key not in src:
                if not key.startswith("scaling_layer."):  # constants; older files leave them out
                    missing.append(src_key if src is vgg else key)
                continue
            if tuple(src.shape(src_key)) != tuple(ref.shape):
                misshaped.append(f"{src_key} (file {tuple(src.shape(src_key))}, model {tuple(ref.shape)})")
                continue
            tensors[key] = src[src_key]
        # `lins.N.*` duplicates `linN.*` in the official state dict (the same modules, listed twice).
        unexpected = [k for k in main if k not in expected and not k.startswith("lins.")]
        if missing or misshaped or unexpected:
            raise CheckpointError(f"{path}: not an LPIPS(net='vgg') weights file: "
                                  + _problems(missing, misshaped, unexpected, vgg is None))
        negative = [k for k in tensors if k.startswith("lin") and bool((tensors[k] < 0).any())]
        if negative:
            raise CheckpointError(f"{path}: LPIPS lin weights must be non-negative: {', '.join(negative)}")
        for key, ref in expected.items():
            tensors.setdefault(key, ref)
        model.load_state_dict(tensors)
        return model


def _unit_normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Scale each feature vector (over channels) to unit length, as lpips' normalize_tensor."""
    return f / (f.square().sum(dim=1, keepdim=True).sqrt() + eps)


def _problems(missing: list[str], misshaped: list[str], unexpected: list[str], no_vgg: bool) -> str:
    def listed(keys: list[str], limit: int = 8) -> str:
        more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    parts = [f"{label} {listed(keys)}" for label, keys in
             (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)) if keys]
    if no_vgg and missing and all(k.startswith("net.") for k in missing):
        parts.append("the file holds only the lin layers; give the VGG16 trunk as vgg_path")
    return "; ".join(parts)


def lpips_or_none(path: str | Path | None, log: Callable[[str], None] = print,
                  config: LPIPSConfig = LPIPSConfig(), vgg_path: str | Path | None = None) -> LPIPS | None:
    """LPIPS from local weight files, or None (after logging why) so that training can run without it."""
    if not path:
        log("LPIPS perceptual loss is off: no weights file given")
        return None
    try:
        return LPIPS.from_file(path, config, vgg_path)
    except CheckpointError as e:
        log(f"LPIPS perceptual loss is off: {e}")
        return None


# ---------------------------------------------------------------------------------------------------
# Metrics


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, 10 log10(R^2 / MSE), in dB; inf for identical images."""
    mse = (a - b).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, sigma: float = 1.5,
         window: int = 11, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean structural similarity per image (Wang et al. 2004, eq. 13), with local statistics under a
    Gaussian window (sec. III-B), biased (population) covariances, computed per channel and averaged over
    the valid (unpadded) positions: scikit-image's `structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)`. Inputs (B, C, H, W) with H, W >= window."""
    B, C, H, W = a.shape
    if H < window or W < window:
        raise ValueError(f"ssim needs images of at least {window}x{window} pixels, got {H}x{W}")
    r = torch.arange(window, dtype=a.dtype, device=a.device) - (window - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = g / g.sum()
    gh, gw = g.view(1, 1, window, 1).repeat(C, 1, 1, 1), g.view(1, 1, 1, window).repeat(C, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # depthwise separable Gaussian, valid positions only
        return F.conv2d(F.conv2d(t, gh, groups=C), gw, groups=C)

    stats = blur(torch.cat([a, b, a * a, b * b, a * b]))  # (5B, C, H - window + 1, W - window + 1)
    mu_a, mu_b, e_aa, e_bb, e_ab = stats.chunk(5)
    var_a, var_b, cov = e_aa - mu_a ** 2, e_bb - mu_b ** 2, e_ab - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))

"""Denoisers: a network wrapped as D(x, sigma) -> estimate of the clean x_0, k-diffusion style.

A sampler never sees the network. It sees a denoiser that takes a noisy sample on the variance
exploding axis, x = x_0 + sigma * n, and the noise level sigma, and returns its estimate of x_0.
Following Karras et al. 2022 (eq. 7 and table 1, "preconditioning"),

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, t(sigma))

where F is the network and t(sigma) the training timestep of that noise level. One small subclass
per parameterization fixes the three scalings; the discrete sigma <-> timestep conversion lives in
their common base. Classifier-free guidance and the inpainting blend are more wrappers around a denoiser.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .schedules import alphas_cumprod, betas_for, sigmas_from_alphas_cumprod


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] with `ndim` dimensions, for broadcasting a per-sample scalar."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class DiscreteDenoiser(nn.Module):
    """Base of the denoisers of networks trained on a discrete schedule of T noise levels.

    `model(x, t, **kwargs)` is the network (e.g. `sdtorch.models.UNet`, whose kwarg is `context`);
    `sigmas` are its T training sigmas, ascending. With `quantize=True` the network is called at the
    nearest whole timestep instead of an interpolated one (diffusers' DPMSolverMultistep does that
    with Karras sigmas); the scalings still use the exact sigma.
    """

    def __init__(self, model: Callable[..., torch.Tensor], sigmas: torch.Tensor, quantize: bool = False):
        super().__init__()
        self.inner_model = model
        self.quantize = quantize
        self.register_buffer("sigmas", sigmas.float().clone(), persistent=False)

    @classmethod
    def from_config(cls, model: Callable[..., torch.Tensor], config, quantize: bool = False):
        """Build from a ModelConfig's training schedule (num_train_timesteps, beta_start/end/schedule)."""
        betas = betas_for(config.beta_schedule, config.num_train_timesteps, config.beta_start, config.beta_end)
        return cls(model, sigmas_from_alphas_cumprod(alphas_cumprod(betas)), quantize=quantize)

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def _log_sigmas(self, device: torch.device) -> torch.Tensor:
        # float64 keeps whole timesteps whole through sigma -> t; MPS has no float64.
        return self.sigmas.to(device, torch.float32 if device.type == "mps" else torch.float64).log()

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool | None = None) -> torch.Tensor:
        """Fractional training timestep of a noise level: linear interpolation in log sigma between the
        two neighbouring training sigmas (k-diffusion's DiscreteSchedule), clamped to [0, T - 1]."""
        quantize = self.quantize if quantize is None else quantize
        log_sigmas = self._log_sigmas(sigma.device)
        log_sigma = sigma.to(log_sigmas.dtype).log()
        low = torch.searchsorted(log_sigmas, log_sigma, right=True) - 1
        low = low.clamp(0, len(log_sigmas) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        t = (1 - w) * low + w * (low + 1)
        return (t.round() if quantize else t).to(sigma.dtype)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level of a (fractional) timestep, interpolating log sigma (inverse of `sigma_to_t`)."""
        log_sigmas = self._log_sigmas(t.device)
        t = t.to(log_sigmas.dtype)
        low, high = t.floor().long(), t.ceil().long()
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp().float()

    def get_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) for a batch of sigmas."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **kwargs) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        c_skip, c_out, c_in = (append_dims(c, x.ndim).to(x.dtype) for c in self.get_scalings(sigma))
        out = self.inner_model(x * c_in, self.sigma_to_t(sigma), **kwargs)
        return x * c_skip + out * c_out


    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What the network should output for x = x0 + sigma * noise."""
        raise NotImplementedError

    def loss(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, min_snr_gamma: float | None = None,
             **kwargs) -> torch.Tensor:
        """Per-sample training loss at integer timesteps t: mean squared error between the network's output
        on x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise and its target (DDPM eq. 14, "L_simple"), optionally
        weighted by min(SNR, gamma) / SNR for eps or min(SNR, gamma) / (SNR + 1) for v (Hang et al. 2023,
        "Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 9 and sec. 3.4)."""
        sigma = self.sigmas[t.long()].to(x0.device)
        c_in = append_dims((sigma ** 2 + 1) ** -0.5, x0.ndim).to(x0.dtype)
        x_t = (x0 + noise * append_dims(sigma, x0.ndim).to(x0.dtype)) * c_in  # VP sample of DDPM eq. 4
        out = self.inner_model(x_t, t.to(x0.dtype), **kwargs)
        err = (out.float() - self.target(x0, noise, sigma).float()).pow(2).flatten(1).mean(1)
        if min_snr_gamma is not None:
            snr = sigma.float() ** -2
            weight = snr.clamp(max=min_snr_gamma) / (snr if isinstance(self, EpsDenoiser) else snr + 1)
            err = err * weight
        return err


class EpsDenoiser(DiscreteDenoiser):
    """For a network that predicts the noise eps: D = x - sigma * eps(x / sqrt(sigma^2 + 1), t)
    (Karras et al. 2022, table 1, VP column: c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1))."""

    prediction_type = "epsilon"

    def get_scalings(self, sigma):
        return torch.ones_like(sigma), -sigma, (sigma ** 2 + 1) ** -0.5

    def target(self, x0, noise, sigma):
        return noise


class VDenoiser(DiscreteDenoiser):
    """For a network that predicts v = alpha * eps - sigma_vp * x_0 (Salimans & Ho 2022, sec. 4; "v" in
    Imagen Video). With sigma_data = 1: c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1),
    c_in = 1 / sqrt(sigma^2 + 1) (Karras et al. 2022, eq. 7 preconditioning; k-diffusion's DiscreteVDDPMDenoiser)."""

    prediction_type = "v_prediction"

    def get_scalings(self, sigma):
        c_in = (sigma ** 2 + 1) ** -0.5
        return 1 / (sigma ** 2 + 1), -sigma * c_in, c_in

    def target(self, x0, noise, sigma):
        """v = alpha eps - sigma_vp x0 with alpha = 1 / sqrt(sigma^2 + 1), sigma_vp = sigma * alpha."""
        alpha = append_dims((sigma ** 2 + 1) ** -0.5, x0.ndim).to(x0.dtype)
        return alpha * noise - append_dims(sigma, x0.ndim).to(x0.dtype) * alpha * x0


def denoiser_for(model: Callable[..., torch.Tensor], config, quantize: bool = False) -> DiscreteDenoiser:
    """The denoiser class that matches `config.prediction_type` ("epsilon" or "v_prediction")."""
    kinds = {"epsilon": EpsDenoiser, "v_prediction": VDenoiser}
    if config.prediction_type not in kinds:
        raise ValueError(f"unknown prediction_type {config.prediction_type!r}; expected one of {list(kinds)}")
    return kinds[config.prediction_type].from_config(model, config, quantize=quantize)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale of Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are
    Flawed"), eq. 15-16: x_rescaled = x_cfg * std(x_pos) / std(x_cfg); x = phi * x_rescaled + (1 - phi) * x_cfg.
    Standard deviations are per sample, over all non-batch dimensions."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6 with scale = 1 + w) around a denoiser:
    D = D_uncond + scale * (D_cond - D_uncond), with both passes run as one batch of 2B.

    Call as `cfg(x, sigma, context=cond, uncond=uncond_context)`; samplers pass these through
    `extra_args`. `rescale` is phi of `rescale_guidance` (0 turns it off). Guidance is applied to
    the x_0 estimates; for an eps- or v-network this equals guiding the network output (both are affine
    in it with the same coefficients), except for the rescale, which diffusers applies to the output.
    At scale 1 the guided estimate is the conditional one, so only that pass runs (half the work).
    """

    def __init__(self, denoiser: nn.Module, scale: float = 7.5, rescale: float = 0.0):
        super().__init__()
        self.inner_model = denoiser
        self.scale = scale
        self.rescale = rescale

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, context: torch.Tensor,
                uncond: torch.Tensor, scale: float | None = None, **kwargs) -> torch.Tensor:
        scale = self.scale if scale is None else scale
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        if scale == 1:
            return self.inner_model(x, sigma, context=context, **kwargs)
        # [B, ...] -> [2B, ...]: unconditional first, as diffusers orders its batch.
        out = self.inner_model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                               context=torch.cat([uncond, context]), **kwargs)
        d_uncond, d_cond = out.chunk(2)
        guided = d_uncond + scale * (d_cond - d_uncond)
        return rescale_guidance(guided, d_cond, self.rescale) if self.rescale > 0 else guided


class InpaintBlend(nn.Module):
    """For models without inpainting channels: keep the known region (mask = 0) equal to the source
    latents re-noised to the current level, at every step (the RePaint-style blend of Lugmayr et al.
    2022, sec. 4, without resampling), and return the source there."""

    def __init__(self, denoiser: nn.Module, source: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor):
        super().__init__()
        self.inner_model, self.source, self.mask, self.noise = denoiser, source, mask, noise

    def forward(self, x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        x = self.mask * x + (1 - self.mask) * (self.source + self.noise * sigma)
        return self.mask * self.inner_model(x, sigma.flatten(), **kwargs) + (1 - self.mask) * self.source

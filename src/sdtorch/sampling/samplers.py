"""Samplers: small functions over a denoiser, k-diffusion style.

Every sampler has the signature

    sample_NAME(model, x, sigmas, extra_args=None, callback=None, noise=None, **opts) -> x_0

`model(x, sigma, **extra_args)` is a denoiser (see `denoisers.py`) returning an x_0 estimate, `x` the
starting sample on the variance-exploding axis (noise * `init_noise_sigma(...)`), `sigmas` the
descending noise levels to visit, ending in 0. `callback({"i", "x", "sigma", "denoised"})` is called
once per step. `noise(sigma, sigma_next) -> tensor` supplies the standard normal draws of the
ancestral and SDE samplers; it may also be a `torch.Generator` (draws `torch.randn(x.shape)` from it,
in the order diffusers draws them) or None (`torch.randn_like`).

Each sampler reproduces one diffusers scheduler when `get_sigmas` builds its schedule with the same
spacing (`x` scaled by `init_noise_sigma`); the tests assert equality to 1e-4:

    ddpm          DDPMScheduler(clip_sample=False)                 (variance_type="fixed_small")
    ddim          DDIMScheduler(clip_sample=False, set_alpha_to_one=True), step(eta=...)
    plms          PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=True)
    euler         EulerDiscreteScheduler
    euler_a       EulerAncestralDiscreteScheduler
    heun          HeunDiscreteScheduler
    dpm2          KDPM2DiscreteScheduler
    lms           LMSDiscreteScheduler (step order 4)
    dpmpp_2m      DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)
    dpmpp_2m_sde  DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)
    dpmpp_sde     DPMSolverSDEScheduler (its noise is a Brownian tree; pass one as `noise`)

DDIM and PNDM step from t to t - T // n rather than to the next listed timestep, so they agree with
the listed schedule only for `leading` spacing (or `trailing` when n divides T). `karras=True` works
with every sampler here, including the three discrete ones, which diffusers does not offer it for.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .schedules import dpmsolver_timesteps, interp_sigmas, karras_sigmas, timesteps, training_sigmas

NoiseSource = Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | torch.Generator | None


def _noise_fn(noise: NoiseSource, x: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Normalise a noise source to a callable noise(sigma, sigma_next) -> standard normal like x."""
    if noise is None:
        return lambda sigma, sigma_next: torch.randn_like(x)
    if isinstance(noise, torch.Generator):
        return lambda sigma, sigma_next: torch.randn(
            x.shape, generator=noise, dtype=x.dtype, device=noise.device).to(x.device)
    return noise


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE, (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 1 with the
    score of eq. 3 and sigma(t) = t)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """(sigma_down, sigma_up) splitting a step from sigma to sigma_next into a deterministic step to
    sigma_down and fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2. eta = 1 is
    the DDPM posterior (Ho et al. 2020, eq. 7); eta scales its std as in DDIM (Song et al. 2021, eq. 16)."""
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def _setup(x, sigmas, extra_args, noise):
    """(s_in, extra_args, noise): s_in turns a step's sigma into a per-sample batch in the schedule's
    dtype, so a half-precision x does not round the noise levels the denoiser sees."""
    s_in = torch.ones(x.shape[0], dtype=sigmas.dtype, device=x.device)
    return s_in, extra_args or {}, _noise_fn(noise, x)


def _report(callback, i, x, sigma, denoised):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


def _churn(x, sigma, n_steps, noise, s_churn, s_tmin, s_tmax, s_noise):
    """Raise the noise level from sigma to sigma_hat = (1 + gamma) sigma by adding fresh noise
    (Karras et al. 2022, algorithm 2, lines 4-6). Returns (x_hat, sigma_hat)."""
    gamma = min(s_churn / n_steps, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise(sigma, sigma_hat) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
    return x, sigma_hat


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, noise=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler steps on the probability-flow ODE, with optional churn (Karras et al. 2022, algorithm 2
    without the second-order correction)."""
    s_in, extra_args, noise = _setup(x, sigmas, extra_args, noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, sigma_hat = _churn(x, sigma, len(sigmas) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        x = x + to_d(x, sigma_hat, denoised) * (sigma_next - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_a(model, x, sigmas, extra_args=None, callback=None, noise=None, eta=1.0, s_noise=1.0):
    """Ancestral Euler: an Euler step to sigma_down, then fresh noise up to sigma_next (k-diffusion's
    sample_euler_ancestral; see `ancestral_step`)."""
    s_in, extra_args, noise = _setup(x, sigmas, extra_args, noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, noise=None):
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x_0) (Ho et al. 2020, eq. 6-7).

    Divided through by sqrt(alpha_bar), eq. 7 becomes: mean = x_0 + (s/t)^2 (x_t - x_0) and
    variance = s^2 (1 - (s/t)^2) for sigmas t -> s (fixed_small variance, beta tilde). This is the
    eta = 1 ancestral step in other words, but on DDPM's own timestep grid.
    """
    s_in, extra_args, noise = _setup(x, sigmas, extra_args, noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        ratio = (sigma_next / sigma) ** 2
        x = denoised + ratio * (x - denoised)
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * (sigma_next ** 2 * (1 - ratio)) ** 0.5
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, noise=None, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12): x_s = sqrt(a_s) x_0 + sqrt(1 - a_s - std^2) eps + std * n.

    Divided by sqrt(a_s) it reads x_s = x_0 + sigma_down * eps + sigma_up * n (`ancestral_step` with
    this eta); eta = 0 is deterministic and equal to an Euler step.
    """
    s_in, extra_args, noise = _setup(x, sigmas, extra_args, noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + to_d(x, sigma, denoised) * sigma_down
        if eta > 0 and sigma_next > 0:
            x = x + noise(sigma, sigma_next) * sigma_up
    return x


# Adams-Bashforth weights of PNDM's pseudo linear multistep, newest output first (Liu et al. 2022, eq. 12).
_PLMS_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def prediction_type(model) -> str:
    """What the network under a chain of denoiser wrappers (each holding `inner_model`) predicts:
    "epsilon" or "v_prediction" (epsilon where no wrapper says)."""
    while model is not None:
        if isinstance(getattr(model, "prediction_type", None), str):
            return model.prediction_type
        model = getattr(model, "inner_model", None)
    return "epsilon"


@torch.no_grad()
def sample_plms(model, x, sigmas, extra_args=None, callback=None, noise=None):
    """Pseudo linear multistep (PNDM, Liu et al. 2022, eq. 12) as diffusers runs it with skip_prk_steps:
    a pseudo improved Euler (Heun) first step instead of the Runge-Kutta warm-up, then Adams-Bashforth of
    rising order up to 4. PNDM's transfer function (eq. 9) is a DDIM step, which divided by
    sqrt(alpha_bar) reads x + eps * (sigma_next - sigma); and eps = dx/dsigma on this axis.

    The multistep combines what the network outputs: eps, or for a v-network v, which is turned into eps
    afterwards with the current sample, eps = (v + sigma x / sqrt(sigma^2 + 1)) / sqrt(sigma^2 + 1) (the
    VE form of eps = alpha v + sigma_vp x_vp), as diffusers' PNDMScheduler does."""
    s_in, extra_args, noise = _setup(x, sigmas, extra_args, noise)
    v_space = prediction_type(model) == "v_prediction"

    def output(x, sigma, denoised):  # the network's own output, from the x_0 estimate
        d = to_d(x, sigma, denoised)
        return (d - sigma * denoised) * (sigma ** 2 + 1) ** -0.5 if v_space else d

    def eps(out, x, sigma):
        return (out + sigma * x * (sigma ** 2 + 1) ** -0.5) * (sigma ** 2 + 1) ** -0.5 if v_space else out

    outs = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        out = output(x, sigma, denoised)
        outs = (outs + [out])[-4:]
        if i == 0 and len(sigmas) > 2:  # pseudo improved Euler start; its second output is not kept
            x_2 = x + eps(out, x, sigma) * (sigma_next - sigma)
            out_2 = output(x_2, sigma_next, model(x_2, sigma_next * s_in, **extra_args))
            x = x + eps((out + out_2) / 2, x, sigma) * (sigma_next - sigma)
            continue
        out = sum(w * o for w, o in zip(_PLMS_WEIGHTS[len(outs)], reversed(outs)))
        x = x + eps(out, x, sigma) * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, noise=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun's second-order method (Karras et al. 2022, algorithm 2); an Euler step into sigma = 0."""
    s_in, extra_args, noise = _setup(x, sigmas, extra_args, noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, sigma_hat = _churn(x, sigma, len(sigmas) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        d = to_d(x, sigma_hat, denoised)
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next * s_in, **extra_args))
        x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm2(model, x, sigmas, extra_args=None, callback=None, noise=None):
    """DPM-Solver-2 (Lu et al. 2022, "DPM-Solver", algorithm 1 with r = 1/2) written as Karras et al. 2022,
    algorithm 2 writes Heun (k-diffusion's sample_dpm_2): an Euler step to the midpoint in log sigma (the
    geometric mean of sigma and sigma_next), a new derivative there, then the full step with it.
    An Euler step into sigma = 0."""
    s_in, extra_args, noise = _setup(x, sigmas, extra_args, noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
            continue
        sigma_mid = sigma_next.log().lerp(sigma.log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigma)
        d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
        x = x + d_2 * (sigma_next - sigma)
    return x


def lms_coefficient(sigmas: torch.Tensor, i: int, j: int, order: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial through sigma_i, ...,
    sigma_{i-order+1} that is 1 at sigma_{i-j}: the weight of d_{i-j} in the variable-step Adams-Bashforth
    method (Hairer, Norsett & Wanner, "Solving ODEs I", sec. III.5; k-diffusion's linear_multistep_coeff).
    Integrated exactly: the integrand is a polynomial."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    basis = np.polynomial.Polynomial([1.0])
    for k, s in enumerate(nodes):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-s, 1.0]) / (nodes[j] - s)  # (tau - s) / (s_j - s)
    antiderivative = basis.integ()
    return float(antiderivative(float(sigmas[i + 1])) - antiderivative(float(sigmas[i])))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, noise=None, order=4):
    """Linear multistep on dx/dsigma with up to `order` past derivatives, weighted by `lms_coefficient`
    (k-diffusion's sample_lms)."""
    s_in, extra_args, noise = _setup(x, sigmas, extra_args, noise)
    ds = []
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        ds = (ds + [to_d(x, sigma, denoised)])[-order:]
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(sigmas, i, j, cur_order) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, noise=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2), in lambda = -log sigma:
    x_next = (sigma_next / sigma) x - expm1(-h) D with D = (1 + 1/2r) x0_i - 1/2r x0_{i-1}, r = h_{i-1} / h.
    First order on the first step; the step into sigma = 0 returns the last x_0 estimate."""
    s_in, extra_args, noise = _setup(x, sigmas, extra_args, noise)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        d = denoised
        if old_denoised is not None:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, noise=None,
                        eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", sec. 5 / appendix, as in diffusers'
    "sde-dpmsolver++" and k-diffusion's sample_dpmpp_2m_sde): per step
    x_next = (sigma_next/sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) (x0 + c D1) + sigma_next sqrt(1 - e^{-2 eta h}) n,
    with the second-order correction D1 = (x0_i - x0_{i-1}) / r and c = 1/2 ("midpoint") or
    (1 - e^{-(1+eta) h}) / (-(1+eta) h) + 1 over (1 - e^{-(1+eta) h}) ("heun")."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', not {solver_type!r}")
    s_in, extra_args, noise = _setup(x, sigmas, extra_args, noise)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        eta_h = eta * h
        decay = -torch.expm1(-h - eta_h)  # 1 - e^{-(1 + eta) h}
        x = sigma_next / sigma * torch.exp(-eta_h) * x + decay * denoised
        if old_denoised is not None:
            d1 = (denoised - old_denoised) / (h_last / h)
            x = x + (0.5 * decay if solver_type == "midpoint" else decay / (-h - eta_h) + 1) * d1
        if eta > 0:
            x = x + noise(sigma, sigma_next) * sigma_next * (-torch.expm1(-2 * eta_h)) ** 0.5 * s_noise
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, noise=None, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++(2S) with ancestral noise, the "DPM++ SDE" of k-diffusion and diffusers'
    DPMSolverSDEScheduler (Lu et al. 2022, "DPM-Solver++", algorithm 1 with SDE steps): a first-order
    step to lambda + r h, then a full step with the x_0 estimate mixed from both evaluations.
    An Euler step into sigma = 0."""
    s_in, extra_args, noise = _setup(x, sigmas, extra_args, noise)
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        t, t_next = t_fn(sigma), t_fn(sigma_next)
        s = t + (t_next - t) * r
        # Step 1: to the intermediate level sigma_fn(s).
        sigma_down, sigma_up = ancestral_step(sigma_fn(t), sigma_fn(s), eta)
        s_ = t_fn(sigma_down)
        x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - torch.expm1(t - s_) * denoised
        x_2 = x_2 + noise(sigma_fn(t), sigma_fn(s)) * s_noise * sigma_up
        denoised_2 = model(x_2, sigma_fn(s) * s_in, **extra_args)
        # Step 2: the full step with the mixed estimate.
        sigma_down, sigma_up = ancestral_step(sigma_fn(t), sigma_fn(t_next), eta)
        t_next_ = t_fn(sigma_down)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sigma_fn(t_next_) / sigma_fn(t)) * x - torch.expm1(t - t_next_) * denoised_d
        x = x + noise(sigma_fn(t), sigma_fn(t_next)) * s_noise * sigma_up
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpm2": sample_dpm2,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_sde": sample_dpmpp_sde,
}

# Which diffusers timestep grid each sampler's scheduler uses (see schedules.py).
_DISCRETE = ("ddpm", "ddim", "plms")  # whole timesteps, sigmas read off the training table
_DPMSOLVER = ("dpmpp_2m", "dpmpp_2m_sde")  # DPMSolverMultistep's own n + 1 grid; Karras over the full range


def _train_sigmas(denoiser_or_config) -> torch.Tensor:
    if isinstance(denoiser_or_config, torch.Tensor):
        return denoiser_or_config.float()
    if hasattr(denoiser_or_config, "sigmas"):
        return denoiser_or_config.sigmas.detach().float().cpu()
    return training_sigmas(denoiser_or_config)


def get_sigmas(denoiser_or_config, steps: int, sampler: str = "euler", karras: bool = False,
               spacing: str = "leading", steps_offset: int = 1, rho: float = 7.0) -> torch.Tensor:
    """The steps + 1 descending sigmas (last one 0) that `sampler`'s diffusers scheduler visits.

    `denoiser_or_config`: a denoiser (its `.sigmas`), a ModelConfig, or a tensor of training sigmas.
    Defaults follow Stable Diffusion's scheduler config (`leading` spacing, steps_offset=1). With
    `karras=True` the sigmas are Karras et al. 2022 eq. 5 between the extremes of the spaced schedule
    (the full training range for the DPM-Solver samplers, as diffusers does).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    train = _train_sigmas(denoiser_or_config)
    T = len(train)
    if sampler in _DPMSOLVER:
        t = dpmsolver_timesteps(steps, T, spacing, steps_offset)
    else:
        t = timesteps(steps, T, spacing, steps_offset, integer=sampler in _DISCRETE)
    sigmas = interp_sigmas(t, train)
    if karras:
        lo, hi = (train[0].item(), train[-1].item()) if sampler in _DPMSOLVER else (sigmas[-1].item(), sigmas[0].item())
        sigmas = karras_sigmas(steps, lo, hi, rho).double()
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def init_noise_sigma(sigmas: torch.Tensor, sampler: str = "euler", spacing: str = "leading") -> torch.Tensor:
    """Scale of the initial noise: x = noise * this. sqrt(sigma_max^2 + 1) is the std of x_0 + sigma n for
    unit-variance data (what DDPM's x_T = n means on the VE axis); diffusers' k-style schedulers use
    sigma_max itself with `linspace` and `trailing` spacing, and this function follows them."""
    sigma_max = sigmas.max()
    if sampler not in _DISCRETE + _DPMSOLVER and spacing in ("linspace", "trailing"):
        return sigma_max
    return (sigma_max ** 2 + 1) ** 0.5

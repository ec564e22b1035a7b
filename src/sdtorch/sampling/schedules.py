"""Noise schedules: training betas, the sigmas they imply, and the sigma grids samplers walk.

Everything here is a plain function that returns a tensor. A DDPM schedule of betas defines
alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4); written in the variance-exploding
form of Karras et al. 2022 (x_sigma = x_0 + sigma * eps), the same noise level is
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t). Samplers in this package work on that sigma axis.

The timestep spacings reproduce diffusers' `set_timesteps` to the bit, because a reproduction of a
diffusers pipeline is only exact if the UNet sees the same timesteps:

- `leading`: t = [0, r, 2r, ...] + steps_offset with r = T // n (DDPM/DDIM default; SD uses offset 1);
- `trailing`: t = round(T, T - T/n, ...) - 1, which always starts at the last training step;
- `linspace`: t = linspace(0, T - 1, n), fractional unless the step count divides T - 1.

See Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace")


def linear_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """beta_t linear in t (Ho et al. 2020, sec. 4: 1e-4 to 0.02 over 1000 steps)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> torch.Tensor:
    """sqrt(beta_t) linear in t, the schedule Stable Diffusion was trained with (LDM, 0.00085 to 0.012)."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2


def cosine_betas(num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2),
    beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), clipped at max_beta (diffusers' "squaredcos_cap_v2")."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def betas_for(schedule: str, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
              beta_end: float = 0.012) -> torch.Tensor:
    """Betas by schedule name: "linear", "scaled_linear" or "cosine" (alias "squaredcos_cap_v2")."""
    if schedule == "linear":
        return linear_betas(num_train_timesteps, beta_start, beta_end)
    if schedule == "scaled_linear":
        return scaled_linear_betas(num_train_timesteps, beta_start, beta_end)
    if schedule in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(num_train_timesteps)
    raise ValueError(f"unknown beta schedule {schedule!r}; expected linear, scaled_linear or cosine")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4), in float32 like the reference."""
    return torch.cumprod(1.0 - betas.float(), dim=0)


def sigmas_from_alphas_cumprod(alphas_bar: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): the VP noise level in VE units (Karras et al. 2022,
    table 1, "VP" column with x scaled by 1/sqrt(alpha_bar)). Ascending in t."""
    return ((1 - alphas_bar) / alphas_bar) ** 0.5


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Inverse of `sigmas_from_alphas_cumprod`: alpha_bar = 1 / (1 + sigma^2)."""
    return 1 / (1 + sigmas ** 2)


def training_sigmas(config) -> torch.Tensor:
    """The discrete training sigmas of a ModelConfig (fields num_train_timesteps, beta_*)."""
    betas = betas_for(config.beta_schedule, config.num_train_timesteps, config.beta_start, config.beta_end)
    return sigmas_from_alphas_cumprod(alphas_cumprod(betas))


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho)
    (Karras et al. 2022, eq. 5, rho = 7). No trailing zero."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).float()


def timesteps(n: int, num_train_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 0,
              integer: bool = True) -> torch.Tensor:
    """Descending timesteps of an n-step schedule, as diffusers' `set_timesteps` computes them.

    `integer=True` rounds `linspace` to whole steps as DDPM/DDIM/PNDM do; the k-style schedulers
    (Euler, Heun, LMS, ...) keep the fractional linspace values (`integer=False`). Returns float64.
    """
    T = num_train_timesteps
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n, dtype=np.float64 if integer else np.float32)
        t = t.round() if integer else t
    elif spacing == "leading":
        t = np.arange(0, n) * (T // n) + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    t = np.sort(np.asarray(t, dtype=np.float64))[::-1]
    return torch.from_numpy(t.copy())


def interp_sigmas(t: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """sigma at (possibly fractional) timesteps, linear in sigma between training steps
    (what diffusers' k-style schedulers do; exact at whole timesteps). Returns float64."""
    grid = np.arange(len(train_sigmas))
    return torch.from_numpy(np.interp(t.numpy(), grid, train_sigmas.double().numpy()))


def dpmsolver_timesteps(n: int, num_train_timesteps: int = 1000, spacing: str = "leading",
                        steps_offset: int = 0) -> torch.Tensor:
    """Timesteps of diffusers' DPMSolverMultistepScheduler, which spaces n + 1 points and drops the
    last for `linspace` and `leading` (so its grid differs from the other schedulers'). Float64."""
    T = num_train_timesteps
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        t = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        t = np.arange(T, 0, -T / n).round() - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    return torch.from_numpy(np.asarray(t, dtype=np.float64).copy())

"""Sampling: noise schedules, denoiser wrappers (eps, v, classifier-free guidance, inpainting blend) and samplers.

    den = EpsDenoiser.from_config(unet, config)             # or denoiser_for(unet, config)
    sigmas = get_sigmas(den, 20, "dpmpp_2m", karras=True)
    x = torch.randn(1, 4, 64, 64) * init_noise_sigma(sigmas, "dpmpp_2m")
    latents = SAMPLERS["dpmpp_2m"](CFGDenoiser(den, 7.5), x, sigmas,
                                   extra_args={"context": cond, "uncond": uncond})
"""

from .denoisers import (CFGDenoiser, DiscreteDenoiser, EpsDenoiser, InpaintBlend, VDenoiser, append_dims,
                        denoiser_for, rescale_guidance)
from .samplers import (SAMPLERS, ancestral_step, get_sigmas, init_noise_sigma, lms_coefficient, sample_ddim,
                       sample_ddpm, sample_dpm2, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_sde,
                       sample_euler, sample_euler_a, sample_heun, sample_lms, sample_plms, to_d)
from .schedules import (alphas_cumprod, alphas_cumprod_from_sigmas, betas_for, cosine_betas, dpmsolver_timesteps,
                        interp_sigmas, karras_sigmas, linear_betas, scaled_linear_betas, sigmas_from_alphas_cumprod,
                        timesteps, training_sigmas)

__all__ = [
    "SAMPLERS", "CFGDenoiser", "DiscreteDenoiser", "EpsDenoiser", "InpaintBlend", "VDenoiser",
    "alphas_cumprod", "alphas_cumprod_from_sigmas", "ancestral_step", "append_dims", "betas_for", "cosine_betas",
    "denoiser_for", "dpmsolver_timesteps", "get_sigmas", "init_noise_sigma", "interp_sigmas", "karras_sigmas",
    "linear_betas", "lms_coefficient", "rescale_guidance", "sample_ddim", "sample_ddpm", "sample_dpm2",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_sde", "sample_euler", "sample_euler_a",
    "sample_heun", "sample_lms", "sample_plms", "scaled_linear_betas", "sigmas_from_alphas_cumprod",
    "timesteps", "to_d", "training_sigmas",
]

"""Samplers, denoisers and schedules against diffusers' schedulers, plus seeded whole-loop checks.

Both sides get the same network (a tiny random sdtorch UNet, or a smooth fixed function), the same
initial noise and the same injected noise (diffusers draws from a torch.Generator, sdtorch from an
identically seeded one; DPMSolverSDE's Brownian tree is shared by constructing the same one), and
must end on the same latents up to float32 rounding (`parity_tol`).
"""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdtorch.config import TINY
from sdtorch.models import UNet
from sdtorch.sampling import (SAMPLERS, CFGDenoiser, EpsDenoiser, VDenoiser, alphas_cumprod, betas_for,
                              get_sigmas, init_noise_sigma, karras_sigmas, rescale_guidance,
                              sigmas_from_alphas_cumprod, timesteps)

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # numpy 2 vs diffusers' np.array(tensor)
              pytest.mark.filterwarnings("ignore:Should have ta>=t0"),  # torchsde, queried at its exact ends
              pytest.mark.usefixtures("one_thread")]  # the tiny UNet is ~30x faster on one thread than two contended

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (1, 4, 8, 8)
EPS32 = torch.finfo(torch.float32).eps
HAS_SCIPY = importlib.util.find_spec("scipy") is not None
HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = UNet(TINY.unet).eval()
    context = torch.randn(1, 8, TINY.unet.context_dim, generator=torch.Generator().manual_seed(1))

    def eps(x, t, context=context):
        return net(x, t, context)

    return eps


def smooth(x, t, context=None):
    """A fixed smooth network that ignores t (so the timestep grid cannot matter)."""
    return torch.tanh(0.8 * x) + 0.1 * torch.sin(3 * x)


def initial_noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# The two loops being compared


def run_diffusers(scheduler, model, steps, seed=0, noise_seed=1, **step_kwargs):
    """diffusers' pipeline loop: scale the input, call the network, step."""
    scheduler.set_timesteps(steps)
    x = initial_noise(seed) * scheduler.init_noise_sigma
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(scheduler.scale_model_input(x, t), t)
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def run_sdtorch(name, model, steps, seed=0, noise_seed=1, v=False, karras=False, spacing="leading",
                steps_offset=1, quantize=False, noise=None, **opts):
    denoiser = (VDenoiser if v else EpsDenoiser).from_config(model, TINY, quantize=quantize)
    sigmas = get_sigmas(denoiser, steps, name, karras=karras, spacing=spacing, steps_offset=steps_offset)
    x = initial_noise(seed) * init_noise_sigma(sigmas, name, spacing)
    noise = torch.Generator().manual_seed(noise_seed) if noise is None else noise
    return SAMPLERS[name](denoiser, x, sigmas, noise=noise, **opts)


def scheduler(cls_name, v=False, spacing="leading", steps_offset=1, karras=False, **config):
    cls = getattr(diffusers, cls_name)
    config = dict(SD_SCHEDULE, timestep_spacing=spacing, steps_offset=steps_offset,
                  prediction_type="v_prediction" if v else "epsilon", **config)
    if karras:
        config["use_karras_sigmas"] = True
    return cls(**config)


def max_err(a, b) -> float:
    return (a - b).abs().max().item()


def parity_tol(ref: torch.Tensor, steps: int) -> float:
    """How far two float32 loops of the same method can end apart: each step rounds a handful of ops on
    latents as large as max|x| (the tiny random UNet drives them to ~50), ordered differently on the two
    sides (diffusers divides by sqrt(sigma^2 + 1) and forms (x - x0) / sigma, sdtorch goes through
    c_skip/c_out), so a step can move them apart by about 2 eps * max|x|, and the steps add up. Measured
    over every case here (AVX-512, AVX2 and SSE kernels): 0.1 to 0.4 of this bound; a wrong sampler or
    setting misses by 1e-3 to 10 (test_wrong_*)."""
    return 2 * EPS32 * steps * ref.abs().max().item()


# ------------------------------------------------------------------------------------------------
# Parity with diffusers: (sdtorch sampler, diffusers scheduler, its extra config, sampler opts = step kwargs)

CASES = {
    "ddpm": ("ddpm", "DDPMScheduler", dict(clip_sample=False), {}),
    "ddim": ("ddim", "DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True), dict(eta=0.0)),
    "ddim_eta": ("ddim", "DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True), dict(eta=0.7)),
    "plms": ("plms", "PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=True), {}),
    "euler": ("euler", "EulerDiscreteScheduler", {}, {}),
    "euler_a": ("euler_a", "EulerAncestralDiscreteScheduler", {}, {}),
    "heun": ("heun", "HeunDiscreteScheduler", {}, {}),
    "dpm2": ("dpm2", "KDPM2DiscreteScheduler", {}, {}),
    "lms": ("lms", "LMSDiscreteScheduler", {}, {}),
    "dpmpp_2m": ("dpmpp_2m", "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++"), {}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), {}),
}
KARRAS = ("euler", "heun", "dpm2", "lms", "dpmpp_2m", "dpmpp_2m_sde")  # use_karras_sigmas in diffusers
# DDIM and PNDM step to t - T // n, which is the next listed timestep for `leading` spacing, and for
# `trailing` when n divides T, but not for `linspace`.
OWN_GRID = ("ddim", "ddim_eta", "plms")


def _needs(case):
    if case == "lms" and not HAS_SCIPY:
        pytest.skip("diffusers' LMSDiscreteScheduler needs scipy")


def assert_parity(case, model, steps, spacing="leading", karras=False, v=False, quantize=False, **kw):
    name, cls_name, config, opts = CASES[case]
    ref = run_diffusers(scheduler(cls_name, v=v, spacing=spacing, karras=karras, **config), model, steps, **opts)
    ours = run_sdtorch(name, model, steps, v=v, karras=karras, spacing=spacing, quantize=quantize, **opts, **kw)
    assert torch.isfinite(ours).all()
    err, tol = max_err(ours, ref), parity_tol(ref, steps)
    assert err < tol, f"{case} ({spacing}, karras={karras}, v={v}): max abs error {err:.2e} > {tol:.2e}"
    return err


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_parity_unet(unet, case, spacing):
    _needs(case)
    if spacing == "linspace" and case in OWN_GRID:  # documented divergence (samplers.py docstring)
        with pytest.raises(AssertionError, match="max abs error"):
            assert_parity(case, unet, 10, spacing)
        return
    assert_parity(case, unet, 10, spacing)


# KDPM2 rounds the Karras timesteps of its first stage but not those of its midpoints, which no single
# denoiser reproduces; it is checked with the t-independent model below.
@pytest.mark.parametrize("case", [c for c in KARRAS if c != "dpm2"])
def test_parity_unet_karras(unet, case):
    _needs(case)
    # DPMSolverMultistep calls the network at whole timesteps under Karras sigmas.
    assert_parity(case, unet, 15, karras=True, quantize=case.startswith("dpmpp"))


@pytest.mark.parametrize("case", KARRAS)
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_parity_smooth_karras(case, spacing):
    _needs(case)
    assert_parity(case, smooth, 12, spacing, karras=True)


@pytest.mark.parametrize("case", ["euler", "ddim", "ddim_eta", "plms", "ddpm", "heun", "dpmpp_2m", "euler_a"])
def test_parity_v_prediction(unet, case):
    assert_parity(case, unet, 10, v=True)


@pytest.mark.parametrize("case", ["euler", "euler_a", "heun", "lms"])
def test_parity_fractional_timesteps(unet, case):
    """20 linspace steps put the k-style schedulers at fractional timesteps. diffusers interpolates sigma
    linearly in t there while the denoiser recovers t by interpolating log sigma (k-diffusion), so the
    network sees t off by up to ~1e-3; the sigmas themselves are identical."""
    _needs(case)
    name, cls_name, config, opts = CASES[case]
    ref = run_diffusers(scheduler(cls_name, spacing="linspace", **config), unet, 20, **opts)
    # A modelling difference, not rounding: measured 7e-5 to 9.5e-5 on every kernel path.
    assert max_err(run_sdtorch(name, unet, 20, spacing="linspace", **opts), ref) < 5e-4


@pytest.mark.skipif(not HAS_TORCHSDE, reason="diffusers' DPMSolverSDEScheduler needs torchsde")
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_parity_dpmpp_sde(unet, karras, spacing):
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    ref = run_diffusers(scheduler("DPMSolverSDEScheduler", spacing=spacing, karras=karras, noise_sampler_seed=3),
                        unet, 10)
    sigmas = get_sigmas(TINY, 10, "dpmpp_sde", karras=karras, spacing=spacing)
    tree = BrownianTreeNoiseSampler(initial_noise(), sigmas[sigmas > 0].min().item(), sigmas.max().item(), 3)
    ours = run_sdtorch("dpmpp_sde", unet, 10, karras=karras, spacing=spacing, noise=tree)
    assert max_err(ours, ref) < parity_tol(ref, 10)


def test_parity_guided_loop(unet):
    """CFG as a denoiser wrapper equals diffusers' guidance of the eps prediction, over a whole loop."""
    uncond = torch.randn(1, 8, TINY.unet.context_dim, generator=torch.Generator().manual_seed(7))
    cond = torch.randn(1, 8, TINY.unet.context_dim, generator=torch.Generator().manual_seed(8))

    def guided_eps(x, t):
        e_u, e_c = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
        return e_u + 5.0 * (e_c - e_u)

    ref = run_diffusers(scheduler("EulerDiscreteScheduler"), guided_eps, 8)
    denoiser = CFGDenoiser(EpsDenoiser.from_config(unet, TINY), scale=5.0)
    sigmas = get_sigmas(TINY, 8, "euler")
    x = initial_noise() * init_noise_sigma(sigmas, "euler")
    ours = SAMPLERS["euler"](denoiser, x, sigmas, extra_args={"context": cond, "uncond": uncond})
    assert max_err(ours, ref) < parity_tol(ref, 8)


# ------------------------------------------------------------------------------------------------
# The parity checks can fail


@pytest.mark.parametrize("ours, theirs", [("euler", "heun"), ("ddim", "ddpm"), ("dpmpp_2m", "euler"),
                                          ("lms", "plms"), ("dpm2", "heun")])
def test_wrong_sampler_does_not_match(unet, ours, theirs):
    _needs(theirs)
    _, cls_name, config, opts = CASES[theirs]
    ref = run_diffusers(scheduler(cls_name, **config), unet, 10, **opts)
    assert max_err(run_sdtorch(ours, unet, 10), ref) > 1e-2


def test_wrong_settings_do_not_match(unet):
    ref = run_diffusers(scheduler("EulerDiscreteScheduler"), unet, 10)
    assert max_err(run_sdtorch("euler", unet, 10, karras=True), ref) > 1e-2
    assert max_err(run_sdtorch("euler", unet, 10, v=True), ref) > 1e-2
    assert max_err(run_sdtorch("euler", unet, 10, steps_offset=0), ref) > 1e-3
    ref = run_diffusers(scheduler("EulerAncestralDiscreteScheduler"), unet, 10)
    assert max_err(run_sdtorch("euler_a", unet, 10, noise_seed=2), ref) > 1e-2


# ------------------------------------------------------------------------------------------------
# Seeded whole loops


def seeded_loop(name, seed, model, karras=False):
    gen = torch.Generator().manual_seed(seed)
    denoiser = EpsDenoiser.from_config(model, TINY)
    sigmas = get_sigmas(denoiser, 6, name, karras=karras)
    x = torch.randn(SHAPE, generator=gen) * init_noise_sigma(sigmas, name)
    return SAMPLERS[name](denoiser, x, sigmas, noise=gen)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_seeded_loop(unet, name):
    a, b = seeded_loop(name, 0, unet), seeded_loop(name, 0, unet)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, seeded_loop(name, 1, unet))
    k = seeded_loop(name, 0, unet, karras=True)
    assert torch.isfinite(k).all() and not torch.allclose(a, k)


def test_callback_sees_every_step(unet):
    seen = []
    sigmas = get_sigmas(TINY, 5, "heun")
    SAMPLERS["heun"](EpsDenoiser.from_config(unet, TINY), initial_noise() * sigmas[0], sigmas,
                     callback=lambda info: seen.append((info["i"], info["sigma"].item())))
    assert seen == [(i, s) for i, s in enumerate(sigmas[:-1].tolist())]


# ------------------------------------------------------------------------------------------------
# Denoisers and guidance


@torch.no_grad()
def test_cfg_is_one_batched_call(unet):
    calls = []

    def counting(x, t, context):
        calls.append(x.shape[0])
        return unet(x, t, context)

    den = EpsDenoiser.from_config(counting, TINY)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(2, 8, 32, generator=g), torch.randn(2, 8, 32, generator=g)
    sigma = torch.tensor([3.0, 0.5])
    guided = CFGDenoiser(den, scale=6.0)(x, sigma, context=cond, uncond=uncond)
    assert calls == [4]
    # The same batch of 4 as CFG, so the same kernels: exact. (Separate batches of 2 would round
    # differently inside the network, by an amount that depends on the CPU's kernels.)
    d_u, d_c = den(torch.cat([x, x]), torch.cat([sigma, sigma]), context=torch.cat([uncond, cond])).chunk(2)
    assert torch.equal(guided, d_u + 6.0 * (d_c - d_u))
    d_c = den(x, sigma, context=cond)
    calls.clear()
    assert torch.equal(CFGDenoiser(den, scale=1.0)(x, sigma, context=cond, uncond=uncond), d_c)
    assert calls == [2]  # scale 1: the conditional pass alone


def test_guidance_rescale_formula():
    g = torch.Generator().manual_seed(4)
    cfg, cond = torch.randn(2, 4, 8, 8, generator=g) * 3, torch.randn(2, 4, 8, 8, generator=g)
    out = rescale_guidance(cfg, cond, 0.7)
    for b in range(2):  # eq. 15-16 per sample, by hand
        rescaled = cfg[b] * cond[b].std() / cfg[b].std()
        assert max_err(out[b], 0.7 * rescaled + 0.3 * cfg[b]) < 1e-5
    assert torch.allclose(rescale_guidance(cfg, cond, 1.0).std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    assert torch.equal(rescale_guidance(cfg, cond, 0.0), cfg)
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    assert max_err(out, rescale_noise_cfg(cfg, cond, guidance_rescale=0.7)) < 1e-6


@torch.no_grad()
def test_cfg_rescale_applies_to_guided_output(unet):
    den = EpsDenoiser.from_config(unet, TINY)
    x, ctx = initial_noise(), torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(5))
    plain = CFGDenoiser(den, scale=7.0)(x, 2.0, context=ctx, uncond=ctx * 0)
    rescaled = CFGDenoiser(den, scale=7.0, rescale=0.5)(x, 2.0, context=ctx, uncond=ctx * 0)
    sigma = torch.tensor([2.0, 2.0])  # the conditional estimate from CFG's own batch of 2: exact
    d_cond = den(torch.cat([x, x]), sigma, context=torch.cat([ctx * 0, ctx]))[1:]
    assert torch.equal(rescaled, rescale_guidance(plain, d_cond, 0.5))


@pytest.mark.parametrize("v", [False, True])
def test_denoiser_scalings(v):
    """A network that predicts exactly eps (or v) for x = x0 + sigma n gives back x0."""
    g = torch.Generator().manual_seed(6)
    x0, n = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    sigma = torch.tensor([2.5])
    x = x0 + sigma * n
    alpha, sigma_vp = (1 + sigma ** 2) ** -0.5, sigma * (1 + sigma ** 2) ** -0.5
    target = alpha * n - sigma_vp * x0 if v else n
    den = (VDenoiser if v else EpsDenoiser).from_config(lambda x_in, t: target, TINY)
    assert max_err(den(x, sigma), x0) < 1e-5


def test_half_precision_sample_keeps_float32_sigmas():
    seen = []

    def net(x, t):
        seen.append((x.dtype, t))
        return smooth(x, t)

    sigmas = get_sigmas(TINY, 6, "dpmpp_2m")
    x = (initial_noise() * init_noise_sigma(sigmas, "dpmpp_2m")).bfloat16()
    out = SAMPLERS["dpmpp_2m"](EpsDenoiser.from_config(net, TINY), x, sigmas)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(dtype == torch.bfloat16 for dtype, _ in seen)
    ts = torch.cat([t for _, t in seen])
    assert torch.equal(ts, ts.round()) and ts.dtype == torch.float32  # whole timesteps, not bf16-rounded


def test_sigma_timestep_conversion():
    den = EpsDenoiser.from_config(smooth, TINY)
    t = torch.arange(1000, dtype=torch.float32)
    assert torch.equal(den.sigma_to_t(den.sigmas), t)  # whole timesteps stay whole
    assert torch.equal(den.t_to_sigma(t), den.sigmas)
    assert den.sigma_min == den.sigmas[0] and den.sigma_max == den.sigmas[-1]
    # Karras sigmas map to the same fractional timesteps as diffusers' _sigma_to_t.
    ref = scheduler("EulerDiscreteScheduler", spacing="linspace", karras=True)
    ref.set_timesteps(12)
    assert max_err(den.sigma_to_t(ref.sigmas[:-1]), ref.timesteps) < 2e-3
    q = EpsDenoiser.from_config(smooth, TINY, quantize=True).sigma_to_t(ref.sigmas[:-1])
    assert torch.equal(q, ref.timesteps.round())


@settings(max_examples=30, deadline=None)
@given(st.floats(min_value=0.0, max_value=999.0))
def test_t_sigma_round_trip(t):
    den = EpsDenoiser.from_config(smooth, TINY)
    t = torch.tensor([t])
    assert abs(den.sigma_to_t(den.t_to_sigma(t)).item() - t.item()) < 1e-2


# ------------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("schedule, ref_name", [("linear", "linear"), ("scaled_linear", "scaled_linear"),
                                                ("cosine", "squaredcos_cap_v2")])
def test_betas_match_diffusers(schedule, ref_name):
    ref = diffusers.DDPMScheduler(beta_schedule=ref_name, beta_start=0.00085, beta_end=0.012)
    betas = betas_for(schedule, 1000, 0.00085, 0.012)
    assert torch.equal(betas, ref.betas)
    assert torch.equal(alphas_cumprod(betas), ref.alphas_cumprod)


def test_sd_sigma_range():
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod(betas_for("scaled_linear")))
    assert abs(sigmas[0].item() - 0.0292) < 1e-4 and abs(sigmas[-1].item() - 14.6146) < 1e-3


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [7, 10, 25])
def test_timesteps_match_diffusers(spacing, steps):
    ddim = diffusers.DDIMScheduler(**SD_SCHEDULE, timestep_spacing=spacing, steps_offset=1)
    ddim.set_timesteps(steps)
    assert torch.equal(timesteps(steps, 1000, spacing, 1).long(), ddim.timesteps)
    euler = scheduler("EulerDiscreteScheduler", spacing=spacing)
    euler.set_timesteps(steps)
    assert torch.equal(timesteps(steps, 1000, spacing, 1, integer=False).float(), euler.timesteps)


@pytest.mark.parametrize("name, cls_name", [("euler", "EulerDiscreteScheduler"),
                                            ("dpmpp_2m", "DPMSolverMultistepScheduler")])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("karras", [False, True])
def test_get_sigmas_match_diffusers(name, cls_name, spacing, karras):
    ref = scheduler(cls_name, spacing=spacing, karras=karras)
    ref.set_timesteps(13)
    sigmas = get_sigmas(TINY, 13, name, karras=karras, spacing=spacing)
    assert sigmas[-1] == 0 and len(sigmas) == 14
    assert torch.allclose(sigmas, ref.sigmas, rtol=1e-6, atol=0)


def test_karras_sigmas_eq5():
    s = karras_sigmas(5, 0.1, 10.0, rho=7.0)
    assert torch.allclose(s[[0, -1]], torch.tensor([10.0, 0.1]))
    inv = s.double() ** (1 / 7)
    assert torch.allclose(inv.diff(), inv.diff()[0].expand(4))  # evenly spaced in sigma^(1/rho)


def test_get_sigmas_accepts_config_denoiser_or_tensor():
    den = EpsDenoiser.from_config(smooth, TINY)
    a = get_sigmas(TINY, 9, "lms")
    assert torch.equal(a, get_sigmas(den, 9, "lms"))
    assert torch.equal(a, get_sigmas(den.sigmas, 9, "lms"))
    with pytest.raises(ValueError):
        get_sigmas(TINY, 9, "nope")

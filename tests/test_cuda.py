"""The same code on a CUDA GPU: skipped where none is visible (every CPU machine, CI); `benchmarks/gpu.sh` runs it.

A GPU's kernels (cuDNN convolutions, cuBLAS products, fused attention) sum in other orders than the CPU's, and TF32
may be used for fp32 products on Ampere and later, so GPU and CPU images agree to rounding, not bit for bit. The
bounds: fp32 GPU against fp32 CPU images within 2e-2 (TF32 keeps 10 mantissa bits, ~1e-3 relative per product,
over a few steps of a small network); fp16 images at least 30 dB PSNR from fp32 ones (the quality guard the
performance work holds every reduced precision to).
"""

from __future__ import annotations

import pytest
import torch

import sdtorch
from sdtorch import generation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
PROMPT = "a large red circle in the center on a white background"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float().cpu() - b.float().cpu()).pow(2).mean().clamp_min(1e-12)
    return float(10 * torch.log10(1 / mse))


@pytest.fixture(scope="module")
def cpu_images():
    return sdtorch.load("shapes").txt2img(PROMPT, seed=3, batch_size=2, output_type="tensor")


def test_builtin_model_on_cuda_matches_the_cpu(cpu_images):
    model = sdtorch.load("shapes", dtype="fp32", device="cuda")
    assert next(model.unet.parameters()).is_cuda and next(model.text_encoder.parameters()).is_cuda
    images = model.txt2img(PROMPT, seed=3, batch_size=2, output_type="tensor")
    assert images.device.type == "cpu" and images.shape == cpu_images.shape
    assert (images - cpu_images).abs().max() <= 2e-2


def test_fp16_auto_on_cuda_keeps_the_pictures(cpu_images):
    model = sdtorch.load("shapes", dtype="auto", device="cuda")
    assert next(model.unet.parameters()).dtype == torch.float16
    images = model.txt2img(PROMPT, seed=3, batch_size=2, output_type="tensor")
    assert torch.isfinite(images).all() and psnr(images, cpu_images) >= 30


def test_batched_mode_tiling_inpainting_and_lora_on_cuda(tmp_path):
    from PIL import Image

    model = sdtorch.load("shapes", device="cuda")
    per_image = model.txt2img(PROMPT, seed=5, batch_size=3, output_type="tensor")
    batched = model.txt2img(PROMPT, seed=5, batch_size=3, batch_mode="batched", output_type="tensor")
    assert (batched - per_image).abs().max() <= 2e-2
    tiled = model.txt2img(PROMPT, seed=5, width=256, height=256, vae_tiling=True, output_type="tensor")
    assert tiled.shape == (1, 3, 256, 256) and torch.isfinite(tiled).all()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    painted = model.inpaint(Image.new("RGB", (64, 64), "white"), mask, PROMPT, seed=1, output_type="tensor")
    assert torch.isfinite(painted).all()
    cpu = sdtorch.load("shapes")
    lora = tmp_path / "l.safetensors"
    _tiny_lora(cpu, lora)
    report = model.load_lora(lora)
    assert sum(report.matched.values()) > 0
    with_lora = model.txt2img(PROMPT, seed=5, output_type="tensor")
    assert not torch.equal(with_lora, per_image[:1])


def _tiny_lora(model, path) -> None:
    """A LoRA with random up weights on the UNet's attention, written in kohya's format."""
    from sdtorch.lora import adapters, formats

    net = adapters.create_network(model, adapters.targets(model), rank=2, alpha=2.0, seed=0)
    with torch.no_grad():
        for m in net.adapters.values():
            m.up.weight.normal_(std=0.3)
    formats.write_lora(path, adapters.network_weights(net))


def test_the_generation_request_runs_in_the_gpu_memory_it_reports():
    model = sdtorch.load("shapes", device="cuda")
    torch.cuda.reset_peak_memory_stats()
    result = generation.generate(model, generation.resolve(PROMPT, model, seed=0))
    assert result.images.shape == (1, 3, 64, 64)
    assert torch.cuda.max_memory_allocated() < 1 << 30, "the built-in model needs well under 1 GiB"

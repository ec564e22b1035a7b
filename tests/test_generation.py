"""The three pipelines on a tiny random model: shapes, seeds, batch independence, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sdtorch
import sdtorch.generation
import sdtorch.sampling
import sdtorch.images


@pytest.fixture(scope="module")
def tiny():
    return sdtorch.build("tiny")


@pytest.fixture(scope="module")
def tiny_inpaint():
    return sdtorch.build(sdtorch.TINY.replace(unet={"in_channels": 9}))


def test_txt2img_is_reproducible_and_batch_independent(tiny):
    a = tiny.txt2img("a red circle", steps=4, seed=7, output_type="tensor")
    b = tiny.txt2img("a red circle", steps=4, seed=7, output_type="tensor")
    assert a.shape == (1, 3, 64, 64) and torch.equal(a, b)
    batch = tiny.txt2img("a red circle", steps=4, seed=6, batch_size=2, output_type="tensor")
    result = sdtorch.generation.generate(tiny, sdtorch.generation.resolve("a red circle", tiny, steps=4, seed=6,
                                                                            batch_size=2))
    assert result.seeds == [6, 7] and torch.equal(result.images, batch), "the same images as the Python API"
    assert not hasattr(tiny, "last_seeds"), "no per-call state on the model"
    assert torch.equal(batch[1:], a), "image 2 of a batch must equal the single image of its seed"
    assert not torch.equal(batch[0], batch[1])
    other = tiny.txt2img("a blue square", steps=4, seed=7, output_type="tensor")
    assert not torch.equal(other, a)


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_sde", "ddim"])
def test_every_kind_of_sampler_runs_seeded(tiny, sampler):
    a = tiny.txt2img("x", steps=3, seed=1, sampler=sampler, output_type="tensor", width=32, height=48)
    assert a.shape == (1, 3, 48, 32) and torch.isfinite(a).all()
    assert torch.equal(a, tiny.txt2img("x", steps=3, seed=1, sampler=sampler, output_type="tensor",
                                       width=32, height=48))


def test_img2img_strength(tiny):
    src = Image.new("RGB", (64, 64), (200, 30, 30))
    zero = tiny.img2img(src, "x", strength=0.0, steps=4, seed=0, output_type="tensor")
    full = tiny.img2img(src, "x", strength=1.0, steps=4, seed=0, output_type="tensor")
    # Strength 0 runs no step: a VAE round trip through the pipeline's scaled latents, the same ops on the
    # same inputs, so exact (the unscaled mode differs from (mode * s) / s by an ulp, which the decoder
    # amplifies by a factor that depends on the weights).
    scale = tiny.config.vae.scaling_factor
    latents = tiny.vae.encode(sdtorch.images.to_tensor(src)).mode() * scale
    assert torch.equal(zero, sdtorch.generation.decode(tiny.vae, latents / scale))
    assert not torch.equal(full, zero)
    pil = tiny.img2img(src, "x", strength=0.5, steps=4, seed=0)
    assert isinstance(pil[0], Image.Image) and pil[0].size == (64, 64)


@pytest.mark.parametrize("which", ["blend", "nine_channel"])
def test_inpaint_keeps_or_conditions_on_known_region(which, tiny, tiny_inpaint):
    model = tiny if which == "blend" else tiny_inpaint
    src = Image.new("RGB", (64, 64), (30, 30, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half
    out = model.inpaint(src, mask, "x", steps=4, seed=0, output_type="tensor")
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    assert not torch.equal(out, model.inpaint(src, mask, "x", steps=4, seed=1, output_type="tensor"))
    with pytest.raises(sdtorch.SDTorchError, match="does not match"):
        model.inpaint(src, Image.new("L", (32, 32)), "x", steps=2)


def test_inpaint_blend_returns_source_in_known_region():
    source, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    seen = []
    blend = sdtorch.sampling.InpaintBlend(lambda x, s, **kw: seen.append(x) or torch.randn_like(x),
                                          source, mask, noise)
    out = blend(torch.randn(1, 4, 8, 8), torch.tensor([2.0]))
    assert torch.equal(out[..., 4:], source[..., 4:])
    assert torch.allclose(seen[0][..., 4:], source[..., 4:] + 2.0 * noise[..., 4:])


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=60), "multiples of 8"), (dict(steps=0), "at least 1"), (dict(sampler="nope"), "valid samplers"),
])
def test_bad_requests(tiny, kwargs, message):
    with pytest.raises(sdtorch.SDTorchError, match=message):
        tiny.txt2img("x", **kwargs)
    with pytest.raises(sdtorch.SDTorchError, match=r"strength must be in \[0, 1\]"):
        tiny.img2img(Image.new("RGB", (64, 64)), "x", strength=1.5)


def test_nan_guard_decodes_again_in_fp32():
    """fp16 overflows (|activation| > 65504) where fp32 does not: the guard re-decodes in fp32 and warns."""
    vae = sdtorch.build("tiny").vae
    with torch.no_grad():
        w = vae.decoder.conv_in.weight
        w.mul_(6e4 / w.abs().max())  # representable in fp16, but the conv's sums are not
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        reference = sdtorch.generation.decode(vae, z)
        vae.half()
        assert not torch.isfinite(vae.decode(z.half())).all()
        with pytest.warns(UserWarning, match="decoding again in float32"):
            guarded = sdtorch.generation.decode(vae, z)
    assert torch.isfinite(guarded).all()
    torch.testing.assert_close(guarded, reference, atol=2e-2, rtol=0)  # weights were rounded to fp16
    assert next(vae.parameters()).dtype == torch.float16, "the VAE goes back to its own dtype"


def test_outpaint_pads_with_edges_and_masks_only_new_area(tiny):
    src = Image.new("RGB", (48, 64), (10, 200, 30))
    padded, mask = sdtorch.images.pad_for_outpaint(src, left=8, right=8)
    assert padded.size == (64, 64) and mask.size == (64, 64)
    m = np.asarray(mask)
    assert (m[:, :8] == 255).all() and (m[:, 56:] == 255).all() and (m[:, 8:56] == 0).all()
    assert padded.getpixel((0, 0)) == (10, 200, 30)
    out = tiny.outpaint(src, "x", left=8, right=8, steps=2, seed=0, output_type="tensor")
    assert out.shape == (1, 3, 64, 64)
    with pytest.raises(sdtorch.SDTorchError, match="non-negative"):
        tiny.outpaint(src, "x", left=-8)


def test_img2img_at_another_size_resizes_the_source(tiny):
    src = Image.new("RGB", (64, 64), (200, 30, 30))
    out = tiny.img2img(src, "x", strength=0.5, steps=2, seed=0, width=32, height=48, output_type="tensor")
    assert out.shape == (1, 3, 48, 32)


def test_the_callback_sees_every_step_and_may_preview(tiny):
    steps = []
    req = sdtorch.generation.resolve("x", tiny, steps=3, seed=2, batch_size=2)
    previews = []

    def callback(step):
        steps.append((step.image, step.images, step.index, step.total, step.done))
        if step.index == 1:
            previews.append(step.preview())

    result = sdtorch.generation.generate(tiny, req, callback=callback)
    assert steps == [(i, 2, j, 3, 3 * i + j + 1) for i in range(2) for j in range(3)]
    assert len(previews) == 2 and previews[0].shape == (1, 3, 64, 64)
    assert torch.equal(result.images, sdtorch.generation.generate(tiny, req).images), "previews change nothing"
    assert not result.interrupted and result.request.steps == 3 and result.request.sampler == "dpmpp_2m"


@pytest.mark.parametrize("how", ["false", "raise"])
def test_an_interrupted_run_returns_what_it_has(tiny, how):
    def callback(step):
        if (step.image, step.index) == (1, 1):
            if how == "raise":
                raise sdtorch.generation.Interrupted
            return False

    req = sdtorch.generation.resolve("x", tiny, steps=3, seed=2, batch_size=3)
    result = sdtorch.generation.generate(tiny, req, callback=callback)
    assert result.interrupted and result.seeds == [2, 3] and result.images.shape == (2, 3, 64, 64)
    assert len(result.parameters) == 2 and "Seed: 3," in result.parameters[1]
    assert torch.equal(result.images[:1], sdtorch.generation.generate(tiny, req).images[:1])


def test_the_result_carries_the_parameters_text_and_png_bytes(tiny):
    import io

    from sdtorch import infotext

    req = sdtorch.generation.resolve("a red circle", tiny, steps=2, seed=5, guidance=3.0)
    result = sdtorch.generation.generate(tiny, req, origin=infotext.Origin(model="m.safetensors", model_hash="ab"))
    prompt, _, fields = infotext.parse(result.parameters[0])
    assert prompt == "a red circle" and fields["Seed"] == "5" and fields["Steps"] == "2"
    assert fields["CFG scale"] == "3.0" and fields["Model"] == "m.safetensors" and fields["Model hash"] == "ab"
    assert "Mode" not in fields and fields["Size"] == "64x64"
    png = Image.open(io.BytesIO(result.png(0)))
    assert png.info["parameters"] == result.parameters[0]
    assert np.array_equal(np.asarray(png), np.asarray(result.pil()[0]))


def test_resolve_takes_the_model_defaults_once(tiny):
    req = sdtorch.generation.resolve("x", tiny, seed=None)
    assert (req.steps, req.sampler, req.width, req.height, req.seed) == (20, "dpmpp_2m", 64, 64, None)
    req = sdtorch.generation.resolve("x", tiny, (70, 50), steps=3)
    assert (req.width, req.height, req.steps) == (64, 48, 3)  # the image's size, rounded down to 8
    with pytest.raises(sdtorch.SDTorchError, match="unknown generation option 'stepz'"):
        sdtorch.generation.resolve("x", tiny, stepz=3)

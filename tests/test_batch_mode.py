"""Batch mode "batched" (one network call a step for the whole batch) against the default "per-image" mode.

What batched mode gives up is bit-identity with runs of one seed; what it must keep is the images. Both modes
draw the same noise from the same per-image generators and feed the same context, so the only difference is
float rounding: a matrix product over a batch of 2B rows is blocked differently from one over 2 rows, which
changes sums in their last bits (~1e-7 relative in fp32). Measured on the built-in model, 10 steps: at most
7e-7 in [0, 1] pixels (AVX512, 2026-12-01), and the 8-bit PNGs identical. The bound below, 1e-3 (a quarter of
one 8-bit level), leaves three orders of magnitude for other CPUs' blocking and still fails for any real
mismatch: the wrong seed, noise or context for an image moves its pixels by tenths.
"""

from __future__ import annotations

import pytest
import torch

import sdtorch
from sdtorch import generation, infotext

PROMPT = "a large red circle in the center on a white background"
PIXEL_BOUND = 1e-3  # see the module docstring


@pytest.fixture(scope="module")
def shapes():
    return sdtorch.load("shapes")


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_batched_images_equal_per_image_ones_within_rounding(shapes, sampler):
    kw = dict(seed=11, batch_size=3, sampler=sampler, output_type="tensor")
    per_image = shapes.txt2img(PROMPT, **kw)
    batched = shapes.txt2img(PROMPT, batch_mode="batched", **kw)
    assert batched.shape == per_image.shape == (3, 3, 64, 64)
    assert (batched - per_image).abs().max() <= PIXEL_BOUND
    assert (batched[0] - batched[1]).abs().max() > 0.05, "each image keeps its own seed's noise"
    alone = shapes.txt2img(PROMPT, batch_mode="batched", seed=12, sampler=sampler, output_type="tensor")
    assert torch.equal(alone[0], per_image[1]), "a batch of one is the per-image run exactly"


def test_batched_inpainting_blends_every_image(shapes):
    from PIL import Image

    source = Image.new("RGB", (64, 64), (255, 255, 255))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    kw = dict(seed=4, batch_size=2, output_type="tensor")
    per_image = shapes.inpaint(source, mask, PROMPT, **kw)
    batched = shapes.inpaint(source, mask, PROMPT, batch_mode="batched", **kw)
    assert (batched - per_image).abs().max() <= PIXEL_BOUND


def test_a_batched_pass_is_one_step_sequence_and_stops_as_a_whole():
    tiny = sdtorch.build("tiny")
    req = generation.resolve("x", tiny, steps=3, seed=2, batch_size=3, batch_mode="batched")
    seen, previews = [], []

    def callback(step):
        seen.append((step.image, step.images, step.index, step.latents.shape[0]))
        if step.index == 1:
            previews.append(step.preview())

    result = generation.generate(tiny, req, callback=callback)
    assert seen == [(0, 1, j, 3) for j in range(3)]
    assert previews[0].shape == (3, 3, 64, 64) and result.seeds == [2, 3, 4]
    _, _, fields = infotext.parse(result.parameters[2])
    assert fields["Batch mode"] == "batched" and fields["Seed"] == "4"
    assert "Batch mode" not in infotext.parse(generation.generate(tiny, generation.resolve(
        "x", tiny, steps=1, seed=2)).parameters[0])[2]

    stopped = generation.generate(tiny, req, callback=lambda step: step.index < 1)
    assert stopped.interrupted and stopped.seeds == [2, 3, 4] and stopped.images.shape == (3, 3, 64, 64)


def test_an_unknown_batch_mode_is_one_line():
    with pytest.raises(sdtorch.SDTorchError, match="unknown batch mode 'parallel'; choose one of per-image, batched"):
        generation.resolve("x", None, batch_mode="parallel")

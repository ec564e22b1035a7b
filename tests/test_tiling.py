"""Tiled VAE decode and encode: the tile layout and blend weights, a tiny random autoencoder, and the
built-in shapes autoencoder on a mosaic, tiled against untiled."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sdtorch
from sdtorch import tiling
from sdtorch.config import TINY, VAEConfig
from sdtorch.data import shapes
from sdtorch.errors import SDTorchError
from sdtorch.models import AutoencoderKL
from sdtorch.pipeline import builtin_path
from sdtorch.training.losses import psnr

needs_model = pytest.mark.skipif(builtin_path("shapes") is None, reason="built-in model not installed")


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(TINY.vae).eval()  # 2x down: 4 latent channels per 2x2 pixels


# --------------------------------------------------------------------------------------------------
# Layout and weights


@pytest.mark.parametrize("size,tile,overlap", [(37, 16, 4), (50, 16, 4), (30, 16, 8), (64, 16, 8), (64, 24, 8),
                                               (17, 16, 0), (16, 16, 4), (5, 16, 4), (100, 7, 6)])
def test_weights_cover_every_position_and_sum_to_one(size, tile, overlap):
    t = min(tile, size)
    starts = tiling.tile_starts(size, t, overlap)
    assert starts[0] == 0 and starts[-1] + t == size  # the last tile ends at the border, no padding
    assert all(0 < b - a <= t - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap
    w = tiling.blend_weights(starts, t, size)
    # t + (1 - t) rounds to exactly 1 in fp64 (measured: 0.0 off wherever at most two tiles overlap); where
    # k tiles overlap, the weights are products of k - 1 ramps, each rounded once: a few ulps (2e-16) from 1
    torch.testing.assert_close(w.sum(0), torch.ones(size, dtype=torch.float64), rtol=0, atol=1e-15)
    for k, s in enumerate(starts):
        assert (w[k, :s] == 0).all() and (w[k, s + t:] == 0).all() and (w[k] >= 0).all()
    assert w[0, 0] == 1 and w[-1, -1] == 1  # the image border gets full weight
    # in 2-D the weight of tile (i, j) is wy[i] wx[j], whose sum over all tiles is (sum wy)(sum wx) = 1
    torch.testing.assert_close(torch.einsum("iy,jx->yx", w, w), torch.ones(size, size, dtype=torch.float64),
                               rtol=0, atol=1e-14)


def test_weights_ramp_linearly_across_an_overlap():
    starts = tiling.tile_starts(37, 16, 4)
    assert starts == [0, 12, 21]  # the last tile moved back from 24 to end at 37: it shares 7, not 4
    w = tiling.blend_weights(starts, 16, 37)
    torch.testing.assert_close(w[1, 12:16], torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64))
    torch.testing.assert_close(w[0, 12:16], 1 - w[1, 12:16])
    torch.testing.assert_close(w[2, 21:28], (torch.arange(7, dtype=torch.float64) + 0.5) / 7)
    assert (w[1, 16:21] == 1).all()


class LocalVAE:
    """A stand-in autoencoder whose decode (nearest upsampling) and encode (mean pooling) are local, so a
    tiled result must equal the untiled one wherever the tiles cover and blend correctly."""

    config = VAEConfig(block_channels=(8, 8, 8), norm_groups=8)  # downsampling 4

    def decode(self, z):
        return z.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)

    def encode(self, x):
        return SimpleNamespace(mode=lambda: F.avg_pool2d(x, 4))


@pytest.mark.parametrize("tile,overlap", [(16, 4), (16, 8), (24, 0), (7, 6)])
def test_a_local_operator_is_reproduced_for_awkward_sizes(tile, overlap):
    z = torch.randn(2, 4, 37, 50, generator=torch.Generator().manual_seed(0))
    vae = LocalVAE()
    # each output value is a weighted mean of identical values, with weights summing to 1 up to fp32 rounding
    torch.testing.assert_close(tiling.decode(vae, z, tile, overlap), vae.decode(z), rtol=1e-6, atol=1e-6)
    images = vae.decode(z)
    torch.testing.assert_close(tiling.encode(vae, images, tile * 4, overlap * 4), z, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# A tiny random autoencoder


def test_one_tile_is_exactly_the_untiled_autoencoder(tiny_vae):
    z = torch.randn(1, 4, 12, 9, generator=torch.Generator().manual_seed(1))
    x = torch.rand(1, 3, 24, 18, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tiling.decode(tiny_vae, z, tile=12, overlap=4), tiny_vae.decode(z))
        assert torch.equal(tiling.encode(tiny_vae, x, tile=24, overlap=8), tiny_vae.encode(x).mode())


def test_tiled_output_has_the_untiled_shape_and_dtype(tiny_vae):
    z = torch.randn(2, 4, 37, 50, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = tiling.decode(tiny_vae, z, tile=16, overlap=4)
        assert out.shape == tiny_vae.decode(z).shape == (2, 3, 74, 100) and out.dtype == torch.float32
        assert out.isfinite().all() and not out.requires_grad
        latents = tiling.encode(tiny_vae, out, tile=32, overlap=8)
        assert latents.shape == (2, 4, 37, 50)
        bf16 = AutoencoderKL(TINY.vae).eval().to(torch.bfloat16)
        assert tiling.decode(bf16, z.bfloat16(), tile=16, overlap=4).dtype == torch.bfloat16


def test_gradients_flow_through_every_tile(tiny_vae):
    z = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(4), requires_grad=True)
    tiling.decode(tiny_vae, z, tile=8, overlap=2).square().sum().backward()
    assert (z.grad.abs().flatten(2).amax(1) > 0).all()  # every latent pixel gets a gradient


@pytest.mark.parametrize("call,fragment", [
    (lambda v, z, x: tiling.decode(v, z, tile=8, overlap=8), "tile > overlap >= 0"),
    (lambda v, z, x: tiling.decode(v, z, tile=8, overlap=-1), "tile > overlap >= 0"),
    (lambda v, z, x: tiling.decode(v, z, tile=8.0, overlap=2), "tile must be an integer"),
    (lambda v, z, x: tiling.decode(v, z, tile=8, overlap=True), "overlap must be an integer"),
    (lambda v, z, x: tiling.encode(v, x, tile=33, overlap=8), "multiples of the autoencoder's downsampling factor 2"),
    (lambda v, z, x: tiling.encode(v, x[..., :39], tile=16, overlap=8), "sides must be multiples of 2"),
])
def test_bad_arguments_are_one_line_errors(tiny_vae, call, fragment):
    z, x = torch.zeros(1, 4, 20, 20), torch.zeros(1, 3, 40, 40)
    with pytest.raises(SDTorchError) as e:
        call(tiny_vae, z, x)
    assert fragment in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# The built-in shapes autoencoder (4x down) on a 256x256 mosaic of 16 scenes, tiled against untiled.
#
# The figures differ from the untiled ones because GroupNorm statistics are taken per tile. They are
# deterministic up to fp32 rounding: perturbing the input by 1e-6 (relative) moves the decodes by under
# 1e-5, so summation order on another CPU (AVX2 or AVX-512) cannot come near the margins below, which are
# set from the measured values, in whole dB, and tight enough that blending with overlap 0 fails.


def _mosaic(background: str = "black", seed: int = 0) -> torch.Tensor:
    """[1, 3, 256, 256] in [-1, 1]: 4x4 two-object scenes at 64 px sharing one background, so that the
    whole mosaic looks like one image (mixed backgrounds throw the untiled GroupNorm statistics off)."""
    rng, scenes = random.Random(seed), []
    while len(scenes) < 16:
        scene = shapes.random_scene(rng, two=True)
        if scene.background == background:
            scenes.append(torch.from_numpy(np.array(shapes.render(scene, 64, rng))).permute(2, 0, 1))
    grid = torch.stack(scenes).reshape(4, 4, 3, 64, 64).permute(2, 0, 3, 1, 4).reshape(1, 3, 256, 256)
    return grid.float() / 127.5 - 1


def _edges(size: int, tile: int, overlap: int, factor: int) -> list[int]:
    """Pixel lines where a tile begins or ends inside the image (a seam would be a step across them)."""
    starts = tiling.tile_starts(size, tile, overlap)
    return sorted({s * factor for s in starts[1:]} | {(s + tile) * factor for s in starts[:-1]})


def _step_across(images: torch.Tensor, lines: list[int]) -> float:
    """Mean absolute step between pixel columns l-1 and l and between rows l-1 and l, over the lines l."""
    idx = torch.tensor(lines)
    dx = (images[..., :, idx] - images[..., :, idx - 1]).abs().mean()
    dy = (images[..., idx, :] - images[..., idx - 1, :]).abs().mean()
    return ((dx + dy) / 2).item()


@pytest.fixture(scope="module")
def shapes_case():
    vae = sdtorch.load("shapes").vae.eval()  # fp32
    image = _mosaic()
    with torch.no_grad():
        latents = vae.encode(image).mode()  # [1, 4, 64, 64]
        return vae, image, latents, vae.decode(latents)


@needs_model
def test_tiled_decode_matches_untiled_without_seams(shapes_case):
    vae, image, latents, untiled = shapes_case
    tile, overlap = 24, 8  # 4x4 tiles of 96 px; the last row and column share 16 latent pixels
    with torch.no_grad():
        tiled = tiling.decode(vae, latents, tile, overlap)
        hard = tiling.decode(vae, latents, tile, 0)  # tiles butted together: a real seam, for contrast
    assert tiled.shape == untiled.shape
    # measured with v16's autoencoder 40.25 dB, max 0.329 (overlap 0: 37.72 dB, max 0.735); with v11's 40.98 dB, max
    # 0.338 (overlap 0: 37.58 dB, max 0.905; tile 16 overlap 8: 35.8 dB, max 0.51)
    assert psnr(tiled, untiled).item() > 39.0
    assert (tiled - untiled).abs().max().item() < 0.45
    # as faithful to the image as the untiled decode (measured 32.27 dB tiled, 31.49 untiled with v16's autoencoder)
    assert psnr(tiled, image).item() > psnr(untiled, image).item() - 0.5
    # Seams: the mean step across the lines where tiles begin and end, beyond the untiled image's step
    # across the same lines. The linear ramp adds at most |A - B| / 32 px between two tiles' decodes A, B;
    # measured +0.0001 against +0.0122 for butted tiles. Bound: one 8-bit level (2/255 in [-1, 1]).
    level = 2 / 255
    lines = _edges(64, tile, overlap, 4)
    assert _step_across(tiled, lines) - _step_across(untiled, lines) < level
    hard_lines = _edges(64, tile, 0, 4)
    assert _step_across(hard, hard_lines) - _step_across(untiled, hard_lines) > level  # the criterion has teeth


@needs_model
def test_tiled_encode_matches_untiled(shapes_case):
    vae, image, latents, untiled = shapes_case
    with torch.no_grad():
        tiled = tiling.encode(vae, image, tile=96, overlap=32)  # 4x4 tiles of 96 px
        decoded = vae.decode(tiled)
    assert tiled.shape == latents.shape
    # measured with v16's autoencoder: 43.64 dB and max 0.208 between the two decodes (v15's: 43.59 dB, max 0.250;
    # v11's: 47.53 dB, max 0.183; the encoder reads further past a tile's edge); 40 dB and 0.35 leave room for
    # another CPU's rounding, and the last line, against the image itself, is what a seam would fail
    assert psnr(decoded, untiled).item() > 40.0
    assert (decoded - untiled).abs().max().item() < 0.35
    assert psnr(decoded, image).item() > psnr(untiled, image).item() - 0.5


def test_generation_decodes_in_tiles_when_asked():
    """`vae_tiling=True` reaches the encode and decode of a run, and the parameters record it: at the
    tiny model's 2x factor, 320x64 pixels are 160x32 latents, so the 64-latent tiles overlap three times."""
    from sdtorch import generation, infotext

    tiny = sdtorch.build("tiny")
    kw = dict(steps=2, seed=1, width=320, height=64)
    plain = generation.generate(tiny, generation.resolve("x", tiny, **kw))
    tiled = generation.generate(tiny, generation.resolve("x", tiny, vae_tiling=True, **kw))
    assert tiled.images.shape == plain.images.shape == (1, 3, 64, 320)
    assert not torch.equal(tiled.images, plain.images), "the decode went through the tiles"
    assert infotext.parse(tiled.parameters[0])[2]["VAE tiling"] == "True"
    assert "VAE tiling" not in infotext.parse(plain.parameters[0])[2]
    small = dict(steps=2, seed=1)  # 64x64: one tile, so exactly the untiled run
    assert torch.equal(generation.generate(tiny, generation.resolve("x", tiny, vae_tiling=True, **small)).images,
                       generation.generate(tiny, generation.resolve("x", tiny, **small)).images)

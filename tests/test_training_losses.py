"""Fast tests for the autoencoder training losses and metrics (sdtorch.training.losses)."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sdtorch.errors import CheckpointError
from sdtorch.training.losses import (
    LPIPS,
    DiscriminatorConfig,
    LPIPSConfig,
    PatchDiscriminator,
    adaptive_weight,
    gradient_difference_loss,
    hinge_d_loss,
    hinge_g_loss,
    lpips_or_none,
    psnr,
    reconstruction_loss,
    ssim,
)

TINY_LPIPS = LPIPSConfig(channels=(4, 8, 8, 16, 16))


# --- discriminator ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size, patches", [(64, 6), (256, 30)])
def test_discriminator_patch_map_shape(size, patches):
    torch.manual_seed(0)
    d = PatchDiscriminator(DiscriminatorConfig(channels=8))
    assert d(torch.randn(2, 3, size, size)).shape == (2, 1, patches, patches)


def test_discriminator_init_is_pix2pix_and_seeded():
    torch.manual_seed(0)
    d = PatchDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.mean().item()) < 1e-3 and abs(weights.std().item() - 0.02) < 1e-3
    assert all(c.bias is None or not c.bias.any() for c in convs)
    norms = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 3 and all(abs(n.weight.mean().item() - 1.0) < 0.01 for n in norms)
    torch.manual_seed(0)
    again = PatchDiscriminator()
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), again.state_dict().values()))


def test_discriminator_norm_choice_and_batch_dependence():
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # not the global RNG: test order
    torch.manual_seed(0)
    group = PatchDiscriminator(DiscriminatorConfig(channels=8, norm="group")).train()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in group.modules())
    # Per-sample: independent of the batch, up to the kernels' rounding, which may change with the batch
    # size: five convs of at most K = 1024 terms each, ~sqrt(K) * 2^-24 = 2e-6 relative apiece, on outputs
    # of order 1, within the default atol of 1e-5 (measured: exact on AVX-512, AVX2 and SSE kernels).
    torch.testing.assert_close(group(x)[:1], group(x[:1]))
    torch.manual_seed(0)
    batch = PatchDiscriminator(DiscriminatorConfig(channels=8, norm="batch")).train()
    assert not torch.allclose(batch(x)[:1], batch(x[:2])[:1])  # batch statistics couple the samples


# --- adversarial losses -----------------------------------------------------------------------------


def test_hinge_losses_hand_computed():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 5.0), torch.full((2, 1, 3, 3), -5.0)).item() == 0.0


def _decoder_losses(scale: float = 1.0):
    torch.manual_seed(0)
    hidden, last = nn.Linear(4, 8), nn.Linear(8, 3)
    x, target = torch.randn(5, 4), torch.randn(5, 3)
    out = last(torch.tanh(hidden(x)))
    rec = (out - target).abs().mean()
    g = scale * -torch.sigmoid(out).sum() / 7
    return rec, g, last.weight


def test_adaptive_weight_matches_manual_autograd():
    rec, g, w = _decoder_losses()
    rec_grad = torch.autograd.grad(rec, w, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, w, retain_graph=True)[0]
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    lam = adaptive_weight(rec, g, w)
    assert not lam.requires_grad and lam.shape == ()
    torch.testing.assert_close(lam, expected)
    (rec + lam * g).backward()  # both graphs were kept for the real backward pass
    assert w.grad is not None


def test_adaptive_weight_scales_inversely_and_clamps():
    rec, g, w = _decoder_losses(1.0)
    rec2, g2, w2 = _decoder_losses(2.0)
    one, two = adaptive_weight(rec, g, w, delta=0.0), adaptive_weight(rec2, g2, w2, delta=0.0)
    torch.testing.assert_close(two, one / 2)
    assert adaptive_weight(rec2, g2, w2) < adaptive_weight(rec, g, w)
    flat = 0.0 * w.sum()  # no adversarial gradient at all: the weight hits the clamp
    assert adaptive_weight(rec, flat, w, max_weight=123.0).item() == 123.0


def test_reconstruction_loss():
    x, y = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 1.0]])
    assert reconstruction_loss(x, y).item() == 2.0
    assert reconstruction_loss(x, y, "mse").item() == 5.0
    assert reconstruction_loss(x, y, "l1", reduction="none").tolist() == [[1.0, 3.0]]
    with pytest.raises(ValueError, match="l2"):
        reconstruction_loss(x, y, "l2")


def test_gradient_difference_loss_hand_computed():
    """Mathieu et al. 2016, eq. 5 (alpha 1): | |dy| - |dx| |, averaged per direction, summed over the two."""
    x = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # edge between columns 1 and 2
    y = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])  # edge between columns 0 and 1
    assert gradient_difference_loss(x, y).item() == 1.0  # horizontal |dx| [0, 1] vs [1, 0]; vertical 0
    assert gradient_difference_loss(x, -x).item() == 0.0  # edge strength only, not its sign
    blurred = torch.tensor([[0.0, 0.5, 1.0]])  # the same step smeared over two pixels
    assert gradient_difference_loss(blurred, y[:1]).item() == 0.5  # a row alone: no vertical term
    assert reconstruction_loss(blurred, y[:1]).item() == pytest.approx(1 / 6)


# --- LPIPS ------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_lpips():
    torch.manual_seed(0)
    return LPIPS(TINY_LPIPS)


def _images(seed: int = 1, n: int = 2, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_lpips_layout_matches_the_lpips_package(tiny_lpips):
    keys = set(tiny_lpips.state_dict())
    convs = {1: (0, 2), 2: (5, 7), 3: (10, 12, 14), 4: (17, 19, 21), 5: (24, 26, 28)}
    expected = {f"net.slice{s}.{i}.{p}" for s, idx in convs.items() for i in idx for p in ("weight", "bias")}
    expected |= {f"lin{i}.model.1.weight" for i in range(5)} | {"scaling_layer.shift", "scaling_layer.scale"}
    assert keys == expected
    assert tiny_lpips.lin3.model[1].weight.shape == (1, 16, 1, 1)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_lpips_round_trip_and_metric_properties(tiny_lpips, tmp_path, suffix):
    path = tmp_path / f"lpips{suffix}"
    sd = tiny_lpips.state_dict()
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    loaded = LPIPS.from_file(path, TINY_LPIPS)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x, y = _images(1), _images(2)
    d = loaded(x, y)
    assert d.shape == (2,) and torch.equal(d, tiny_lpips(x, y))
    assert torch.equal(loaded(x, x), torch.zeros(2))
    torch.testing.assert_close(loaded(y, x), d)
    assert (d > 0).all()
    loaded.train()
    assert not loaded.training


def test_lpips_gradient_reaches_the_input_only(tiny_lpips):
    x = _images(1).requires_grad_(True)
    tiny_lpips(x, _images(2)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_lpips.parameters())


def test_lpips_bad_files_name_the_keys(tiny_lpips, tmp_path):
    sd = dict(tiny_lpips.state_dict())
    del sd["net.slice3.12.weight"], sd["lin2.model.1.weight"]
    sd["lin1.model.1.weight"] = torch.ones(1, 3, 1, 1)
    sd["extra.weight"] = torch.ones(1)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        LPIPS.from_file(tmp_path / "bad.safetensors", TINY_LPIPS)
    msg = str(e.value)
    assert "missing net.slice3.12.weight, lin2.model.1.weight" in msg
    assert "mis-shaped lin1.model.1.weight (file (1, 3, 1, 1), model (1, 8, 1, 1))" in msg
    assert "unexpected extra.weight" in msg and "bad.safetensors" in msg

    sd = dict(tiny_lpips.state_dict())
    sd["lin0.model.1.weight"] = -sd["lin0.model.1.weight"]
    save_file(sd, str(tmp_path / "negative.safetensors"))
    with pytest.raises(CheckpointError, match="non-negative: lin0.model.1.weight"):
        LPIPS.from_file(tmp_path / "negative.safetensors", TINY_LPIPS)


def test_lpips_lin_only_file_plus_torchvision_vgg(tiny_lpips, tmp_path):
    sd = tiny_lpips.state_dict()
    lins = {k: v for k, v in sd.items() if k.startswith("lin")}
    vgg = {"features." + k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith("net.")}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier too
    save_file(lins, str(tmp_path / "lin.safetensors"))
    save_file(vgg, str(tmp_path / "vgg16.safetensors"))
    with pytest.raises(CheckpointError, match="only the lin layers"):
        LPIPS.from_file(tmp_path / "lin.safetensors", TINY_LPIPS)
    loaded = LPIPS.from_file(tmp_path / "lin.safetensors", TINY_LPIPS, vgg_path=tmp_path / "vgg16.safetensors")
    x, y = _images(3), _images(4)
    assert torch.equal(loaded(x, y), tiny_lpips(x, y))


def test_lpips_or_none(tiny_lpips, tmp_path):
    logged = []
    assert lpips_or_none(None, logged.append) is None
    assert logged == ["LPIPS perceptual loss is off: no weights file given"]
    assert lpips_or_none(tmp_path / "nope.pth", logged.append) is None
    assert logged[-1].startswith("LPIPS perceptual loss is off:") and "nope.pth: no such file" in logged[-1]
    save_file(tiny_lpips.state_dict(), str(tmp_path / "ok.safetensors"))
    assert isinstance(lpips_or_none(tmp_path / "ok.safetensors", logged.append, TINY_LPIPS), LPIPS)
    assert len(logged) == 2


VGG16_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _vgg16(pretrained=False, **_):
    """Stand-in for `torchvision.models.vgg16`: the VGG16 feature stack (config D), random weights."""
    layers, c_in = [], 3
    for v in VGG16_D:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=True)]
            c_in = v
    return types.SimpleNamespace(features=nn.Sequential(*layers))


def _import_reference_lpips(monkeypatch):
    """The official lpips package, its trunk built by `_vgg16`: torchvision need not be installed, and
    the test never depends on its version."""
    models = types.ModuleType("torchvision.models")
    models.vgg16 = _vgg16
    if "lpips" not in sys.modules:  # lpips imports torchvision at import time
        fake = types.ModuleType("torchvision")
        fake.models = models
        monkeypatch.setitem(sys.modules, "torchvision", fake)
        monkeypatch.setitem(sys.modules, "torchvision.models", models)
    lpips = pytest.importorskip("lpips")
    monkeypatch.setattr(lpips.pretrained_networks, "tv", models)
    return lpips


def test_lpips_matches_the_official_package(monkeypatch, tmp_path):
    lpips = _import_reference_lpips(monkeypatch)
    torch.manual_seed(0)
    ref = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).eval()
    with torch.no_grad():
        for lin in ref.lins:
            lin.model[1].weight.abs_()
    path = tmp_path / "official.safetensors"
    # lins.N.* alias linN.* (cloned: safetensors refuses shared storage). The scaling constants are left
    # out, as in the package's own weight files, so ours must equal them.
    save_file({k: v.clone() for k, v in ref.state_dict().items() if not k.startswith("scaling_layer.")},
              str(path))
    ours = LPIPS.from_file(path)
    x, y = _images(5, size=48), _images(6, size=48)
    with torch.no_grad():
        expected = ref(x, y).flatten()
    torch.testing.assert_close(ours(x, y), expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ours(x, y), ours(x, _images(7, size=48)))


# --- metrics ----------------------------------------------------------------------------------------


def _image_pairs():
    """(a, b) batches of 2 in [-1, 1]: pure noise, and smooth structure with a degraded copy."""
    g = torch.Generator().manual_seed(0)
    noise_a = torch.rand(2, 3, 24, 31, generator=g, dtype=torch.float64) * 2 - 1
    noise_b = torch.rand(2, 3, 24, 31, generator=g, dtype=torch.float64) * 2 - 1
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 40, dtype=torch.float64),
                            torch.linspace(-1, 1, 36, dtype=torch.float64), indexing="ij")
    disc = ((xx ** 2 + yy ** 2) < 0.4).double()
    structured = torch.stack([
        torch.stack([xx, yy, disc * 2 - 1]),
        torch.stack([torch.sin(6 * xx) * torch.cos(4 * yy), disc - 0.5, xx * yy]),
    ])
    degraded = (0.8 * structured + 0.1 * torch.randn(structured.shape, generator=g, dtype=torch.float64)
                + 0.05).clamp(-1, 1)
    return [(noise_a, noise_b), (structured, degraded), (structured, structured.roll(3, dims=-1))]


@pytest.mark.parametrize("pair", range(3))
def test_psnr_and_ssim_match_scikit_image(pair):
    metrics = pytest.importorskip("skimage.metrics")
    a, b = _image_pairs()[pair]
    ours_psnr, ours_ssim = psnr(a, b), ssim(a, b)
    assert ours_psnr.shape == ours_ssim.shape == (2,)
    for i in range(2):
        x, y = a[i].numpy(), b[i].numpy()
        ref_psnr = metrics.peak_signal_noise_ratio(x, y, data_range=2)
        ref_ssim = metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                                 use_sample_covariance=False, data_range=2, channel_axis=0)
        assert abs(ours_psnr[i].item() - ref_psnr) < 1e-4
        assert abs(ours_ssim[i].item() - ref_ssim) < 1e-4


def test_metrics_of_identical_images():
    a = _image_pairs()[1][0]
    assert torch.equal(psnr(a, a), torch.full((2,), math.inf, dtype=a.dtype))
    torch.testing.assert_close(ssim(a, a), torch.ones(2, dtype=a.dtype))
    bright = _image_pairs()[0][0] * 0.5 + 0.5  # noise in [0, 1]; 1 - bright has the same local means
    assert (ssim(bright, 1 - bright) < -0.9).all()  # and is anti-correlated everywhere
    # float32 against float64: a local moment of values <= 1 is two 11-tap sums, rounded to ~sqrt(22) * 2^-24
    # = 3e-7, and var = E[x^2] - mu^2 (cov alike) cancels to an error of ~4e-7. Where the image is flat
    # (var = 0), only c2 = 3.6e-3 is left in SSIM's factors (2 cov + c2) / (var_a + var_b + c2), so a pixel
    # can move by 2 * 2 * 4e-7 / c2 = 4.4e-4, and the mean with it (measured: 6e-6 to 7.5e-6 on AVX-512, AVX2
    # and SSE kernels, which round differently; bfloat16 inputs miss by 2.6e-3).
    torch.testing.assert_close(ssim(a.float(), a.float() * 0.9), ssim(a, a * 0.9).float(), atol=5e-4, rtol=0)


def test_psnr_hand_computed_and_ssim_size_check():
    a, b = torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.2)  # mse 0.04, range 2
    assert psnr(a, b).item() == pytest.approx(10 * np.log10(4 / 0.04))
    with pytest.raises(ValueError, match="11x11"):
        ssim(a, b)

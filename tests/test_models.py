"""The networks on tiny configs: API, odd sizes, presets, and architecture inference from shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_components

import sdtorch
from sdtorch.checkpoints import detect, keymaps
from sdtorch.checkpoints.io import StateDict
from sdtorch.checkpoints.loader import _shape_after
from sdtorch.models import AutoencoderKL, CLIPTextModel, UNet


def test_preset_parameter_counts_match_stable_diffusion():
    model = sdtorch.build("sd15", device="meta")
    counts = {k: round(v / 1e6, 1) for k, v in model.parameter_counts().items()}
    assert counts == {"unet": 859.5, "vae": 83.7, "text_encoder": 123.1}
    sd21 = sdtorch.build("sd21", device="meta").parameter_counts()
    assert round(sd21["unet"] / 1e6, 1) == 865.9  # SD2: linear projections and 1024-wide context


def fake_original(config: sdtorch.ModelConfig) -> StateDict:
    """Shapes of an original single file for `config`, built on the meta device (no memory)."""
    shapes = {}
    model = sdtorch.build(config, device="meta")
    for name, module in model.modules.items():
        for key, src in keymaps.original_sources(name, list(module.state_dict()), config).items():
            shape = tuple(module.state_dict()[key].shape)
            if src.transform == "conv1x1":
                shape = shape + (1, 1)
            if isinstance(src.transform, tuple):
                shape = (shape[0] * src.transform[1],) + shape[1:]
            shapes[src.key] = shape
            assert _shape_after(shape, src.transform) == tuple(module.state_dict()[key].shape)
    if config.family == "sd2":  # real SD2 files carry all 24 OpenCLIP layers
        for k in [k for k in shapes if ".resblocks.22." in k]:
            shapes[k.replace(".resblocks.22.", ".resblocks.23.")] = shapes[k]
    return StateDict("fake.safetensors", list(shapes), None, shapes.__getitem__)


@pytest.mark.parametrize("preset", [sdtorch.SD15, sdtorch.SD21, sdtorch.SD15.replace(unet={"in_channels": 9})])
def test_architecture_is_inferred_from_shapes(preset):
    sd = fake_original(preset)
    family = detect.detect_family(sd)
    assert family == preset.family
    got = detect.infer_config(sd, family)
    assert got.unet == preset.unet and got.vae == preset.vae and got.text == preset.text
    assert keymaps.is_ignored_original("cond_stage_model.model.transformer.resblocks.23.ln_1.weight", got) \
        == (family == "sd2")


def test_unet_odd_latent_size_matches_diffusers():
    ref, _, _ = reference_components("sd1")
    ours = UNet(sdtorch.UNetConfig(block_channels=(32, 64, 64), attention_levels=(True, True, False),
                                   num_heads=2, context_dim=32, norm_groups=8)).eval()
    ours.load_state_dict(ref.state_dict())
    x, ctx = torch.randn(1, 4, 10, 14), torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 500, ctx), ref(x, 500, ctx).sample, rtol=0, atol=1e-5)


def test_vae_posterior():
    torch.manual_seed(0)
    vae = AutoencoderKL(sdtorch.TINY.vae).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x)
        assert post.mean.shape == (2, 4, 16, 16)
        a = post.sample(torch.Generator().manual_seed(3))
        b = post.sample(torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and not torch.equal(a, post.mode())
        kl = post.kl()
        manual = 0.5 * (post.mean ** 2 + post.var - 1 - post.logvar).flatten(1).sum(1)
        torch.testing.assert_close(kl, manual)
        assert vae.decode(a).shape == x.shape


def test_clip_skip_reads_earlier_layers():
    _, _, ref = reference_components("sd1")
    ours = CLIPTextModel(sdtorch.TextConfig(width=32, layers=3, heads=2, mlp_width=48)).eval()
    ours.load_state_dict({k.removeprefix("text_model."): v for k, v in ref.state_dict().items()})
    ids = torch.randint(0, 49408, (1, 77))
    with torch.no_grad():
        hidden = ref(ids, output_hidden_states=True).hidden_states
        for skip in (1, 2, 3):
            expect = ref.final_layer_norm(hidden[-skip]) if hasattr(ref, "final_layer_norm") \
                else ref.text_model.final_layer_norm(hidden[-skip])
            torch.testing.assert_close(ours(ids, clip_skip=skip), expect, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="clip_skip"):
        ours(ids, clip_skip=4)


def test_v_probe_on_constructed_models():
    """The SD2 prediction-type probe separates a model that returns -x from one that returns noise."""
    unet = UNet(sdtorch.TINY.unet).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
        assert detect.probe_v_prediction(unet, 32) is False  # output 0: mean(out - x) = -0.5
        unet.conv_out.bias.fill_(-2.0)  # output -2 everywhere: far below x = 0.5
        assert detect.probe_v_prediction(unet, 32) is True

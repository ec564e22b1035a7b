"""Full SD15 size (859.5 M UNet, 83.7 M VAE, 123 M text encoder) against diffusers/transformers.

Opt in with `pytest -m slow`; it writes about 4.3 GB to a temporary folder and needs ~14 GB of RAM.
"""

from __future__ import annotations

import pytest
import torch
from test_checkpoints import assert_close, assert_same_weights

import sdtorch
from sdtorch.checkpoints import detect, read_state_dict

pytestmark = pytest.mark.slow


@torch.no_grad()
def test_sd15_full_size_parity(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).eval()  # diffusers' SD1 defaults
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4).eval()
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,  # ViT-L/14
                                        num_attention_heads=12, hidden_act="quick_gelu")).eval()
    assert (sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in vae.parameters())) \
        == (859520964, 83653863)
    folder = tmp_path / "sd15"
    folder.mkdir()
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text("{}")
    sdtorch.build("tiny").tokenizer.save(folder / "tokenizer")

    model = sdtorch.load(folder)
    assert model.config.unet == sdtorch.SD15.unet and model.config.vae == sdtorch.SD15.vae
    assert model.config.text == sdtorch.SD15.text

    ref = full_outputs(unet, vae, text, ours=False)
    mine = full_outputs(model.unet, model.vae, model.text_encoder, ours=True)
    errors = assert_close(ref, mine, tol=1e-5)
    print("SD15 max abs difference against diffusers/transformers:", {k: f"{v:.2e}" for k, v in errors.items()})

    path = model.save_single_file(tmp_path / "sd15.safetensors")
    assert detect.infer_config(read_state_dict(path), "sd1").unet == sdtorch.SD15.unet
    again = sdtorch.load(path)
    assert again.report.ok, str(again.report)
    assert_same_weights(model, again)


def full_outputs(unet, vae, text, ours: bool) -> dict:
    """Seeded outputs; 32x32 latents still pass through every UNet level."""
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([601.0])
    image, latents = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, torch.randn(1, 4, 8, 8, generator=g)
    ids = torch.randint(0, 49408, (1, 77), generator=g)
    with torch.no_grad():
        if ours:
            post = vae.encode(image)
            return dict(unet=unet(x, t, ctx), mean=post.mean, decoded=vae.decode(latents), text=text(ids))
        post = vae.encode(image).latent_dist
        return dict(unet=unet(x, t, ctx).sample, mean=post.mean, decoded=vae.decode(latents).sample,
                    text=text(ids).last_hidden_state)

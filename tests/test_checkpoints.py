"""Every checkpoint format, proven against diffusers/transformers with the same weights (fp32, 1e-5)."""

from __future__ import annotations

import torch
from conftest import seeded_inputs

import sdtorch

TOL = 1e-5


@torch.no_grad()
def reference_outputs(unet, vae, text, in_channels):
    i = seeded_inputs(in_channels)
    post = vae.encode(i["image"]).latent_dist
    return dict(unet=unet(i["x"], i["t"], i["ctx"]).sample, mean=post.mean, std=post.std,
                decoded=vae.decode(i["latents"]).sample, text=text(i["ids"]).last_hidden_state)


@torch.no_grad()
def sdtorch_outputs(model, in_channels):
    i = seeded_inputs(in_channels)
    post = model.vae.encode(i["image"])
    return dict(unet=model.unet(i["x"], i["t"], i["ctx"]), mean=post.mean, std=post.std,
                decoded=model.vae.decode(i["latents"]), text=model.text_encoder(i["ids"]))


def assert_close(a: dict, b: dict, tol=TOL) -> dict:
    errors = {}
    for k in a:
        assert a[k].shape == b[k].shape, k
        err = (a[k].float() - b[k].float()).abs().max().item()
        assert err <= tol, f"{k}: max abs difference {err:.3g} > {tol}"
        assert a[k].abs().max() > 1e-3, f"{k}: output is trivially small, the test would prove nothing"
        errors[k] = err
    return errors


def assert_same_weights(a, b):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = a.modules[name].state_dict(), b.modules[name].state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs"


def test_diffusers_folder_matches_reference(reference):
    model = sdtorch.load(reference["folder"])
    assert model.report.ok, str(model.report)
    n_in = model.config.unet.in_channels
    assert n_in == (9 if reference["layout"] == "inpaint" else 4)
    assert model.config.inpainting == (reference["layout"] == "inpaint")
    assert model.config.prediction_type == ("v_prediction" if reference["layout"] == "sd2" else "epsilon")
    ref = reference_outputs(reference["unet"], reference["vae"], reference["text"], n_in)
    assert_close(ref, sdtorch_outputs(model, n_in))


def test_single_file_roundtrip_through_diffusers_converter(reference, tmp_path):
    """diffusers folder -> sdtorch -> original .safetensors -> diffusers from_single_file, and sdtorch again."""
    from diffusers import StableDiffusionPipeline

    model = sdtorch.load(reference["folder"])
    path = model.save_single_file(tmp_path / "model.safetensors")
    n_in = model.config.unet.in_channels
    ref = reference_outputs(reference["unet"], reference["vae"], reference["text"], n_in)

    theirs = StableDiffusionPipeline.from_single_file(str(path), config=str(reference["folder"]),
                                                      local_files_only=True, safety_checker=None)
    assert_close(ref, reference_outputs(theirs.unet, theirs.vae, theirs.text_encoder, n_in))

    again = sdtorch.load(path)
    assert again.report.ok, str(again.report)
    assert again.config == model.config
    assert_close(ref, sdtorch_outputs(again, n_in))


def test_original_keys_are_the_compvis_layout(reference, tmp_path):
    model = sdtorch.load(reference["folder"])
    sd = sdtorch.checkpoints.read_state_dict(model.save_single_file(tmp_path / "m.safetensors"))
    keys = set(sd)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys  # upsampler of the attention-free level
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in keys  # upsampler after attention
    assert sd.shape("first_stage_model.encoder.mid.attn_1.q.weight")[2:] == (1, 1)
    if reference["layout"] == "sd2":
        assert sd.shape("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight") == (96, 32)
    else:
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys


def test_ckpt_with_ema_loads_ema_weights(tmp_path):
    """A Lightning-style .ckpt: `state_dict` with EMA copies and schedule buffers beside the weights."""
    torch.manual_seed(0)
    model = sdtorch.build("tiny")
    path = model.save_single_file(tmp_path / "m.safetensors")
    sd = dict(sdtorch.checkpoints.read_state_dict(path))
    ema = {}
    for k, v in sd.items():
        if k.startswith("model.diffusion_model."):
            ema["model_ema." + k[len("model."):].replace(".", "")] = v + 0.01
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {**sd, **ema, "betas": torch.zeros(1000), "model_ema.decay": torch.tensor(0.999)},
                "global_step": 5}, ckpt)

    plain = sdtorch.load(ckpt, config="tiny")
    assert plain.report.ok and plain.report.detected["ema"][0] == "present, not used"
    torch.testing.assert_close(plain.unet.conv_in.weight, model.unet.conv_in.weight, rtol=0, atol=0)
    with_ema = sdtorch.load(ckpt, config="tiny", use_ema=True)
    assert with_ema.report.ok, str(with_ema.report)
    torch.testing.assert_close(with_ema.unet.conv_in.weight, model.unet.conv_in.weight + 0.01, rtol=0, atol=0)


def test_save_diffusers_opens_in_diffusers(reference, tmp_path):
    from diffusers import StableDiffusionPipeline

    model = sdtorch.load(reference["folder"])
    model.save_diffusers(tmp_path / "out")
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    n_in = model.config.unet.in_channels
    assert_close(sdtorch_outputs(model, n_in), reference_outputs(theirs.unet, theirs.vae, theirs.text_encoder, n_in))
    assert theirs.scheduler.config.prediction_type == model.config.prediction_type
    back = sdtorch.load(tmp_path / "out")
    assert back.config == model.config
    assert_same_weights(model, back)


def test_dtype_on_load(reference, tmp_path):
    model = sdtorch.load(reference["folder"], dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for m in model.modules.values() for p in m.parameters())
    assert all(c.dtype == "bfloat16" for c in model.report.components)
    half = model.save_single_file(tmp_path / "half.safetensors", dtype="fp16")
    kept = sdtorch.load(half)  # no dtype: keep the checkpoint's own
    assert next(kept.unet.parameters()).dtype == torch.float16


def test_vae_without_middle_attention_matches_diffusers(tmp_path):
    """diffusers' mid_block_add_attention=False: the folder, our save (opened by diffusers) and a single file."""
    from diffusers import AutoencoderKL

    from sdtorch.checkpoints import load_vae, save_vae

    torch.manual_seed(3)
    ref = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, sample_size=16, mid_block_add_attention=False).eval()
    ref.save_pretrained(tmp_path / "ref")
    ours = load_vae(tmp_path / "ref", torch.float32)
    assert ours.config.mid_attention is False and len(ours.decoder.mid_block.attentions) == 0
    i = seeded_inputs(4)
    with torch.no_grad():
        expected = dict(mean=ref.encode(i["image"]).latent_dist.mean, decoded=ref.decode(i["latents"]).sample)
        assert_close(expected, dict(mean=ours.encode(i["image"]).mean, decoded=ours.decode(i["latents"])))
        save_vae(ours, tmp_path / "ours", 32)
        back = AutoencoderKL.from_pretrained(tmp_path / "ours").eval()
        assert_close(expected, dict(mean=back.encode(i["image"]).latent_dist.mean,
                                    decoded=back.decode(i["latents"]).sample))
    model = sdtorch.build("tiny")
    model.use_vae(ours)
    model.save_single_file(tmp_path / "m.safetensors")
    again = sdtorch.load(tmp_path / "m.safetensors")  # the architecture detected from the keys
    assert again.config.vae.mid_attention is False
    assert_same_weights(model, again)

"""Class-conditional and unconditional UNets: parity with diffusers' UNet2DConditionModel(num_class_embeds=...)
and UNet2DModel on tiny random models that diffusers saved itself, round trips through sdtorch's two formats,
the strict key report, and config validation."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from conftest import _perturb_norms
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sdtorch
from sdtorch import checkpoints
from sdtorch.checkpoints import detect, read_state_dict
from sdtorch.config import ConfigError, ModelConfig, UNetConfig, VAEConfig
from sdtorch.errors import CheckpointError
from sdtorch.models import AutoencoderKL, UNet

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5
CLASSES = 3  # classes 0..2, and 3 the null class

# name -> (diffusers UNet class, its config beside the shared tiny one)
UNETS = {
    "time-cross": ("UNet2DConditionModel", dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, num_class_embeds=CLASSES + 1)),
    "uncond": ("UNet2DModel", dict(
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16)),
    "uncond-one-head-no-mid": ("UNet2DModel", dict(
        down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=None, add_attention=False)),
    "time-uncond": ("UNet2DModel", dict(
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16, num_class_embeds=CLASSES + 1)),
}


def _reference_folder(folder, name: str):
    """A diffusers folder written by diffusers' own save_pretrained: LDMPipeline for an unconditional UNet,
    else a bare pipeline of the three components (diffusers has no class-conditional UNet pipeline)."""
    import diffusers
    from diffusers import AutoencoderKL as HFAutoencoderKL
    from diffusers import DDIMScheduler, DiffusionPipeline, LDMPipeline

    class ClassPipeline(DiffusionPipeline):
        def __init__(self, unet, vae, scheduler):
            super().__init__()
            self.register_modules(unet=unet, vae=vae, scheduler=scheduler)

    kind, extra = UNETS[name]
    torch.manual_seed(0)
    unet = getattr(diffusers, kind)(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                    layers_per_block=1, norm_num_groups=8, **extra)
    vae = HFAutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                          sample_size=16)
    _perturb_norms(unet, vae)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if "num_class_embeds" in extra:
        ClassPipeline(unet=unet, vae=vae, scheduler=scheduler).save_pretrained(folder)
    else:
        LDMPipeline(vqvae=vae, unet=unet, scheduler=scheduler).save_pretrained(folder)
    return unet.eval()


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(2, 4, 8, 8, generator=g), t=torch.tensor([3.0, 977.0]),
                ctx=torch.randn(2, 5, 32, generator=g), labels=torch.tensor([1, CLASSES]))  # a class and the null


def _ours(unet: UNet, i: dict, context=None) -> torch.Tensor:
    with torch.no_grad():
        return unet(i["x"], i["t"], context, i["labels"] if unet.config.num_classes else None)


def _theirs(unet, i: dict, context=None) -> torch.Tensor:
    labels = i["labels"] if unet.config.get("num_class_embeds") else None
    with torch.no_grad():
        if unet.__class__.__name__ == "UNet2DModel":
            return unet(i["x"], i["t"], class_labels=labels).sample
        return unet(i["x"], i["t"], encoder_hidden_states=context, class_labels=labels).sample


@pytest.mark.parametrize("name", list(UNETS))
def test_matches_diffusers_and_round_trips(name, tmp_path):
    reference = _reference_folder(tmp_path / "ref", name)
    config, modules, tokenizer, report = checkpoints.read_checkpoint(tmp_path / "ref")
    assert report.ok and modules["text_encoder"] is None and tokenizer is None and config.text is None
    assert config.unet.conditioning == ("none" if name.startswith("uncond") else "class")
    i = _inputs()
    if config.unet.cross_attention:  # "time" mode beside cross-attention: any context, or one zero token
        err = (_ours(modules["unet"], i, i["ctx"]) - _theirs(reference, i, i["ctx"])).abs().max().item()
        zeros = torch.zeros(2, 1, 32)
        assert torch.equal(_ours(modules["unet"], i), _ours(modules["unet"], i, zeros))
        err = max(err, (_ours(modules["unet"], i) - _theirs(reference, i, zeros)).abs().max().item())
    else:
        err = (_ours(modules["unet"], i) - _theirs(reference, i)).abs().max().item()
    assert err < TOL, f"{name}: max abs difference {err:.2e} from diffusers"
    ours = _ours(modules["unet"], i)

    single = checkpoints.save_single_file(modules, config, tmp_path / "model.safetensors")
    assert detect.detect_family(read_state_dict(single)) == "custom"  # from the metadata: no text keys
    folder = checkpoints.save_diffusers(modules, config, None, tmp_path / "ours")
    for path in (single, folder):
        config2, modules2, tokenizer2, report2 = checkpoints.read_checkpoint(path)
        assert report2.ok and config2 == config and tokenizer2 is None and modules2["text_encoder"] is None
        assert torch.equal(_ours(modules2["unet"], i), ours), path
    if config.unet.num_classes is not None:
        key = "model.diffusion_model.label_emb.weight"  # openaimodel's name of the "time" class table
        assert read_state_dict(single).shape(key) == (CLASSES + 1, 128)
    # what sdtorch wrote opens in diffusers
    from diffusers import LDMPipeline, UNet2DConditionModel, UNet2DModel

    kind = UNet2DConditionModel if config.unet.cross_attention else UNet2DModel
    theirs = kind.from_pretrained(folder / "unet").eval()
    assert (_theirs(theirs, i, torch.zeros(2, 1, 32)) - ours).abs().max().item() < TOL
    if name == "uncond":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = LDMPipeline.from_pretrained(folder)  # warns that vqvae is an AutoencoderKL, and runs
        image = pipe(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
        assert image.shape == (1, 16, 16, 3)


CONTEXT = ModelConfig(family="custom", text=None, sample_size=16,
                      unet=UNetConfig(block_channels=(32, 64), attention_levels=(False, True), layers_per_block=1,
                                      num_heads=2, context_dim=32, norm_groups=8, num_classes=CLASSES),
                      vae=VAEConfig(block_channels=(32, 64), layers_per_block=1, norm_groups=8))


def _context_model():
    torch.manual_seed(0)
    modules = {"unet": UNet(CONTEXT.unet).eval(), "vae": AutoencoderKL(CONTEXT.vae).eval()}
    with torch.no_grad():
        modules["unet"].class_context.weight.normal_()
    _perturb_norms(*modules.values())
    return modules


def test_context_mode_is_ldm_class_embedder_and_round_trips(tmp_path):
    from diffusers import UNet2DConditionModel

    modules, i = _context_model(), _inputs()
    ours = _ours(modules["unet"], i)
    folder = checkpoints.save_diffusers(modules, CONTEXT, None, tmp_path / "model")
    unet_json = json.loads((folder / "unet" / "config.json").read_text())
    assert unet_json["sdtorch_class_context_embeds"] == CLASSES + 1 and "num_class_embeds" not in unet_json
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "SDTorchClassConditionalPipeline"
    # LDM's ClassEmbedder: the class's row is a one-token context, here fed by hand to diffusers' UNet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    context = modules["unet"].class_context.weight[i["labels"]][:, None]
    assert (theirs(i["x"], i["t"], encoder_hidden_states=context).sample - ours).abs().max().item() < TOL

    single = checkpoints.save_single_file(modules, CONTEXT, tmp_path / "model.safetensors")
    assert read_state_dict(single).shape("cond_stage_model.embedding.weight") == (CLASSES + 1, 32)
    for path in (folder, single):
        config, back, _, report = checkpoints.read_checkpoint(path)
        assert report.ok and config == CONTEXT and torch.equal(_ours(back["unet"], i), ours)
        assert report.detected["conditioning"][0].startswith("3 classes (context mode), null class 3")


def _drop_key(path, key):
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    del tensors[key]
    save_file(tensors, str(path), metadata=metadata)


def test_missing_class_tables_are_named(tmp_path):
    _reference_folder(tmp_path / "ref", "time-cross")
    _drop_key(tmp_path / "ref" / "unet" / "diffusion_pytorch_model.safetensors", "class_embedding.weight")
    with pytest.raises(CheckpointError, match=r"1 missing in unet: class_embedding\.weight"):
        checkpoints.read_checkpoint(tmp_path / "ref")
    config, modules, _, report = checkpoints.read_checkpoint(tmp_path / "ref", strict=False)
    assert report.components[0].missing == ["class_embedding.weight"]

    modules = _context_model()
    single = checkpoints.save_single_file(modules, CONTEXT, tmp_path / "model.safetensors")
    _drop_key(single, "cond_stage_model.embedding.weight")
    with pytest.raises(CheckpointError, match=r"cond_stage_model\.embedding\.weight \(for class_context\.weight\)"):
        checkpoints.read_checkpoint(single)
    # a class table the config does not expect ("time" mode's, in a "context"-mode file) is unexpected
    extra = checkpoints.save_single_file(modules, CONTEXT, tmp_path / "extra.safetensors")
    tensors = load_file(str(extra))
    tensors["model.diffusion_model.label_emb.weight"] = torch.zeros(CLASSES + 1, 128)
    save_file(tensors, str(extra), metadata={"sdtorch_config": json.dumps(dataclasses.asdict(CONTEXT))})
    with pytest.raises(CheckpointError, match=r"1 unexpected: model\.diffusion_model\.label_emb\.weight"):
        checkpoints.read_checkpoint(extra)


@pytest.mark.parametrize("fields, message", [
    (dict(num_classes=0), "unet.num_classes = 0: must be a positive integer"),
    (dict(num_classes=True), "unet.num_classes = True: must be a positive integer"),
    (dict(num_classes=3, class_conditioning="film"), "unet.class_conditioning = 'film': expected one of context, time"),
    (dict(num_classes=3, cross_attention=False, num_heads=None, head_dim=16),
     "unet.class_conditioning = 'context': feeds the class to the cross-attention"),
    (dict(mid_attention=False), "unet.mid_attention = False: the middle block of a cross-attention UNet"),
    (dict(cross_attention=False, num_heads=2), "unet.num_heads = 2: a UNet without cross-attention"),
    (dict(cross_attention="no"), "unet.cross_attention = 'no': must be true or false"),
])
def test_config_validation(fields, message):
    with pytest.raises(ConfigError) as e:
        UNetConfig(block_channels=(32, 64), attention_levels=(False, True), norm_groups=8, **fields)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_parts_and_forward_refuse_the_wrong_condition():
    with pytest.raises(ConfigError, match="a class-conditional UNet takes no text encoder"):
        sdtorch.TINY.replace(unet={"num_classes": 3}).check_parts()
    with pytest.raises(ConfigError, match="needs a text encoder"):
        sdtorch.TINY.replace(text=None).check_parts()
    CONTEXT.check_parts()
    assert CONTEXT.unet.null_class == CLASSES and sdtorch.TINY.unet.null_class is None
    unet, i = UNet(CONTEXT.unet), _inputs()
    with pytest.raises(ValueError, match="needs class_labels"):
        unet(i["x"], i["t"])
    with pytest.raises(ValueError, match="context given"):
        unet(i["x"], i["t"], i["ctx"], i["labels"])
    with pytest.raises(ValueError, match="class_labels given to a UNet without classes"):
        UNet(sdtorch.TINY.unet)(i["x"], i["t"], i["ctx"], i["labels"])


def test_folder_class_count_is_checked(tmp_path):
    _reference_folder(tmp_path / "ref", "time-uncond")
    path = tmp_path / "ref" / "unet" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_class_embeds": 1}))
    with pytest.raises(CheckpointError, match=r"unet/config.json: num_class_embeds = 1: expected an integer of at "
                                              r"least 2 \(the classes, then the null class\)"):
        checkpoints.read_checkpoint(tmp_path / "ref")

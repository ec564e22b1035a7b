"""Tiny randomly initialised reference models (diffusers + transformers) in the SD1, SD2 and
inpainting layouts, saved by the reference libraries themselves as diffusers folders."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# pytest-xdist (`-n`, set in pyproject.toml's addopts) runs the suite in several worker processes: each gets an
# equal share of the cores for torch and for the subprocesses it starts (the CLI, torchrun), so the workers do
# not oversubscribe the machine. A value the user set wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

warnings.filterwarnings("ignore", category=FutureWarning)

# name -> (unet in_channels, text activation, linear projection, heads per level)
LAYOUTS = {
    "sd1": dict(in_channels=4, act="quick_gelu", linear=False, heads=2),
    "sd2": dict(in_channels=4, act="gelu", linear=True, heads=(2, 4, 4)),  # head width 16 at every level
    "inpaint": dict(in_channels=9, act="quick_gelu", linear=False, heads=2),
}
CHANNELS = (32, 64, 64)


def reference_components(layout: str, seed: int = 0):
    """(unet, vae, text_encoder) from diffusers/transformers at a tiny config."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = LAYOUTS[layout]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=spec["in_channels"], out_channels=4, block_out_channels=CHANNELS,
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=spec["heads"], use_linear_projection=spec["linear"], norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=77, hidden_act=spec["act"], projection_dim=32))
    _perturb_norms(unet, vae, text)
    return unet.eval(), vae.eval(), text.eval()


def _perturb_norms(*modules):
    """Give norms random affine weights (they start at 1/0) so a swapped norm cannot go unnoticed."""
    with torch.no_grad():
        for m in modules:
            for name, p in m.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))


def save_reference_folder(folder, layout: str, seed: int = 0):
    """Write a diffusers folder with diffusers' and transformers' own save_pretrained."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer as HFTokenizer

    from sdtorch.tokenizer import CLIPTokenizer

    unet, vae, text = reference_components(layout, seed)
    tok_dir = folder.parent / f"{folder.name}-tok"
    CLIPTokenizer.bundled("!" if layout == "sd2" else "<|endoftext|>").save(tok_dir)
    scheduler = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              skip_prk_steps=True, prediction_type="v_prediction" if layout == "sd2" else "epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=HFTokenizer.from_pretrained(tok_dir),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return unet, vae, text


def write_discs(folder, n: int, colours: dict, caption) -> None:
    """`n` 32 px images of a coloured disc on the left or the right (seed 0), each with a same-name .txt:
    caption(colour name, "left" or "right")."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    for i in range(n):
        name, x = rng.choice(list(colours)), rng.choice([8, 24])
        im = Image.new("RGB", (32, 32), (245, 245, 245))
        ImageDraw.Draw(im).ellipse([x - 6, 10, x + 6, 22], fill=colours[name])
        im.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption(name, "left" if x == 8 else "right"))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    on a busy 2-core machine, two threads wait on each other and tiny models run up to 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", params=list(LAYOUTS))
def reference(request, tmp_path_factory):
    """A diffusers folder per layout, with the in-memory reference modules that wrote it."""
    layout = request.param
    folder = tmp_path_factory.mktemp(layout) / "model"
    unet, vae, text = save_reference_folder(folder, layout)
    return dict(layout=layout, folder=folder, unet=unet, vae=vae, text=text)


def seeded_inputs(in_channels: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(2, in_channels, 16, 16, generator=g), t=torch.tensor([3.0, 977.0]),
                ctx=torch.randn(2, 77, 32, generator=g), image=torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
                latents=torch.randn(2, 4, 8, 8, generator=g), ids=torch.randint(0, 49408, (2, 77), generator=g))


@pytest.fixture(scope="session")
def cli():
    """The real CLI, one forked process per call (see cli_harness.py)."""
    from cli_harness import CLI

    runner = CLI()
    yield runner
    runner.close()

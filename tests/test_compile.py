"""`model.compile()` (torch.compile, Inductor) gives the eager model's images, and follows every LoRA change.
The first test is slow (about 35 s of compiling on a 2-core CPU), so it runs with `-m slow`. The LoRA one, with
frozen weights (the default), runs in CI (about 80 s on 2 cores: six compiles), since a compiled model that
ignores a LoRA draws a wrong picture without a word.

Inductor fuses element-wise work into generated C++ loops and may reorder float sums, so the compiled UNet's
outputs differ from eager ones in their last bits (~1e-7 relative in fp32). Measured: 2e-6 in [0, 1] pixels after
2 steps of the tiny model (AVX512, 2026-12-01). The bound, 1e-4, is 50 times that for other CPUs' vector widths and
still far below what a wrong kernel gives (a dropped residual or norm moves pixels by tenths).
"""

from __future__ import annotations

import shutil

import pytest

import sdtorch

needs_compiler = pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))),
                                    reason="torch.compile's CPU backend needs a C++ compiler")


@pytest.mark.slow
@needs_compiler
def test_compiled_unet_gives_the_eager_images():
    model = sdtorch.build("tiny")
    kw = dict(steps=2, seed=1, batch_size=2, output_type="tensor")
    eager = model.txt2img("a red circle", **kw)
    unet = model.unet
    assert model.compile() is model and model.unet is unet, "compiled in place: the same module and weights"
    compiled = model.txt2img("a red circle", **kw)
    assert (compiled - eager).abs().max() <= 1e-4
    assert set(model.unet.state_dict()) == set(sdtorch.build("tiny").unet.state_dict()), "keys unchanged"


@needs_compiler
@pytest.mark.parametrize("freeze", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_compiled_unet_follows_every_lora_change(tmp_path, freeze):
    """With `freeze` (the default) the weights are constants of the compiled graph, and with or without it the
    compiled code does not see LoRA hooks added later, so each LoRA change must make it compile again: load,
    scale, merge, unmerge and unload each give the eager model's images for that state. The LoRA changes the tiny
    image by far more than the 1e-4 bound (checked on the eager side)."""
    from test_cli_lora import make_lora

    model, eager_model = sdtorch.build("tiny", seed=3), sdtorch.build("tiny", seed=3)
    lora = make_lora(sdtorch.build("tiny", seed=3), tmp_path / "style.safetensors", seed=1)
    kw = dict(steps=2, seed=1, output_type="tensor")
    model.compile(freeze=freeze)

    def same(step: str):
        a, b = model.txt2img("a red circle", **kw), eager_model.txt2img("a red circle", **kw)
        # the bound of the module docstring; frozen weights folded in gave 7.5e-7 on the built-in model after
        # 10 steps (benchmarks/shapes_speed.py --compile, AVX512, 2026-12-04), a stale graph 0.16 here
        assert (a - b).abs().max() <= 1e-4, step
        return b

    base = same("base")
    for m in (model, eager_model):
        m.load_lora(lora, 1.0, name="style")
    assert (same("loaded") - base).abs().max() > 0.05, "the LoRA changes the image"
    for m in (model, eager_model):
        m.set_lora_scale("style", 0.5)
    same("scale 0.5")
    for m in (model, eager_model):
        m.merge_lora()
    same("merged")
    for m in (model, eager_model):
        m.unmerge_lora()
        m.unload_lora("style")
    assert (same("unloaded") - base).abs().max() == 0

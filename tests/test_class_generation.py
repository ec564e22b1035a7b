"""Sampling class-conditional and unconditional models (tiny random ones): labels and guidance against the null
class, names, saving and loading, the parameters text, and bad requests."""

from __future__ import annotations

import pytest
import torch

import sdtorch
from sdtorch import generation, infotext

CLASS = sdtorch.TINY.replace(unet={"num_classes": 3}, text=None)
TIME = sdtorch.TINY.replace(unet={"num_classes": 3, "class_conditioning": "time", "cross_attention": False,
                                  "num_heads": None, "head_dim": 16}, text=None)
NONE = sdtorch.TINY.replace(unet={"cross_attention": False, "num_heads": None, "head_dim": 16}, text=None)


@pytest.fixture(scope="module", params=["context", "time"])
def class_model(request):
    model = sdtorch.build(CLASS if request.param == "context" else TIME, seed=1)
    model.class_names = ["red circle", "blue square", "green triangle"]
    return model


def test_class_models_sample_by_name_or_index_and_guide_against_the_null_class(class_model):
    kw = dict(steps=3, seed=4, output_type="tensor")
    by_name = class_model.txt2img(class_label="blue square", **kw)
    assert torch.equal(by_name, class_model.txt2img(class_label=1, **kw))
    assert torch.equal(by_name, class_model.txt2img(class_label="1", **kw))
    assert not torch.equal(by_name, class_model.txt2img(class_label=0, **kw)), "the label reaches the UNet"
    seen = []
    unet_forward = class_model.unet.forward

    def spy(x, t, context=None, class_labels=None):
        seen.append(class_labels.tolist())
        return unet_forward(x, t, context, class_labels)

    class_model.unet.forward = spy
    try:
        class_model.txt2img(class_label=2, guidance=3.0, batch_size=2, batch_mode="batched", **kw)
    finally:
        class_model.unet.forward = unet_forward
    assert seen[0] == [3, 3, 2, 2], "one batch: the null class (index 3) for both images, then the class"


def test_the_parameters_record_the_class_and_a_saved_model_keeps_its_names(class_model, tmp_path):
    result = generation.generate(class_model, generation.resolve("", class_model, class_label="green triangle",
                                                                 steps=2, seed=0))
    assert infotext.parse(result.parameters[0])[2]["Class"] == "green triangle"
    folder = class_model.save_diffusers(tmp_path / "m")
    again = sdtorch.load(folder)
    assert again.text_encoder is None and again.tokenizer is None
    assert again.class_names == class_model.class_names
    assert torch.equal(again.txt2img(class_label="green triangle", steps=2, seed=0, output_type="tensor"),
                       result.images)


def test_unconditional_models_sample_with_no_prompt_and_no_guidance():
    model = sdtorch.build(NONE, seed=2)
    a = model.txt2img(steps=3, seed=1, output_type="tensor")
    assert a.shape == (1, 3, 64, 64) and torch.isfinite(a).all()
    assert not torch.equal(a, model.txt2img(steps=3, seed=2, output_type="tensor"))
    assert generation.resolve("", model).guidance == 1.0
    assert set(model.modules) == {"unet", "vae"}


@pytest.mark.parametrize("which, kwargs, message", [
    ("class", dict(prompt="a cat", class_label=0), "a class-conditional model takes no prompt"),
    ("class", dict(), "the model is class-conditional: ask for a class"),
    ("class", dict(class_label="purple"), "unknown class 'purple': its classes are red circle, blue square"),
    ("class", dict(class_label=3), r"class index 3 is out of range: the model has 3 classes \(0 to 2\)"),
    ("class", dict(class_label=-1), "class index -1 is out of range"),
    ("none", dict(prompt="a cat"), "an unconditional model takes no prompt"),
    ("none", dict(guidance=4.0), "an unconditional model has nothing to guide by"),
    ("none", dict(class_label=1), "is not class-conditional"),
    ("text", dict(prompt="x", class_label=1), "is not class-conditional"),
])
def test_a_request_that_does_not_fit_the_conditioning_is_one_line(which, kwargs, message):
    model = sdtorch.build({"class": CLASS, "none": NONE, "text": sdtorch.TINY}[which])
    if which == "class":
        model.class_names = ["red circle", "blue square", "green triangle"]
    kwargs = {"prompt": "", **kwargs}
    with pytest.raises(sdtorch.SDTorchError, match=message):
        model.txt2img(kwargs.pop("prompt"), steps=1, **kwargs)


def test_class_index_reads_names_and_indices_and_keeps_a_long_list_short():
    from sdtorch.pipeline import SHOWN_CLASSES, class_index
    names = [f"class{i}" for i in range(1000)]
    assert class_index("class7", 1000, names) == 7
    assert class_index(" 12 ", 1000, names) == 12 and class_index(999, 1000, None) == 999
    with pytest.raises(sdtorch.SDTorchError) as error:
        class_index("dog", 1000, names)
    message = str(error.value)
    assert message.startswith("unknown class 'dog': its classes are class0, class1,") and "\n" not in message
    assert f"class{SHOWN_CLASSES - 1}, ... (1000 in all)" in message and f"class{SHOWN_CLASSES}," not in message
    with pytest.raises(sdtorch.SDTorchError, match="it names no classes; give an index 0 to 3"):
        class_index("dog", 4, None)
    with pytest.raises(sdtorch.SDTorchError, match="unknown class True"):
        class_index(True, 4, None)


def test_class_names_must_fit_the_model():
    model = sdtorch.build(CLASS)
    for names in (["a", "b"], ["a", "a", "b"], ["a", "b", "7"]):
        with pytest.raises(sdtorch.SDTorchError, match="expected 3 distinct class names"):
            sdtorch.pipeline.check_class_names(names, model.config, "names")
    with pytest.raises(sdtorch.SDTorchError, match="not class-conditional"):
        sdtorch.pipeline.check_class_names(["a"], sdtorch.TINY, "names")


def test_the_cli_draws_a_class_replays_it_and_refuses_what_does_not_fit(tmp_path):
    import numpy as np
    from PIL import Image
    from test_bad_input import assert_one_line_error, run_cli

    model = sdtorch.build(CLASS, seed=1)
    model.class_names = ["red circle", "blue square", "green triangle"]
    folder = model.save_diffusers(tmp_path / "classes")
    out = tmp_path / "c.png"
    code, _, err = run_cli("generate", "-m", folder, "--class", "blue square", "--steps", "2", "--seed", "5",
                           "-o", out)
    assert code == 0, err
    assert infotext.parse(Image.open(out).info["parameters"])[2]["Class"] == "blue square"
    code, _, err = run_cli("replay", out)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "c-replay.png")))
    bad = tmp_path / "bad.png"
    assert_one_line_error(["generate", "a cat", "-m", folder, "-o", bad], "takes no prompt")
    assert_one_line_error(["generate", "-m", folder, "--class", "purple", "-o", bad], "unknown class 'purple'")
    assert_one_line_error(["generate", "-m", folder, "--unconditional", "-o", bad], "is class-conditioned")
    assert_one_line_error(["generate", "x", "--class", "1", "-o", bad], "is not class-conditional")
    assert not bad.exists()
    none = sdtorch.build(NONE).save_diffusers(tmp_path / "none")
    code, _, err = run_cli("generate", "-m", none, "--unconditional", "--steps", "2", "-o", tmp_path / "u.png")
    assert code == 0, err

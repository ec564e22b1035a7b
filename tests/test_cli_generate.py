"""End to end: the generation CLI in a subprocess on a tiny saved model, PNG parameters and replay."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_bad_input import assert_one_line_error, run_cli

import sdtorch
from sdtorch import infotext


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    sdtorch.build("tiny", seed=3).save_single_file(path)
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_replay_and_python_api_are_bit_identical(model_file, tmp_path):
    code, out, err = run_cli("generate", "a red circle, (big:1.2)", "-m", model_file, "--seed", "10", "--steps", "3",
                             "-b", "2", "-n", "blurry", "--sampler", "euler_a", "-o", tmp_path / "img-{seed}.png")
    assert code == 0, err
    assert "sampling" in err  # the progress bar
    params = Image.open(tmp_path / "img-11.png").info["parameters"]
    prompt, negative, fields = infotext.parse(params)
    assert (prompt, negative) == ("a red circle, (big:1.2)", "blurry")
    assert fields["Seed"] == "11" and fields["Sampler"] == "Euler a" and fields["Size"] == "64x64"
    assert fields["Model hash"] == infotext.model_hash(model_file)

    code, out, err = run_cli("generate", "a red circle, (big:1.2)", "-m", model_file, "--seed", "11", "--steps", "3",
                             "-n", "blurry", "--sampler", "euler_a", "-o", tmp_path / "single.png")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "single.png"), pixels(tmp_path / "img-11.png")), "batch size changed it"

    code, out, err = run_cli("replay", tmp_path / "img-11.png")
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "img-11-replay.png"), pixels(tmp_path / "img-11.png"))

    api = sdtorch.load(model_file).txt2img("a red circle, (big:1.2)", negative_prompt="blurry", steps=3, seed=11,
                                           sampler="euler_a")[0]
    assert np.array_equal(np.asarray(api), pixels(tmp_path / "img-11.png")), "CLI and Python API differ"
    assert not np.array_equal(pixels(tmp_path / "img-10.png"), pixels(tmp_path / "img-11.png"))


def test_img2img_and_inpaint(model_file, tmp_path):
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "src.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    code, _, err = run_cli("img2img", tmp_path / "src.png", "a circle", "-m", model_file, "--strength", "0.5",
                           "--steps", "4", "--seed", "1", "-o", tmp_path / "i2i.png")
    assert code == 0, err
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "i2i.png").info["parameters"]
    code, _, err = run_cli("inpaint", tmp_path / "src.png", tmp_path / "mask.png", "a circle", "-m", model_file,
                           "--steps", "3", "--seed", "1", "--karras", "-o", tmp_path / "inp.png")
    assert code == 0, err
    params = Image.open(tmp_path / "inp.png").info["parameters"]
    assert "Schedule type: Karras" in params and "Mode: inpaint" in params
    assert_one_line_error(["replay", tmp_path / "inp.png"], "text-to-image runs only")
    code, _, err = run_cli("outpaint", tmp_path / "src.png", "a circle", "-m", model_file, "--pad", "8", "0", "8", "0",
                           "--steps", "2", "--seed", "1", "-o", tmp_path / "out.png")
    assert code == 0, err
    assert Image.open(tmp_path / "out.png").size == (80, 64)


def test_bad_generation_input_leaves_no_file(model_file, tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "src.png")
    Image.new("L", (32, 32)).save(tmp_path / "small-mask.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out.png"
    gen = ["generate", "x", "-m", model_file, "--steps", "2", "-o", out]
    for extra, fragment in ((["--width", "60"], "multiples of 8"), (["--steps", "0"], "at least 1"),
                            (["--sampler", "nope"], "valid samplers: ddpm, ddim")):
        assert_one_line_error(gen + extra, fragment)
    assert_one_line_error(["img2img", tmp_path / "src.png", "x", "-m", model_file, "--strength", "1.5", "-o", out],
                          "strength must be in [0, 1]")
    assert_one_line_error(["inpaint", tmp_path / "src.png", tmp_path / "small-mask.png", "x", "-m", model_file,
                           "--steps", "2", "-o", out], "does not match image size")
    assert_one_line_error(["img2img", tmp_path / "broken.png", "x", "-m", model_file, "-o", out],
                          "broken.png", "unreadable image")
    assert_one_line_error(["generate", "x", "-m", model_file, "-o", tmp_path / "missing" / "a.png"], "does not exist")
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_batch_mode_tiling_dtype_and_device_flags(model_file, tmp_path):
    code, _, err = run_cli("generate", "x", "-m", model_file, "--seed", "3", "--steps", "2", "-b", "2",
                           "--batch-mode", "batched", "--vae-tiling", "--dtype", "fp32", "--device", "cpu",
                           "-o", tmp_path / "b-{seed}.png")
    assert code == 0, err
    fields = infotext.parse(Image.open(tmp_path / "b-4.png").info["parameters"])[2]
    assert fields["Batch mode"] == "batched" and fields["VAE tiling"] == "True"
    code, _, err = run_cli("generate", "x", "-m", model_file, "--seed", "4", "--steps", "2", "-o", tmp_path / "s.png")
    assert code == 0, err
    # batched against per-image: float rounding only (tests/test_batch_mode.py), so the 8-bit pixels agree within 1
    diff = np.abs(pixels(tmp_path / "s.png").astype(int) - pixels(tmp_path / "b-4.png").astype(int))
    assert diff.max() <= 1
    assert_one_line_error(["generate", "x", "-m", model_file, "--device", "gpu", "-o", tmp_path / "d.png"],
                          "unknown device 'gpu'")
    assert not (tmp_path / "d.png").exists()


def test_samplers_command_lists_all():
    code, out, _ = run_cli("samplers")
    assert code == 0
    assert [line.split()[0] for line in out.strip().splitlines()] == list(sdtorch.sampling.SAMPLERS)


def test_infotext_roundtrip_and_old_karras_names():
    text = infotext.build('a "quoted", prompt\nsecond line', "neg: x", {
        "Steps": 20, "Sampler": "DPM++ 2M", "CFG scale": 7.5, "Seed": 3, "Size": "512x768", "Model": "a, b.ckpt"})
    prompt, negative, fields = infotext.parse(text)
    assert prompt == 'a "quoted", prompt\nsecond line' and negative == "neg: x"
    assert fields == {"Steps": "20", "Sampler": "DPM++ 2M", "CFG scale": "7.5", "Seed": "3", "Size": "512x768",
                      "Model": "a, b.ckpt"}
    with pytest.raises(sdtorch.SDTorchError, match="Steps"):
        infotext.parse("just a caption")

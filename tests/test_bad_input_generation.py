"""Bad input to the generation commands and the generation API: one clean line (exit code 2, or an
SDTorchError from the API), nothing written, never a traceback, a hang or a black image."""

from __future__ import annotations

import copy
import math
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from cli_harness import assert_clean_error
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import sdtorch
from sdtorch import generation, images
from sdtorch.errors import SDTorchError
from sdtorch.generation import Limits, Request, schedule_max_steps
from sdtorch.sampling import SAMPLERS, get_sigmas, training_sigmas

GOOD_PARAMS = "a circle\nSteps: 2, Sampler: Euler, CFG scale: 7.0, Seed: 1, Size: 16x16, Model: @M"


def png_with_text(path, text=None, size=(64, 64)):
    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    Image.new("RGB", size, (120, 60, 30)).save(path, pnginfo=info)


def claim_size(path, width: int, height: int) -> None:
    """Rewrite a PNG's IHDR width and height (and its CRC): the header then claims a size the data lacks."""
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny model file and every bad (and good) input file the table names, in one folder."""
    d = tmp_path_factory.mktemp("bad-gen")
    sdtorch.build("tiny", seed=3).save_single_file(d / "tiny.safetensors")
    Image.new("RGB", (64, 64), (200, 40, 40)).save(d / "src.png")
    Image.new("RGB", (60, 64)).save(d / "odd.png")
    Image.new("RGB", (4, 64)).save(d / "sliver.png")
    Image.new("L", (64, 64), 255).save(d / "mask.png")
    Image.new("L", (32, 32)).save(d / "small-mask.png")
    (d / "broken.png").write_bytes(b"not an image")
    whole = (d / "src.png").read_bytes()
    (d / "truncated.png").write_bytes(whole[: len(whole) // 2])
    png_with_text(d / "bomb.png")
    claim_size(d / "bomb.png", 50000, 50000)
    (d / "folder").mkdir()
    (d / "dir.png").mkdir()
    os.mkfifo(d / "fifo")
    os.mkfifo(d / "fifo.png")
    (d / "fifo-model" / "unet").mkdir(parents=True)
    os.mkfifo(d / "fifo-model" / "unet" / "diffusion_pytorch_model.safetensors")
    with open(d / "sparse.safetensors", "wb") as f:
        f.truncate(65 << 30)  # a sparse 65 GiB file: larger than any model
    model = str(d / "tiny.safetensors")
    replays = {
        "none": None,
        "unclosed": 'x\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model: "abc',
        "no-seed": "x\nSteps: 2, Sampler: Euler, CFG scale: 7, Size: 64x64, Model: @M",
        "no-steps-line": "just a caption",
        "steps-abc": GOOD_PARAMS.replace("Steps: 2", "Steps: abc"),
        "steps-1001": GOOD_PARAMS.replace("Steps: 2", "Steps: 1001"),
        "size-64": GOOD_PARAMS.replace("Size: 16x16", "Size: 16"),
        "size-3d": GOOD_PARAMS.replace("Size: 16x16", "Size: 16x16x3"),
        "cfg-nan": GOOD_PARAMS.replace("CFG scale: 7.0", "CFG scale: nan"),
        "seed-neg": GOOD_PARAMS.replace("Seed: 1", "Seed: -1"),
        "clip-0": GOOD_PARAMS + ", Clip skip: 0",
        "sampler": GOOD_PARAMS.replace("Euler", "Warp"),
        "model-zero": GOOD_PARAMS.replace("@M", "/dev/zero"),
        "model-fifo": GOOD_PARAMS.replace("@M", str(d / "fifo")),
        "model-fifo-folder": GOOD_PARAMS.replace("@M", str(d / "fifo-model")),
        "model-sparse": GOOD_PARAMS.replace("@M", str(d / "sparse.safetensors")),
        "model-missing": GOOD_PARAMS.replace("@M", str(d / "missing.safetensors")),
        "img2img": GOOD_PARAMS + ", Denoising strength: 0.5, Mode: img2img",
        "good": GOOD_PARAMS,
    }
    for name, text in replays.items():
        png_with_text(d / f"replay-{name}.png", None if text is None else text.replace("@M", model))
    return d


G = ["generate", "x", "-m", "@M", "--steps", "2", "-W", "16", "-H", "16"]
I2I = ["img2img", "@D/src.png", "x", "-m", "@M", "--steps", "2"]
INP = ["inpaint", "@D/src.png", "@D/mask.png", "x", "-m", "@M", "--steps", "2"]
OUT = ["outpaint", "@D/src.png", "x", "-m", "@M", "--steps", "2", "--pad"]
R = ["replay"]

# (args, fragments the one error line must hold, environment); @M is the tiny model, @D/ the data folder.
BAD_INPUTS = [
    # sizes
    pytest.param(G + ["-W", "60"], ["multiples of 8"], None, id="width-60"),
    pytest.param(G + ["-W", "0"], ["multiples of 8"], None, id="width-0"),
    pytest.param(G + ["-W=-8"], ["multiples of 8"], None, id="width-negative"),
    pytest.param(G + ["-W", "100000", "-H", "100000"], ["SDTORCH_MAX_SIDE"], None, id="width-huge"),
    pytest.param(G + ["-W", "4096", "-H", "4096"], ["SDTORCH_MAX_PIXELS"], None, id="pixels-over-limit"),
    pytest.param(G + ["-W", "64.0"], ["invalid int value"], None, id="width-float"),
    pytest.param(G + ["-H", "abc"], ["invalid int value"], None, id="height-text"),
    pytest.param(G, ["SDTORCH_MAX_SIDE"], {"SDTORCH_MAX_SIDE": "8"}, id="env-side-limit"),
    # steps
    pytest.param(G + ["--steps", "0"], ["at least 1"], None, id="steps-0"),
    pytest.param(G + ["--steps=-3"], ["at least 1"], None, id="steps-negative"),
    pytest.param(G + ["--steps", "1001"], ["at most 1000"], None, id="steps-1001"),
    pytest.param(G + ["--steps", "999"], ["supports at most 998", "dpmpp_2m"], None, id="steps-999-dpmpp"),
    pytest.param(G + ["--steps", "1000", "--sampler", "euler"], ["supports at most 999"], None, id="steps-1000-euler"),
    pytest.param(G + ["--steps", "2.5"], ["invalid int value"], None, id="steps-float"),
    pytest.param(G + ["--steps", "6"], ["at most 5", "SDTORCH_MAX_STEPS"], {"SDTORCH_MAX_STEPS": "5"}, id="env-steps"),
    # guidance
    pytest.param(G + ["-g", "nan"], ["guidance", "nan"], None, id="guidance-nan"),
    pytest.param(G + ["-g", "inf"], ["guidance", "inf"], None, id="guidance-inf"),
    pytest.param(G + ["-g=-inf"], ["guidance"], None, id="guidance-minus-inf"),
    pytest.param(G + ["-g", "1e999"], ["guidance"], None, id="guidance-overflow"),
    pytest.param(G + ["-g=-1"], ["guidance must be in [0, 100]"], None, id="guidance-negative"),
    pytest.param(G + ["--cfg", "750"], ["guidance must be in [0, 100]"], None, id="guidance-750"),
    pytest.param(G + ["-g", "seven"], ["invalid float value"], None, id="guidance-text"),
    # seeds and batches
    pytest.param(G + ["--seed=-1"], ["seed"], None, id="seed-negative"),
    pytest.param(G + ["--seed", "18446744073709551616"], ["seed", "2**64"], None, id="seed-2-64"),
    pytest.param(G + ["--seed", "18446744073709551615", "-b", "2"], ["seed + batch size"], None, id="seed-batch"),
    pytest.param(G + ["--seed", "1e3"], ["invalid int value"], None, id="seed-float"),
    pytest.param(G + ["-b", "0"], ["batch size"], None, id="batch-0"),
    pytest.param(G + ["-b=-1"], ["batch size"], None, id="batch-negative"),
    pytest.param(G + ["-b", "101"], ["SDTORCH_MAX_BATCH"], None, id="batch-101"),
    pytest.param(G + ["-b", "3"], ["SDTORCH_MAX_BATCH"], {"SDTORCH_MAX_BATCH": "2"}, id="env-batch"),
    # clip skip, sampler, dtype
    pytest.param(G + ["--clip-skip", "0"], ["clip skip"], None, id="clip-skip-0"),
    pytest.param(G + ["--clip-skip", "3"], ["clip skip 3", "only 2 layers"], None, id="clip-skip-over-layers"),
    pytest.param(G + ["--sampler", "nope"], ["unknown sampler", "valid samplers: ddpm"], None, id="sampler-unknown"),
    pytest.param(G + ["--sampler", ""], ["unknown sampler"], None, id="sampler-empty"),
    pytest.param(G + ["--dtype", "fp64"], ["invalid choice"], None, id="dtype"),
    # prompts
    pytest.param(["generate", b"caf\xe9", "-m", "@M"], ["prompt", "UTF-8"], None, id="prompt-not-utf8"),
    pytest.param(G + ["-n", b"\xff\xfe"], ["negative prompt", "UTF-8"], None, id="negative-not-utf8"),
    pytest.param(["generate", "x" * 10001, "-m", "@M"], ["SDTORCH_MAX_PROMPT_CHARS"], None, id="prompt-too-long"),
    # limits themselves
    pytest.param(G, ["SDTORCH_MAX_SIDE", "positive integer"], {"SDTORCH_MAX_SIDE": "big"}, id="env-not-a-number"),
    pytest.param(G, ["SDTORCH_MAX_PIXELS", "positive integer"], {"SDTORCH_MAX_PIXELS": "0"}, id="env-zero"),
    # output names
    pytest.param(G + ["-o", "out.jpg"], ["out.jpg", ".png"], None, id="output-jpg"),
    pytest.param(G + ["-o", "@D/missing/a.png"], ["does not exist"], None, id="output-no-folder"),
    pytest.param(G + ["-o", "@D/dir.png"], ["is a folder"], None, id="output-is-folder"),
    pytest.param(G + ["-o", "@D/fifo.png"], ["not a regular file"], None, id="output-fifo"),
    pytest.param(G + ["-o", "{foo}.png"], ["unknown field {foo}"], None, id="output-unknown-field"),
    pytest.param(G + ["-o", "{}.png"], ["unknown field"], None, id="output-positional-field"),
    pytest.param(G + ["-o", "{seed[0]}.png"], ["unknown field"], None, id="output-indexed-field"),
    pytest.param(G + ["-o", "{.png"], ["not a valid name pattern"], None, id="output-open-brace"),
    pytest.param(G + ["-o", "a}.png"], ["not a valid name pattern"], None, id="output-close-brace"),
    pytest.param(G + ["-o", "{seed:q}.png"], ["not a valid name pattern"], None, id="output-bad-spec"),
    pytest.param(G + ["-o", "{seed!s:.1}.png", "--seed", "10", "-b", "2"], ["both be written"], None,
                 id="output-batch-collides"),
    pytest.param(G + ["-o", "a" * 250 + ".png"], ["too long"], None, id="output-name-too-long"),
    pytest.param(G + ["-o", ""], ["not a file name"], None, id="output-empty"),
    pytest.param(G + ["-o", "no\nsuch/x.png"], ["'no\\nsuch", "does not exist"], None, id="output-newline-in-name"),
    # models that are not files
    pytest.param(G + ["-m", "@D/fifo"], ["not a regular file"], None, id="model-fifo"),
    pytest.param(G + ["-m", "/dev/zero"], ["/dev/zero", "not a regular file"], None, id="model-dev-zero"),
    # source images
    pytest.param(["img2img", "@D/missing.png", "x", "-m", "@M"], ["missing.png", "no such image"], None,
                 id="image-missing"),
    pytest.param(["img2img", "@D/folder", "x", "-m", "@M"], ["is a folder"], None, id="image-folder"),
    pytest.param(["img2img", "@D/broken.png", "x", "-m", "@M"], ["broken.png", "unreadable image"], None,
                 id="image-not-an-image"),
    pytest.param(["img2img", "@D/truncated.png", "x", "-m", "@M"], ["truncated.png", "unreadable image"], None,
                 id="image-truncated"),
    pytest.param(["img2img", "@D/bomb.png", "x", "-m", "@M"], ["bomb.png", "too large"], None, id="image-bomb"),
    pytest.param(["img2img", "@D/fifo.png", "x", "-m", "@M"], ["not a regular file"], None, id="image-fifo"),
    pytest.param(["img2img", "/dev/zero", "x", "-m", "@M"], ["not a regular file"], None, id="image-dev-zero"),
    pytest.param(["img2img", "@D/sliver.png", "x", "-m", "@M"], ["sliver.png", "4x64", "smaller than 8x8"], None,
                 id="image-too-small"),
    pytest.param(I2I, ["src.png", "SDTORCH_MAX_IMAGE_PIXELS"], {"SDTORCH_MAX_IMAGE_PIXELS": "4000"},
                 id="image-over-limit"),
    pytest.param(I2I + ["--strength", "1.5"], ["strength must be in [0, 1]"], None, id="strength-1.5"),
    pytest.param(I2I + ["--strength=-0.1"], ["strength"], None, id="strength-negative"),
    pytest.param(I2I + ["--strength", "nan"], ["strength"], None, id="strength-nan"),
    pytest.param(["inpaint", "@D/src.png", "@D/small-mask.png", "x", "-m", "@M"], ["small-mask.png",
                 "does not match image size"], None, id="mask-size"),
    pytest.param(["inpaint", "@D/src.png", "@D/broken.png", "x", "-m", "@M"], ["broken.png", "unreadable"], None,
                 id="mask-not-an-image"),
    pytest.param(INP + ["-W", "12"], ["multiples of 8"], None, id="inpaint-width"),
    # outpaint padding
    pytest.param(OUT + ["-8", "0", "0", "0"], ["non-negative"], None, id="pad-negative"),
    pytest.param(OUT + ["100000", "0", "0", "0"], ["padding", "4096"], None, id="pad-huge"),
    pytest.param(OUT + ["4000", "0", "4000", "0"], ["8064x64", "SDTORCH_MAX_SIDE"], None, id="pad-sum-huge"),
    pytest.param(OUT + ["a", "0", "0", "0"], ["invalid int value"], None, id="pad-text"),
    pytest.param(OUT + ["8", "8"], ["--pad"], None, id="pad-two-values"),
    # replay
    pytest.param(R + ["@D/replay-none.png"], ["no 'parameters' text"], None, id="replay-no-text"),
    pytest.param(R + ["@D/replay-unclosed.png"], ["replay-unclosed.png", "malformed quoted value"], None,
                 id="replay-unclosed-quote"),
    pytest.param(R + ["@D/replay-no-seed.png"], ["no 'Seed' field"], None, id="replay-no-seed"),
    pytest.param(R + ["@D/replay-no-steps-line.png"], ["Steps"], None, id="replay-no-steps-line"),
    pytest.param(R + ["@D/replay-steps-abc.png"], ["malformed parameters"], None, id="replay-steps-text"),
    pytest.param(R + ["@D/replay-steps-1001.png"], ["at most 1000"], None, id="replay-steps-1001"),
    pytest.param(R + ["@D/replay-size-64.png"], ["malformed parameters"], None, id="replay-size-one-number"),
    pytest.param(R + ["@D/replay-size-3d.png"], ["malformed parameters"], None, id="replay-size-three-numbers"),
    pytest.param(R + ["@D/replay-cfg-nan.png"], ["guidance"], None, id="replay-cfg-nan"),
    pytest.param(R + ["@D/replay-seed-neg.png"], ["seed"], None, id="replay-seed-negative"),
    pytest.param(R + ["@D/replay-clip-0.png"], ["clip skip"], None, id="replay-clip-skip-0"),
    pytest.param(R + ["@D/replay-sampler.png"], ["'Warp' is not one sdtorch has"], None, id="replay-sampler"),
    pytest.param(R + ["@D/replay-model-zero.png"], ["/dev/zero", "not a regular file"], None, id="replay-dev-zero"),
    pytest.param(R + ["@D/replay-model-fifo.png"], ["not a regular file"], None, id="replay-model-fifo"),
    pytest.param(R + ["@D/replay-model-fifo-folder.png"], ["missing component weights"], None,
                 id="replay-model-folder-fifo-weights"),
    pytest.param(R + ["@D/replay-model-sparse.png"], ["larger than any model"], None, id="replay-model-huge"),
    pytest.param(R + ["@D/replay-model-missing.png"], ["not found; pass --model"], None, id="replay-model-missing"),
    pytest.param(R + ["@D/replay-img2img.png"], ["text-to-image runs only"], None, id="replay-img2img"),
    pytest.param(R + ["@D/broken.png"], ["unreadable image"], None, id="replay-not-an-image"),
    pytest.param(R + ["@D/fifo.png"], ["not a regular file"], None, id="replay-fifo"),
    pytest.param(R + ["@D/replay-good.png", "-o", "x.jpg"], [".png"], None, id="replay-output-jpg"),
]


def _expand(args, data):
    model = str(data / "tiny.safetensors")
    out = []
    for a in args:
        if isinstance(a, str):
            a = model if a == "@M" else a.replace("@D/", f"{data}/")
        out.append(a)
    return out


@pytest.mark.parametrize("args, fragments, env", BAD_INPUTS)
def test_bad_input_is_one_clean_line(cli, data, args, fragments, env):
    run = cli if env is None else (lambda a, cwd: cli(a, cwd, env=env))
    assert_clean_error(run, _expand(args, data), fragments, watch=[data])


def test_the_good_inputs_of_the_table_work(cli, data, tmp_path):
    """The table's rows fail for their bad value alone: the same calls with good values write images."""
    small = ["-W", "16", "-H", "16", "--steps", "1"]
    for args in (G, I2I + small, INP + small, OUT + ["8", "0", "0", "0"] + small,
                 R + ["@D/replay-good.png", "-o", "r.png"], ["img2img", "@D/odd.png", "x", "-m", "@M", "--steps", "1"]
                 + small):
        code, out, err = cli(_expand(args, data), tmp_path)
        assert code == 0, (args, err)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 6 and not [n for n in written if n.startswith(".")], written
    assert Image.open(tmp_path / "r.png").size == (16, 16)


# ---- the invariant over arbitrary values ---------------------------------------------------------------

def _values(ok, wild):
    """Mostly good values (so that images are made and checked too), else anything."""
    return st.one_of(ok, ok, ok, wild, st.sampled_from(["nan", "inf", "-inf", "1e999", "", "x", "-1", "0"]))


def _wild(low, high, slow_from, slow_to):
    """Integers in [low, high] except the valid but slow ones in [slow_from, slow_to] (big images, many steps)."""
    return st.integers(low, high).filter(lambda v: not slow_from <= v <= slow_to).map(str)


# What a real command line can hold: any text but NUL, and no lone surrogate (a shell's argv is bytes, which Python
# decodes with surrogateescape, giving only U+DC80..U+DCFF, and the harness makes that round trip; an argument such
# as U+D800 cannot reach a real process, and the harness itself raised on it). Non-UTF-8 bytes are tested with
# a bytes argument above (negative-not-utf8).
ARGV_CHARS = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))

FLAGS = {
    "-W": _values(st.sampled_from(["8", "16", "24"]), _wild(-10**6, 10**6, 33, 4096)),
    "-H": _values(st.sampled_from(["8", "16", "32"]), _wild(-10**6, 10**6, 33, 4096)),
    "--steps": _values(st.sampled_from(["1", "2"]), _wild(-10**4, 10**4, 4, 996)),
    "-g": _values(st.floats(0, 20).map(repr), st.floats(allow_nan=True, allow_infinity=True).map(repr)),
    "--seed": _values(st.integers(0, 2**64 - 1).map(str), st.integers(-2**70, 2**70).map(str)),
    "-b": _values(st.sampled_from(["1", "2"]), _wild(-5, 1000, 3, 100)),
    "--clip-skip": _values(st.sampled_from(["1", "2"]), st.integers(-5, 50).map(str)),
    "--sampler": _values(st.sampled_from(list(SAMPLERS)), st.text(max_size=8)),
    "-n": st.text(ARGV_CHARS, max_size=30),
}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(prompt=st.text(ARGV_CHARS, max_size=40),
       flags=st.fixed_dictionaries({}, optional=FLAGS), karras=st.booleans())
def test_arbitrary_generation_flags_give_an_image_or_one_clean_line(cli, data, tmp_path_factory, prompt, flags,
                                                                    karras):
    cwd = tmp_path_factory.mktemp("any")
    args = ["generate", prompt, "-m", str(data / "tiny.safetensors"), "-W", "16", "-H", "16", "--steps", "1"]
    args += [f"{k}={v}" for k, v in flags.items()] + (["--karras"] if karras else [])
    code, out, err = cli(args, cwd)
    event(f"exit {code}")
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("sdtorch: error:"), err
        assert not list(cwd.iterdir()), "a refused run wrote something"
        return
    written = list(cwd.iterdir())
    assert written and all(p.suffix == ".png" and not p.name.startswith(".") for p in written), written
    for p in written:
        with Image.open(p) as im:
            a = np.asarray(im)
        assert a.ndim == 3 and a.shape[2] == 3 and a.any(), f"{p.name}: black image"


# ---- the Python API ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return sdtorch.build("tiny")


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(width="64"), "width and height must be integers"),
    (dict(height=64.0), "width and height must be integers"),
    (dict(width=True), "width and height must be integers"),
    (dict(guidance="7"), "guidance must be a number"),
    (dict(guidance=float("nan")), "guidance must be in [0, 100], got nan"),
    (dict(guidance=True), "guidance must be a number"),
    (dict(steps=2.5), "steps must be an integer"),
    (dict(steps="2"), "steps must be an integer"),
    (dict(steps=True), "steps must be an integer"),
    (dict(seed=-1), "seed must be in"),
    (dict(seed="1"), "seed must be an integer"),
    (dict(seed=1.0), "seed must be an integer"),
    (dict(batch_size=True), "batch size must be an integer"),
    (dict(batch_size=0), "batch size must be at least 1"),
    (dict(sampler=3), "unknown sampler 3"),
    (dict(karras="yes"), "karras must be True or False"),
    (dict(clip_skip=1.0), "clip skip must be a positive integer"),
    (dict(clip_skip=5), "only 2 layers"),
    (dict(guidance_rescale=2.0), "guidance rescale must be in [0, 1]"),
    (dict(negative_prompt=5), "negative prompt must be a string"),
    (dict(negative_prompt="\udcff"), "not valid UTF-8"),
    (dict(limits="big"), "limits must be a generation.Limits"),
    (dict(limits=Limits(max_side=32)), "SDTORCH_MAX_SIDE"),
    (dict(output_type="np"), "output_type must be 'pil' or 'tensor'"),
    (dict(stepz=3), "unknown generation option 'stepz'"),
    (dict(steps=999), "supports at most 998"),
])
def test_api_refuses_wrong_types_and_values(tiny, kwargs, fragment):
    with pytest.raises(SDTorchError) as e:
        tiny.txt2img("x", **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("prompt", [None, 3, b"x", "\udce9"])
def test_api_refuses_a_prompt_that_is_not_text(tiny, prompt):
    with pytest.raises(SDTorchError, match="prompt"):
        tiny.txt2img(prompt, steps=1)


def test_api_checks_images_and_padding(tiny, data):
    with pytest.raises(SDTorchError, match="strength must be a number"):
        tiny.img2img(data / "src.png", "x", strength="0.5")
    with pytest.raises(SDTorchError, match="smaller than 8x8"):
        tiny.img2img(data / "sliver.png", "x", steps=1)
    # a size that is not a multiple of 8 is rounded down and the image resized, as diffusers does
    assert tiny.img2img(data / "odd.png", "x", steps=1)[0].size == (56, 64)
    with pytest.raises(SDTorchError, match="too large"):
        tiny.img2img(data / "bomb.png", "x", steps=1)
    with pytest.raises(SDTorchError, match="SDTORCH_MAX_IMAGE_PIXELS"):
        tiny.img2img(data / "src.png", "x", steps=1, limits=Limits(max_image_pixels=100))
    with pytest.raises(SDTorchError, match="expected an image path or a PIL image"):
        tiny.img2img(np.zeros((8, 8, 3)), "x")
    for pad in (dict(left=True), dict(left=1.5), dict(top=-8), dict(right=10**9)):
        with pytest.raises(SDTorchError, match="padding"):
            tiny.outpaint(data / "src.png", "x", steps=1, **pad)
    with pytest.raises(SDTorchError, match="does not match image size"):
        tiny.inpaint(data / "src.png", data / "small-mask.png", "x")


def test_cli_and_api_give_the_same_text(cli, data, tmp_path, tiny):
    line = assert_clean_error(cli, _expand(G + ["-g", "nan"], data), ["guidance"])
    with pytest.raises(SDTorchError) as e:
        tiny.txt2img("x", steps=2, width=16, height=16, guidance=float("nan"))
    assert line == f"sdtorch: error: {e.value}"


def test_limits_are_checked_and_read_from_the_environment():
    assert Limits.from_env({"SDTORCH_MAX_SIDE": "8192", "SDTORCH_MAX_BATCH": "1_000"}) == Limits(
        max_side=8192, max_batch=1000)
    assert Limits.from_env({}) == Limits()
    for bad in ("0", "-1", "1.5", "x", ""):
        with pytest.raises(SDTorchError, match="SDTORCH_MAX_STEPS: must be a positive integer"):
            Limits.from_env({"SDTORCH_MAX_STEPS": bad})
    for bad in (0, -1, 2.0, True, "8"):
        with pytest.raises(SDTorchError, match="max_side must be a positive integer"):
            Limits(max_side=bad)
    Request("x", width=8192, height=8, steps=5000).validate(Limits(max_side=8192, max_steps=5000))


@pytest.mark.parametrize("T", [1000, 100])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_schedule_max_steps_is_where_the_noise_levels_stop_decreasing(T, karras, sampler):
    cfg = sdtorch.TINY.replace(num_train_timesteps=T)
    train = training_sigmas(cfg)

    def strictly_decreasing(n):
        sigmas = get_sigmas(train, n, sampler, karras=karras)
        return len(sigmas) == n + 1 and bool(torch.isfinite(sigmas).all() and (sigmas[:-1] > sigmas[1:]).all())

    most = schedule_max_steps(T, sampler, karras)
    if most is None:
        assert all(strictly_decreasing(n) for n in (T - 1, T, T + 1, 3 * T))
    else:
        assert strictly_decreasing(most) and not strictly_decreasing(most + 1)


def test_non_finite_latents_are_an_error_not_a_black_image(tiny):
    broken = copy.deepcopy(tiny)
    with torch.no_grad():
        broken.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(SDTorchError, match="sampling produced NaN/inf latents"):
        broken.txt2img("x", steps=2, width=16, height=16)
    vae = copy.deepcopy(tiny.vae)
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(float("inf"))
    with pytest.raises(SDTorchError, match="VAE decoded NaN/inf"):
        generation.decode(vae, torch.zeros(1, 4, 8, 8))


# ---- image modes -----------------------------------------------------------------------------------------

def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 8, dtype=np.uint32).reshape(8, 64) * 128).astype(np.uint16)  # 0 .. 65408
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I", "I;16")
    rgb = np.asarray(images.open_image(tmp_path / "g16.png"))
    expected = np.round(ramp / 257).astype(np.uint8)  # 65535 -> 255; PIL's own convert clips at 255
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 1], expected)
    assert np.array_equal(np.asarray(images.open_image(tmp_path / "g16.png", "L")), expected)


def test_float_images_are_read_as_zero_to_one():
    a = np.array([[0.0, 0.5, 1.0, 2.0, -1.0, math.nan]], dtype=np.float32)
    out = np.asarray(images.open_image(Image.fromarray(a, "F"), "L"))
    assert out.tolist() == [[0, 128, 255, 255, 0, 0]]


def test_transparency_is_composited_white_for_images_black_for_masks(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    im = images.open_image(tmp_path / "rgba.png")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 0, 0) and im.getpixel((1, 1)) == (255, 255, 255)
    la = Image.new("LA", (8, 8), (255, 0))
    la.putpixel((0, 0), (255, 255))
    mask = images.open_image(la, "L")
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((1, 1)) == 0
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.info["transparency"] = 1
    assert images.open_image(pal).getpixel((3, 3)) == (255, 255, 255)
    del pal.info["transparency"]
    assert images.open_image(pal).getpixel((3, 3)) == (10, 200, 30)


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F", "LA", "La",
                                  "RGBa", "PA", "RGBA", "RGB"])
def test_every_mode_converts_to_rgb_and_l(mode):
    im = Image.new(mode, (8, 8))
    assert images.open_image(im).mode == "RGB" and images.open_image(im, "L").mode == "L"

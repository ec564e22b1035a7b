"""End to end: LoRAs in the CLI (--lora, <lora:NAME:SCALE> prompt tags, replay, lora-info, convert-lora,
merge-lora, eval shapes --lora) on a tiny saved model, and every bad LoRA input as one clean error line."""

from __future__ import annotations

import argparse
import json
import pickle

import numpy as np
import pytest
import torch
from cli_harness import assert_clean_error
from PIL import Image
from safetensors.torch import load_file

import sdtorch
from sdtorch import infotext
from sdtorch.errors import SDTorchError
from sdtorch.lora import adapters, formats
from sdtorch.lora.prompt import LoraRef, applied_loras, split_lora_tags

pytestmark = pytest.mark.filterwarnings("ignore:32x32 differs")  # the small size is for speed only
GEN = ["--steps", "2", "--seed", "5", "-W", "32", "-H", "32"]


def make_lora(model, path, seed: int, bump_out: int = 0, extra_key: bool = False):
    """A rank-2 kohya LoRA on the UNet and text-encoder attention with random (not zero) up weights, so that it
    changes the image; `bump_out` gives every up one row too many (a wrong shape), `extra_key` adds an adapter for
    a module the model lacks."""
    net = adapters.create_network(model, adapters.targets(model, text_encoder=True), rank=2, alpha=1.0, seed=seed)
    weights = adapters.network_weights(net)
    g = torch.Generator().manual_seed(seed)
    for aw in weights.values():
        out, r = aw.tensors["up"].shape
        aw.tensors["up"] = torch.randn(out + bump_out, r, generator=g) * 3  # changes the tiny image clearly
    formats.write_lora(path, weights)
    if extra_key:
        sd = load_file(path)
        sd["lora_unet_no_such_block.lora_down.weight"] = torch.zeros(2, 8)
        sd["lora_unet_no_such_block.lora_up.weight"] = torch.zeros(8, 2)
        from safetensors.torch import save_file
        save_file(sd, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-cli")
    model = sdtorch.build("tiny", seed=3)
    model.save_single_file(root / "tiny.safetensors")
    (root / "loras").mkdir()
    return dict(root=root, model=root / "tiny.safetensors", style=make_lora(model, root / "style.safetensors", 1),
                named=make_lora(model, root / "loras" / "named.safetensors", 2),
                wrong=make_lora(model, root / "wrong.safetensors", 3, bump_out=1),
                extra=make_lora(model, root / "extra.safetensors", 4, extra_key=True), folder=root / "loras")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def params(path) -> tuple[str, str, dict]:
    return infotext.parse(Image.open(path).info["parameters"])


def test_lora_flag_and_tag_match_the_api_and_replay(cli, files, tmp_path):
    m, style = files["model"], files["style"]
    code, _, err = cli(["generate", "a red circle", "-m", m, *GEN, "-o", "base.png"], tmp_path)
    assert code == 0, err
    code, _, err = cli(["generate", "a red circle", "-m", m, *GEN, "--lora", f"{style}:0.8", "-o", "flag.png"],
                       tmp_path)
    assert code == 0, err
    assert "LoRA style: matched 120 of 120 adapter tensors (unet 96, text encoder 24)" in err
    assert np.abs(pixels(tmp_path / "flag.png") - pixels(tmp_path / "base.png")).max() > 10, "the LoRA did nothing"

    api = sdtorch.load(m)
    api.load_lora(style, 0.8)
    ours = np.asarray(api.txt2img("a red circle", steps=2, seed=5, width=32, height=32)[0]).astype(np.int16)
    assert np.array_equal(ours, pixels(tmp_path / "flag.png")), "CLI --lora and Python API differ"

    prompt, _, f = params(tmp_path / "flag.png")
    assert prompt == "a red circle <lora:style:0.8>"
    assert f["Lora hashes"] == f"style: {adapters.lora_hash(style)}"
    assert json.loads(f["Lora files"]) == {"style": str(style.resolve())}

    # the same LoRA by name, as a prompt tag, from the LoRA folder ($SDTORCH_LORAS): same tensors, same image
    (files["folder"] / "style.safetensors").write_bytes(style.read_bytes())
    try:
        code, _, err = cli(["generate", "a red circle <lora:style:0.8>", "-m", m, *GEN, "-o", "tag.png"], tmp_path,
                           env={"SDTORCH_LORAS": str(files["folder"])})
    finally:
        (files["folder"] / "style.safetensors").unlink()
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "tag.png"), pixels(tmp_path / "flag.png"))
    prompt, _, f = params(tmp_path / "tag.png")
    assert prompt == "a red circle <lora:style:0.8>" and "Lora files" not in f
    assert f["Lora hashes"] == f"style: {adapters.lora_hash(style)}"

    code, _, err = cli(["replay", "flag.png"], tmp_path)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "flag-replay.png"), pixels(tmp_path / "flag.png"))

    # a tag by name plus a flag by name, from --lora-dir; replay finds them with the same --lora-dir
    code, _, err = cli(["generate", "a red circle <lora:named:-0.5>", "-m", m, *GEN, "--lora-dir", files["folder"],
                        "--lora", f"{style}:0.3", "-o", "two.png"], tmp_path)
    assert code == 0, err
    api.unload_lora("style")
    api.load_lora("named", -0.5, folder=files["folder"])
    api.load_lora(style, 0.3)
    ours = np.asarray(api.txt2img("a red circle", steps=2, seed=5, width=32, height=32)[0]).astype(np.int16)
    assert np.array_equal(ours, pixels(tmp_path / "two.png")), "two stacked LoRAs: CLI and API differ"
    prompt, _, f = params(tmp_path / "two.png")
    assert prompt == "a red circle <lora:named:-0.5> <lora:style:0.3>"
    assert f["Lora hashes"] == (f"named: {adapters.lora_hash(files['named'])}, "
                                f"style: {adapters.lora_hash(style)}")
    code, _, err = cli(["replay", "two.png", "--lora-dir", files["folder"], "-o", "two-replay.png"], tmp_path)
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "two-replay.png"), pixels(tmp_path / "two.png"))


def test_replay_refuses_a_changed_lora(cli, files, tmp_path):
    lora = tmp_path / "mine.safetensors"
    lora.write_bytes(files["style"].read_bytes())
    code, _, err = cli(["generate", "a circle", "-m", files["model"], *GEN, "--lora", lora, "-o", "a.png"],
                       tmp_path)
    assert code == 0, err
    make_lora(sdtorch.build("tiny", seed=3), lora, seed=9)  # same name and path, other tensors
    assert_clean_error(cli, ["replay", "a.png"], ["mine", "hash", adapters.lora_hash(files["style"])], cwd=tmp_path)


def test_lora_info(cli, files, tmp_path):
    code, out, err = cli(["lora-info", files["style"]], tmp_path)
    assert code == 0, err
    assert "format:   kohya" in out and "ranks:    2 x40" in out and "alphas:   1.0 x40" in out
    assert "unet: lora x32 modules" in out and "text_encoder: lora x8 modules" in out
    code, out, err = cli(["lora-info", files["style"], "--json"], tmp_path)
    assert code == 0, err
    info = json.loads(out)
    assert info["format"] == "kohya" and info["ranks"] == {"2": 40} and info["targets"]["unet"] == {"lora": 32}
    assert info["counts"] == {"adapters": 40, "tensors": 120, "unknown": 0}


def test_lora_info_and_convert_lora_take_names_as_lora_does(cli, files, tmp_path):
    """A name works wherever a LoRA file does, as `--lora NAME`: the built-in one, or one in --lora-dir."""
    code, out, err = cli(["lora-info", "teal"], tmp_path)
    assert code == 0, err
    assert str(adapters.builtin_dir() / "teal.safetensors") in out and "format:   kohya" in out
    code, out, err = cli(["lora-info", "named", "--lora-dir", files["folder"]], tmp_path)
    assert code == 0, err
    assert "named.safetensors" in out and "ranks:    2 x40" in out
    code, _, err = cli(["convert-lora", "named", "p.safetensors", "--to", "peft", "--lora-dir", files["folder"]],
                       tmp_path)
    assert code == 0, err
    assert len(load_file(tmp_path / "p.safetensors")) == 80
    assert_clean_error(cli, ["lora-info", "nosuch", "--lora-dir", files["folder"]], ["'nosuch' not found"],
                       cwd=tmp_path)


def test_convert_lora_round_trip_is_lossless(cli, files, tmp_path):
    code, _, err = cli(["convert-lora", files["style"], "p.safetensors", "--to", "peft"], tmp_path)
    assert code == 0, err
    peft = load_file(tmp_path / "p.safetensors")
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in peft) and len(peft) == 80
    code, _, err = cli(["convert-lora", "p.safetensors", "k.safetensors", "--to", "kohya", "-m", files["model"]],
                       tmp_path)
    assert code == 0, err
    before, after = load_file(files["style"]), load_file(tmp_path / "k.safetensors")
    assert sorted(before) == sorted(after)
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k


def test_merge_lora_checkpoint_draws_what_the_loaded_lora_draws(cli, files, tmp_path):
    code, out, err = cli(["merge-lora", files["model"], f"{files['style']}:0.8", files["named"], "merged.safetensors"],
                         tmp_path)
    assert code == 0, err
    assert out.count("matched 120 of 120") == 2 and "wrote merged.safetensors" in out
    for name, extra in (("merged.png", ["-m", "merged.safetensors"]),
                        ("loaded.png", ["-m", files["model"], "--lora", f"{files['style']}:0.8", "--lora",
                                        files["named"]]), ("base.png", ["-m", files["model"]])):
        code, _, err = cli(["generate", "a red circle", *GEN, *extra, "-o", name], tmp_path)
        assert code == 0, err
    merged, loaded = pixels(tmp_path / "merged.png"), pixels(tmp_path / "loaded.png")
    # Merged weights (W + s BA, rounded once in fp32) and hooks (Wx + s B(Ax)) differ by fp32 rounding only,
    # ~1e-6 relative through 2 steps and the decoder, far below one 8-bit level (1/255); such an error can only
    # show by tipping a pixel across a rounding boundary, i.e. by at most 1 level, and in few pixels.
    assert np.abs(merged - loaded).max() <= 1 and (merged != loaded).mean() < 0.01
    assert np.abs(loaded - pixels(tmp_path / "base.png")).max() > 10, "the merge did nothing"


def test_eval_shapes_records_the_loras(cli, files, tmp_path):
    code, _, err = cli(["eval", "shapes", "-m", files["model"], "--lora", f"{files['style']}:0.5", "--steps", "1",
                        "--n-seen", "1", "--n-heldout", "0", "--n-two", "0", "-o", "ev"], tmp_path)
    assert code == 0, err
    settings = json.loads((tmp_path / "ev" / "report.json").read_text())["settings"]
    assert settings["loras"] == [{"name": "style", "path": str(files["style"].resolve()), "scale": 0.5,
                                  "hash": adapters.lora_hash(files["style"])}]


def test_bad_lora_input_is_one_line_and_writes_nothing(cli, files, tmp_path):
    (tmp_path / "cut.safetensors").write_bytes(files["style"].read_bytes()[:5000])
    with open(tmp_path / "evil.ckpt", "wb") as f:  # a pickle that asks for a class: never unpickled
        pickle.dump({"lora_unet_x.lora_down.weight": argparse.Namespace(a=1)}, f)
    gen = ["generate", "a circle", "-m", files["model"], *GEN, "-o", "out.png"]
    watch = [files["root"], files["folder"]]
    cases = [
        (["--lora", "nosuch", "--lora-dir", files["folder"]], ["'nosuch' not found", str(files["folder"])]),
        (["--lora", f"{files['style']}:nan"], ["not a finite number"]),
        (["--lora", f"{files['style']}:inf"], ["not a finite number"]),
        (["--lora", f"{files['style']}:big"], ["scale 'big' is not a number"]),
        (["--lora", files["wrong"]], ["wrong.safetensors", "do not fit", "update for a Linear weight"]),
        (["--lora", tmp_path / "cut.safetensors"], ["cut.safetensors", "truncated"]),
        (["--lora", tmp_path / "evil.ckpt"], ["evil.ckpt", "refused", "argparse.Namespace"]),
        (["--lora", files["extra"]], ["2 of 122 adapter tensors match no module", "--lora-partial"]),
        (["--lora", files["style"], "--lora", files["style"]], ["two LoRAs are named 'style'"]),
    ]
    for extra, fragments in cases:
        assert_clean_error(cli, gen + extra, fragments, cwd=tmp_path, watch=watch)
    for prompt, fragments in (("a <lora:style:x>", ["scale 'x' is not a number"]),
                              ("a <lora:style:1:0.5>", ["one scale per LoRA"]),
                              ("a <lora:absent>", ["'absent' not found"])):
        assert_clean_error(cli, ["generate", prompt, *gen[2:], "--lora-dir", files["folder"]], fragments,
                           cwd=tmp_path, watch=watch)
    assert_clean_error(cli, ["merge-lora", files["model"], files["wrong"], "m.safetensors"], ["do not fit"],
                       cwd=tmp_path, watch=watch)
    assert_clean_error(cli, ["merge-lora", files["model"], f"{files['style']}:nan", "m.safetensors"],
                       ["not a finite number"], cwd=tmp_path, watch=watch)
    assert_clean_error(cli, ["merge-lora", files["model"], "m.safetensors"], ["at least one LORA"], cwd=tmp_path,
                       watch=watch)
    assert_clean_error(cli, ["convert-lora", files["style"], "c.safetensors", "--to", "lycoris"], ["kohya or peft"],
                       cwd=tmp_path, watch=watch)
    assert_clean_error(cli, ["eval", "shapes", "-m", files["model"], "--lora", "nosuch", "-o", "ev"],
                       ["'nosuch' not found"], cwd=tmp_path, watch=watch)
    # --lora-partial: the matching part loads, with a warning giving the counts
    code, _, err = cli(gen + ["--lora", files["extra"], "--lora-partial"], tmp_path)
    assert code == 0, err
    assert "sdtorch: warning:" in err and "2 unmatched" in err and (tmp_path / "out.png").is_file()


def test_prompt_tags_and_applied_loras_leave_the_model_unchanged(files):
    assert split_lora_tags("a <lora:one> b <lyco:two:-0.25>, <hypernet:h:1>") == (
        "a  b , <hypernet:h:1>", [("one", 1.0), ("two", -0.25)])
    model = sdtorch.load(files["model"])
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    refs = [LoraRef("good", files["style"], 1.0), LoraRef("bad", files["wrong"], 1.0)]
    with pytest.raises(SDTorchError, match="do not fit"):
        with applied_loras(model, refs):
            pass
    assert model.loras == {}
    with applied_loras(model, refs[:1]) as nets:
        assert list(nets) == ["good"] and list(model.loras) == ["good"]
    assert model.loras == {}
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in before.items())

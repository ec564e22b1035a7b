"""First runs that explain themselves (issue 21): a prompt outside the model's vocabulary and a size other
than its training size each warn once and still make the image; `--version`, `models` and bare `sdtorch`."""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import pytest

import sdtorch
from sdtorch.generation import unknown_words
from sdtorch.pipeline import VOCABULARY_FILE, builtin_path

ROOT = Path(__file__).resolve().parents[1]


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning" in line.lower()]


def test_unknown_words_ignore_case_weights_and_break():
    vocab = ["a", "red", "circle"]
    assert unknown_words("A (Red:1.3) [circle] BREAK a cat, a CAT wearing sunglasses", vocab) == [
        "cat", "wearing", "sunglasses"]
    assert unknown_words("((a red circle)), a circle:0.5", vocab) == []


def test_shipped_vocabulary_is_the_grammar():
    spec = importlib.util.spec_from_file_location("shapes_vocabulary", ROOT / "scripts" / "shapes_vocabulary.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shipped = json.loads((builtin_path("shapes") / VOCABULARY_FILE).read_text())
    assert shipped == script.shapes_vocabulary()
    assert {"small", "large", "triangle", "gray", "background"} <= set(shipped) and "teal" not in shipped


def test_cli_warns_once_for_unknown_words_and_size_and_still_writes(cli, tmp_path):
    code, out, err = cli(["generate", "a cat wearing (sunglasses:1.2) BREAK a red circle", "-W", "72", "-H", "64",
                          "--steps", "1", "--seed", "3", "-o", "cat.png"], tmp_path)
    assert code == 0, err
    assert (tmp_path / "cat.png").is_file()
    lines = warning_lines(err)
    assert len(lines) == 2 and all(line.startswith("sdtorch: warning: ") for line in lines), err
    words, size = lines
    assert "'cat', 'wearing', 'sunglasses'" in words and "break" not in words.lower()
    assert "it knows: a, in, the" in words and "docs/shapes-model.md" in words
    assert "72x64 differs from the 64x64 this model was trained at" in size


def test_cli_is_quiet_for_a_grammatical_prompt_at_the_model_size(cli, tmp_path):
    code, out, err = cli(["generate", "(a large red circle:1.2) in the center on a white background", "-W", "64",
                          "--steps", "1", "--seed", "3", "-o", "ok.png"], tmp_path)
    assert code == 0, err
    assert (tmp_path / "ok.png").is_file() and warning_lines(err) == [], err


def test_api_warns_with_python_warnings():
    model = sdtorch.load("shapes")
    assert model.vocabulary is not None and "circle" in model.vocabulary
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.txt2img("a teal square", steps=1, seed=0, output_type="tensor")
    assert out.shape[-2:] == (64, 64)
    assert [str(w.message).split(";")[0] for w in caught] == ["the model shapes-model does not know 'teal'"]
    assert caught[0].filename == __file__  # pointed at the caller's line
    with pytest.warns(UserWarning, match="80x64 differs from the 64x64"):
        model.txt2img("a red circle", steps=1, width=80, output_type="tensor")


def test_version(cli, tmp_path):
    assert cli(["--version"], tmp_path) == (0, f"sdtorch {sdtorch.__version__}\n", "")


def test_no_arguments_prints_usage_and_exits_0(cli, tmp_path):
    code, out, err = cli([], tmp_path)
    assert code == 0 and err == ""
    assert out.startswith("usage: sdtorch") and len(out.splitlines()) < 15
    for command in ("sdtorch generate", "sdtorch img2img", "sdtorch train"):
        assert command in out


def test_models_lists_builtin_and_user_folder(cli, tmp_path):
    code, out, err = cli(["models"], tmp_path)
    assert code == 0, err
    assert any(line.split()[:5] == ["shapes", "sd1", "v_prediction", "64x64", "built-in"] for line in out.splitlines())

    models = tmp_path / "models"
    models.mkdir()
    code, _, err = cli(["convert", "shapes", models / "mine"], tmp_path)  # save_diffusers keeps the vocabulary
    assert code == 0, err
    assert json.loads((models / "mine" / VOCABULARY_FILE).read_text()) == sdtorch.load(models / "mine").vocabulary
    shutil.copy(ROOT / "README.md", models / "notes.md")  # neither a .safetensors nor a folder: not listed
    (models / "broken.safetensors").write_bytes(b"not a checkpoint")
    code, out, err = cli(["models"], tmp_path, env={"SDTORCH_MODELS": str(models)})
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["mine"][1:4] == ["sd1", "v_prediction", "64x64"]
    assert "unreadable:" in rows["broken.safetensors"] and "notes.md" not in rows
    code, out, err = cli(["models", "--dir", tmp_path / "nowhere"], tmp_path)
    assert code == 2 and err.startswith("sdtorch: error:") and "--dir" in err

"""A model folder's own generation defaults (generation_defaults.json): written by convert, read by load,
used by the API, the CLI and eval, recorded in the PNG, and rejected with one line when malformed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_bad_input import assert_one_line_error, run_cli

import sdtorch
from sdtorch import infotext
from sdtorch.pipeline import DEFAULTS_FILE, GENERATION_DEFAULTS


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("defaults")
    sdtorch.build("tiny", seed=5).save_diffusers(root / "plain")
    code, out, err = run_cli("convert", root / "plain", root / "tuned", "--default-guidance", "2.5",
                             "--default-steps", "4", "--default-sampler", "euler")
    assert code == 0, err
    return root


def test_convert_writes_and_load_reads_the_defaults(folders):
    assert json.loads((folders / "tuned" / DEFAULTS_FILE).read_text()) == {"steps": 4, "guidance": 2.5,
                                                                             "sampler": "euler"}
    assert not (folders / "plain" / DEFAULTS_FILE).exists()
    plain, tuned = sdtorch.load(folders / "plain"), sdtorch.load(folders / "tuned")
    assert plain.defaults == {} and plain.default("guidance") == GENERATION_DEFAULTS["guidance"]
    assert tuned.default("guidance") == 2.5 and tuned.default("steps") == 4
    out = tuned.txt2img("a red circle", seed=3, output_type="tensor")
    assert torch_equal(out, tuned.txt2img("a red circle", seed=3, steps=4, guidance=2.5, sampler="euler",
                                          output_type="tensor"))
    assert not torch_equal(out, plain.txt2img("a red circle", seed=3, steps=4, sampler="euler",
                                              output_type="tensor"))  # 7.5, not 2.5
    again = folders / "again"
    tuned.save_diffusers(again)  # kept through a save
    assert sdtorch.load(again).defaults == tuned.defaults
    assert "generation defaults: steps 4, guidance 2.5, sampler euler" in tuned.summary()


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_cli_takes_the_model_defaults_unless_given(folders, tmp_path):
    code, out, err = run_cli("generate", "a red circle", "-m", folders / "tuned", "--seed", "1",
                             "-o", tmp_path / "a.png")
    assert code == 0, err
    _, _, fields = infotext.parse(Image.open(tmp_path / "a.png").info["parameters"])
    assert (fields["CFG scale"], fields["Steps"], fields["Sampler"]) == ("2.5", "4", "Euler")
    code, out, err = run_cli("generate", "a red circle", "-m", folders / "tuned", "--seed", "1", "--cfg", "6",
                             "-o", tmp_path / "b.png")
    assert code == 0, err
    _, _, fields = infotext.parse(Image.open(tmp_path / "b.png").info["parameters"])
    assert (fields["CFG scale"], fields["Steps"]) == ("6.0", "4")
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


@pytest.mark.parametrize("content, fragment", [
    ('{"guidance": "high"}', "guidance must be a number"),
    ('{"steps": 0}', "steps must be a positive integer"),
    ('{"sampler": "warp"}', "unknown sampler"),
    ('{"cfg": 3}', "unknown generation defaults"),
    ("not json", "not readable JSON"),
])
def test_bad_defaults_file_is_one_line(folders, tmp_path, content, fragment):
    bad = tmp_path / "bad"
    sdtorch.load(folders / "plain").save_diffusers(bad)
    (bad / DEFAULTS_FILE).write_text(content)
    assert_one_line_error(["generate", "x", "-m", bad, "-o", tmp_path / "x.png"], fragment)
    assert not (tmp_path / "x.png").exists()


def test_defaults_need_a_folder(folders, tmp_path):
    assert_one_line_error(["convert", folders / "plain", tmp_path / "m.safetensors", "--default-guidance", "3"],
                          "diffusers folders only")
    assert not (tmp_path / "m.safetensors").exists()

"""Bad checkpoints end in one clear line naming the file, exit code 2 from the CLI, no traceback."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import sdtorch
from sdtorch.checkpoints import read_state_dict


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    return sdtorch.build("tiny").save_single_file(path)


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "sdtorch.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(args, *fragments):
    code, out, err = run_cli(*args)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdtorch: error:"), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_truncated_safetensors(tiny_file, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    assert_one_line_error(["info", bad], str(bad), "truncated")


def test_corrupt_safetensors_header(tiny_file, tmp_path):
    bad = tmp_path / "corrupt.safetensors"
    data = bytearray(tiny_file.read_bytes())
    data[20:40] = b"\x00" * 20
    bad.write_bytes(bytes(data))
    assert_one_line_error(["info", bad], str(bad), "corrupt")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_ckpt_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    for name, dump in (("zip.ckpt", lambda p: torch.save({"state_dict": {"x": Exploit()}}, p)),
                       ("legacy.ckpt", lambda p: p.write_bytes(pickle.dumps({"state_dict": Exploit()}, protocol=2)))):
        path = tmp_path / name
        dump(path)
        with pytest.raises(sdtorch.CheckpointError, match="refused"):
            read_state_dict(path)
        assert_one_line_error(["info", path], str(path), "refused")
        assert not marker.exists(), "the pickle ran code"


def test_lightning_callback_objects_are_inert(tmp_path):
    """Old SD .ckpt files pickle a Lightning callback beside the weights: loaded as an inert stand-in."""
    import types

    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    mods = {n: types.ModuleType(n) for n in names}
    Callback = type("ModelCheckpoint", (), {"__module__": names[-1]})
    mods[names[-1]].ModelCheckpoint = Callback
    sys.modules.update(mods)
    try:
        cb = Callback()
        cb.best = 1.0
        torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": {"cb": cb}}, tmp_path / "l.ckpt")
    finally:
        for n in names:
            del sys.modules[n]
    sd = read_state_dict(tmp_path / "l.ckpt")
    assert list(sd) == ["w"]


def test_not_a_checkpoint(tmp_path):
    for name, data in (("notes.safetensors", b"hello, this is text\n"), ("image.ckpt", b"\x89PNG\r\n\x1a\n...")):
        path = tmp_path / name
        path.write_bytes(data)
        assert_one_line_error(["info", path], str(path), "not a checkpoint")
    path = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], path)
    assert_one_line_error(["info", path], str(path), "not a checkpoint")


def test_unsupported_family_names_the_supported_ones(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.ones(4, 4, 3, 3)}, path)
    assert_one_line_error(["info", path], str(path), "SDXL", "SD 1.x", "SD 2.x")
    other = tmp_path / "resnet.safetensors"
    save_file({"fc.weight": torch.ones(2, 2)}, other)
    assert_one_line_error(["info", other], str(other), "not a Stable Diffusion checkpoint", "SD 1.x")


def test_folder_with_missing_component(tmp_path):
    folder = tmp_path / "model"
    sdtorch.build("tiny").save_diffusers(folder)
    shutil.rmtree(folder / "vae")
    assert_one_line_error(["info", folder], str(folder), "vae/config.json")
    assert_one_line_error(["info", tmp_path], str(tmp_path), "model_index.json")


def test_strict_report_names_every_problem(tiny_file, tmp_path):
    sd = dict(read_state_dict(tiny_file))
    del sd["model.diffusion_model.out.2.bias"]
    sd["model.diffusion_model.conv_extra.weight"] = torch.zeros(3)
    sd["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad, metadata=read_state_dict(tiny_file).metadata)
    with pytest.raises(sdtorch.CheckpointError) as e:
        sdtorch.load(bad)
    msg = str(e.value)
    for name in ("model.diffusion_model.out.2.bias", "model.diffusion_model.conv_extra.weight",
                 "first_stage_model.quant_conv.weight", "strict=False"):
        assert name in msg, msg
    assert_one_line_error(["info", bad], "1 missing in unet", "1 mis-shaped in vae", "1 unexpected")

    model = sdtorch.load(bad, strict=False)  # partial: loads what matches, reports the rest
    assert not model.report.ok
    assert model.report.components[0].missing == ["model.diffusion_model.out.2.bias (for conv_out.bias)"]
    ref = sdtorch.load(tiny_file)
    torch.testing.assert_close(model.unet.conv_out.weight, ref.unet.conv_out.weight, rtol=0, atol=0)
    code, out, err = run_cli("info", bad, "--partial")
    assert code == 0 and "1 missing" in out


def test_convert_cli_roundtrip(tiny_file, tmp_path):
    code, out, err = run_cli("convert", tiny_file, tmp_path / "folder")
    assert code == 0, err
    code, out, err = run_cli("convert", tmp_path / "folder", tmp_path / "back.safetensors", "--save-dtype", "fp16")
    assert code == 0, err
    back = sdtorch.load(tmp_path / "back.safetensors", dtype="fp32")
    ref = sdtorch.load(tiny_file)
    torch.testing.assert_close(back.unet.conv_in.weight, ref.unet.conv_in.weight.half().float(), rtol=0, atol=0)
    assert_one_line_error(["convert", tiny_file, tmp_path / "no" / "such.safetensors"], "does not exist")
    assert_one_line_error(["convert", tiny_file, tmp_path / "x.ckpt"], "unsafe")


def test_convert_bakes_in_another_vae(tiny_file, tmp_path):
    from sdtorch.checkpoints import save_vae
    from sdtorch.config import TINY
    from sdtorch.models import AutoencoderKL

    other = sdtorch.build("tiny", seed=9).vae
    other.config = dataclasses.replace(other.config, scaling_factor=0.5)
    save_vae(other, tmp_path / "vae", 64)
    code, out, err = run_cli("convert", tiny_file, tmp_path / "baked", "--vae", tmp_path / "vae")
    assert code == 0, err
    baked, ref = sdtorch.load(tmp_path / "baked"), sdtorch.load(tiny_file)
    assert baked.config.vae.scaling_factor == 0.5 != ref.config.vae.scaling_factor
    for k, v in other.state_dict().items():
        torch.testing.assert_close(baked.vae.state_dict()[k], v, rtol=0, atol=0)
    torch.testing.assert_close(baked.unet.conv_in.weight, ref.unet.conv_in.weight, rtol=0, atol=0)
    assert not torch.equal(baked.vae.decoder.conv_out.weight, ref.vae.decoder.conv_out.weight)
    wide = AutoencoderKL(dataclasses.replace(TINY.vae, latent_channels=8))
    save_vae(wide, tmp_path / "wide", 64)
    assert_one_line_error(["convert", tiny_file, tmp_path / "wide-baked", "--vae", tmp_path / "wide"],
                          "8 latent channels", "do not fit")
    assert not (tmp_path / "wide-baked").exists()

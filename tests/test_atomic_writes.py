"""Nothing is written unless it is whole (issue 17, section 3).

Every writer goes through `sdtorch.fileio`: a file under a unique temporary name beside its target, a
folder under a temporary name beside its own, renamed into place on success and removed on any failure.
Destinations are checked before the work starts. The table runs bad destinations through the real CLI;
the unit tests make a writer fail midway and check that nothing partial is left and that what was there
before is untouched; the kill tests SIGKILL a process in the middle of writing a training checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cli_harness import assert_clean_error, snapshot

import sdtorch
from sdtorch import checkpoints, fileio
from sdtorch.errors import SDTorchError
from sdtorch.training import common


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model and its single file."""
    model = sdtorch.build("tiny")
    return model, model.save_single_file(tmp_path_factory.mktemp("src") / "tiny.safetensors")


def _leftovers(folder: Path) -> list[str]:
    """Temporary files and folders of the writers (hidden `.NAME.XXXX.tmp` / `.old`) under `folder`."""
    return sorted(p for p in snapshot(folder) if Path(p).name.startswith(".") and
                  (p.endswith(".tmp") or p.endswith(".old") or ".sdtorch-probe." in p))


# Each row: (setup(tmp, src) -> argv, error fragments). `tmp` is a fresh folder that holds the destination;
# it is watched, so nothing may appear in it, change or go. `src` is a tiny model's single file.
def _convert_to(name):
    return lambda tmp, src: ["convert", src, tmp / name]


def _convert_onto_dir(tmp, src):
    (tmp / "out.safetensors").mkdir()
    return ["convert", src, tmp / "out.safetensors"]


def _convert_onto_file(tmp, src):
    (tmp / "model").write_text("not a folder")
    return ["convert", src, tmp / "model"]


def _convert_into_folder_holding_file_vae(tmp, src):
    (tmp / "out").mkdir()
    (tmp / "out" / "vae").write_text("a file where the vae folder would go")
    return ["convert", src, tmp / "out"]


def _convert_into_photos(tmp, src):
    (tmp / "photos").mkdir()
    (tmp / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
    return ["convert", src, tmp / "photos"]


def _convert_read_only(tmp, src):
    (tmp / "ro").mkdir()
    os.chmod(tmp / "ro", 0o555)
    return ["convert", src, tmp / "ro" / "m.safetensors"]


def _convert_missing_source_onto_dir(tmp, src):
    """Both the source and the destination are bad: the destination is named, so nothing was loaded."""
    (tmp / "d.safetensors").mkdir()
    return ["convert", tmp / "missing.safetensors", tmp / "d.safetensors"]


def _shapes_onto_file(tmp, src):
    (tmp / "data").write_text("x")
    return ["make-shapes", tmp / "data", "--count", "2"]


def _shapes_into_photos(tmp, src):
    (tmp / "data").mkdir()
    (tmp / "data" / "000000.png").write_bytes(b"mine")
    (tmp / "data" / "holiday.jpg").write_bytes(b"mine too")
    return ["make-shapes", tmp / "data", "--count", "2"]


def _eval_into_notes(tmp, src):
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("keep me")
    return ["eval", "shapes", "-o", tmp / "notes", "--n-seen", "1", "--n-heldout", "1", "--n-two", "1"]


RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

BAD_INPUTS = [
    pytest.param(_convert_onto_dir, ["out.safetensors", "is a folder"], id="convert-onto-a-directory"),
    pytest.param(_convert_to("no/m.safetensors"), ["does not exist"], id="convert-file-parent-missing"),
    pytest.param(_convert_to("no/model"), ["does not exist"], id="convert-folder-parent-missing"),
    pytest.param(_convert_onto_file, ["is a file"], id="convert-folder-onto-a-file"),
    pytest.param(_convert_into_folder_holding_file_vae, ["not a diffusers model folder"],
                 id="convert-into-folder-holding-file-vae"),
    pytest.param(_convert_into_photos, ["photos", "not a diffusers model folder"], id="convert-into-unrelated-folder"),
    pytest.param(_convert_to("m.ckpt"), ["m.ckpt", "unsafe"], id="convert-to-ckpt"),
    pytest.param(_convert_to("m.PT"), ["unsafe"], id="convert-to-pt-upper-case"),
    pytest.param(_convert_to("m.safetensor"), ["unknown extension"], id="convert-to-typo-extension"),
    pytest.param(_convert_to("line\nbreak/m.safetensors"), ["does not exist"], id="convert-newline-in-name"),
    pytest.param(lambda tmp, src: ["convert", src, tmp / "m.safetensors", "--default-guidance", "3"],
                 ["diffusers folders only"], id="convert-defaults-into-single-file"),
    pytest.param(_convert_missing_source_onto_dir, ["d.safetensors", "is a folder"],
                 id="convert-destination-checked-before-loading"),
    pytest.param(_convert_read_only, ["not writable"], id="convert-read-only-folder",
                 marks=pytest.mark.skipif(RUNNING_AS_ROOT, reason="permission bits do not stop root")),
    pytest.param(lambda tmp, src: ["convert", src, "/proc/sdtorch-out.safetensors"], ["not writable"],
                 id="convert-into-proc-even-root-cannot-write",
                 marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")),
    pytest.param(_shapes_onto_file, ["is not a folder"], id="make-shapes-onto-a-file"),
    pytest.param(_shapes_into_photos, ["not a make-shapes dataset"], id="make-shapes-into-unrelated-folder"),
    pytest.param(lambda tmp, src: ["make-shapes", tmp / "no" / "data", "--count", "2"], ["does not exist"],
                 id="make-shapes-parent-missing"),
    pytest.param(_eval_into_notes, ["not an evaluation folder"], id="eval-into-unrelated-folder"),
    pytest.param(lambda tmp, src: ["eval", "shapes", "-o", tmp / "no" / "eval", "--n-seen", "1"],
                 ["does not exist"], id="eval-parent-missing"),
]


@pytest.mark.parametrize("setup,fragments", BAD_INPUTS)
def test_bad_destination(cli, tiny, tmp_path, setup, fragments):
    args = setup(tmp_path, tiny[1])
    assert_clean_error(cli, args, fragments, watch=[tmp_path])
    assert _leftovers(tmp_path) == []


# --- the helpers' invariants ---

def test_atomic_file_removes_its_temp_file_on_any_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    for error in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with fileio.atomic_file(target) as tmp:
                tmp.write_bytes(b"half of the new")
                raise error
        assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_atomic_file_temp_names_are_unique_and_the_last_rename_wins(tmp_path):
    target = tmp_path / "out.txt"
    with fileio.atomic_file(target) as a, fileio.atomic_file(target) as b:
        assert a != b and a.parent == b.parent == tmp_path
        a.write_text("a")
        b.write_text("b")
    assert target.read_text() == "a" and sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_atomic_file_onto_a_folder_fails_and_leaves_nothing(tmp_path):
    (tmp_path / "out.png").mkdir()
    with pytest.raises(OSError):
        fileio.write_bytes(tmp_path / "out.png", b"png")
    assert sorted(os.listdir(tmp_path)) == ["out.png"] and not any((tmp_path / "out.png").iterdir())


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("from an earlier save")
    with pytest.raises(RuntimeError):
        with fileio.atomic_folder(target) as tmp:
            (tmp / "new.bin").write_text("half")
            raise RuntimeError("midway")
    assert os.listdir(tmp_path) == ["model"] and os.listdir(target) == ["stale.bin"]
    with fileio.atomic_folder(target) as tmp:
        (tmp / "new.bin").write_text("whole")
    assert os.listdir(tmp_path) == ["model"] and os.listdir(target) == ["new.bin"]


def test_check_folder_destination_replaces_only_what_it_may(tmp_path):
    ours = lambda f: (f / "model_index.json").is_file()  # noqa: E731
    (tmp_path / "empty").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    for name in ("empty", "model", "new"):
        assert fileio.check_folder_destination(tmp_path / name, replaceable=ours) == tmp_path / name
    with pytest.raises(SDTorchError, match="other: folder exists and is not a model folder"):
        fileio.check_folder_destination(tmp_path / "other", replaceable=ours, what="a model folder")
    with pytest.raises(SDTorchError, match="folder exists"):
        fileio.check_folder_destination(tmp_path / "empty", replace=False)
    assert fileio.shown(tmp_path / "a\nb") == repr(str(tmp_path / "a\nb"))


# --- writers that fail midway ---

def _partial_save_file(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{partial")
    raise OSError(28, "No space left on device")


def test_failed_single_file_write_keeps_the_old_file(tiny, tmp_path, monkeypatch):
    import safetensors.torch

    model = tiny[0]
    dst = tmp_path / "m.safetensors"
    dst.write_bytes(b"the previous model")
    monkeypatch.setattr(safetensors.torch, "save_file", _partial_save_file)
    with pytest.raises(OSError, match="No space"):
        model.save_single_file(dst)
    assert dst.read_bytes() == b"the previous model" and os.listdir(tmp_path) == ["m.safetensors"]


@pytest.mark.parametrize("where", ["weights", "tokenizer", "json"])
def test_failed_diffusers_save_keeps_the_old_folder(tiny, tmp_path, monkeypatch, where):
    model = tiny[0]
    dst = tmp_path / "model"
    model.save_diffusers(dst)
    before = snapshot(tmp_path)
    calls = []
    if where == "weights":  # the UNet written, then the VAE's write fails
        real = checkpoints.write_safetensors

        def flaky(tensors, path, metadata=None):
            calls.append(path)
            if len(calls) == 2:
                _partial_save_file(tensors, path)
            real(tensors, path, metadata)
        monkeypatch.setattr(checkpoints, "write_safetensors", flaky)
    elif where == "tokenizer":
        def half_tokenizer(self, folder):
            Path(folder).mkdir()
            (Path(folder) / "vocab.json").write_text("{")
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(sdtorch.tokenizer.CLIPTokenizer, "save", half_tokenizer)
    else:  # the last file, model_index.json, fails to serialise
        real_dumps = json.dumps

        def dumps(obj, *a, **k):
            if isinstance(obj, dict) and "_class_name" in obj and obj["_class_name"] == "StableDiffusionPipeline":
                raise TypeError("not JSON serialisable")
            return real_dumps(obj, *a, **k)
        monkeypatch.setattr(checkpoints.json, "dumps", dumps)
    for target in (dst, tmp_path / "fresh"):  # an old folder stays as it was; a new one does not appear
        calls.clear()
        with pytest.raises((OSError, TypeError)):
            model.save_diffusers(target)
        assert snapshot(tmp_path) == before


def test_save_functions_check_the_destination_before_converting(tiny, tmp_path, monkeypatch):
    def no_conversion(*a, **k):
        raise AssertionError("tensors were converted before the destination was checked")
    monkeypatch.setattr(checkpoints, "_state", no_conversion)
    model = tiny[0]
    (tmp_path / "d.safetensors").mkdir()
    (tmp_path / "f").write_text("a file")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "vae").write_text("a file named vae")
    with pytest.raises(SDTorchError, match="is a folder"):
        model.save_single_file(tmp_path / "d.safetensors")
    with pytest.raises(SDTorchError, match="does not exist"):
        model.save_single_file(tmp_path / "no" / "m.safetensors")
    with pytest.raises(SDTorchError, match="is not a folder"):
        model.save_diffusers(tmp_path / "f")
    with pytest.raises(SDTorchError, match="not a diffusers model folder"):
        model.save_diffusers(tmp_path / "out")
    with pytest.raises(SDTorchError, match="not an autoencoder folder"):
        checkpoints.save_vae(model.vae, tmp_path / "out", 64)
    assert sorted(snapshot(tmp_path)) == ["d.safetensors", "f", "out", "out/vae"]


def test_save_diffusers_replaces_a_model_folder_whole(cli, tiny, tmp_path):
    """Writing onto an existing model folder replaces it: a stray file (even one named like a component)
    is gone, the defaults are part of the same folder, and the result loads."""
    dst = tmp_path / "model"
    tiny[0].save_diffusers(dst)
    (dst / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"stale weights from another save")
    (dst / "notes.txt").write_text("stray")
    code, out, err = cli(["convert", tiny[1], dst, "--default-steps", "7"], tmp_path)
    assert code == 0, err
    assert not (dst / "notes.txt").exists() and not (dst / "unet" / "diffusion_pytorch_model.bin").exists()
    assert json.loads((dst / "generation_defaults.json").read_text()) == {"steps": 7}
    assert sdtorch.load(dst).default("steps") == 7 and _leftovers(tmp_path) == []


def test_failed_tokenizer_save_keeps_the_old_folder(tmp_path, monkeypatch):
    from sdtorch.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer.bundled()
    tok.save(tmp_path / "tok")
    before = snapshot(tmp_path)
    real_dumps, calls = json.dumps, []

    def dumps(obj, *a, **k):  # vocab.json written, then special_tokens_map.json fails
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("midway")
        return real_dumps(obj, *a, **k)
    monkeypatch.setattr(sdtorch.tokenizer.json, "dumps", dumps)
    with pytest.raises(ValueError):
        tok.save(tmp_path / "tok")
    assert snapshot(tmp_path) == before
    monkeypatch.undo()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "model.safetensors").write_bytes(b"not a tokenizer file")
    with pytest.raises(SDTorchError, match="not a tokenizer folder"):
        tok.save(tmp_path / "mine")


def test_failed_make_shapes_leaves_no_folder_and_keeps_an_old_one(tmp_path, monkeypatch):
    from sdtorch.data import shapes

    shapes.make_shapes(tmp_path / "data", 4, progress=False)
    before = snapshot(tmp_path)
    real, calls = shapes.render, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*a, **k)
    monkeypatch.setattr(shapes, "render", flaky)
    for target in (tmp_path / "data", tmp_path / "new"):
        calls.clear()
        with pytest.raises(OSError):
            shapes.make_shapes(target, 6, progress=False)
        assert snapshot(tmp_path) == before
    monkeypatch.undo()
    shapes.make_shapes(tmp_path / "data", 2, progress=False)  # a smaller dataset replaces the larger whole
    assert sorted(os.listdir(tmp_path / "data")) == ["000000.png", "000000.txt", "000001.png", "000001.txt"]


def test_failed_latent_shard_write_leaves_nothing_and_stale_temps_are_swept(tmp_path, monkeypatch):
    from PIL import Image

    from sdtorch.training import data as training_data

    for i in range(3):
        Image.new("RGB", (16, 16), (80 * i, 0, 0)).save(tmp_path / f"{i}.png")
    ds = training_data.ImageCaptionDataset(tmp_path, 16)
    encode = lambda px: (torch.nn.functional.avg_pool2d(px, 4), torch.ones(len(px), 3, 4, 4))  # noqa: E731
    monkeypatch.setattr(training_data, "save_file", _partial_save_file)
    with pytest.raises(OSError):
        training_data.LatentCache(tmp_path / "cache", ds, encode, progress=False)
    assert os.listdir(tmp_path / "cache") == []
    monkeypatch.undo()
    (tmp_path / "cache" / ".latents-00000.safetensors.abcd.tmp").write_bytes(b"left by a killed run")
    training_data.LatentCache(tmp_path / "cache", ds, encode, progress=False)
    assert os.listdir(tmp_path / "cache") == ["latents-00000.safetensors"]


# --- training checkpoints, the log and its plot ---

def ckpt_state(step: int, **more) -> dict:
    """A training checkpoint's state with the fields `load_latest` requires."""
    return {"step": step, "epoch": 0, "batch_pos": step, "rng": common.rng_state(), "optimizer": {}, "scheduler": {},
            **more}


def test_pruning_never_removes_the_checkpoint_latest_names(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (100, 200):  # an earlier, longer run left these
        common.save_checkpoint(folder, step, ckpt_state(step), keep=3)
    common.save_checkpoint(folder, 10, ckpt_state(10), keep=1)  # a new run overwrote the folder
    assert (folder / "latest").read_text() == "ckpt-00000010.pt"
    assert common.load_latest(folder)["step"] == 10
    assert sorted(os.listdir(folder)) == ["ckpt-00000010.pt", "latest"]
    for step in (20, 30, 40):
        common.save_checkpoint(folder, step, ckpt_state(step), keep=2)
    assert sorted(os.listdir(folder)) == ["ckpt-00000030.pt", "ckpt-00000040.pt", "latest"]
    with pytest.raises(SDTorchError, match="keep-checkpoints"):
        common.save_checkpoint(folder, 50, ckpt_state(50), keep=0)
    assert sorted(os.listdir(folder)) == ["ckpt-00000030.pt", "ckpt-00000040.pt", "latest"]


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    from sdtorch.training import common

    folder, mode = Path(sys.argv[1]), sys.argv[2]
    fields = {"epoch": 0, "batch_pos": 0, "rng": common.rng_state(), "optimizer": {}, "scheduler": {}}
    common.save_checkpoint(folder, 1, {"step": 1, "w": torch.ones(1000), **fields}, keep=3)
    if mode == "weights":  # SIGKILL once half of the new checkpoint is on disk
        def torch_save(obj, path):
            Path(path).write_bytes(b"PK" + b"x" * 2000)
            os.kill(os.getpid(), signal.SIGKILL)
        common.torch.save = torch_save
    else:  # SIGKILL as the new `latest` is about to be renamed into place
        real = os.replace
        def replace(src, dst):
            if Path(dst).name == "latest":
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
        os.replace = replace
    common.save_checkpoint(folder, 2, {"step": 2, "w": torch.zeros(1000), **fields}, keep=3)
""")


@pytest.mark.parametrize("mode", ["weights", "latest"])
def test_sigkill_mid_checkpoint_leaves_the_previous_one_and_latest_valid(tmp_path, mode):
    folder = tmp_path / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(folder), mode], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (folder / "latest").read_text() == "ckpt-00000001.pt"
    previous = common.load_latest(folder)
    assert previous["step"] == 1 and torch.equal(previous["w"], torch.ones(1000))
    names = sorted(os.listdir(folder))
    assert "ckpt-00000002.pt" in names if mode == "latest" else "ckpt-00000002.pt" not in names
    assert any(n.endswith(".tmp") for n in names)  # a kill cannot clean up ...
    common.save_checkpoint(folder, 3, ckpt_state(3), keep=3)  # ... so the next checkpoint does
    assert not any(n.endswith(".tmp") for n in os.listdir(folder))
    assert common.load_latest(folder)["step"] == 3


def test_log_with_a_torn_last_line_resumes_and_plots(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    common.JsonlLog(log, resume_step=2).write(step=3, loss=0.2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.2}]
    common.plot_curves(log, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "loss.png").unlink()
    (tmp_path / "loss.png").mkdir()  # an unwritable target: the error, and no temp file left
    with pytest.raises(OSError):
        common.plot_curves(log, tmp_path / "loss.png")
    assert sorted(os.listdir(tmp_path)) == ["log.jsonl", "loss.png"]

"""`sdtorch train-lora` on a tiny model: only the adapters train, the file is kohya's with ss_* metadata, holds the
EMA adapters and no base weight, and loads back; a SIGKILLed run resumes to bit-identical adapters; bf16 runs; bad
flags are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_harness import assert_clean_error
from conftest import write_discs
from safetensors import safe_open
from safetensors.torch import load_file

import sdtorch
from sdtorch.infotext import model_hash
from sdtorch.lora import adapters, formats
from sdtorch.training import lora
from sdtorch.training.diffusion import loop

COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220)}
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 captioned 32 px discs (comma-separated tags) and a tiny model saved as a diffusers folder."""
    root = tmp_path_factory.mktemp("lora")
    images = root / "images"
    images.mkdir()
    write_discs(images, 12, COLOURS, lambda name, side: f"{name} disc, {side}")
    model = sdtorch.build("tiny").save_diffusers(root / "base")
    return images, model


def args_for(data, out, **kw):
    images, model = data
    base = dict(data=str(images), output=str(out), model=str(model), resolution=32, batch_size=4, max_steps=3,
                warmup=1, lr=1e-2, log_every=1, val_every=100, sample_steps=1, sample_prompts=["red disc"],
                progress=False)
    return lora.LoraTrainArgs(**{**base, **kw})


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sdtorch.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ONE_THREAD)


# One run, shared by the file test and the resume test: the text encoder adapted too, dropout (a random stream
# the resume must continue), an EMA decay that makes the averaged adapters differ from the last step's.
STEPS = ["--max-steps", "4", "--checkpoint-every", "2", "--rank", "2", "--alpha", "1", "--dropout", "0.1",
         "--text-encoder", "--ema-decay", "0.9"]


def train_cmd(data, out, *extra):
    images, model = data
    return ["train-lora", images, out, "--model", model, "--resolution", "32", "--batch-size", "4", "--warmup", "1",
            "--lr", "1e-2", "--log-every", "1", "--sample-steps", "1", "--sample-prompts", "red disc",
            "--no-progress", *STEPS, *extra]


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "teal-run"
    r = run_cli(*train_cmd(data, out))
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def read_ckpt(out, step):
    return torch.load(out / "checkpoints" / f"ckpt-{step:08d}.pt", weights_only=True)


def test_only_the_adapters_train(data, tmp_path):
    run = lora.setup(args_for(data, tmp_path / "run", text_encoder=True, conv=True))
    loop(run)
    fresh = sdtorch.load(data[1], dtype=torch.float32)
    for part in ("unet", "text_encoder", "vae"):
        got = getattr(run.base, part).state_dict()
        for k, v in getattr(fresh, part).state_dict().items():
            assert torch.equal(got[k], v), f"{part}.{k}: a base weight changed"
    ups = [k for k in run.trained.state_dict() if k.endswith("up.weight")]
    assert any(k.startswith("adapters.text_encoder") for k in ups) and any("conv1" in k for k in ups)
    assert all(run.trained.state_dict()[k].abs().max() > 0 for k in ups), "every adapter moved off zero"
    assert (tmp_path / "run" / "log.jsonl").is_file() and (tmp_path / "run" / "loss.png").is_file()

    line = lora.summary(run.trained, run.base)
    n = sum(p.numel() for p in run.trained.parameters())
    assert f"{len(run.trained.target_ids)} adapters, rank 4, alpha 4" in line and f"{n:,} trainable" in line
    assert "attn2.to_q 4" in line and "conv1 8" in line and "text encoder 8 (self_attn.q_proj 2" in line


def test_the_file_is_written_atomically(data, tmp_path, monkeypatch):
    run = lora.setup(args_for(data, tmp_path / "run", max_steps=1))
    loop(run)
    path = lora.save(run, tmp_path / "run" / "x.safetensors")
    kept = path.read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        lora.save(run, path)
    assert path.read_bytes() == kept and sorted(p.name for p in path.parent.glob(".*")) == []


def test_cli_writes_a_kohya_file_that_loads_back(data, whole):
    out, stdout = whole
    path = out / "teal-run.safetensors"
    assert f"wrote {path}" in stdout and "train-lora: 40 adapters, rank 2, alpha 1: UNet 32 (" in stdout
    assert "text encoder 8 (" in stdout and "trainable parameters" in stdout
    assert not [p.name for p in out.glob(".*")], "no temporary file is left"
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())

    # Only adapters: three tensors per adapted module (40 of them), no base weight under any name.
    roles = (".lora_down.weight", ".lora_up.weight", ".alpha")
    assert all(k.startswith(("lora_unet_", "lora_te_")) and k.endswith(roles) for k in keys) and len(keys) == 3 * 40
    assert sum(k.startswith("lora_te_") for k in keys) == 3 * 8
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_network_module"]) == ("2", "1.0",
                                                                                           "networks.lora")
    assert meta["ss_steps"] == meta["ss_max_train_steps"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_train_unet_only"] == "False" and meta["ss_text_encoder_lr"] == "0.01"
    assert meta["ss_sd_model_name"] == "base" and meta["ss_sd_model_hash"] == model_hash(data[1])
    assert meta["sshs_model_hash"][:12] == adapters.lora_hash(path)  # the hash of the tensors as written
    tags = json.loads(meta["ss_tag_frequency"])["images"]
    captions = [p.read_text() for p in data[0].glob("*.txt")]
    assert tags["red disc"] == sum(c.startswith("red disc") for c in captions)
    assert sum(tags.values()) == 2 * len(captions)  # two tags per caption
    words = {w for c in captions for w in c.replace(",", " ").split()}
    assert json.loads(meta["sdtorch_vocabulary"]) == sorted(words)  # what the unknown-word warning learns
    assert (out / "samples" / "final.png").is_file()

    # The EMA adapters are what is saved, not the last step's.
    model = sdtorch.load(data[1], dtype=torch.float32)
    saved, report = formats.resolve(formats.read_lora(path), model)
    assert report.matched["unet"] > 0 and report.matched["text_encoder"] > 0
    final = read_ckpt(out, 4)
    for target, w in saved.items():
        key = f"adapters.{target.replace('.', '|')}"
        for role in ("down", "up"):
            assert torch.equal(w.tensors[role], final["ema"][f"{key}.{role}.weight"]), target
    assert any(not torch.equal(w.tensors["up"], final["model"][f"adapters.{t.replace('.', '|')}.up.weight"])
               for t, w in saved.items())

    before = model.txt2img("red disc", steps=2, seed=0, output_type="tensor")
    model.load_lora(path)
    after = model.txt2img("red disc", steps=2, seed=0, output_type="tensor")
    assert (after - before).abs().max() > 1e-4, "the trained LoRA changes the picture"


def test_resume_after_sigkill_gives_the_same_adapters(data, whole, tmp_path):
    whole, _ = whole
    cut = tmp_path / "teal-run"
    proc = subprocess.Popen([sys.executable, "-m", "sdtorch.cli", *map(str, train_cmd(data, cut))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    latest, deadline = cut / "checkpoints" / "latest", time.time() + 120
    while time.time() < deadline and not (latest.is_file() and latest.read_text() == "ckpt-00000002.pt"):
        time.sleep(0.02)  # `latest` is replaced atomically, after its checkpoint is whole
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert latest.read_text() == "ckpt-00000002.pt", "killed between the checkpoints of steps 2 and 4"
    started = read_ckpt(cut, 2)["clock"]["started_at"]
    r = run_cli(*train_cmd(data, cut, "--resume"))
    assert r.returncode == 0, r.stderr

    a, b = read_ckpt(whole, 4), read_ckpt(cut, 4)
    assert a["step"] == b["step"] == 4 and b["clock"]["started_at"] == started, "the first start time is kept"
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    fa, fb = load_file(whole / "teal-run.safetensors"), load_file(cut / "teal-run.safetensors")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa), "the LoRA files' tensors"
    with safe_open(str(cut / "teal-run.safetensors"), "pt") as f:
        assert f.metadata()["ss_training_started_at"] == str(started)
    losses = lambda out: [json.loads(x).get("loss") for x in (out / "log.jsonl").read_text().splitlines()]  # noqa
    assert losses(whole) == losses(cut)


@pytest.mark.skipif("AVX512" not in torch.backends.cpu.get_cpu_capability(),
                    reason="without AVX512 this CPU emulates bf16, about 100x slower")
def test_bf16_trains_the_adapters(data, tmp_path):
    run = lora.setup(args_for(data, tmp_path / "run", bf16=True, max_steps=2))
    loop(run)
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    sd = run.trained.state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values()), "the adapters stay fp32 under autocast"
    assert all(sd[k].abs().max() > 0 for k in sd if k.endswith("up.weight")), "every adapter moved off zero"


@pytest.mark.parametrize("extra, fragment", [
    (["--rank", "0"], "--rank must be at least 1"),
    (["--alpha", "0"], "--alpha must be a finite number above 0"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--name", "a/b"], "--name must be a file name"),
    (["--model", "/nonexistent/model"], "nonexistent"),
])
def test_bad_flags_are_one_line_errors(cli, data, tmp_path, extra, fragment):
    out = tmp_path / "run"
    assert_clean_error(cli, ["train-lora", data[0], out, "--model", data[1], "--max-steps", "1", "--no-progress",
                             *extra], [fragment], cwd=tmp_path, watch=[data[0].parent])
    assert not out.exists()


def test_torchrun_two_processes_match_one_with_twice_the_batch(data, tmp_path):
    """train-lora under torchrun: 2 gloo processes x batch 2 against 1 process x batch 4, no dropout (its masks
    come from each process's own stream). Per-sample randomness makes the inputs identical, so the adapters
    differ only by float32 rounding, measured and bounded as for `sdtorch train` (test_training._ddp_divergence);
    the losses agree to 1e-5 relative for the same reason as there."""
    from test_training import _ddp_divergence

    one, two, broken = tmp_path / "one", tmp_path / "two", tmp_path / "broken"
    common = ["--dropout", "0", "--checkpoint-every", "100"]
    r = run_cli(*train_cmd(data, one, *common))
    assert r.returncode == 0, r.stderr

    def torchrun(out, entry):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *entry,
               *map(str, train_cmd(data, out, *common, "--batch-size", "2"))]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
        assert r.returncode == 0, r.stderr[-3000:]

    torchrun(two, ["-m", "sdtorch.cli"])
    read = lambda out: [x for x in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in x]  # noqa
    assert [x["step"] for x in read(one)] == [x["step"] for x in read(two)] == [1, 2, 3, 4]
    for x, y in zip(read(one), read(two)):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x, y)
    assert _ddp_divergence(one, two) < 0.01
    a, b = (load_file(out / f"{out.name}.safetensors") for out in (one, two))
    assert a.keys() == b.keys() and len(a) > 0
    torchrun(broken, [str(Path(__file__).with_name("ddp_fault.py"))])  # rank 1's gradients dropped
    assert _ddp_divergence(one, broken) > 0.01, "the comparison cannot see a rank's gradients dropped"

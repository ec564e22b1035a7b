"""The trainers: short CLI runs, exact resume after SIGKILL, and 2-process DDP against 1 process."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

from pathlib import Path

import pytest
import torch
from conftest import write_discs

import sdtorch
from sdtorch import checkpoints
from sdtorch.models import UNet
from sdtorch.sampling import EpsDenoiser, VDenoiser
from sdtorch.tokenizer import CLIPTokenizer
from sdtorch.training import common

COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 captioned 32 px images of a coloured disc on the left or the right, and a random TINY VAE."""
    root = tmp_path_factory.mktemp("data")
    write_discs(root, 24, COLOURS, lambda name, side: f"a {name} disc on the {side}")
    vae = checkpoints.save_vae(sdtorch.build("tiny").vae, root.parent / "vae", 32)
    return root, vae


def train_cmd(data, out, *extra):
    root, vae = data
    return ["train", root, out, "--vae", vae, "--resolution", "32", "--batch-size", "4", "--val-every", "100",
            "--log-every", "1", "--no-progress", "--sample-steps", "2", "--warmup", "2", *map(str, extra)]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sdtorch.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kw)


def final_state(out):
    return torch.load(out / "checkpoints" / (out / "checkpoints" / "latest").read_text(), weights_only=True)


def test_train_vae_then_train_and_generate(data, tmp_path):
    root, _ = data
    r = cli("train-vae", root, tmp_path / "vae-run", "--resolution", "32", "--batch-size", "4", "--max-steps", "3",
            "--disc-start", "1", "--val-every", "3", "--log-every", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "LPIPS perceptual loss is off" in r.stdout
    records = [json.loads(line) for line in (tmp_path / "vae-run" / "log.jsonl").read_text().splitlines()]
    assert any("val_psnr" in rec and "val_ssim" in rec for rec in records)
    assert any(rec.get("d_loss", 0) > 0 for rec in records), "the discriminator switched on at step 1"

    out = tmp_path / "run"
    r = cli(*train_cmd((root, tmp_path / "vae-run" / "vae"), out, "--max-steps", "3", "--tokenizer", "captions",
                       "--min-snr-gamma", "5", "--prediction-type", "v_prediction"))
    assert r.returncode == 0, r.stderr
    assert (out / "loss.png").is_file() and (out / "samples" / "final.png").is_file()
    model = sdtorch.load(out / "model")
    assert model.config.prediction_type == "v_prediction" and model.tokenizer.vocab_size < 2000
    assert model.txt2img("a red disc", steps=2, seed=0, output_type="tensor").shape == (1, 3, 32, 32)


def test_decoder_only_fine_tune_keeps_the_latent_space(data, tmp_path):
    root, vae_dir = data
    base = checkpoints.load_vae(vae_dir, torch.float32)
    r = cli("train-vae", root, tmp_path / "ft", "--init", vae_dir, "--decoder-only", "--resolution", "32",
            "--batch-size", "4", "--max-steps", "3", "--lr", "1e-3", "--disc-start", "100", "--edge-weight", "1",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    tuned = checkpoints.load_vae(tmp_path / "ft" / "vae", torch.float32)
    old, new = base.state_dict(), tuned.state_dict()
    frozen = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(old[k], new[k]) for k in frozen)
    assert not torch.equal(old["decoder.conv_out.weight"], new["decoder.conv_out.weight"])
    assert not torch.equal(old["post_quant_conv.weight"], new["post_quant_conv.weight"])
    assert tuned.config.scaling_factor == base.config.scaling_factor  # not measured again: the latents are the same
    r = cli("train-vae", root, tmp_path / "ft0", "--init", vae_dir, "--decoder-only", "--resolution", "32",
            "--batch-size", "4", "--max-steps", "3", "--lr", "1e-3", "--disc-start", "100", "--no-progress")
    assert r.returncode == 0, r.stderr  # the same run without the edge term trains another decoder
    plain = checkpoints.load_vae(tmp_path / "ft0" / "vae", torch.float32).state_dict()
    assert not torch.equal(plain["decoder.conv_out.weight"], new["decoder.conv_out.weight"])
    r = cli("train-vae", root, tmp_path / "bad", "--decoder-only", "--max-steps", "1", "--no-progress")
    assert r.returncode != 0 and "give it with --init" in r.stderr and not (tmp_path / "bad").exists()
    r = cli("train-vae", root, tmp_path / "bad", "--init", vae_dir, "--logvar-init", "-6", "--max-steps", "1",
            "--no-progress")
    assert r.returncode != 0 and "--logvar-init" in r.stderr and not (tmp_path / "bad").exists()
    r = cli("train-vae", root, tmp_path / "bad", "--edge-weight", "-1", "--max-steps", "1", "--no-progress")
    assert r.returncode == 2 and "--edge-weight must be 0 or more" in r.stderr and not (tmp_path / "bad").exists()


def test_resume_after_sigkill_is_exact(data, tmp_path):
    steps = ["--max-steps", "12", "--checkpoint-every", "3", "--keep-checkpoints", "2"]
    whole = tmp_path / "whole"
    assert cli(*train_cmd(data, whole, *steps)).returncode == 0

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "sdtorch.cli", *map(str, train_cmd(data, cut, *steps))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (cut / "checkpoints" / "ckpt-00000006.pt").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = int((cut / "checkpoints" / "latest").read_text()[5:13])
    assert 3 <= killed_at < 12
    (cut / "checkpoints" / ".ckpt-00000099.pt.tmp").write_bytes(b"half a checkpoint")  # a write cut short
    r = cli(*train_cmd(data, cut, *steps, "--resume"))
    assert r.returncode == 0, r.stderr

    a, b = final_state(whole), final_state(cut)
    assert a["step"] == b["step"] == 12
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert sorted(p.name for p in (cut / "checkpoints").glob("ckpt-*.pt")) == ["ckpt-00000009.pt", "ckpt-00000012.pt"]
    losses = lambda out: [json.loads(x).get("loss") for x in (out / "log.jsonl").read_text().splitlines()]  # noqa
    assert losses(whole) == losses(cut)


def _torchrun(data, out, *, fault: bool = False):
    """2 gloo processes x batch 2; `fault` drops rank 1's gradients in the all-reduce (tests/ddp_fault.py)."""
    entry = [str(Path(__file__).with_name("ddp_fault.py"))] if fault else ["-m", "sdtorch.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *entry,
           *map(str, train_cmd(data, out, "--max-steps", "4", "--checkpoint-every", "100"))]
    cmd[cmd.index("--batch-size") + 1] = "2"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


def _ddp_divergence(one, two) -> float:
    """RMS over every weight of the difference between two runs, in units of the sum of the learning
    rates the runs stepped with.

    Why this measure, and why 0.01 bounds it. The two runs feed identical samples, so they differ only in
    float32 rounding: forward passes at batch 2 against batch 4 (other kernel blocking) and the order in
    which per-sample gradients are summed. AdamW moves each weight by about lr per step at most (Kingma and
    Ba 2015, sec. 2.1), whatever the gradient's size, so one weight moves at most about sum(lr). Where a
    weight's gradient stands well above its rounding error, the two runs' steps agree to float32 precision
    (about 1e-6 of sum(lr)). Where a gradient is itself at the rounding level, Adam's normalisation turns the
    noise into a full step of either sign, and that weight may differ by up to 2 * sum(lr) (seen: 2.4e-6 on
    one element against 4e-4, on another machine). An element-wise bound therefore cannot be tight and
    honest at once; the RMS over all n weights is: k such weights give at most 2 * sqrt(k / n) * sum(lr),
    so 0.01 allows k = n / 40,000 (65 of the 2.6 M weights here) and needs no luck. Measured: 1e-5 for a
    correct run; 0.37 with rank 1's gradients dropped, when most weights take a different step.
    """
    read = lambda out: [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]  # noqa
    lr_sum = sum(r["lr"] for r in read(one))
    a, b = final_state(one)["model"], final_state(two)["model"]
    assert a.keys() == b.keys()
    sq = sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in a)
    n = sum(v.numel() for v in a.values())
    return math.sqrt(sq / n) / lr_sum


def test_two_processes_match_one_with_twice_the_batch(data, tmp_path):
    """torchrun: 2 gloo processes x batch 2 against 1 process x batch 4. Per-sample randomness makes the
    inputs identical; only float32 rounding differs (see `_ddp_divergence`), and dropping one rank's
    gradients is caught."""
    one, two, broken = tmp_path / "one", tmp_path / "two", tmp_path / "broken"
    assert cli(*train_cmd(data, one, "--max-steps", "4", "--checkpoint-every", "100")).returncode == 0
    _torchrun(data, two)
    read = lambda out: [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]  # noqa
    la, lb = read(one), read(two)
    assert [x["step"] for x in la] == [x["step"] for x in lb] == [1, 2, 3, 4]
    for x, y in zip(la, lb):
        # A per-sample loss is a float32 forward pass some 60 ops deep, rounded differently at batch 2 and
        # batch 4: about 60 * 1.2e-7 = 7e-6 relative at most, so 1e-5 (seen: 6e-8).
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x, y)
    assert _ddp_divergence(one, two) < 0.01
    _torchrun(data, broken, fault=True)
    assert _ddp_divergence(one, broken) > 0.01, "the comparison cannot see a rank's gradients dropped"


@pytest.mark.parametrize("cls", [EpsDenoiser, VDenoiser])
def test_training_loss_is_zero_for_an_oracle(cls):
    """The loss the denoiser trains with and the x0 it samples with agree: an oracle network gives 0."""
    g = torch.Generator().manual_seed(0)  # not the global RNG, which earlier tests move
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    probe = cls.from_config(lambda x, t, **kw: torch.zeros_like(x), sdtorch.TINY)
    sigma = probe.sigmas[t]
    oracle = cls.from_config(lambda x, tt, **kw: probe.target(x0, noise, sigma), sdtorch.TINY)
    assert oracle.loss(x0, noise, t).abs().max() < 1e-10
    x = x0 + noise * sigma[:, None, None, None]
    # |x| reaches ~60 at t = 990 and x0 = c_skip x + c_out F cancels it: a few ulps of 64 (4e-6 each)
    torch.testing.assert_close(oracle(x, sigma), x0, rtol=1e-4, atol=1e-4)
    weighted = cls.from_config(lambda x, tt, **kw: torch.zeros_like(x), sdtorch.TINY)
    plain, snr5 = weighted.loss(x0, noise, t), weighted.loss(x0, noise, t, min_snr_gamma=5.0)
    snr = sigma ** -2
    expect = snr.clamp(max=5) / (snr if cls is EpsDenoiser else snr + 1)
    torch.testing.assert_close(snr5, plain * expect)


def test_caption_tokenizer_round_trips():
    captions = [f"a {s} {c} circle in the {p}" for s in ("small", "large") for c in COLOURS for p in ("left", "right")]
    tok = CLIPTokenizer.train(captions * 5, vocab_size=600)
    ids = tok.encode("a large green circle in the left")
    assert len(ids) < 12, "frequent words became single tokens"
    assert tok.decode(tok.encode("a red circle")).strip() == "a red circle"
    assert tok.encode("ünseen wörds 42!")  # every byte stays encodable


def test_caption_tokenizer_is_the_same_from_the_same_captions():
    """An id picks an embedding row, so a training run reproduces only if the same captions give the same
    ids: HF's BPE trainer, used before, numbered tokens and broke merge ties in hash-map order, new for
    every trainer; sdtorch's own breaks ties by order and numbers tokens in CLIP's layout."""
    captions = [f"a {s} {c} {shape} in the {p}" for s in ("small", "large") for c in COLOURS
                for shape in ("circle", "square", "triangle") for p in ("top left", "bottom right", "center")]
    first = CLIPTokenizer.train(captions)
    for _ in range(4):  # against HF's trainer this failed at the first comparison, in both runs tried
        assert CLIPTokenizer.train(captions).vocab == first.vocab
    byte_chars = list(CLIPTokenizer.bundled().vocab)[:256]
    assert list(first.vocab)[:512] == byte_chars + [c + "</w>" for c in byte_chars]
    assert list(first.vocab.values()) == list(range(len(first.vocab)))
    with pytest.raises(ValueError, match="below 514"):
        CLIPTokenizer.train(captions, vocab_size=100)


def test_train_takes_a_tokenizer_folder(data, tmp_path):
    """--tokenizer FOLDER keeps that tokenizer's ids (so a shipped model's run can be repeated exactly);
    a model folder works too, and a folder with no tokenizer in it is a clear error."""
    captions = [f"a {c} disc on the {side}" for c in COLOURS for side in ("left", "right")]
    given = CLIPTokenizer.train(captions * 3, vocab_size=600)
    given.save(tmp_path / "tok")
    out = tmp_path / "run"
    r = cli(*train_cmd(data, out, "--max-steps", "1", "--tokenizer", tmp_path / "tok"))
    assert r.returncode == 0, r.stderr
    assert CLIPTokenizer.from_folder(out / "tokenizer").vocab == given.vocab
    assert sdtorch.load(out / "model").tokenizer.vocab == given.vocab
    r = cli(*train_cmd(data, tmp_path / "again", "--max-steps", "1", "--tokenizer", out / "model"))
    assert r.returncode == 0, r.stderr
    assert CLIPTokenizer.from_folder(tmp_path / "again" / "tokenizer").vocab == given.vocab
    (tmp_path / "empty").mkdir()
    r = cli(*train_cmd(data, tmp_path / "bad", "--max-steps", "1", "--tokenizer", tmp_path / "empty"))
    assert r.returncode == 2 and "vocab.json" in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists(), "checked before anything is written"


def test_max_length_is_saved_with_the_model(data, tmp_path):
    """--max-length N: captions padded to N positions in training, the text encoder built with N positions,
    and the saved model pads prompts to N too. A caption longer than N, or a resume with another N, is a
    clear error before anything is encoded."""
    out = tmp_path / "run"
    r = cli(*train_cmd(data, out, "--max-steps", "1", "--tokenizer", "captions", "--max-length", "10"))
    assert r.returncode == 0, r.stderr
    model = sdtorch.load(out / "model")
    assert model.tokenizer.max_length == 10 and model.config.text.max_positions == 10
    assert model.text_encoder.embeddings.position_embedding.weight.shape[0] == 10
    assert model.tokenizer(["a red disc on the left"]).shape == (1, 10)
    images = model.txt2img("a red disc on the left, " * 3, steps=2, seed=0)  # longer: cut or chunked, no error
    assert images[0].size == (32, 32)
    r = cli(*train_cmd(data, out, "--max-steps", "2", "--tokenizer", "captions", "--max-length", "12", "--resume"))
    assert r.returncode == 2 and "--max-length 12 differs" in r.stderr, r.stderr
    short = tmp_path / "short"  # "a red disc on the left" is 6 tokens, 8 with start and end
    r = cli(*train_cmd(data, short, "--max-steps", "1", "--tokenizer", "captions", "--max-length", "7",
                       "--cache-latents"))
    assert r.returncode == 2 and "longest caption is 8 tokens" in r.stderr, r.stderr
    assert not (short / "latent-cache").exists() and not (short / "tokenizer").exists()


def test_schedule_ema_and_sample_seeds():
    f = common.warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(110) == pytest.approx(0.0)
    m = torch.nn.Linear(2, 2)
    ema = common.EMA(m, decay=0.9)
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m, step=100)
    torch.testing.assert_close(ema.shadow["weight"], before + 0.1)
    g1, g2 = common.sample_generator(0, 1, 5, 0), common.sample_generator(0, 1, 5, 0)
    assert torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2))
    assert not torch.equal(torch.randn(3, generator=common.sample_generator(0, 1, 6, 0)),
                           torch.randn(3, generator=common.sample_generator(0, 1, 5, 0)))
    one = common.epoch_batches(10, 4, 0, 0, common.Dist(0, 1))
    two = [common.epoch_batches(10, 2, 0, 0, common.Dist(r, 2)) for r in (0, 1)]
    assert [sorted(b) for b in one] == [sorted(two[0][k] + two[1][k]) for k in range(2)]


def test_options_run_accumulation_bf16_checkpointing_cache_and_frozen_text(data, tmp_path):
    pretrained = tmp_path / "pre"
    sdtorch.build("tiny").save_diffusers(pretrained)  # stands in for a pretrained text encoder
    out = tmp_path / "run"
    r = cli(*train_cmd(data, out, "--max-steps", "2", "--grad-accum", "2", "--bf16", "--gradient-checkpointing",
                       "--cache-latents", "--text-encoder", pretrained, "--sample-every", "1",
                       "--sample-prompts", "a red disc", "a blue disc"))
    assert r.returncode == 0, r.stderr
    assert len(list((out / "latent-cache").glob("latents-*.safetensors"))) == 1
    assert (out / "samples" / "step-00000001.png").is_file()
    model = sdtorch.load(out / "model")
    frozen = sdtorch.load(pretrained)
    for k, v in frozen.text_encoder.state_dict().items():
        assert torch.equal(model.text_encoder.state_dict()[k], v), "the pretrained text encoder stayed frozen"


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    unet = UNet(sdtorch.TINY.unet).train()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    grads = []
    for flag in (False, True):
        unet.gradient_checkpointing = flag
        unet.zero_grad()
        unet(x, torch.tensor([3.0, 700.0]), ctx).square().mean().backward()
        grads.append([p.grad.clone() for p in unet.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_compile_gives_the_eager_gradients():
    """--compile's forward and backward (fp32) against eager on the trainer's module: every gradient tensor
    within 1e-3 relative norm. Under bf16 autocast this failed (the text encoder got zero gradients), which
    is why `train` refuses --compile with --bf16, tested below."""
    from sdtorch.models import CLIPTextModel
    from sdtorch.sampling import denoiser_for
    from sdtorch.training.diffusion import Trainable

    torch.manual_seed(0)
    cfg = sdtorch.TINY
    model = Trainable(UNet(cfg.unet), CLIPTextModel(cfg.text)).train()
    denoiser = denoiser_for(model.unet, cfg)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t, ids = torch.randint(0, 1000, (4,), generator=g), torch.randint(0, cfg.text.vocab_size, (4, 77), generator=g)
    grads = []
    for forward in (model, common.compiled(model)):
        model.zero_grad()
        forward(denoiser, latents, noise, t, ids).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n, a in grads[0].items():
        b = grads[1][n]
        assert (a - b).norm() <= 1e-3 * a.norm() + 1e-9, f"{n}: compiled gradient differs from eager"


def test_compile_with_bf16_is_refused(data, tmp_path):
    out = tmp_path / "run"
    r = cli(*train_cmd(data, out, "--max-steps", "1", "--compile", "--bf16"))
    assert r.returncode == 2 and "--compile with --bf16" in r.stderr, r.stderr
    assert not out.exists()


def test_compile_without_a_compiler_is_a_clear_error(data, tmp_path):
    """Checked before anything is encoded or written: exit 2 and one line naming what is missing."""
    out = tmp_path / "run"
    r = cli(*train_cmd(data, out, "--max-steps", "1", "--compile"), env={**os.environ, "PATH": str(tmp_path)})
    assert r.returncode == 2 and "C++ compiler" in r.stderr, r.stderr
    assert not out.exists()


def test_logvar_init_starts_every_posterior_at_that_variance():
    from sdtorch.training.autoencoder import _start_logvar_at

    torch.manual_seed(0)
    vae = sdtorch.build("tiny").vae
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert vae.encode(x).logvar.std() > 0.01  # the default init: it varies with the input
    _start_logvar_at(vae, -6.0)
    post = vae.encode(x)
    torch.testing.assert_close(post.logvar, torch.full_like(post.logvar, -6.0))
    assert post.mean.std() > 0.01, "the means are untouched"

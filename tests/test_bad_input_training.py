"""Bad arguments to `train`, `train-vae`, `make-shapes` and `eval shapes`: one clean line, exit code 2, and
no file or folder made (issue 17, sections 3 and 5). Every row fails in the argument checks, before any
training, rendering or model loading starts, so the table runs in seconds. Also: the warnings for images
without captions, and --resume without a checkpoint."""

from __future__ import annotations

import dataclasses
import re
import warnings

import pytest
from cli_harness import assert_clean_error

import sdtorch
from sdtorch import checkpoints
from sdtorch.data.shapes import make_shapes
from sdtorch.errors import SDTorchError
from sdtorch.evaluation import check_shapes_eval
from sdtorch.training.autoencoder import VAETrainArgs
from sdtorch.training.autoencoder import train as train_vae
from sdtorch.training.data import ImageCaptionDataset, warn_missing_captions
from sdtorch.training.diffusion import TrainArgs, train


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A 12-image shapes dataset at 32 px, a tiny VAE, an ordinary file, an empty folder, and `work`, the
    folder every row's output would go into (watched for new files)."""
    root = tmp_path_factory.mktemp("inputs")
    make_shapes(root / "data", 12, size=32, progress=False)
    vae = checkpoints.save_vae(sdtorch.build("tiny").vae, root / "vae", 32)
    (root / "file.txt").write_text("not a folder\n")
    (root / "empty").mkdir()
    work = tmp_path_factory.mktemp("work")
    return {"data": root / "data", "vae": vae, "file": root / "file.txt", "empty": root / "empty",
            "out": work / "run", "work": work, "root": root}


TRAIN = ["train", "{data}", "{out}", "--vae", "{vae}", "--resolution", "32", "--batch-size", "4", "--max-steps",
         "1", "--no-progress", "--sample-steps", "2"]
VAE = ["train-vae", "{data}", "{out}", "--resolution", "32", "--batch-size", "4", "--max-steps", "1",
       "--no-progress"]
SHAPES = ["make-shapes", "{out}", "--count", "2", "--size", "32"]
EVAL = ["eval", "shapes", "--output", "{out}", "--n-seen", "1", "--n-heldout", "0", "--n-two", "0", "--steps", "2"]


def row(base, extra, fragments, id, **subs):
    """A bad input: `base` plus `extra` flags (a later flag wins in argparse), with placeholders such as
    {data} replaced (subs: placeholder -> another placeholder or a literal), and the fragments the error
    must contain."""
    return pytest.param(base, extra, fragments, subs, id=id)


BAD_INPUTS = [
    # train: every field's range
    row(TRAIN, ["--max-steps", "0"], ["--max-steps", "at least 1", "0"], "train-max-steps-0"),
    row(TRAIN, ["--max-steps", "-5"], ["--max-steps", "-5"], "train-max-steps-negative"),
    row(TRAIN, ["--max-steps", "2.5"], ["--max-steps", "2.5"], "train-max-steps-float"),
    row(TRAIN, ["--keep-checkpoints", "0"], ["--keep-checkpoints", "at least 1"], "train-keep-0"),
    row(TRAIN, ["--keep-checkpoints", "-1"], ["--keep-checkpoints", "-1"], "train-keep-negative"),
    row(TRAIN, ["--batch-size", "0"], ["--batch-size", "at least 1"], "train-batch-0"),
    row(TRAIN, ["--batch-size", "100"], ["fewer than one batch"], "train-batch-over-dataset"),
    row(TRAIN, ["--grad-accum", "0"], ["--grad-accum"], "train-grad-accum-0"),
    row(TRAIN, ["--lr", "0"], ["--lr", "above 0"], "train-lr-0"),
    row(TRAIN, ["--lr", "-1e-4"], ["--lr"], "train-lr-negative"),
    row(TRAIN, ["--lr", "nan"], ["--lr", "nan"], "train-lr-nan"),
    row(TRAIN, ["--lr", "inf"], ["--lr", "inf"], "train-lr-inf"),
    row(TRAIN, ["--weight-decay", "-0.1"], ["--weight-decay"], "train-weight-decay-negative"),
    row(TRAIN, ["--weight-decay", "nan"], ["--weight-decay"], "train-weight-decay-nan"),
    row(TRAIN, ["--warmup", "-1"], ["--warmup", "at least 0"], "train-warmup-negative"),
    row(TRAIN, ["--clip-grad", "0"], ["--clip-grad"], "train-clip-grad-0"),
    row(TRAIN, ["--ema-decay", "1"], ["--ema-decay", "[0, 1)"], "train-ema-decay-1"),
    row(TRAIN, ["--ema-decay", "-0.1"], ["--ema-decay"], "train-ema-decay-negative"),
    row(TRAIN, ["--caption-dropout", "1.5"], ["--caption-dropout", "[0, 1]"], "train-dropout-over-1"),
    row(TRAIN, ["--caption-dropout", "nan"], ["--caption-dropout"], "train-dropout-nan"),
    row(TRAIN, ["--min-snr-gamma", "0"], ["--min-snr-gamma"], "train-min-snr-0"),
    row(TRAIN, ["--resolution", "30"], ["--resolution", "multiple of 8"], "train-resolution-not-8"),
    row(TRAIN, ["--resolution", "0"], ["--resolution"], "train-resolution-0"),
    row(TRAIN, ["--resolution", "8192"], ["--resolution", "4096"], "train-resolution-huge"),
    row(TRAIN, ["--max-length", "2"], ["--max-length"], "train-max-length-2"),
    row(TRAIN, ["--max-length", "5000"], ["--max-length", "1024"], "train-max-length-huge"),
    row(TRAIN, ["--prediction-type", "x0"], ["--prediction-type", "'x0'"], "train-prediction-type"),
    row(TRAIN, ["--log-every", "0"], ["--log-every"], "train-log-every-0"),
    row(TRAIN, ["--val-every", "0"], ["--val-every"], "train-val-every-0"),
    row(TRAIN, ["--checkpoint-every", "0"], ["--checkpoint-every"], "train-checkpoint-every-0"),
    row(TRAIN, ["--sample-every", "-1"], ["--sample-every"], "train-sample-every-negative"),
    row(TRAIN, ["--sample-steps", "0"], ["--sample-steps"], "train-sample-steps-0"),
    row(TRAIN, ["--sample-steps", "999"], ["--sample-steps", "schedule"], "train-sample-steps-past-schedule"),
    row(TRAIN, ["--sample-prompts"], ["--sample-prompts", "at least one"], "train-no-sample-prompts"),
    row(TRAIN, ["--sample-prompts", b"caf\xe9"], ["--sample-prompts", "utf-8"], "train-sample-prompt-not-utf8"),
    row(TRAIN, ["--seed", "-1"], ["--seed", "-1"], "train-seed-negative"),
    row(TRAIN, ["--seed", str(2**64)], ["--seed"], "train-seed-overflow"),
    row(TRAIN, ["--val-size", "-1"], ["--val-size"], "train-val-size-negative"),
    row(TRAIN, ["--tokenizer-vocab", "100"], ["--tokenizer-vocab", "514"], "train-tokenizer-vocab-small"),
    row(TRAIN, ["--tokenizer", "{root}/nosuch"], ["--tokenizer"], "train-tokenizer-missing"),
    row(TRAIN, ["--config", "{root}/nosuch.json"], ["nosuch.json", "preset"], "train-config-missing"),
    row(TRAIN, ["--vae", "{root}/nosuch"], ["--vae", "no such"], "train-vae-missing"),
    row(TRAIN, ["--vae", "{file}"], ["file.txt"], "train-vae-not-a-checkpoint"),
    row(TRAIN, ["--text-encoder", "{root}/nosuch"], ["--text-encoder", "no such"], "train-text-encoder-missing"),
    row(TRAIN, ["--text-encoder", "{vae}", "--max-length", "10"], ["--max-length", "scratch"],
        "train-max-length-with-pretrained-text"),
    row(TRAIN, ["--cache-latents", "--random-flip"], ["--cache-latents"], "train-cache-with-flips"),
    row(TRAIN, ["--compile", "--bf16"], ["--compile with --bf16"], "train-compile-bf16"),
    row(TRAIN, ["--resume"], ["--resume", "no checkpoint"], "train-resume-without-checkpoint"),
    row(TRAIN, ["--resume", "--resume-or-start"], ["--resume-or-start"], "train-resume-both"),
    row(TRAIN, [], ["is a file"], "train-data-is-a-file", data="{file}"),
    row(TRAIN, [], ["no such dataset folder"], "train-data-missing", data="{root}/nosuch"),
    row(TRAIN, [], ["no usable images"], "train-data-empty", data="{empty}"),
    row(TRAIN, [], ["is a file"], "train-output-is-a-file", out="{file}"),
    row(TRAIN, [], ["file.txt", "is a file"], "train-output-under-a-file", out="{file}/run"),
    row(TRAIN, [], ["run folder name"], "train-output-empty", out=""),
    # train-vae
    row(VAE, ["--max-steps", "0"], ["--max-steps", "at least 1"], "vae-max-steps-0"),
    row(VAE, ["--keep-checkpoints", "0"], ["--keep-checkpoints"], "vae-keep-0"),
    row(VAE, ["--batch-size", "0"], ["--batch-size"], "vae-batch-0"),
    row(VAE, ["--lr", "nan"], ["--lr"], "vae-lr-nan"),
    row(VAE, ["--disc-lr", "0"], ["--disc-lr"], "vae-disc-lr-0"),
    row(VAE, ["--kl-weight", "-1"], ["--kl-weight"], "vae-kl-weight-negative"),
    row(VAE, ["--edge-weight", "-1"], ["--edge-weight must be"], "vae-edge-weight-negative"),
    row(VAE, ["--lpips-weight", "inf"], ["--lpips-weight"], "vae-lpips-weight-inf"),
    row(VAE, ["--disc-weight", "nan"], ["--disc-weight"], "vae-disc-weight-nan"),
    row(VAE, ["--rec-loss", "l3"], ["--rec-loss", "'l3'"], "vae-rec-loss"),
    row(VAE, ["--disc-norm", "layer"], ["--disc-norm"], "vae-disc-norm"),
    row(VAE, ["--resolution", "16", "--disc-start", "0"], ["--resolution", "24"], "vae-resolution-below-patchgan"),
    row(VAE, ["--resolution", "36"], ["--resolution", "multiple of 8"], "vae-resolution-not-8"),
    row(VAE, ["--logvar-init", "100"], ["--logvar-init"], "vae-logvar-init-huge"),
    row(VAE, ["--scaling-factor", "0"], ["--scaling-factor"], "vae-scaling-factor-0"),
    row(VAE, ["--disc-start", "-1"], ["--disc-start"], "vae-disc-start-negative"),
    row(VAE, ["--warmup", "-1"], ["--warmup"], "vae-warmup-negative"),
    row(VAE, ["--log-every", "0"], ["--log-every"], "vae-log-every-0"),
    row(VAE, ["--val-size", "-1"], ["--val-size"], "vae-val-size-negative"),
    row(VAE, ["--seed", "-1"], ["--seed"], "vae-seed-negative"),
    row(VAE, ["--init", "{root}/nosuch"], ["--init", "no such"], "vae-init-missing"),
    row(VAE, ["--init", "{file}"], ["file.txt"], "vae-init-not-a-checkpoint"),
    row(VAE, ["--lpips", "{root}/nosuch.pth"], ["--lpips", "no such"], "vae-lpips-missing"),
    row(VAE, ["--decoder-only"], ["--init"], "vae-decoder-only-without-init"),
    row(VAE, ["--init", "{vae}", "--logvar-init", "-5"], ["--logvar-init"], "vae-init-with-logvar-init"),
    row(VAE, ["--config", "{root}/nosuch.json"], ["nosuch.json"], "vae-config-missing"),
    row(VAE, ["--resume"], ["--resume", "no checkpoint"], "vae-resume-without-checkpoint"),
    row(VAE, [], ["is a file"], "vae-data-is-a-file", data="{file}"),
    row(VAE, [], ["no usable images"], "vae-data-empty", data="{empty}"),
    row(VAE, [], ["is a file"], "vae-output-is-a-file", out="{file}"),
    # make-shapes
    row(SHAPES, ["--count", "0"], ["--count", "at least 1"], "shapes-count-0"),
    row(SHAPES, ["--count", "-3"], ["--count"], "shapes-count-negative"),
    row(SHAPES, ["--count", "many"], ["--count"], "shapes-count-not-a-number"),
    row(SHAPES, ["--size", "0"], ["--size"], "shapes-size-0"),
    row(SHAPES, ["--size", "8"], ["--size", "16"], "shapes-size-too-small"),
    row(SHAPES, ["--size", "5000"], ["--size", "1024"], "shapes-size-huge"),
    row(SHAPES, ["--with-color", "cyan"], ["--with-color", "teal"], "shapes-with-unknown-colour"),
    row(SHAPES, ["--with-color", "teal", "--random-colors"], ["cannot be combined"], "shapes-with-colour-and-random"),
    row(EVAL, ["--n-teal", "-2"], ["--n-teal"], "eval-n-teal-negative"),
    row(SHAPES, [], ["file.txt"], "shapes-folder-is-a-file", out="{file}"),
    row(SHAPES, [], ["file.txt"], "shapes-folder-under-a-file", out="{file}/data"),
    # eval shapes: checked before the model loads
    row(EVAL, ["--n-seen", "-1"], ["--n-seen"], "eval-n-seen-negative"),
    row(EVAL, ["--n-two", "-1"], ["--n-two"], "eval-n-two-negative"),
    row(EVAL, ["--n-seen", "0"], ["all 0"], "eval-nothing-to-grade"),
    row(EVAL, ["--n-heldout", "x"], ["--n-heldout"], "eval-n-heldout-not-a-number"),
    row(EVAL, ["--steps", "0"], ["steps"], "eval-steps-0"),
    row(EVAL, ["--steps", "5000"], ["steps"], "eval-steps-huge"),
    row(EVAL, ["--guidance", "nan"], ["guidance"], "eval-guidance-nan"),
    row(EVAL, ["--guidance", "inf"], ["guidance"], "eval-guidance-inf"),
    row(EVAL, ["--sampler", "nope"], ["sampler", "nope"], "eval-sampler-unknown"),
    row(EVAL, ["--seed", "-1"], ["--seed"], "eval-seed-negative"),
    row(EVAL, ["--seed", str(2**64 - 1), "--n-seen", "2"], ["--seed"], "eval-seed-past-last-prompt"),
    row(EVAL, [], ["file.txt"], "eval-output-is-a-file", out="{file}"),
    row(EVAL, [], ["nosuch"], "eval-output-parent-missing", out="{root}/nosuch/eval"),
]


def fill(args, paths, subs):
    """The row's argv: each "{name}" placeholder replaced by a path (after the row's substitutions)."""
    names = {k: str(v) for k, v in paths.items()}
    out = []
    for a in args:
        if isinstance(a, str):
            for key, value in subs.items():
                a = a.replace("{" + key + "}", value)
            a = a.format(**names)
        out.append(a)
    return out


@pytest.mark.parametrize("base, extra, fragments, subs", BAD_INPUTS)
def test_bad_input_is_one_clean_line_and_writes_nothing(cli, paths, base, extra, fragments, subs):
    args = fill([*base, *extra], paths, subs)
    assert_clean_error(cli, args, fragments, watch=[paths["work"], paths["root"]])


def test_python_api_gets_the_same_checks(paths, tmp_path):
    """The dataclasses refuse wrong types and ranges with the CLI's text, and make no folder."""
    base = dict(data=str(paths["data"]), output=str(tmp_path / "run"), vae=str(paths["vae"]))
    for bad, text in [(dict(max_steps=0), "--max-steps must be at least 1, got 0"),
                      (dict(max_steps=2.5), "--max-steps must be an integer, got 2.5"),
                      (dict(lr="1e-4"), "--lr must be a number, got '1e-4'"),
                      (dict(keep_checkpoints=True), "--keep-checkpoints must be an integer"),
                      (dict(sample_prompts="a photo"), "--sample-prompts must be a list of strings, got 'a photo'"),
                      (dict(prediction_type=None, min_snr_gamma=float("nan")), "--min-snr-gamma")]:
        with pytest.raises(SDTorchError, match=re.escape(text)):
            train(TrainArgs(**base, **bad))
    with pytest.raises(SDTorchError, match="--disc-start must be an integer"):
        train_vae(VAETrainArgs(data=base["data"], output=base["output"], disc_start=None))
    with pytest.raises(SDTorchError, match="--count must be an integer"):
        make_shapes(tmp_path / "shapes", 2.0)
    with pytest.raises(SDTorchError, match="--n-two must be an integer"):
        check_shapes_eval(n_two=1.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_captionless_images_warn_with_the_count(paths, tmp_path):
    """All images without captions (or with empty ones), then some: a warning that counts them."""
    folder = tmp_path / "data"
    folder.mkdir()
    for p in sorted(paths["data"].glob("*.png"))[:10]:
        (folder / p.name).write_bytes(p.read_bytes())
    with pytest.warns(UserWarning, match="10 of 10 images have no caption; training on empty captions"):
        assert warn_missing_captions(ImageCaptionDataset(folder, 32)) == 10
    (folder / "000000.txt").write_text("a red circle\n")
    (folder / "000001.txt").write_text("  \n")  # blank: trains as the empty prompt too
    with pytest.warns(UserWarning, match="9 of 10 images have no caption"):
        assert warn_missing_captions(ImageCaptionDataset(folder, 32)) == 9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_missing_captions(ImageCaptionDataset(paths["data"], 32)) == 0


def test_train_warns_on_the_cli_before_it_checks_the_vae(cli, paths, tmp_path):
    """`sdtorch train` prints the caption warning as one line; here the --vae then fails, so no folder."""
    folder = tmp_path / "data"
    folder.mkdir()
    for p in sorted(paths["data"].glob("*.png")):
        (folder / p.name).write_bytes(p.read_bytes())
    args = fill(TRAIN, paths, {"data": str(folder), "vae": "{file}"})
    code, _, err = cli(args, tmp_path)
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[0] == f"sdtorch: warning: {folder}: 12 of 12 images have no caption; training on " \
                                  "empty captions", err
    assert err.splitlines()[1].startswith("sdtorch: error:") and len(err.splitlines()) == 2, err
    assert not paths["out"].exists()


def test_resume_needs_a_checkpoint_and_resume_or_start_starts(cli, paths, tmp_path):
    """--resume in a folder without a checkpoint is an error that leaves the folder as it was;
    --resume-or-start there trains a new run, and --resume then continues it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert_clean_error(cli, fill([*TRAIN, "--resume"], paths, {"out": str(out)}), ["no checkpoint"],
                       watch=[tmp_path])
    run = [*TRAIN, "--sample-prompts", "a"]
    code, _, err = cli(fill([*run, "--resume-or-start"], paths, {"out": str(out)}), tmp_path)
    assert code == 0, err
    assert (out / "checkpoints" / "latest").read_text() == "ckpt-00000001.pt"
    code, _, err = cli(fill([*run, "--resume", "--max-steps", "2"], paths, {"out": str(out)}), tmp_path)
    assert code == 0, err
    assert (out / "checkpoints" / "latest").read_text() == "ckpt-00000002.pt"
    assert (out / "notes.txt").read_text() == "mine\n"


def test_args_check_covers_every_field():
    """A new field without a range check would pass unnoticed: every field of both dataclasses is named
    in its check (or is a bool or a free-form string whose use checks it)."""
    import inspect

    from sdtorch.training.lora import LoraTrainArgs

    for cls, free in [(TrainArgs, {"config", "tokenizer", "text_encoder"}), (VAETrainArgs, {"config"}),
                      (LoraTrainArgs, {"model", "name"})]:  # model: sdtorch.load checks it; name: lora_name
        # a field may be checked by the class that declares it or by a base class's check (RunArgs and so on)
        source = "".join(inspect.getsource(c.check) for c in cls.__mro__ if "check" in vars(c))
        for f in dataclasses.fields(cls):
            if f.type == "bool" or f.name in free:
                continue
            assert f'"{f.name}"' in source or f"self.{f.name}" in source, f"{cls.__name__}.{f.name} is unchecked"

"""Issue 22's training half: class labels from class folders or metadata.jsonl, `sdtorch train --conditioning
class|none` on tiny configs (labels reach the UNet, label dropout, class names saved, exact resume, torchrun),
the data's bad inputs (one clean line, nothing written), and `eval shapes` on class and unconditional models."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_harness import assert_clean_error
from PIL import Image

import sdtorch
from sdtorch import checkpoints
from sdtorch.data.shapes import SEEN_PAIRS, class_name, class_scene, make_shapes, render
from sdtorch.errors import SDTorchError
from sdtorch.evaluation.classes import evaluate_classes, evaluate_unconditional
from sdtorch.training.data import ImageCaptionDataset, LatentCache
from sdtorch.training.diffusion import TrainArgs, prepare_batch, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """40 one-object 32 px images in 20 class folders (make-shapes --classes), and a random TINY VAE."""
    root = tmp_path_factory.mktemp("classes")
    make_shapes(root / "data", 40, size=32, progress=False, classes=True)
    vae = checkpoints.save_vae(sdtorch.build("tiny").vae, root / "vae", 32)
    return root / "data", vae


def args(inputs, out, conditioning="class", **kw) -> TrainArgs:
    data, vae = inputs
    base = dict(data=str(data), output=str(out), vae=str(vae), config="tiny", conditioning=conditioning,
                resolution=32, batch_size=4, max_steps=2, warmup=1, val_size=4, val_every=100, log_every=1,
                checkpoint_every=100, sample_steps=2, progress=False)
    return TrainArgs(**{**base, **kw})


def _image(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


# ---------------------------------------------------------------------------------------------------------
# The data


def test_class_folders_give_sorted_labels_and_names(inputs):
    ds = ImageCaptionDataset(inputs[0], 32, conditioning="class")
    names = sorted(class_name(c, s) for c, s in SEEN_PAIRS)
    assert ds.class_names == names and ds.num_classes == 20
    for i in range(len(ds)):  # each image's label is its folder's place in the sorted names
        assert names[ds.labels[i]] == ds.files[i].parent.name
    item = ds[3]
    assert item["label"] == ds.labels[3] and item["caption"] == names[ds.labels[3]]


def test_numbered_folders_and_metadata_labels(tmp_path):
    for k in (0, 1, 2):
        _image(tmp_path / "num" / str(k) / "a.png")
    ds = ImageCaptionDataset(tmp_path / "num", 16, conditioning="class")
    assert ds.class_names is None and ds.labels == [0, 1, 2]

    meta = tmp_path / "meta"
    rows = [("a.png", "dog"), ("b.png", "cat"), ("c.png", "dog")]
    for name, _ in rows:
        _image(meta / name)
    (meta / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "label": label}) + "\n"
                                                 for f, label in rows))
    ds = ImageCaptionDataset(meta, 16, conditioning="class")
    assert ds.class_names == ["cat", "dog"] and ds.labels == [1, 0, 1]
    (meta / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "label": i % 2}) + "\n"
                                                 for i, (f, _) in enumerate(rows)))
    ds = ImageCaptionDataset(meta, 16, conditioning="class")
    assert ds.class_names is None and ds.labels == [0, 1, 0]


def test_unconditional_data_ignores_captions_and_folders(inputs):
    ds = ImageCaptionDataset(inputs[0], 32, conditioning="none")
    assert len(ds) == 40 and set(ds.captions) == {""} and ds.labels is None and "label" not in ds[0]


def test_latent_cache_carries_the_labels(inputs, tmp_path):
    ds = ImageCaptionDataset(inputs[0], 32, conditioning="class")
    vae = checkpoints.load_vae(inputs[1])
    cache = LatentCache(tmp_path / "cache", ds, vae.encode, progress=False)
    assert [cache[i]["label"] for i in range(len(ds))] == ds.labels


def _bad_data(root: Path, kind: str) -> Path:
    """A data folder with one fault of the issue's list."""
    folder = root / kind
    if kind == "empty-class":
        _image(folder / "cat" / "a.png")
        _image(folder / "dog" / "b.png")
        (folder / "bird").mkdir()
    elif kind == "single-class":
        _image(folder / "cat" / "a.png")
        _image(folder / "cat" / "b.png")
    elif kind == "loose-images":
        _image(folder / "cat" / "a.png")
        _image(folder / "dog" / "b.png")
        _image(folder / "c.png")
    elif kind == "no-class-folders":
        _image(folder / "a.png")
    else:  # metadata.jsonl rows
        rows = {"missing-labels": [{"label": "cat"}, {}, {"text": "a dog"}],
                "mixed-labels": [{"label": "cat"}, {"label": 1}],
                "quoted-numbers": [{"label": "0"}, {"label": "1"}],
                "unused-index": [{"label": 0}, {"label": 2}]}[kind]
        for i, row in enumerate(rows):
            _image(folder / f"{i}.png")
            row["file_name"] = f"{i}.png"
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


BAD_DATA = {
    "empty-class": ["bird", "no usable images"],
    "single-class": ["single class", "--conditioning none"],
    "loose-images": ["outside any class folder", "c.png"],
    "no-class-folders": ["no class folders"],
    "missing-labels": ["2 line(s) have no \"label\"", "line 2"],
    "mixed-labels": ["mixes class names and integer indices"],
    "quoted-numbers": ["number written as a string"],
    "unused-index": ["label 1", "no usable images"],
}


@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_bad_class_data_is_one_clean_line_and_writes_nothing(cli, inputs, tmp_path, kind):
    data = _bad_data(tmp_path, kind)
    out = tmp_path / "work" / "run"
    out.parent.mkdir()
    assert_clean_error(cli, ["train", str(data), str(out), "--vae", str(inputs[1]), "--conditioning", "class",
                             "--resolution", "32", "--max-steps", "1", "--no-progress"], BAD_DATA[kind],
                       watch=[out.parent, data])


BAD_FLAGS = [
    (["--tokenizer", "captions"], ["--tokenizer", "no text encoder"]),
    (["--max-length", "8"], ["--max-length", "no text encoder"]),
    (["--conditioning", "text", "--class-embedding", "time"], ["--class-embedding", "--conditioning class"]),
    (["--conditioning", "pixels"], ["--conditioning", "pixels"]),
    (["--sample-prompts", "teal-circle"], ["--sample-prompts", "unknown class 'teal-circle'"]),
]


@pytest.mark.parametrize("extra,fragments", BAD_FLAGS, ids=[b[0][1] for b in BAD_FLAGS])
def test_bad_class_flags_are_one_clean_line(cli, inputs, tmp_path, extra, fragments):
    out = tmp_path / "work" / "run"
    out.parent.mkdir()
    assert_clean_error(cli, ["train", str(inputs[0]), str(out), "--vae", str(inputs[1]), "--conditioning", "class",
                             "--resolution", "32", "--max-steps", "1", "--no-progress", *extra], fragments,
                       watch=[out.parent])


# ---------------------------------------------------------------------------------------------------------
# The trainer


def test_label_dropout_gives_the_null_class():
    batch = {"mean": torch.zeros(64, 4, 2, 2), "std": torch.ones(64, 4, 2, 2), "label": torch.arange(64) % 5,
             "index": torch.arange(64), "caption": [""] * 64}
    kept = prepare_batch(batch, 0, _Dropout(0.0), None, 1.0, 10,
                         null_class=5)[3]
    assert torch.equal(kept, torch.arange(64) % 5)
    dropped = prepare_batch(batch, 0, _Dropout(1.0), None, 1.0, 10, null_class=5)[3]
    assert torch.equal(dropped, torch.full((64,), 5))
    half = prepare_batch(batch, 0, _Dropout(0.5), None, 1.0, 10, null_class=5)[3]
    nulls = int((half == 5).sum())
    # 64 independent draws at p = 0.5: outside 12..52 has probability below 1e-6 (binomial tails); seeded anyway
    assert 12 < nulls < 52 and torch.equal(half[half != 5], (torch.arange(64) % 5)[half != 5])


class _Dropout:
    """The two fields prepare_batch reads."""

    def __init__(self, p):
        self.caption_dropout, self.seed = p, 0


def test_class_run_saves_a_model_that_draws_each_class(inputs, tmp_path):
    folder = train(args(inputs, tmp_path / "run"))
    model = sdtorch.load(folder)
    assert model.config.unet.conditioning == "class" and model.config.unet.num_classes == 20
    assert model.text_encoder is None and model.class_names == sorted(class_name(c, s) for c, s in SEEN_PAIRS)
    assert json.loads((tmp_path / "run" / "classes.json").read_text())["num_classes"] == 20
    a = model.txt2img(class_label="red-circle", steps=2, seed=0, output_type="tensor")
    b = model.txt2img(class_label="blue-square", steps=2, seed=0, output_type="tensor")
    assert not torch.equal(a, b), "the class does not reach the UNet"
    assert (tmp_path / "run" / "samples" / "final.png").is_file()


def test_class_embedding_time_mode_trains(inputs, tmp_path):
    model = sdtorch.load(train(args(inputs, tmp_path / "run", class_embedding="time", max_steps=1)))
    assert model.config.unet.class_conditioning == "time"
    assert "class_embedding.weight" in dict(model.unet.named_parameters())


def test_unconditional_run_has_no_cross_attention(inputs, tmp_path):
    folder = train(args(inputs, tmp_path / "run", conditioning="none"))
    model = sdtorch.load(folder)
    u = model.config.unet
    assert u.conditioning == "none" and not u.cross_attention and u.head_dim == 32  # TINY: 64 channels / 2 heads
    assert model.text_encoder is None and model.class_names is None
    assert not any("attn2" in k for k in model.unet.state_dict())
    assert model.txt2img(steps=2, seed=0, guidance=1.0)[0].size == (32, 32)


def test_class_run_resumes_exactly(inputs, tmp_path):
    """Four steps straight, against two steps, a stop, and a resume to four: the same weights, EMA and losses."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(args(inputs, whole, max_steps=4, checkpoint_every=2))
    train(args(inputs, cut, max_steps=4, checkpoint_every=2))
    ckpts = cut / "checkpoints"
    (ckpts / "ckpt-00000004.pt").unlink()  # as if stopped after step 2
    (ckpts / "latest").write_text("ckpt-00000002.pt")
    log = cut / "log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if json.loads(line).get("step", 0) <= 2))
    shutil.rmtree(cut / "model")
    train(args(inputs, cut, max_steps=4, checkpoint_every=2, resume=True))
    a, b = (torch.load(p / "checkpoints" / "ckpt-00000004.pt", weights_only=True) for p in (whole, cut))
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    losses = lambda out: [json.loads(x).get("loss") for x in (out / "log.jsonl").read_text().splitlines()]  # noqa
    assert losses(whole) == losses(cut)


def test_resume_with_other_classes_is_refused(inputs, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(inputs[0], data)
    run = tmp_path / "run"
    train(args(inputs, run, data=str(data), max_steps=1))
    shutil.rmtree(data / "red-circle")
    with pytest.raises(SDTorchError, match="resume with the same classes"):
        train(args(inputs, run, data=str(data), max_steps=2, resume=True))


def test_two_processes_see_the_same_labels_as_one(inputs, tmp_path):
    """torchrun: 2 gloo processes x batch 2 against 1 process x batch 4, class-conditional. Each sample's
    label and randomness come from its dataset index, so the per-step losses agree to float32 rounding of a
    forward pass some 60 ops deep at another batch size (about 60 * 1.2e-7 relative; bound 1e-5)."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(args(inputs, one, max_steps=3))
    a = args(inputs, two, max_steps=3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "sdtorch.cli", "train", a.data, a.output, "--vae", a.vae, "--config", "tiny", "--conditioning", "class",
           "--resolution", "32", "--batch-size", "2", "--max-steps", "3", "--warmup", "1", "--val-size", "4",
           "--val-every", "100", "--log-every", "1", "--checkpoint-every", "100", "--sample-steps", "2",
           "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    read = lambda out: [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]  # noqa
    la, lb = read(one), read(two)
    assert [x["step"] for x in la] == [x["step"] for x in lb] == [1, 2, 3]
    for x, y in zip(la, lb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x, y)


def test_class_names_travel_in_a_single_file(inputs, tmp_path):
    model = sdtorch.load(train(args(inputs, tmp_path / "run", max_steps=1)))
    path = model.save_single_file(tmp_path / "classes.safetensors")
    again = sdtorch.load(path)
    assert again.class_names == model.class_names and again.class_label("white-square") == 16


# ---------------------------------------------------------------------------------------------------------
# eval shapes on class and unconditional models


class _Drawer:
    """A stand-in for a class (or unconditional) shapes model that renders scenes itself: `wrong` swaps each
    class's colour for the next class's, so the grader must tell right from wrong."""

    def __init__(self, vae, kind="class", wrong=False):
        self.vae, self.wrong, self.name = vae, wrong, "drawer"
        self.class_names = [class_name(c, s) for c, s in SEEN_PAIRS] if kind == "class" else None
        self.config = type("C", (), {"sample_size": 64, "unet": type("U", (), {"conditioning": kind})()})()

    def class_name(self, label):
        return self.class_names[label]

    def txt2img(self, class_label=None, seed=0, **_):
        rng = random.Random(seed)
        pair = SEEN_PAIRS[(class_label if class_label is not None else seed) % len(SEEN_PAIRS)]
        if self.wrong:
            pair = (SEEN_PAIRS[(SEEN_PAIRS.index(pair) + 3) % len(SEEN_PAIRS)][0], pair[1])
        return [render(class_scene(rng, *pair), 64, rng)]


@pytest.fixture(scope="module")
def shapes_vae():
    return sdtorch.load("shapes").vae


def test_class_grader_tells_right_from_wrong(shapes_vae):
    right = evaluate_classes(_Drawer(shapes_vae), sampler="euler", steps=1, guidance=1.0, n_per_class=2,
                             progress=False)[0]
    # the drawer's renders are graded exactly; their round trip through the shipped autoencoder is its ceiling, 40
    # of 40 for v16's and 39 for v15's (a small object on gray drawn round, as in docs/shapes-model.md), so one
    # miss is allowed
    assert right["overall"]["exact"]["accuracy"] == 1.0 and right["autoencoder"]["exact"]["correct"] >= 39
    assert set(right["classes"]) == {class_name(c, s) for c, s in SEEN_PAIRS}
    wrong = evaluate_classes(_Drawer(shapes_vae, wrong=True), sampler="euler", steps=1, guidance=1.0,
                             n_per_class=1, progress=False)[0]
    # the shifted colour equals the class's own for some pairs (same colour, other shape in SEEN_PAIRS order)
    same = sum(SEEN_PAIRS[(i + 3) % 20][0] == p[0] for i, p in enumerate(SEEN_PAIRS))
    assert wrong["overall"]["exact"]["correct"] == same < 20


def test_unconditional_grader_counts_valid_scenes_and_pairs(shapes_vae):
    report = evaluate_unconditional(_Drawer(shapes_vae, kind="none"), sampler="euler", steps=1, n_images=20,
                                    progress=False)[0]
    assert report["overall"]["valid"]["accuracy"] == 1.0 and report["overall"]["pairs_drawn"] == 20
    assert report["autoencoder"]["valid"]["accuracy"] == 1.0


def test_text_only_commands_refuse_a_class_model(cli, inputs, tmp_path):
    folder = train(args(inputs, tmp_path / "run", max_steps=1))
    assert_clean_error(cli, ["eval", "shapes", "--model", str(folder), "--n-seen", "3", "-o", str(tmp_path / "ev")],
                       ["--n-seen", "class-conditional", "--n-per-class"], watch=[tmp_path])
    assert_clean_error(cli, ["eval", "shapes", "--n-per-class", "3", "-o", str(tmp_path / "ev")],
                       ["--n-per-class", "text-conditioned"], watch=[tmp_path])
    assert_clean_error(cli, ["train-lora", str(inputs[0]), str(tmp_path / "lora"), "--model", str(folder),
                             "--resolution", "32", "--max-steps", "1", "--no-progress"],
                       ["train-lora", "class-conditioned"], watch=[tmp_path])

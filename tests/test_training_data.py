"""The training dataset and latent cache on tiny image folders built with PIL."""

from __future__ import annotations

import json
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from sdtorch.errors import SDTorchError
from sdtorch.models.vae import DiagonalGaussian
from sdtorch.training.data import ImageCaptionDataset, LatentCache, collate

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(path, size, color=(255, 255, 255)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def gradient(path, size, seed=0):
    """A smooth but asymmetric image (plus a little noise so PNGs do not compress to nothing)."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    noise = np.random.default_rng(seed).uniform(0, 0.1, (h, w))
    a = np.stack([x, y, (x * y + noise) / 1.1], -1) * 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype(np.uint8)).save(path)
    return path


def bands(path, size, colors):
    """Vertical bands of equal width, left to right."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    for i, c in enumerate(colors):
        a[:, i * w // len(colors):(i + 1) * w // len(colors)] = c
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def captioned(root):
    """Four captioned-or-not images in nested folders, plus files the dataset must ignore."""
    solid(root / "a.png", (40, 30), RED)
    (root / "a.txt").write_text("  a red picture \n")
    gradient(root / "sub" / "b.jpg", (30, 60))
    (root / "sub" / "b.caption").write_text("a gradient")
    solid(root / "sub" / "deeper" / "c.webp", (20, 20), BLUE)  # no caption
    gradient(root / "d.BMP", (17, 50))
    (root / "d.txt").write_text("bitmap")
    (root / "d.caption").write_text("not used: .txt comes first")
    (root / "notes.md").write_text("not an image")
    solid(root / ".cache" / "hidden.png", (8, 8))
    return root


def no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def test_kohya_folder(tmp_path):
    ds = no_warnings(ImageCaptionDataset, captioned(tmp_path), 16)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.files] == [
        "a.png", "d.BMP", "sub/b.jpg", "sub/deeper/c.webp"]
    assert ds.captions == ["a red picture", "bitmap", "a gradient", ""]
    assert ds.missing_captions == 1 and ds.skipped == [] and len(ds) == 4
    assert [ds[i]["caption"] for i in range(4)] == ds.captions
    assert [ds[i]["index"] for i in range(4)] == [0, 1, 2, 3]


def test_metadata_jsonl_wins(tmp_path):
    captioned(tmp_path)
    rows = [{"file_name": "sub/b.jpg", "text": " from metadata "}, {"file_name": "a.png", "text": "red"},
            {"file_name": "d.BMP"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = no_warnings(ImageCaptionDataset, tmp_path, 16)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.files] == ["a.png", "d.BMP", "sub/b.jpg"]
    assert ds.captions == ["red", "", "from metadata"]  # .txt files are ignored when metadata exists
    assert ds.missing_captions == 1


def test_bad_metadata_line_names_file_and_line(tmp_path):
    solid(tmp_path / "a.png", (8, 8))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n')
    with pytest.raises(SDTorchError, match=r"metadata\.jsonl:2"):
        ImageCaptionDataset(tmp_path, 8)


def test_unreadable_images_skipped_with_one_warning(tmp_path):
    captioned(tmp_path)
    (tmp_path / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(500))
    data = gradient(tmp_path / "full.png", (64, 64)).read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "truncated.png") as im:  # the header still opens: only a full load finds it
        assert im.size == (64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageCaptionDataset(tmp_path, 16)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "2 unreadable" in message and "corrupt.png" in message and "truncated.png" in message
    assert sorted(p.name for p in ds.skipped) == ["corrupt.png", "truncated.png"]
    assert len(ds) == 5 and "truncated.png" not in [p.name for p in ds.files]


def test_getitem_failure_uses_next_image(tmp_path):
    solid(tmp_path / "a.png", (8, 8), RED)
    (tmp_path / "b.png").write_bytes(b"not a png at all")
    solid(tmp_path / "c.png", (8, 8), BLUE)
    ds = no_warnings(ImageCaptionDataset, tmp_path, 8, verify=False)
    assert len(ds) == 3 and ds.skipped == []
    with pytest.warns(UserWarning, match="b.png"):
        item = ds[1]
    assert item["index"] == 2 and ds.skipped == [tmp_path / "b.png"]
    (tmp_path / "c.png").unlink()  # vanishes after init: the last index wraps around to the first
    with pytest.warns(UserWarning, match="c.png"):
        assert ds[2]["index"] == 0
    assert ds[1]["index"] == 0  # known-bad indices are not retried
    (tmp_path / "a.png").unlink()
    with pytest.warns(UserWarning), pytest.raises(SDTorchError, match="none of the 3"):
        ds[0]


def test_shapes_and_range(tmp_path):
    for name, size in [("wide", (90, 20)), ("tall", (13, 70)), ("tiny", (5, 7)), ("big", (200, 150))]:
        gradient(tmp_path / f"{name}.png", size)
    solid(tmp_path / "white.png", (33, 21), (255, 255, 255))
    solid(tmp_path / "black.png", (21, 33), (0, 0, 0))
    ds = ImageCaptionDataset(tmp_path, 24, center_crop=False, random_flip=True)
    for i in range(len(ds)):
        px = ds[i]["pixels"]
        assert px.shape == (3, 24, 24) and px.dtype == torch.float32
        assert px.min() >= -1 and px.max() <= 1
    names = [p.stem for p in ds.files]
    assert torch.all(ds[names.index("white")]["pixels"] == 1)
    assert torch.all(ds[names.index("black")]["pixels"] == -1)
    assert ds[names.index("big")]["pixels"].std() > 0.2  # a real image, not a constant


def test_center_crop_is_the_middle(tmp_path):
    bands(tmp_path / "a.png", (96, 32), [RED, GREEN, BLUE])  # short side already R: crop only
    px = ImageCaptionDataset(tmp_path, 32)[0]["pixels"]
    assert torch.equal(px, torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 32, 32))


def test_center_crop_after_resize(tmp_path):
    bands(tmp_path / "wide.png", (128, 32), [RED, RED, BLUE, BLUE])  # 4:1, resized to 64x16
    bands(tmp_path / "tall.png", (96, 32), [RED, BLUE])
    Image.open(tmp_path / "tall.png").rotate(-90, expand=True).save(tmp_path / "tall.png")  # 1:3, red on top
    ds = ImageCaptionDataset(tmp_path, 16)
    names = [p.stem for p in ds.files]
    red, blue = torch.tensor([1.0, -1, -1])[:, None, None], torch.tensor([-1.0, -1, 1])[:, None, None]
    wide = ds[names.index("wide")]["pixels"]  # crop of columns 24..40 of 64: left half red, right half blue
    assert torch.allclose(wide[:, :, :6], red.expand(3, 16, 6), atol=0.02)
    assert torch.allclose(wide[:, :, 10:], blue.expand(3, 16, 6), atol=0.02)
    tall = ds[names.index("tall")]["pixels"]
    assert torch.allclose(tall[:, :6], red.expand(3, 6, 16), atol=0.02)
    assert torch.allclose(tall[:, 10:], blue.expand(3, 6, 16), atol=0.02)


def test_resize_is_antialiased(tmp_path):
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(checker).convert("RGB").save(tmp_path / "checker.png")
    px = ImageCaptionDataset(tmp_path, 16)[0]["pixels"]  # a 4x shrink averages the 1-pixel squares to grey
    assert px.abs().max() < 0.05


def test_randomness_is_seeded_by_seed_epoch_index(tmp_path):
    gradient(tmp_path / "a.png", (80, 40))
    gradient(tmp_path / "b.png", (40, 90), seed=1)
    def make(seed):
        return ImageCaptionDataset(tmp_path, 24, center_crop=False, random_flip=True, seed=seed)

    ds, again, other = make(7), make(7), make(8)
    state = random.getstate(), torch.get_rng_state()
    per_epoch = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        again.set_epoch(epoch)
        random.seed(epoch)  # global RNG state must not matter
        torch.manual_seed(epoch)
        items = [ds[i]["pixels"] for i in (1, 0)][::-1]  # order of access must not matter either
        assert all(torch.equal(items[i], again[i]["pixels"]) for i in range(2))
        per_epoch.append(items)
    assert len({tuple(x[0].flatten()[:50].tolist()) for x in per_epoch}) > 2  # epochs give other crops
    ds.set_epoch(3)
    assert torch.equal(ds[1]["pixels"], per_epoch[3][1])  # resuming at an epoch repeats it
    other.set_epoch(0)
    assert not all(torch.equal(other[i]["pixels"], per_epoch[0][i]) for i in range(2))
    random.setstate(state[0])
    torch.set_rng_state(state[1])
    assert (random.getstate(), torch.get_rng_state().tolist()) == (state[0], state[1].tolist())


def test_random_flip_flips(tmp_path):
    bands(tmp_path / "a.png", (16, 16), [RED, BLUE])
    plain = ImageCaptionDataset(tmp_path, 16)[0]["pixels"]
    flipping = ImageCaptionDataset(tmp_path, 16, random_flip=True)
    seen = []
    for epoch in range(16):
        flipping.set_epoch(epoch)
        px = flipping[0]["pixels"]
        assert torch.equal(px, plain) or torch.equal(px, plain.flip(-1))
        seen.append(torch.equal(px, plain))
    assert any(seen) and not all(seen)
    assert plain[0, 0, 0] == 1 and plain[2, 0, -1] == 1  # red on the left, blue on the right


def test_errors_name_the_folder(tmp_path):
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        if folder.name == "empty":
            (folder / "sub").mkdir(parents=True)
            (folder / "readme.txt").write_text("no images")
        with pytest.raises(SDTorchError, match=str(folder)) as err:
            ImageCaptionDataset(folder, 16)
        assert "\n" not in str(err.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="x.png"), pytest.raises(SDTorchError, match="no usable images"):
        ImageCaptionDataset(tmp_path / "bad", 16)


def test_collate_in_a_dataloader(tmp_path):
    captioned(tmp_path)
    batch = next(iter(DataLoader(ImageCaptionDataset(tmp_path, 16), batch_size=3, collate_fn=collate)))
    assert batch["pixels"].shape == (3, 3, 16, 16)
    assert batch["caption"] == ["a red picture", "bitmap", "a gradient"]
    assert torch.equal(batch["index"], torch.tensor([0, 1, 2]))


class PoolEncoder:
    """A stand-in VAE: mean is a 4x average pool, std a function of it; counts the images it encodes."""

    def __init__(self, posterior=False):
        self.seen, self.posterior = 0, posterior

    def __call__(self, pixels):
        self.seen += len(pixels)
        mean = F.avg_pool2d(pixels, 4)
        if self.posterior:
            return DiagonalGaussian(torch.cat([mean, -mean.abs()], dim=1))
        return mean, 0.1 + mean.abs()


def test_latent_cache_round_trip_and_reuse(tmp_path):
    data = captioned(tmp_path / "data")
    ds = ImageCaptionDataset(data, 16)
    enc = PoolEncoder()
    cache = LatentCache(tmp_path / "cache", ds, enc, batch_size=3, progress=False, vae_id="pool", shard_size=3)
    assert enc.seen == 4 and len(cache) == 4
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["latents-00000.safetensors",
                                                                      "latents-00001.safetensors"]
    for i in range(4):
        item, mean = cache[i], F.avg_pool2d(ds[i]["pixels"][None], 4)[0]
        assert item["mean"].shape == (3, 4, 4) and item["mean"].dtype == torch.float32
        assert torch.equal(item["mean"], mean) and torch.equal(item["std"], 0.1 + mean.abs())
        assert item["caption"] == ds.captions[i] and item["index"] == i
    batch = next(iter(DataLoader(cache, batch_size=4, collate_fn=collate, num_workers=0)))
    assert batch["mean"].shape == (4, 3, 4, 4) and batch["caption"] == ds.captions
    assert torch.equal(pickle.loads(pickle.dumps(cache))[3]["mean"], cache[3]["mean"])

    again = PoolEncoder()
    reused = LatentCache(tmp_path / "cache", ImageCaptionDataset(data, 16), again, progress=False,
                         vae_id="pool", shard_size=3)
    assert again.seen == 0 and torch.equal(reused[2]["std"], cache[2]["std"])

    (tmp_path / "cache" / "latents-00001.safetensors").unlink()  # an interrupted build resumes
    resumed = PoolEncoder()
    LatentCache(tmp_path / "cache", ds, resumed, progress=False, vae_id="pool", shard_size=3)
    assert resumed.seen == 1


def test_latent_cache_rebuilt_when_stale(tmp_path):
    data = captioned(tmp_path / "data")
    folder = tmp_path / "cache"
    LatentCache(folder, ImageCaptionDataset(data, 16), PoolEncoder(), progress=False, vae_id="a", shard_size=2)
    for change in ("vae_id", "resolution", "files", "fp16"):
        enc = PoolEncoder()
        if change == "files":
            (data / "sub" / "b.jpg").unlink()
        ds = ImageCaptionDataset(data, 32 if change == "resolution" else 16)
        dtype = torch.float16 if change == "fp16" else torch.float32
        cache = LatentCache(folder, ds, enc, progress=False, vae_id="b", shard_size=2, dtype=dtype)
        assert enc.seen == len(ds), change
        assert sorted(p.name for p in folder.iterdir()) == [f"latents-0000{k}.safetensors"
                                                            for k in range((len(ds) + 1) // 2)]
    assert torch.allclose(cache[0]["mean"], F.avg_pool2d(ds[0]["pixels"][None], 4)[0], atol=1e-3)


def test_latent_cache_accepts_a_posterior(tmp_path):
    gradient(tmp_path / "data" / "a.png", (20, 20))
    ds = ImageCaptionDataset(tmp_path / "data", 8)
    item = LatentCache(tmp_path / "cache", ds, PoolEncoder(posterior=True), progress=False)[0]
    mean = F.avg_pool2d(ds[0]["pixels"][None], 4)[0]
    assert torch.allclose(item["mean"], mean) and torch.allclose(item["std"], torch.exp(-0.5 * mean.abs()))


def test_latent_cache_refuses_random_crops_and_bad_encoders(tmp_path):
    gradient(tmp_path / "data" / "a.png", (20, 20))
    for kwargs in (dict(random_flip=True), dict(center_crop=False)):
        with pytest.raises(SDTorchError, match="center_crop=True and random_flip=False"):
            LatentCache(tmp_path / "cache", ImageCaptionDataset(tmp_path / "data", 8, **kwargs), PoolEncoder())
    ds = ImageCaptionDataset(tmp_path / "data", 8)
    with pytest.raises(SDTorchError, match="encode_fn must return"):
        LatentCache(tmp_path / "cache", ds, lambda x: x, progress=False)
    with pytest.raises(SDTorchError, match="for a batch of 1"):
        LatentCache(tmp_path / "cache", ds, lambda x: (x, x[:, :1]), progress=False)

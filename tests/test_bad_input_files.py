"""Every file and folder sdtorch reads, malformed: one clear line naming the file and the problem, never a
traceback (issue 17, section 4). Checkpoints, configs, tokenizers and generation defaults go through the
real CLI (`BAD_INPUTS`); training checkpoints and datasets through their Python readers."""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from cli_harness import assert_clean_error
from PIL import Image
from safetensors.torch import save_file

import sdtorch
from sdtorch.checkpoints import read_state_dict
from sdtorch.config import TINY
from sdtorch.errors import SDTorchError
from sdtorch.training import common
from sdtorch.training.data import ImageCaptionDataset, LatentCache


class Payload:
    """A pickle that would call `fn(arg)` when loaded."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def _resave(src: Path, dst: Path, tensors=None, meta=None, drop_meta=()):
    """Write `src`'s tensors (changed by `tensors`, None values dropped) with its metadata changed by `meta`."""
    sd = read_state_dict(src)
    out = {k: sd[k] for k in sd}
    for k, v in (tensors or {}).items():
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    metadata = {k: v for k, v in {**sd.metadata, **(meta or {})}.items() if k not in drop_meta}
    save_file(out, dst, metadata=metadata)


def _edit_json(path: Path, change):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


def _folder_variant(base: Path, root: Path, name: str, edit) -> None:
    """A copy of the diffusers folder `base` named `name`, changed by `edit(folder)`."""
    folder = root / name
    shutil.copytree(base, folder)
    edit(folder)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Every malformed input of BAD_INPUTS, made from one tiny model, by name."""
    root = tmp_path_factory.mktemp("bad")
    model = sdtorch.build("tiny")
    good = model.save_single_file(root / "good.safetensors")
    folder = model.save_diffusers(root / "good-folder")
    meta = json.loads(read_state_dict(good).metadata["sdtorch_config"])
    u = "model.diffusion_model."

    def with_config(name, change):
        cfg = json.loads(json.dumps(meta))
        _resave(good, root / name, meta={"sdtorch_config": json.dumps(change(cfg))})

    # shapes: without the stored config the architecture is read from tensor shapes
    _resave(good, root / "shape-1d.safetensors", {f"{u}input_blocks.0.0.weight": torch.zeros(32)},
            drop_meta=["sdtorch_config"])
    _resave(good, root / "shape-missing.safetensors", {f"{u}out.2.weight": None}, drop_meta=["sdtorch_config"])
    _resave(good, root / "shape-zero.safetensors", {f"{u}time_embed.0.weight": torch.zeros(0, 32)},
            drop_meta=["sdtorch_config"])
    _resave(good, root / "no-config.safetensors", drop_meta=["sdtorch_config"])  # text width 32: heads 32 // 64 = 0
    _resave(good, root / "inconsistent.safetensors", {"first_stage_model.quant_conv.weight": torch.zeros(6, 8, 1, 1)})
    # sdtorch_config metadata
    _resave(good, root / "meta-notjson.safetensors", meta={"sdtorch_config": "{'family': sd1"})
    with_config("meta-list.safetensors", lambda c: [c])
    with_config("meta-nounet.safetensors", lambda c: {k: v for k, v in c.items() if k != "unet"})
    with_config("meta-unknown.safetensors", lambda c: {**c, "unet": {**c["unet"], "wings": 2}})
    with_config("meta-type.safetensors", lambda c: {**c, "unet": {**c["unet"], "block_channels": "32,64"}})
    with_config("meta-bool.safetensors", lambda c: {**c, "unet": {**c["unet"], "layers_per_block": True}})
    with_config("meta-negative.safetensors", lambda c: {**c, "vae": {**c["vae"], "latent_channels": -4}})
    with_config("meta-zero.safetensors", lambda c: {**c, "unet": {**c["unet"], "block_channels": [0, 64]}})
    with_config("meta-heads.safetensors", lambda c: {**c, "unet": {**c["unet"], "num_heads": 3}})
    with_config("meta-family.safetensors", lambda c: {**c, "family": "sdxl"})
    with_config("meta-context.safetensors", lambda c: {**c, "unet": {**c["unet"], "context_dim": 48}})
    with_config("meta-text.safetensors", lambda c: {**c, "text": "clip"})
    _resave(good, root / "tok-notjson.safetensors", meta={"sdtorch_tokenizer": "{"})
    _resave(good, root / "tok-list.safetensors", meta={"sdtorch_tokenizer": "[]"})
    # a model whose text encoder is smaller than the bundled CLIP tokenizer, saved before files kept tokenizers
    small = TINY.replace(text={"vocab_size": 600})
    sdtorch.build(small).save_single_file(root / "small-vocab.safetensors")
    sdtorch.build(TINY.replace(text={"max_positions": 16})).save_single_file(root / "short.safetensors")
    # legacy (non-zip) pickles that ask for callables
    for name, obj in (("system", {"state_dict": Payload(os.system, "true")}),
                      ("eval", {"state_dict": {"w": Payload(builtins.eval, "1")}}),
                      ("nested", {"state_dict": {"w": [1, (2, {"x": Payload(builtins.exec, "1")})]}})):
        (root / f"legacy-{name}.ckpt").write_bytes(pickle.dumps(obj, protocol=2 if name == "system" else 4))
    torch.save({"state_dict": {"w": torch.ones(2), "x": Payload(builtins.eval, "1")}}, root / "legacy-torch.ckpt",
               _use_new_zipfile_serialization=False)

    # diffusers folders
    def edit(name, fn):
        _folder_variant(folder, root, name, fn)

    edit("vae-list", lambda f: (f / "vae" / "config.json").write_text("[1, 2]"))
    edit("unet-notjson", lambda f: (f / "unet" / "config.json").write_text('{"in_channels": 4,'))
    edit("vae-latin1", lambda f: (f / "vae" / "config.json").write_bytes(b'{"name": "\xe9"}'))
    edit("index-list", lambda f: (f / "model_index.json").write_text("[]"))
    edit("text-nohidden", lambda f: _edit_json(f / "text_encoder" / "config.json",
                                               lambda d: {k: v for k, v in d.items() if k != "hidden_size"}))
    edit("text-act", lambda f: _edit_json(f / "text_encoder" / "config.json", lambda d: {**d, "hidden_act": "relu"}))
    edit("text-heads", lambda f: _edit_json(f / "text_encoder" / "config.json",
                                            lambda d: {**d, "num_attention_heads": 5}))
    edit("unet-heads", lambda f: _edit_json(f / "unet" / "config.json", lambda d: {**d, "attention_head_dim": 3}))
    edit("unet-heads-zero", lambda f: _edit_json(f / "unet" / "config.json",
                                                 lambda d: {**d, "attention_head_dim": [2, 0]}))
    edit("unet-channels", lambda f: _edit_json(f / "unet" / "config.json",
                                               lambda d: {**d, "block_out_channels": "32,64"}))
    edit("unet-sample", lambda f: _edit_json(f / "unet" / "config.json", lambda d: {**d, "sample_size": "8"}))
    edit("unet-types", lambda f: _edit_json(f / "unet" / "config.json", lambda d: {**d, "down_block_types": 2}))
    edit("vae-groups", lambda f: _edit_json(f / "vae" / "config.json", lambda d: {**d, "norm_num_groups": 7}))
    edit("sched-pred", lambda f: _edit_json(f / "scheduler" / "scheduler_config.json",
                                            lambda d: {**d, "prediction_type": "sample"}))
    edit("sched-beta", lambda f: _edit_json(f / "scheduler" / "scheduler_config.json",
                                            lambda d: {**d, "beta_end": "0.012"}))
    edit("tok-novocab", lambda f: (f / "tokenizer" / "vocab.json").unlink())
    edit("tok-vocab-notjson", lambda f: (f / "tokenizer" / "vocab.json").write_text('{"a": 1'))
    edit("tok-vocab-list", lambda f: (f / "tokenizer" / "vocab.json").write_text("[1]"))
    edit("tok-vocab-id", lambda f: _edit_json(f / "tokenizer" / "vocab.json", lambda d: {**d, "zq": "7"}))
    edit("tok-vocab-big", lambda f: _edit_json(f / "tokenizer" / "vocab.json", lambda d: {**d, "zq": 99999}))
    edit("tok-vocab-lacks", lambda f: _edit_json(f / "tokenizer" / "vocab.json",
                                                 lambda d: {k: v for k, v in d.items() if k != "the</w>"}))
    edit("tok-merges-latin1", lambda f: (f / "tokenizer" / "merges.txt").write_bytes(b"#version: 0.2\n\xe9 t\n"))
    edit("tok-merges-triple", lambda f: (f / "tokenizer" / "merges.txt").write_text("#version: 0.2\nt h e\n"))
    edit("tok-length", lambda f: _edit_json(f / "tokenizer" / "tokenizer_config.json",
                                            lambda d: {**d, "model_max_length": 100}))
    edit("tok-length-type", lambda f: _edit_json(f / "tokenizer" / "tokenizer_config.json",
                                                 lambda d: {**d, "model_max_length": "77"}))
    edit("tok-special-list", lambda f: (f / "tokenizer" / "special_tokens_map.json").write_text("[]"))
    for name, text in (("notjson", '{"steps": 4,'), ("list", "[4]"), ("steps-bool", '{"steps": true}'),
                       ("steps-float", '{"steps": 2.5}'), ("steps-zero", '{"steps": 0}'),
                       ("guidance-nan", '{"guidance": NaN}'), ("guidance-str", '{"guidance": "7"}'),
                       ("sampler-list", '{"sampler": ["euler"]}'), ("sampler-unknown", '{"sampler": "magic"}'),
                       ("unknown-key", '{"seed": 3}')):
        edit(f"defaults-{name}", lambda f, text=text: (f / "generation_defaults.json").write_text(text))
    edit("defaults-latin1", lambda f: (f / "generation_defaults.json").write_bytes(b'{"sampler": "\xe9"}'))
    return root


GEN = ["-W", "64", "-H", "64", "--steps", "1", "-o", "out.png", "a cat"]

BAD_INPUTS = [
    # single files: tensor shapes read when the file carries no sdtorch_config
    pytest.param(["info", "shape-1d.safetensors"], ["shape-1d.safetensors", "input_blocks.0.0.weight", "[32]",
                                                    "expected [out, in, kh, kw]"], id="shape-wrong-rank"),
    pytest.param(["info", "shape-missing.safetensors"], ["shape-missing.safetensors", "out.2.weight", "missing"],
                 id="shape-missing-key"),
    pytest.param(["info", "shape-zero.safetensors"], ["time_embed.0.weight", "[0, 32]"], id="shape-zero-size"),
    pytest.param(["info", "no-config.safetensors"], ["no-config.safetensors", "impossible", "text.heads = 0",
                                                     "--config"], id="shape-impossible-heads"),
    pytest.param(["info", "inconsistent.safetensors"], ["quant_conv.weight", "mis-shaped"], id="shape-inconsistent"),
    # sdtorch_config metadata
    pytest.param(["info", "meta-notjson.safetensors"], ["meta-notjson.safetensors", "sdtorch_config", "not JSON"],
                 id="config-not-json"),
    pytest.param(["info", "meta-list.safetensors"], ["sdtorch_config", "JSON object", "list"], id="config-list"),
    pytest.param(["info", "meta-nounet.safetensors"], ["sdtorch_config", "missing field", "unet"],
                 id="config-missing-part"),
    pytest.param(["info", "meta-unknown.safetensors"], ["unknown field", "unet.wings"], id="config-unknown-field"),
    pytest.param(["info", "meta-type.safetensors"], ["unet.block_channels", "'32,64'"], id="config-wrong-type"),
    pytest.param(["info", "meta-bool.safetensors"], ["unet.layers_per_block = True", "positive integer"],
                 id="config-bool-for-int"),
    pytest.param(["info", "meta-negative.safetensors"], ["vae.latent_channels = -4"], id="config-negative"),
    pytest.param(["info", "meta-zero.safetensors"], ["unet.block_channels", "0"], id="config-zero-channels"),
    pytest.param(["info", "meta-heads.safetensors"], ["unet.num_heads = 3", "do not split"], id="config-heads"),
    pytest.param(["info", "meta-family.safetensors"], ["family = 'sdxl'"], id="config-family"),
    pytest.param(["info", "meta-context.safetensors"], ["unet.context_dim = 48", "text encoder's width 32"],
                 id="config-parts-do-not-fit"),
    pytest.param(["info", "meta-text.safetensors"], ["text must be a JSON object"], id="config-part-not-object"),
    pytest.param(["info", "tok-notjson.safetensors"], ["tok-notjson.safetensors", "sdtorch_tokenizer", "not JSON"],
                 id="tokenizer-meta-not-json"),
    pytest.param(["info", "tok-list.safetensors"], ["sdtorch_tokenizer", "expected an object"],
                 id="tokenizer-meta-list"),
    # a single file without its own tokenizer whose text encoder the bundled one does not fit
    pytest.param(["info", "small-vocab.safetensors"], ["small-vocab.safetensors", "49407", "600 token embeddings",
                                                       "folder"], id="bundled-tokenizer-overflows"),
    pytest.param(["generate", "--model", "small-vocab.safetensors", *GEN], ["600 token embeddings"],
                 id="bundled-tokenizer-overflows-generate"),
    pytest.param(["info", "short.safetensors"], ["77 tokens", "16 positions"], id="bundled-tokenizer-too-long"),
    # legacy pickles asking for callables: refused by name
    pytest.param(["info", "legacy-system.ckpt"], ["legacy-system.ckpt", "refused", "posix.system"],
                 id="legacy-os-system"),
    pytest.param(["info", "legacy-eval.ckpt"], ["refused", "builtins.eval"], id="legacy-eval"),
    pytest.param(["info", "legacy-nested.ckpt"], ["refused", "builtins.exec"], id="legacy-nested"),
    pytest.param(["info", "legacy-torch.ckpt"], ["refused", "builtins.eval"], id="legacy-torch-save"),
    # diffusers folders
    pytest.param(["info", "vae-list"], ["vae-list/vae/config.json", "JSON object", "list"], id="folder-vae-list"),
    pytest.param(["info", "unet-notjson"], ["unet/config.json", "not valid JSON"], id="folder-unet-not-json"),
    pytest.param(["info", "vae-latin1"], ["vae/config.json", "not UTF-8"], id="folder-not-utf8"),
    pytest.param(["info", "index-list"], ["model_index.json", "JSON object"], id="folder-index-list"),
    pytest.param(["info", "text-nohidden"], ["text_encoder/config.json", "hidden_size"], id="folder-missing-key"),
    pytest.param(["info", "text-act"], ["text_encoder/config.json", "hidden_act", "'relu'"], id="folder-activation"),
    pytest.param(["info", "text-heads"], ["text_encoder/config.json", "num_attention_heads", "5 heads"],
                 id="folder-text-heads"),
    pytest.param(["info", "unet-heads"], ["unet/config.json", "attention_head_dim", "do not split into 3 heads"],
                 id="folder-heads-info"),
    pytest.param(["generate", "--model", "unet-heads", *GEN], ["attention_head_dim", "3 heads"],
                 id="folder-heads-generate"),
    pytest.param(["info", "unet-heads-zero"], ["unet/config.json", "attention_head_dim"], id="folder-heads-zero"),
    pytest.param(["info", "unet-channels"], ["unet/config.json", "block_out_channels"], id="folder-channels-type"),
    pytest.param(["info", "unet-sample"], ["unet/config.json", "sample_size"], id="folder-sample-size-type"),
    pytest.param(["info", "unet-types"], ["unet/config.json", "down_block_types"], id="folder-block-types"),
    pytest.param(["info", "vae-groups"], ["vae/config.json", "norm_num_groups"], id="folder-norm-groups"),
    pytest.param(["info", "sched-pred"], ["scheduler_config.json", "prediction_type", "'sample'"],
                 id="folder-prediction-type"),
    pytest.param(["info", "sched-beta"], ["scheduler_config.json", "beta_end"], id="folder-beta-type"),
    # tokenizer folders
    pytest.param(["info", "tok-novocab"], ["tokenizer/vocab.json: tokenizer file not found"], id="tokenizer-no-vocab"),
    pytest.param(["info", "tok-vocab-notjson"], ["vocab.json", "not valid JSON"], id="tokenizer-vocab-not-json"),
    pytest.param(["info", "tok-vocab-list"], ["vocab.json", "JSON object"], id="tokenizer-vocab-list"),
    pytest.param(["info", "tok-vocab-id"], ["tok-vocab-id/tokenizer: the vocabulary", "'zq'",
                                            "not a non-negative integer"],
                 id="tokenizer-id-type"),
    pytest.param(["info", "tok-vocab-big"], ["tokenizer", "99999", "49408 token embeddings"],
                 id="tokenizer-id-out-of-range"),
    pytest.param(["generate", "--model", "tok-vocab-lacks", *GEN],
                 ["tok-vocab-lacks/tokenizer: the vocabulary lacks the token 'the</w>'"],
                 id="tokenizer-merge-result-missing-generate"),
    pytest.param(["info", "tok-merges-latin1"], ["merges.txt", "not UTF-8"], id="tokenizer-merges-not-utf8"),
    pytest.param(["info", "tok-merges-triple"], ["merges.txt", "merge 1", "not a pair"], id="tokenizer-merges-triple"),
    pytest.param(["info", "tok-length"], ["rows of 100 tokens", "77 positions"], id="tokenizer-longer-than-positions"),
    pytest.param(["info", "tok-length-type"], ["tokenizer_config.json: model_max_length = '77'"],
                 id="tokenizer-length-type"),
    pytest.param(["info", "tok-special-list"], ["special_tokens_map.json", "JSON object"], id="tokenizer-special-list"),
    # generation_defaults.json
    pytest.param(["info", "defaults-notjson"], ["generation_defaults.json", "JSON"], id="defaults-not-json"),
    pytest.param(["info", "defaults-list"], ["generation_defaults.json", "JSON object"], id="defaults-list"),
    pytest.param(["info", "defaults-steps-bool"], ["generation_defaults.json", "steps", "True"],
                 id="defaults-steps-bool"),
    pytest.param(["info", "defaults-steps-float"], ["steps", "2.5"], id="defaults-steps-float"),
    pytest.param(["info", "defaults-steps-zero"], ["steps", "0"], id="defaults-steps-zero"),
    pytest.param(["info", "defaults-guidance-nan"], ["guidance", "nan"], id="defaults-guidance-nan"),
    pytest.param(["info", "defaults-guidance-str"], ["guidance", "'7'"], id="defaults-guidance-str"),
    pytest.param(["info", "defaults-sampler-list"], ["sampler", "['euler']"], id="defaults-sampler-unhashable"),
    pytest.param(["info", "defaults-sampler-unknown"], ["sampler", "'magic'"], id="defaults-sampler-unknown"),
    pytest.param(["info", "defaults-unknown-key"], ["unknown generation defaults", "seed"], id="defaults-unknown-key"),
    pytest.param(["info", "defaults-latin1"], ["generation_defaults.json"], id="defaults-not-utf8"),
]


@pytest.mark.parametrize("args, fragments", BAD_INPUTS)
def test_bad_input_file(cli, bad, args, fragments):
    line = assert_clean_error(cli, [str(bad / a) if (bad / a).exists() else a for a in args], fragments,
                              watch=[bad])
    assert "\x1b" not in line and "weights_only" not in line, line


def test_refusal_text_holds_no_torch_advice(bad):
    """The legacy refusal names the callable only: no ANSI escapes, no `weights_only=False` advice."""
    for name in ("system", "eval", "nested", "torch"):
        with pytest.raises(sdtorch.CheckpointError) as e:
            read_state_dict(bad / f"legacy-{name}.ckpt")
        msg = str(e.value)
        assert "\x1b" not in msg and "weights_only" not in msg and "\n" not in msg, msg


def test_converted_shapes_file_keeps_its_tokenizer_and_generates_the_same_image(cli, tmp_path):
    """`convert shapes OUT.safetensors` stores the 596-token tokenizer and its 24-token rows in the file."""
    out = tmp_path / "shapes.safetensors"
    code, _, err = cli(["convert", "shapes", str(out)], tmp_path)
    assert code == 0, err
    folder, single = sdtorch.load("shapes"), sdtorch.load(out, dtype="fp32")
    assert (single.tokenizer.vocab, single.tokenizer.merges) == (folder.tokenizer.vocab, folder.tokenizer.merges)
    assert single.tokenizer.max_length == folder.tokenizer.max_length == single.config.text.max_positions
    kw = dict(steps=2, seed=7, guidance=1.5, output_type="tensor")
    a = folder.txt2img("a small red circle on a blue background", **kw)
    b = single.txt2img("a small red circle on a blue background", **kw)
    torch.testing.assert_close(b, a, rtol=0, atol=0)  # the same fp32 weights, tokens and computation


def test_the_bundled_tokenizer_is_not_stored(tmp_path):
    """Files of models with the bundled CLIP tokenizer stay as small as before (it is every reader's default)."""
    path = sdtorch.build("tiny").save_single_file(tmp_path / "t.safetensors")
    assert "sdtorch_tokenizer" not in read_state_dict(path).metadata
    assert sdtorch.load(path).tokenizer.vocab_size == 49408


def test_configs_refuse_impossible_architectures():
    """Every ModelConfig is checked when it is made, whichever path makes it."""
    with pytest.raises(SDTorchError, match=r"unet.head_dim = 48: 64 attention channels"):
        TINY.replace(unet={"num_heads": None, "head_dim": 48})
    with pytest.raises(ValueError, match="vae.block_channels"):  # ConfigError is also a ValueError
        TINY.replace(vae={"block_channels": (32, 60)})
    with pytest.raises(SDTorchError, match="text.layer_norm_eps"):
        TINY.replace(text={"layer_norm_eps": float("nan")})
    with pytest.raises(SDTorchError, match="beta_end"):
        TINY.replace(beta_end=1.5)
    for preset in sdtorch.config.PRESETS.values():
        preset.check_parts()


# --- training configs, checkpoints and datasets: their Python readers ---------------------------------------


def test_load_config_names_the_file(tmp_path):
    cases = {"notjson.json": "{", "list.json": "[]", "heads.json": json.dumps(
        {**dataclasses.asdict(TINY), "text": {**dataclasses.asdict(TINY.text), "heads": 3}}),
        "latin1.json": b"\xe9"}
    for name, text in cases.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(SDTorchError, match=name):
            common.load_config(str(path))
    with pytest.raises(SDTorchError, match="not a preset"):
        common.load_config(str(tmp_path / "missing.json"))
    assert common.load_config("tiny") == TINY


@pytest.fixture(scope="module")
def run_state():
    """A trainer checkpoint's structure, as `save_checkpoint` writes it."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return {"model": model.state_dict(), "ema": dict(model.state_dict()), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": common.rng_state(), "step": 3, "epoch": 0, "batch_pos": 3}


def _run_folder(tmp_path, state, latest=None):
    folder = tmp_path / "checkpoints"
    path = common.save_checkpoint(folder, 3, state, keep=2)
    if latest is not None:
        (folder / "latest").write_bytes(latest)
    return folder, path


def test_load_latest_reads_what_save_checkpoint_wrote(tmp_path, run_state):
    folder, _ = _run_folder(tmp_path, run_state)
    state = common.load_latest(folder)
    assert state["step"] == 3
    model = torch.nn.Linear(2, 2)
    state.restore(model, "model")
    torch.testing.assert_close(model.state_dict(), run_state["model"], rtol=0, atol=0)
    assert common.load_latest(tmp_path / "nothing") is None


@pytest.mark.parametrize("latest, fragment", [
    (b"\xff\xfe\x00garbage", "does not name a checkpoint"),
    (b"../../../etc/passwd", "does not name a checkpoint"),
    (b"ckpt-00000900.pt", "names ckpt-00000900.pt, which does not exist"),
    (b"", "does not name a checkpoint"),
], ids=["garbage", "path-escape", "points-past", "empty"])
def test_load_latest_bad_pointer(tmp_path, run_state, latest, fragment):
    folder, _ = _run_folder(tmp_path, run_state, latest)
    with pytest.raises(SDTorchError, match=fragment) as e:
        common.load_latest(folder)
    assert str(folder / "latest") in str(e.value)


@pytest.mark.parametrize("change, fragment", [
    (lambda s: {k: v for k, v in s.items() if k != "step"}, "'step' is None"),
    (lambda s: {**s, "epoch": "0"}, "'epoch' is '0'"),
    (lambda s: {**s, "batch_pos": -1}, "'batch_pos' is -1"),
    (lambda s: {**s, "step": True}, "'step' is True"),
    (lambda s: {**s, "rng": {}}, "'rng' lacks the torch generator state"),
    (lambda s: {**s, "model": [1, 2]}, "'model' is not a state dict"),
    (lambda s: [s], "not a training checkpoint"),
], ids=["no-step", "epoch-str", "negative", "bool", "no-rng", "model-list", "list"])
def test_load_latest_bad_structure(tmp_path, run_state, change, fragment):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save(change(run_state), folder / "ckpt-00000003.pt")
    (folder / "latest").write_text("ckpt-00000003.pt")
    with pytest.raises(SDTorchError, match=fragment) as e:
        common.load_latest(folder)
    assert "ckpt-00000003.pt" in str(e.value)


def test_load_latest_truncated_lacking_or_unfitting(tmp_path, run_state):
    folder, path = _run_folder(tmp_path, run_state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SDTorchError, match="corrupt or truncated") as e:
        common.load_latest(folder)
    assert str(path) in str(e.value)
    path.write_bytes(data)
    state = common.load_latest(folder)
    with pytest.raises(SDTorchError, match="lacks 'vae'"):  # a VAE run resuming from a diffusion checkpoint
        state["vae"]
    with pytest.raises(SDTorchError, match="'model' does not fit this run"):
        state.restore(torch.nn.Linear(3, 2), "model")
    torch.save({"x": Payload(os.system, "true")}, path)
    with pytest.raises(SDTorchError, match="refused.*posix.system"):
        common.load_latest(folder)


def _image(path: Path, colour=(200, 30, 30)):
    Image.new("RGB", (16, 16), colour).save(path)


def test_dataset_readers_name_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SDTorchError, match="no usable images"):
        ImageCaptionDataset(empty, 8)
    with pytest.raises(SDTorchError, match="no such dataset folder"):
        ImageCaptionDataset(tmp_path / "absent", 8)

    captions = tmp_path / "captions"
    captions.mkdir()
    _image(captions / "a.png")
    (captions / "a.txt").write_bytes(b"a red \xff square")
    with pytest.raises(SDTorchError, match=r"a\.txt: caption is not UTF-8"):
        ImageCaptionDataset(captions, 8)

    meta = tmp_path / "meta"
    meta.mkdir()
    _image(meta / "a.png")
    (meta / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "\xff"}\n')
    with pytest.raises(SDTorchError, match=r"metadata\.jsonl: not UTF-8"):
        ImageCaptionDataset(meta, 8)
    (meta / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"\n')
    with pytest.raises(SDTorchError, match=r"metadata\.jsonl:1: not valid JSON"):
        ImageCaptionDataset(meta, 8)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with warnings.catch_warnings(record=True), pytest.raises(SDTorchError, match="1 unreadable"):
        warnings.simplefilter("always")
        ImageCaptionDataset(broken, 8)


def test_latent_cache_re_encodes_shards_that_are_cut_foreign_or_incomplete(tmp_path):
    """A shard cut short, written for other data (fingerprint), or lacking a tensor is encoded again."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        _image(data / f"{i}.png", (60 * i, 0, 0))
    dataset = ImageCaptionDataset(data, 8)
    calls = []

    def encode(pixels):
        calls.append(len(pixels))
        return pixels[:, :1] * 1.0, torch.ones_like(pixels[:, :1])

    cache = tmp_path / "cache"
    want = LatentCache(cache, dataset, encode, progress=False, shard_size=2)
    ref = [want[i]["mean"] for i in range(3)]
    shard = cache / "latents-00000.safetensors"
    original = shard.read_bytes()
    fingerprint = read_state_dict(shard).metadata["fingerprint"]
    damaged = {
        "truncated": lambda: shard.write_bytes(original[: len(original) - 10]),
        "fingerprint": lambda: save_file({"mean": torch.zeros(2, 1, 8, 8), "std": torch.ones(2, 1, 8, 8),
                                          "index": torch.arange(2)}, shard, metadata={"fingerprint": "other"}),
        "no-std": lambda: save_file({"mean": torch.zeros(2, 1, 8, 8), "index": torch.arange(2)}, shard,
                                    metadata={"fingerprint": fingerprint}),
        "short": lambda: save_file({"mean": torch.zeros(1, 1, 8, 8), "std": torch.ones(1, 1, 8, 8),
                                    "index": torch.arange(1)}, shard, metadata={"fingerprint": fingerprint}),
    }
    for name, damage in damaged.items():
        damage()
        calls.clear()
        again = LatentCache(cache, dataset, encode, progress=False, shard_size=2)
        assert calls == [2], name  # only the damaged shard, its two images
        for i in range(3):
            torch.testing.assert_close(again[i]["mean"], ref[i], rtol=0, atol=0)

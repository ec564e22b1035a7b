"""LoRA, LoCon, LoHa and LoKr adapters: the maths against direct formulas, hooks, stacking, merge/unmerge, bad input,
and files from diffusers/PEFT (and kohya names) giving diffusers' own outputs (fp32, 1e-5)."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import sdtorch
from sdtorch.errors import SDTorchError
from sdtorch.lora import adapters

# fp32 with unit-scale values: a dot product of n terms is off by about sqrt(n) * 6e-8 * |terms|, so the few
# hundred terms of these tiny layers stay below 1e-5 (and a wrong formula is off by O(0.1)).
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def weights(kind, alpha=None, **tensors):
    return SimpleNamespace(kind=kind, tensors=tensors, alpha=alpha, file_keys=())


def r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return sdtorch.build("tiny")


def snapshot(model):
    """Every UNet/text-encoder tensor (cloned) and the number of forward hooks: what "unchanged" means."""
    sd = {f"{p}.{k}": v.clone() for p in ("unet", "text_encoder") for k, v in getattr(model, p).state_dict().items()}
    hooks = sum(len(m._forward_hooks) for p in ("unet", "text_encoder") for m in getattr(model, p).modules())
    return sd, hooks, list(model.loras)


def assert_unchanged(model, snap):
    sd, hooks, names = snapshot(model)
    assert sd.keys() == snap[0].keys() and hooks == snap[1] and names == snap[2]
    for k in sd:
        assert torch.equal(sd[k], snap[0][k]), k


def unet_out(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([10.0, 700.0]), ctx)


def random_network(model, name, seed, ids=None, rank=2, alpha=3.0):
    """A LoRA with non-zero up weights (a trained-looking one) on attention and convs."""
    ids = ids or adapters.targets(model, conv=True, text_encoder=True)
    net = adapters.create_network(model, ids, rank, alpha, name=name, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in net.adapters.values():
            m.up.weight.copy_(torch.randn(m.up.weight.shape, generator=g) * 0.3)
    return net


# ---- the maths ----

def test_lora_linear_and_locon_deltas_match_formula():
    lin = nn.Linear(6, 5)
    w = weights("lora", alpha=4.0, down=r(2, 6), up=r(5, 2))
    m = adapters.adapter_module(w, lin)
    torch.testing.assert_close(m.delta_weight(), 2.0 * w.tensors["up"] @ w.tensors["down"], rtol=0, atol=TOL)
    x = r(3, 6, seed=1)
    torch.testing.assert_close(m(x), x @ m.delta_weight().T, rtol=0, atol=TOL)

    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    w = weights("lora", alpha=None, down=r(3, 4, 3, 3), up=r(6, 3, 1, 1))
    m = adapters.adapter_module(w, conv)
    expect = (w.tensors["up"].flatten(1) @ w.tensors["down"].flatten(1)).reshape(6, 4, 3, 3)  # alpha None: scale 1
    torch.testing.assert_close(m.delta_weight(), expect, rtol=0, atol=TOL)
    x = r(2, 4, 9, 9, seed=2)
    torch.testing.assert_close(m(x), F.conv2d(x, expect, stride=2, padding=1), rtol=0, atol=TOL)

    w = weights("lora", alpha=1.5, down=r(3, 4, 1, 1), mid=r(3, 3, 3, 3), up=r(6, 3, 1, 1))  # Tucker LoCon
    m = adapters.adapter_module(w, conv)
    expect = torch.einsum("oa,abkl,bi->oikl", w.tensors["up"][:, :, 0, 0], w.tensors["mid"],
                          w.tensors["down"][:, :, 0, 0]) * 0.5
    torch.testing.assert_close(m.delta_weight(), expect, rtol=0, atol=TOL)
    torch.testing.assert_close(m(x), F.conv2d(x, expect, stride=2, padding=1), rtol=0, atol=TOL)


def test_loha_delta_matches_formula():
    lin = nn.Linear(6, 8)
    t = dict(w1_a=r(8, 2), w1_b=r(2, 6, seed=1), w2_a=r(8, 2, seed=2), w2_b=r(2, 6, seed=3))
    m = adapters.adapter_module(weights("loha", alpha=1.0, **t), lin)
    expect = (t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"]) * 0.5  # FedPara eq. 2, alpha/rank = 1/2
    torch.testing.assert_close(m.delta_weight(), expect, rtol=0, atol=TOL)
    x = r(3, 6, seed=4)
    torch.testing.assert_close(m(x), x @ expect.T, rtol=0, atol=TOL)

    conv = nn.Conv2d(4, 6, 3, padding=1)
    t = dict(w1_a=r(2, 6), w1_b=r(2, 4, seed=1), w2_a=r(2, 6, seed=2), w2_b=r(2, 4, seed=3),
             t1=r(2, 2, 3, 3, seed=4), t2=r(2, 2, 3, 3, seed=5))
    m = adapters.adapter_module(weights("loha", alpha=2.0, **t), conv)
    f1 = torch.einsum("ijkl,ip,jq->pqkl", t["t1"], t["w1_a"], t["w1_b"])
    f2 = torch.einsum("ijkl,ip,jq->pqkl", t["t2"], t["w2_a"], t["w2_b"])
    torch.testing.assert_close(m.delta_weight(), f1 * f2, rtol=0, atol=TOL)


def test_lokr_delta_matches_formula_and_lycoris_scale():
    lin = nn.Linear(6, 8)
    w1, w2a, w2b = r(2, 3), r(4, 2, seed=1), r(2, 2, seed=2)
    m = adapters.adapter_module(weights("lokr", alpha=1.0, w1=w1, w2_a=w2a, w2_b=w2b), lin)
    expect = torch.kron(w1, w2a @ w2b) * 0.5  # rank 2 from w2_b
    torch.testing.assert_close(m.delta_weight(), expect, rtol=0, atol=TOL)
    x = r(3, 6, seed=3)
    torch.testing.assert_close(m(x), x @ expect.T, rtol=0, atol=TOL)
    # neither factor factorised: no rank, scale 1 whatever alpha says (LyCORIS / A1111)
    full = adapters.adapter_module(weights("lokr", alpha=7.0, w1=w1, w2=r(4, 2, seed=4)), lin)
    torch.testing.assert_close(full.delta_weight(), torch.kron(w1, r(4, 2, seed=4)), rtol=0, atol=TOL)

    conv = nn.Conv2d(4, 6, 3, padding=1)
    w1, w2 = r(2, 2), r(3, 2, 3, 3, seed=5)
    m = adapters.adapter_module(weights("lokr", alpha=3.0, w1_a=r(2, 1), w1_b=r(1, 2, seed=6), w2=w2), conv)
    kron4 = torch.kron((r(2, 1) @ r(1, 2, seed=6))[:, :, None, None], w2) * 3.0  # 4-d Kronecker, rank 1
    torch.testing.assert_close(m.delta_weight(), kron4, rtol=0, atol=TOL)
    x = r(1, 4, 5, 5, seed=7)
    torch.testing.assert_close(m(x), F.conv2d(x, kron4, padding=1), rtol=0, atol=TOL)


def test_bad_adapter_shapes_are_one_line_errors():
    lin = nn.Linear(6, 5)
    with pytest.raises(SDTorchError, match="rank mismatch"):
        adapters.adapter_module(weights("lora", down=r(2, 6), up=r(5, 3)), lin)
    with pytest.raises(SDTorchError, match=r"shape \[2, 7\]"):
        adapters.adapter_module(weights("lora", down=r(2, 7), up=r(5, 2)), lin)
    with pytest.raises(SDTorchError, match="do not fit"):
        adapters.adapter_module(weights("lokr", w1=r(2, 3), w2=r(3, 3)), lin)
    with pytest.raises(SDTorchError, match="LayerNorm"):
        adapters.adapter_module(weights("lora", down=r(2, 6), up=r(6, 2)), nn.LayerNorm(6))


# ---- hooks, stacking, merging ----

def test_targets_cover_the_documented_modules(model):
    ids = adapters.targets(model)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0" in ids
    assert all(i.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for i in ids) and len(ids) % 8 == 0
    more = adapters.targets(model, feed_forward=True, conv=True, text_encoder=True)
    for want in ("unet.down_blocks.0.resnets.0.conv1", "unet.down_blocks.0.downsamplers.0.conv",
                 "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2", "unet.mid_block.attentions.0.proj_in",
                 "text_encoder.encoder.layers.0.self_attn.out_proj"):
        assert want in more
    assert "unet.conv_in" not in more and set(ids) < set(more)


def test_hooks_add_the_scaled_adapter_and_stack(model):
    ids = adapters.targets(model, conv=True)
    a, b = random_network(model, "a", 1, ids), random_network(model, "b", 2, ids)
    keys = set(model.unet.state_dict())
    base = unet_out(model)
    adapters.attach(model, a)
    adapters.attach(model, b)
    a.scale, b.scale = 0.7, 0.3
    assert set(model.unet.state_dict()) == keys  # adapters live outside the model's state dict

    t = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    lin = adapters.base_module(model, t)
    x = r(2, 5, lin.in_features, seed=3)
    with torch.no_grad():
        plain = F.linear(x, lin.weight, lin.bias)
        expect = plain + 0.7 * x @ a.adapter(t).delta_weight().T + 0.3 * x @ b.adapter(t).delta_weight().T
        torch.testing.assert_close(lin(x), expect, rtol=0, atol=TOL)
    stacked = unet_out(model)
    assert (stacked - base).abs().max() > 1e-2  # the LoRAs change the output

    # Same as the base with W + 0.7 dA + 0.3 dB in the weights: merged and unmerged agree. The two paths round
    # differently in fp32 (sum of products vs product of sums) by ~1e-7 relative per layer, over ~20 layers.
    model.merge_lora()
    for t in ids:
        w = adapters.base_module(model, t).weight
        dw = 0.7 * a.adapter(t).delta_weight() + 0.3 * b.adapter(t).delta_weight()
        torch.testing.assert_close(w - model._lora_state.originals[t], dw, rtol=0, atol=TOL)
    torch.testing.assert_close(unet_out(model), stacked, rtol=0, atol=TOL)
    model.unmerge_lora()
    torch.testing.assert_close(unet_out(model), stacked, rtol=0, atol=0)  # hooks back on: the same computation

    model.unload_lora("a")
    model.unload_lora("b")
    assert torch.equal(unet_out(model), base) and model.loras == {}
    assert sum(len(m._forward_hooks) for m in model.unet.modules()) == 0


def test_merge_unmerge_and_unload_restore_weights_bit_for_bit(model):
    before = snapshot(model)
    adapters.attach(model, random_network(model, "a", 1))
    model.merge_lora()
    merged = unet_out(model)
    adapters.attach(model, random_network(model, "b", 2))  # loaded while merged: folded in too
    model.set_lora_scale("b", 0.0)
    torch.testing.assert_close(unet_out(model), merged, rtol=0, atol=TOL)  # re-merged from the originals
    model.set_lora_scale("b", 0.5)
    model.unload_lora("b")
    torch.testing.assert_close(unet_out(model), merged, rtol=0, atol=TOL)
    model.unmerge_lora()
    model.unload_lora("a")
    assert_unchanged(model, before)


def test_trainable_network_starts_at_zero_and_trains_through_hooks(model):
    for p in model.unet.parameters():
        p.requires_grad_(False)
    base = unet_out(model)
    net = adapters.create_network(model, adapters.targets(model), rank=4, alpha=4.0, dropout=0.1, seed=3)
    again = adapters.create_network(model, adapters.targets(model), rank=4, alpha=4.0, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), again.parameters()))  # seeded
    adapters.attach(model, net)
    assert torch.equal(unet_out(model), base)  # up = 0: delta 0 at step 0
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    model.unet(x, torch.tensor([5.0]), ctx).square().mean().backward()
    assert all(p.grad is None for p in model.unet.parameters())
    ups = [m.up.weight.grad for m in net.adapters.values()]
    assert all(g is not None for g in ups) and sum(g.abs().sum() for g in ups) > 0
    first, t = adapters.network_weights(net)[net.target_ids[0]], net.target_ids[0]
    assert first.kind == "lora" and first.alpha == 4.0
    assert first.tensors["down"].shape == (4, adapters.base_module(model, t).in_features)
    assert torch.equal(first.tensors["down"], net.adapter(t).down.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hooks_in_half_precision(model, dtype):
    ids = adapters.targets(model, conv=True)
    net = random_network(model, "a", 1, ids)  # fp32 adapters on a half-precision model: computed in fp32
    adapters.attach(model, net)
    ref = unet_out(model)
    model.to(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        out = model.unet(x.to(dtype), torch.tensor([10.0, 700.0]), ctx.to(dtype))
    assert out.dtype == dtype
    # bf16 keeps 8 bits of mantissa: ~0.4% relative per rounding, accumulated over the ~20 layers of the tiny UNet
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
    model.merge_lora()  # merged in the weights' dtype, originals kept exactly
    model.unmerge_lora()


# ---- loading: names, scales, hashes, the model unchanged on error ----

def test_bad_scale_and_unknown_name_leave_the_model_unchanged(model, tmp_path, monkeypatch):
    monkeypatch.setenv("SDTORCH_LORAS", str(tmp_path))
    adapters.attach(model, random_network(model, "a", 1))
    before = snapshot(model)
    for bad in (float("nan"), float("inf"), "0.5", True, None):
        with pytest.raises(SDTorchError, match="finite number"):
            model.load_lora("anything", scale=bad)
        with pytest.raises(SDTorchError, match="finite number"):
            model.set_lora_scale("a", bad)
    with pytest.raises(SDTorchError) as e:
        model.load_lora("nosuch")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "nosuch.safetensors") in msg and "loras" in msg
    with pytest.raises(SDTorchError, match="no LoRA named 'zzz'"):
        model.unload_lora("zzz")
    with pytest.raises(SDTorchError, match="already loaded"):
        adapters.attach(model, random_network(model, "a", 2))
    assert_unchanged(model, before)


def test_lora_folder_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTORCH_LORAS", str(tmp_path))
    safetensors.torch.save_file({"x": torch.zeros(1)}, tmp_path / "mine.safetensors")
    assert adapters.find_lora("mine") == tmp_path / "mine.safetensors"
    assert adapters.find_lora(tmp_path / "mine.safetensors") == tmp_path / "mine.safetensors"
    assert adapters.find_lora("mine", folder=tmp_path) == tmp_path / "mine.safetensors"
    with pytest.raises(SDTorchError, match="not found"):
        adapters.find_lora("mine", folder=tmp_path / "elsewhere")


def test_hash_is_a1111_addnet_hash(tmp_path):
    t = {"a.lora_down.weight": r(2, 3), "a.lora_up.weight": r(3, 2)}
    p1, p2 = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    safetensors.torch.save_file(t, p1)
    safetensors.torch.save_file(t, p2, metadata={"ss_output_name": "other"})
    data = p1.read_bytes()
    body = data[8 + int.from_bytes(data[:8], "little"):]  # after the 8-byte length and the JSON header
    assert adapters.lora_hash(p1) == hashlib.sha256(body).hexdigest()[:12]
    assert adapters.lora_hash(p2) == adapters.lora_hash(p1)  # metadata does not change it
    assert adapters.lora_hash(p1) != hashlib.sha256(data).hexdigest()[:12]


def test_a_loaded_lora_teaches_the_vocabulary_check_its_words(tmp_path):
    """A model that warns about prompt words it was not trained on also knows the caption words of a loaded LoRA
    (its sdtorch_vocabulary metadata, which train-lora writes), and forgets them when it is unloaded."""
    import json
    import warnings

    from sdtorch.lora import formats

    m = sdtorch.build(sdtorch.TINY)
    m.vocabulary = ["a", "red", "disc"]
    net = adapters.create_network(m, adapters.targets(m)[:1], rank=2, alpha=2.0)
    path = formats.write_lora(tmp_path / "teal.safetensors", adapters.network_weights(net),
                              metadata={"sdtorch_vocabulary": json.dumps(["a", "teal", "disc"])})

    def warned(prompt):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m.txt2img(prompt, steps=1, seed=0, width=32, height=32)
        return [str(w.message) for w in caught if "does not know" in str(w.message)]

    assert warned("a teal disc") and "'teal'" in warned("a teal disc")[0]
    m.load_lora(path)
    assert warned("a teal disc") == [] and m.known_words() == ["a", "red", "disc", "teal"]
    m.unload_lora("teal")
    assert warned("a teal disc")


# ---- proven against diffusers (needs formats.read_lora/resolve) ----

def _has_formats() -> bool:
    try:
        from sdtorch.lora import formats  # noqa: F401
    except ImportError:
        return False
    return True


needs_formats = pytest.mark.skipif(not _has_formats(), reason="sdtorch.lora.formats is not written yet")


@pytest.fixture(scope="module")
def peft_lora(tmp_path_factory):
    """A tiny diffusers SD1 folder and a LoRA made by peft on its UNet (attention and resnet conv1, LoCon) and text
    encoder, saved by diffusers' own save_lora_weights; the same tensors under kohya names; and diffusers' outputs
    with no LoRA and with each file loaded by its own load_lora_weights (one pipeline, loaded and unloaded in turn).
    The PEFT file has alpha = rank (writing alphas into its metadata needs peft >= 0.22 with this diffusers); the
    kohya file has alpha = rank / 2, which diffusers and sdtorch must both read from its .alpha tensors."""
    from conftest import save_reference_folder
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("ref") / "model"
    unet, _, text = save_reference_folder(folder, "sd1")  # the modules that wrote the folder: peft adapts them
    torch.manual_seed(5)  # init_lora_weights=False: random up (B) weights, so the LoRA changes the outputs
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"]))
    # peft's own injection for the text encoder: transformers' add_adapter wants peft >= 0.22
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), text)
    out = folder.parent / "lora"
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(text))
    files = dict(peft=out / "pytorch_lora_weights.safetensors", kohya=folder.parent / "kohya_style.safetensors")

    kohya = {}  # the same tensors under kohya names, with alpha tensors of half the rank
    for k, v in safetensors.torch.load_file(files["peft"]).items():
        part, _, rest = k.partition(".")
        module, _, role = rest.rpartition(".lora_")
        prefix = "lora_unet_" if part == "unet" else "lora_te_"
        name = prefix + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if role.startswith('A') else 'lora_up'}.weight"] = v
        kohya[f"{name}.alpha"] = torch.tensor(2.0 if part == "unet" else 1.0)  # alpha/rank 0.5: both must scale
    safetensors.torch.save_file(kohya, files["kohya"])

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    outputs = {"base": _outputs(pipe.unet, pipe.text_encoder, True)}
    for fmt, path in files.items():
        pipe.load_lora_weights(str(path))
        outputs[fmt] = _outputs(pipe.unet, pipe.text_encoder, True)
        pipe.unload_lora_weights()
    for b, again in zip(outputs["base"], _outputs(pipe.unet, pipe.text_encoder, True)):
        assert torch.equal(b, again), "unloaded: the reference is its base again"
    return dict(folder=folder, outputs=outputs, **files)


def _outputs(unet, text, diffusers: bool):
    from conftest import seeded_inputs

    i = seeded_inputs(4)
    with torch.no_grad():
        u, t = unet(i["x"], i["t"], i["ctx"]), text(i["ids"])
    return (u.sample, t.last_hidden_state) if diffusers else (u, t)


@needs_formats
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_lora_file_gives_diffusers_outputs(peft_lora, fmt):
    # Tolerance: the same fp32 weights in both; the only differences are summation order in attention and in
    # the separately computed adapter branch (~1e-7 relative per op over a few dozen ops), well under 1e-5.
    base, expect = peft_lora["outputs"]["base"], peft_lora["outputs"][fmt]
    model = sdtorch.load(peft_lora["folder"])
    report = model.load_lora(peft_lora[fmt], name="mine")
    assert report.matched["unet"] > 0 and report.matched["text_encoder"] > 0 and not report.unmatched
    got = _outputs(model.unet, model.text_encoder, False)
    for b, e, g in zip(base, expect, got):
        assert (e - b).abs().max() > 1e-2  # the LoRA matters
        torch.testing.assert_close(g, e, rtol=0, atol=TOL)
    net = model.loras["mine"]
    assert net.hash == adapters.lora_hash(peft_lora[fmt]) and len(net.hash) == 12
    model.merge_lora()  # merged: same outputs within the fp32 rounding of W + dW vs W x + dW x
    for g, e in zip(_outputs(model.unet, model.text_encoder, False), expect):
        torch.testing.assert_close(g, e, rtol=0, atol=TOL)


@needs_formats
def test_failed_load_leaves_model_unchanged(peft_lora, tmp_path):
    model = sdtorch.load(peft_lora["folder"])
    model.load_lora(peft_lora["peft"], name="kept", scale=0.5)
    before = snapshot(model)
    sd = safetensors.torch.load_file(peft_lora["kohya"])
    bad = dict(sd)
    k = next(k for k in bad if k.endswith("lora_up.weight") and "lora_unet_" in k)
    bad[k] = bad[k][:, :-1].contiguous()  # rank mismatch between down and up
    safetensors.torch.save_file(bad, tmp_path / "bad.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes(peft_lora["kohya"].read_bytes()[:200])
    for path in (tmp_path / "bad.safetensors", tmp_path / "truncated.safetensors"):
        with pytest.raises(SDTorchError):
            model.load_lora(path, name="kept")
        assert_unchanged(model, before)
    model.load_lora(peft_lora["kohya"], name="kept")  # a good file replaces the network of that name
    assert list(model.loras) == ["kept"] and model.loras["kept"].scale == 1.0

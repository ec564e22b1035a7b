"""LoRA file formats: every layout people share resolves to the same modules, every bad file is one clear error,
conversions are lossless, and diffusers reads what we write (and we read what diffusers writes)."""

from __future__ import annotations

import json
import math
import warnings
from fractions import Fraction

import pytest
import torch
from safetensors.torch import save_file

import sdtorch
from sdtorch.errors import SDTorchError
from sdtorch.lora import formats

R = 2  # adapter rank in these tests
# sdtorch module path -> (weight shape in TINY, the original LDM-layout name, written out by hand from the layout:
# TINY has one ResBlock per level, so level 1 starts at input_blocks.3 and the up path's second slot is output_blocks.1)
TARGETS = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (
        (64, 64), "input_blocks.3.1.transformer_blocks.0.attn1.to_q"),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": (
        (64, 32), "middle_block.1.transformer_blocks.0.attn2.to_k"),
    "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0": (
        (64, 64), "output_blocks.1.1.transformer_blocks.0.attn1.to_out.0"),
    "down_blocks.1.attentions.0.proj_in": ((64, 64, 1, 1), "input_blocks.3.1.proj_in"),
    "down_blocks.1.resnets.0.conv1": ((64, 32, 3, 3), "input_blocks.3.0.in_layers.2"),
}
TEXT = {"encoder.layers.0.self_attn.q_proj": (32, 32), "encoder.layers.1.self_attn.out_proj": (32, 32)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return sdtorch.build(sdtorch.TINY)


def lora_pair(shape, seed, dtype=torch.float32):
    """(down, up) for a Linear [out, in] or a LoCon Conv2d [out, in, kh, kw] (up is a 1x1 conv)."""
    g = torch.Generator().manual_seed(seed)
    out, inp, *kernel = shape
    down = torch.randn(R, inp, *kernel, generator=g)
    up = torch.randn(out, R, *([1, 1] if kernel else []), generator=g)
    return down.to(dtype), up.to(dtype)


def expected_weights(dtype=torch.float32):
    """{target id: (down, up, alpha)} for every module above."""
    out = {}
    for i, (path, (shape, _)) in enumerate(TARGETS.items()):
        out[f"unet.{path}"] = (*lora_pair(shape, i, dtype), float(i + 1))
    for i, (path, shape) in enumerate(TEXT.items()):
        out[f"text_encoder.{path}"] = (*lora_pair(shape, 10 + i, dtype), 0.5 * (i + 1))
    return out


def kohya_file(ldm: bool, dtype=torch.float32):
    sd = {}
    for target, (down, up, alpha) in expected_weights(dtype).items():
        part, _, path = target.partition(".")
        if part == "unet":
            name = "lora_unet_" + (TARGETS[path][1] if ldm else path).replace(".", "_")
        else:
            name = "lora_te_text_model_" + path.replace(".", "_")
        sd |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
               f"{name}.alpha": torch.tensor(alpha, dtype=dtype)}
    return sd, {}


def peft_file(prefixed: bool):
    sd, meta = {}, {}
    for target, (down, up, alpha) in expected_weights().items():
        part, _, path = target.partition(".")
        name = (f"{part}." if prefixed else "") + ("text_model." if part == "text_encoder" else "") + path
        sd |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
    return sd, meta


def processor_file():
    """Old diffusers attention-processor names; they cover attention projections only."""
    sd = {}
    for target, (down, up, _) in expected_weights().items():
        part, _, path = target.partition(".")
        if ".attn" not in path:
            continue
        attn, _, proj = path.replace(".to_out.0", ".to_out").rpartition(".")
        sd |= {f"{attn}.processor.{proj}_lora.down.weight": down, f"{attn}.processor.{proj}_lora.up.weight": up}
    return sd, {}


@pytest.mark.parametrize("layout", ["kohya", "kohya_ldm", "peft_prefixed", "peft_unprefixed", "processor"])
def test_every_layout_resolves_to_the_same_modules(model, tmp_path, layout):
    sd, meta = {"kohya": lambda: kohya_file(False), "kohya_ldm": lambda: kohya_file(True),
                "peft_prefixed": lambda: peft_file(True), "peft_unprefixed": lambda: peft_file(False),
                "processor": processor_file}[layout]()
    path = tmp_path / "l.safetensors"
    save_file(sd, str(path), metadata=meta)
    lora = formats.read_lora(path)
    assert lora.format == ("kohya" if layout.startswith("kohya") else "peft")
    adapters, report = formats.resolve(lora, model)
    want = {t: w for t, w in expected_weights().items() if layout != "processor" or ".attn" in t}
    assert set(adapters) == set(want)
    for target, (down, up, alpha) in want.items():
        aw = adapters[target]
        assert aw.kind == "lora" and torch.equal(aw.tensors["down"], down) and torch.equal(aw.tensors["up"], up)
        assert aw.alpha == (alpha if layout.startswith("kohya") else None)  # PEFT files without metadata: alpha = rank
    assert report.total == len(sd) and not report.unmatched
    n_text = sum(len(aw.file_keys) for t, aw in adapters.items() if t.startswith("text_encoder."))
    assert report.matched == {"unet": len(sd) - n_text, "text_encoder": n_text}
    assert report.summary() == f"matched {len(sd)} of {len(sd)} adapter tensors (unet {len(sd) - n_text}, " \
                               f"text encoder {n_text})"


def reference_delta(kind, t, shape):
    """The weight update as LyCORIS defines it (LoHa: FedPara eq. 2, (w1_a w1_b) * (w2_a w2_b); LoKr: w1 (x) w2; CP
    cores rebuilt as einsum('i j k l, i p, j r -> p r k l', t, a, b)), reshaped to the module's weight: the shapes
    a file passes with are shapes the reference can compute."""
    def cp(core, a, b):
        return torch.einsum("ijkl,ip,jr->prkl", core, a, b)

    def mat(a, b, core=None):
        return cp(core, a, b) if core is not None else a @ b.flatten(1)

    if kind == "loha":
        w1, w2 = mat(t["w1_a"], t["w1_b"], t.get("t1")), mat(t["w2_a"], t["w2_b"], t.get("t2"))
        return (w1.reshape(shape) * w2.reshape(shape))
    w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
    w2 = t["w2"] if "w2" in t else mat(t["w2_a"], t["w2_b"], t.get("t2"))
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape)


Q, CONV = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.1.resnets.0.conv1"
LYCORIS = {  # (kind, target, tensors): Q is a Linear [64, 64], CONV a Conv2d [64, 32, 3, 3]
    "locon": ("lora", CONV, {"down": (R, 32, 3, 3), "up": (64, R, 1, 1)}),
    "locon_tucker": ("lora", CONV, {"down": (R, 32, 1, 1), "mid": (R, R, 3, 3), "up": (64, R, 1, 1)}),
    "loha": ("loha", Q, {"w1_a": (64, R), "w1_b": (R, 64), "w2_a": (64, 3), "w2_b": (3, 64)}),
    "loha_conv": ("loha", CONV, {"w1_a": (64, R), "w1_b": (R, 288), "w2_a": (64, R), "w2_b": (R, 288)}),
    "loha_tucker": ("loha", CONV, {"t1": (R, R, 3, 3), "w1_a": (R, 64), "w1_b": (R, 32),
                                   "t2": (R, R, 3, 3), "w2_a": (R, 64), "w2_b": (R, 32)}),
    "lokr": ("lokr", Q, {"w1": (8, 8), "w2_a": (8, R), "w2_b": (R, 8)}),
    "lokr_conv": ("lokr", CONV, {"w1_a": (4, R), "w1_b": (R, 4), "w2": (16, 8, 3, 3)}),
    "lokr_conv_flat": ("lokr", CONV, {"w1": (4, 4), "w2_a": (16, R), "w2_b": (R, 72)}),
    "lokr_tucker": ("lokr", CONV, {"w1": (4, 4), "t2": (R, R, 3, 3), "w2_a": (R, 16), "w2_b": (R, 8)}),
}


@pytest.mark.parametrize("name", list(LYCORIS))
def test_lycoris_adapters_resolve_and_fit(model, tmp_path, name):
    kind, path, shapes = LYCORIS[name]
    g = torch.Generator().manual_seed(0)
    tensors = {role: torch.randn(s, generator=g) for role, s in shapes.items()}
    prefix = "lora_unet_" + path.replace(".", "_")
    names = {"lora": {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight"}}
    sd = {f"{prefix}.{names[kind][r] if kind == 'lora' else ('hada_' if kind == 'loha' else 'lokr_') + r}": t
          for r, t in tensors.items()} | {f"{prefix}.alpha": torch.tensor(1.0)}
    save_file(sd, str(tmp_path / "l.safetensors"))
    lora = formats.read_lora(tmp_path / "l.safetensors")
    assert lora.format == ("kohya" if kind == "lora" else "lycoris")
    adapters, report = formats.resolve(lora, model)
    aw = adapters[f"unet.{path}"]
    assert aw.kind == kind and aw.alpha == 1.0 and report.total == len(sd)
    assert all(torch.equal(aw.tensors[r], t) for r, t in tensors.items())
    weight = model.unet.get_submodule(path).weight
    if kind != "lora":
        assert reference_delta(kind, tensors, weight.shape).shape == weight.shape
    # the same adapter on a module of another shape is refused by name
    other = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" if path == Q else "conv_in"
    moved = {k.replace(prefix, "lora_unet_" + other.replace(".", "_")): v for k, v in sd.items()}
    with pytest.raises(SDTorchError, match=rf"lora_unet_{other.replace('.', '_')}: .*update for a") as e:
        formats.resolve(formats.parse_lora(moved), model)
    assert "\n" not in str(e.value)


def test_diffusers_writes_and_reads_our_files(tmp_path):
    """A LoRA made by peft on a tiny diffusers UNet and text encoder and saved by diffusers' save_lora_weights
    resolves to the modules peft wrapped, with peft's alphas; our PEFT file loads into diffusers (UNet) and peft
    (text encoder, from our metadata) with our alphas."""
    from conftest import save_reference_folder
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    folder = tmp_path / "model"
    unet, _, text = save_reference_folder(folder, "sd1")
    model = sdtorch.load(folder)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, rank_pattern={"attn2.to_k": 1},
                                alpha_pattern={"attn1.to_q": 5}, target_modules=["to_q", "to_k", "to_out.0", "conv1"]))
    # transformers' own add_adapter wants a newer peft than PyPI has; peft's injection is what it calls
    text_config = LoraConfig(r=2, lora_alpha=1, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    inject_adapter_in_model(text_config, text)

    def wrapped(**parts):
        return {f"{part}.{n.removeprefix('text_model.')}": m for part, mod in parts.items()
                for n, m in mod.named_modules() if isinstance(m, BaseTunerLayer)}

    text_layers = {f"{t.partition('.')[2]}.lora_{ab}.weight": getattr(m, f"lora_{ab}")["default"].weight
                   for t, m in wrapped(text_encoder=text).items() for ab in "AB"}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "theirs", unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict())
    lora = formats.read_lora(tmp_path / "theirs" / "pytorch_lora_weights.safetensors")
    adapters, report = formats.resolve(lora, model)
    theirs = wrapped(unet=unet, text_encoder=text)
    assert set(adapters) == set(theirs) and not report.unmatched
    assert {formats.rank(aw) for aw in adapters.values()} == {1, 2}
    for target, m in theirs.items():
        aw = adapters[target]
        assert torch.equal(aw.tensors["down"], m.lora_A["default"].weight.detach())
        assert aw.alpha / formats.rank(aw) == m.scaling["default"], target  # both are alpha / r, computed alike

    # ours -> diffusers / peft: give each adapter its own alpha, write PEFT, load with the reference loaders
    for i, aw in enumerate(adapters.values()):
        aw.alpha = 0.25 * (i + 1)
    ours = formats.write_lora(tmp_path / "ours.safetensors", adapters, to="peft")
    fresh_unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    fresh_unet.load_lora_adapter(str(tmp_path), weight_name=ours.name, prefix="unet", adapter_name="x")
    fields = {k.removeprefix("text_encoder."): v for k, v in
              json.loads(formats.read_lora(ours).metadata[formats.PEFT_METADATA_KEY]).items()
              if k.startswith("text_encoder.")}
    fresh_text = inject_adapter_in_model(LoraConfig(**fields), CLIPTextModel.from_pretrained(folder / "text_encoder"),
                                         adapter_name="x")
    loaded = wrapped(unet=fresh_unet, text_encoder=fresh_text)
    assert set(loaded) == set(adapters)
    for target, aw in adapters.items():
        if target.startswith("unet."):
            assert torch.equal(loaded[target].lora_B["x"].weight.detach(), aw.tensors["up"])
        assert math.isclose(loaded[target].scaling["x"], aw.alpha / formats.rank(aw), rel_tol=1e-12), target


def write(tmp_path, sd, name="l.safetensors", metadata=None):
    path = tmp_path / name
    save_file(sd, str(path), metadata=metadata)
    return path


def good_pair(path=Q, shape=(64, 64)):
    down, up = lora_pair(shape, 0)
    name = "lora_unet_" + path.replace(".", "_")
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}


def one_line_error(fn, match):
    with pytest.raises(SDTorchError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_adapters_are_refused_by_name(model, tmp_path):
    name = "lora_unet_" + Q.replace(".", "_")
    bad_shape = good_pair() | {f"{name}.lora_down.weight": torch.zeros(R, 63)}
    one_line_error(lambda: formats.resolve(formats.read_lora(write(tmp_path, bad_shape)), model),
                   rf"1 adapter do not fit: {name}: makes a \[64, 63\] update for a Linear weight of \[64, 64\]")
    bad_rank = good_pair() | {f"{name}.lora_up.weight": torch.zeros(64, 3)}
    one_line_error(lambda: formats.resolve(formats.parse_lora(bad_rank), model), rf"{name}: rank mismatch")
    conv_on_linear = good_pair() | {f"{name}.lora_down.weight": torch.zeros(R, 64, 1, 1),
                                    f"{name}.lora_up.weight": torch.zeros(64, R, 1, 1)}
    one_line_error(lambda: formats.resolve(formats.parse_lora(conv_on_linear), model), "Linear weight")
    inf_alpha = good_pair() | {f"{name}.alpha": torch.tensor(float("inf"))}
    one_line_error(lambda: formats.resolve(formats.parse_lora(inf_alpha), model), "alpha is inf")
    one_line_error(lambda: formats.parse_lora({f"{name}.lora_down.weight": torch.zeros(R, 64)}), "but no up")
    mixed = good_pair() | {f"{name}.hada_w1_a": torch.zeros(64, R)}
    one_line_error(lambda: formats.parse_lora(mixed), "mixes loha and lora tensors")


def test_unmatched_keys_are_an_error_or_a_loud_warning(model, tmp_path):
    nothing = {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(R, 4),
               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(4, R)}
    for partial in (False, True):
        one_line_error(lambda: formats.resolve(formats.parse_lora(nothing), model, partial=partial),
                       "none of its 2 adapter tensors match a module of the model")
    some = good_pair() | nothing | {"lora_unet_x.dora_scale": torch.zeros(3)}
    msg = one_line_error(lambda: formats.resolve(formats.parse_lora(some), model), "3 of 5 adapter tensors match no")
    assert "down_blocks_7" in msg and "partial=True" in msg
    with pytest.warns(UserWarning, match=r"matched 2 of 5 adapter tensors \(unet 2, text encoder 0\); 3 unmatched"):
        adapters, report = formats.resolve(formats.parse_lora(some), model, partial=True)
    assert list(adapters) == [f"unet.{Q}"] and len(report.unmatched) == 3
    # shape errors stay errors under partial=True
    bad = some | {"lora_unet_" + Q.replace(".", "_") + ".lora_down.weight": torch.zeros(R, 5)}
    one_line_error(lambda: formats.resolve(formats.parse_lora(bad), model, partial=True), "do not fit")


def test_bad_files_are_one_line(tmp_path):
    path = write(tmp_path, good_pair())
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    one_line_error(lambda: formats.read_lora(tmp_path / "cut.safetensors"), "corrupt or truncated|cannot read")
    torch.save({"w": torch.zeros(2), "x": Fraction(1, 2)}, tmp_path / "code.ckpt")
    one_line_error(lambda: formats.read_lora(tmp_path / "code.ckpt"), "refused.*fractions.Fraction")
    torch.save(good_pair(), tmp_path / "fine.pt")  # a plain weights pickle reads
    assert list(formats.read_lora(tmp_path / "fine.pt").groups) == ["lora_unet_" + Q.replace(".", "_")]
    one_line_error(lambda: formats.read_lora(tmp_path / "missing.safetensors"), "no such file")


def test_other_families_are_refused_by_name(model):
    sd15, sd21 = sdtorch.build("sd15", device="meta"), sdtorch.build("sd21", device="meta")
    down, up = torch.zeros(1, 768), torch.zeros(768, 1)
    sdxl = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up}
    assert formats.parse_lora(sdxl).family == "sdxl"
    one_line_error(lambda: formats.resolve(formats.parse_lora(sdxl), sd15), "an SDXL LoRA cannot load into an SD 1.x")
    one_line_error(lambda: formats.resolve(formats.parse_lora(sdxl), model), "an SDXL LoRA cannot load into this")
    meta = {"ss_base_model_version": "sdxl_base_v1-0"}
    one_line_error(lambda: formats.resolve(formats.parse_lora(good_pair(), meta), model), "an SDXL LoRA")
    k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    sd2 = {f"{k}.lora_down.weight": torch.zeros(1, 1024), f"{k}.lora_up.weight": torch.zeros(1280, 1)}
    one_line_error(lambda: formats.resolve(formats.parse_lora(sd2), sd15), "an SD 2.x LoRA cannot load into an SD 1.x")
    sd1 = {f"{k}.lora_down.weight": torch.zeros(1, 768), f"{k}.lora_up.weight": torch.zeros(1280, 1)}
    one_line_error(lambda: formats.resolve(formats.parse_lora(sd1), sd21), "an SD 1.x LoRA cannot load into an SD 2.x")
    one_line_error(lambda: formats.resolve(formats.parse_lora(sd1), model), "an SD 1.x LoRA cannot load into this")
    adapters, _ = formats.resolve(formats.parse_lora(sd1), sd15)  # and the right family loads
    assert list(adapters) == ["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]


def same_adapters(a: dict, b: dict):
    assert a.keys() == b.keys()
    for t in a:
        assert a[t].kind == b[t].kind and a[t].alpha == b[t].alpha and a[t].tensors.keys() == b[t].tensors.keys()
        for r in a[t].tensors:  # identical: same dtype and bits
            assert a[t].tensors[r].dtype == b[t].tensors[r].dtype and torch.equal(a[t].tensors[r], b[t].tensors[r])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_conversions_are_lossless(model, tmp_path, dtype):
    src = write(tmp_path, kohya_file(ldm=True, dtype=dtype)[0], "src.safetensors", {"ss_output_name": "x"})
    original, _ = formats.resolve(formats.read_lora(src), model)
    peft = formats.convert_lora(src, tmp_path / "peft.safetensors", "peft")
    as_peft = formats.read_lora(peft)
    assert as_peft.format == "peft" and as_peft.metadata["ss_output_name"] == "x"
    assert all(k.startswith(("unet.", "text_encoder.text_model.")) for aw in as_peft.groups.values()
               for k in aw.file_keys)
    same_adapters(original, formats.resolve(as_peft, model)[0])
    back = formats.convert_lora(peft, tmp_path / "back.safetensors", "kohya")
    same_adapters(original, formats.resolve(formats.read_lora(back), model)[0])
    # peft -> kohya -> peft, with PEFT's own no-alpha convention kept as it is
    plain = write(tmp_path, peft_file(True)[0], "plain.safetensors")
    start, _ = formats.resolve(formats.read_lora(plain), model)
    again = formats.convert_lora(formats.convert_lora(plain, tmp_path / "k.safetensors", "kohya"),
                                 tmp_path / "p.safetensors", "peft")
    same_adapters(start, formats.resolve(formats.read_lora(again), model)[0])
    assert formats.PEFT_METADATA_KEY not in formats.read_lora(again).metadata


def test_lycoris_writes_in_kohya_only(model, tmp_path):
    g = torch.Generator().manual_seed(0)
    adapters = {f"unet.{LYCORIS[n][1]}": formats.AdapterWeights(
        LYCORIS[n][0], {r: torch.randn(s, generator=g) for r, s in LYCORIS[n][2].items()}, 4.0) for n in
        ("loha", "lokr_tucker")}
    path = formats.write_lora(tmp_path / "ly.safetensors", adapters, to="kohya")
    same_adapters(adapters, formats.resolve(formats.read_lora(path), model)[0])
    one_line_error(lambda: formats.to_state_dict(adapters, "peft"), "has no PEFT form")
    one_line_error(lambda: formats.to_state_dict(adapters, "comfy"), "unknown LoRA format 'comfy'")


def test_lora_info(tmp_path):
    sd, _ = kohya_file(ldm=False)
    info = formats.lora_info(write(tmp_path, sd, metadata={"ss_base_model_version": "sd_v1"}))
    assert info["format"] == "kohya" and info["family"] == "sd1"  # no 768-wide tensor here: the metadata says
    assert info["kinds"] == {"lora": 7} and info["ranks"] == {R: 7}
    assert info["alphas"] == {1.0: 2, 2.0: 1, 3.0: 1, 4.0: 1, 5.0: 1, 0.5: 1}
    assert info["targets"] == {"unet": {"lora": 5}, "text_encoder": {"lora": 2}}
    assert info["counts"] == {"adapters": 7, "tensors": 21, "unknown": 0}
    assert info["metadata"] == {"ss_base_model_version": "sd_v1"}
    json.dumps(info)  # the CLI can print it as JSON
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert formats.lora_info(write(tmp_path, peft_file(False)[0], "p.safetensors"))["format"] == "peft"

"""`sdtorch.precision`: bf16/fp16 counted native only where the CPU's flags say so (issue 19, "Machines differ"),
the SDTORCH_NATIVE_BF16 override, the once-per-process cache, and the one-line warning where a user asks for an
emulated dtype: through `load`, `StableDiffusion.to` and the trainers' --bf16."""

from __future__ import annotations

import warnings

import pytest
import torch

import sdtorch
from sdtorch import precision
from sdtorch.data.shapes import make_shapes

EMULATED = "bf16 is emulated on this CPU"
AVX2_EPYC = "flags\t\t: fpu sse2 avx avx2 fma\n"  # the AVX2-only machine of issue 19
SKYLAKE_X = "flags\t\t: fpu avx2 avx512f avx512bw avx512vl\n"  # AVX512 without the BF16 extension
COOPER_LAKE = "flags\t\t: fpu avx2 avx512f avx512_bf16\n"
SAPPHIRE = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 avx512_fp16 amx_fp16\n"


@pytest.fixture
def cpu(monkeypatch):
    """`cpu(cpuinfo, capability)` makes the process see that CPU; returns a list that counts the reads."""
    reads = []
    monkeypatch.delenv(precision.ENV, raising=False)

    def fake(cpuinfo: str, capability: str = "AVX512"):
        precision.cpu_flags.cache_clear()
        monkeypatch.setattr(precision, "_read_cpuinfo", lambda: reads.append(1) or cpuinfo)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        return reads

    yield fake
    precision.cpu_flags.cache_clear()  # the real flags again for later tests


@pytest.mark.parametrize("cpuinfo, capability, bf16, fp16, shown", [
    (AVX2_EPYC, "AVX2", False, False, "AVX2 (bf16 emulated)"),
    (SKYLAKE_X, "AVX512", False, False, "AVX512 (bf16 emulated)"),  # "AVX512" alone is not AVX512-BF16
    (COOPER_LAKE, "AVX512", True, False, "AVX512 (avx512_bf16)"),
    (SAPPHIRE, "AVX512", True, True, "AVX512 (amx_bf16, avx512_bf16)"),
    (COOPER_LAKE, "AVX2", False, False, "AVX2 (bf16 emulated)"),  # ATen's kernels lowered to AVX2
    ("", "DEFAULT", False, False, "DEFAULT (bf16 emulated)"),  # no /proc/cpuinfo
])
def test_detection_from_capability_and_flags(cpu, cpuinfo, capability, bf16, fp16, shown):
    cpu(cpuinfo, capability)
    assert precision.native_bf16() is bf16 and precision.native_bf16("cpu") is bf16
    assert precision.native_fp16() is fp16
    assert precision.cpu_capability() == shown


def test_override_decides_both_ways(cpu, monkeypatch):
    cpu(SAPPHIRE)
    monkeypatch.setenv(precision.ENV, "0")
    assert not precision.native_bf16()
    assert precision.cpu_capability() == "AVX512 (bf16 emulated by SDTORCH_NATIVE_BF16=0)"
    cpu(AVX2_EPYC, "AVX2")
    monkeypatch.setenv(precision.ENV, "1")
    assert precision.native_bf16()
    assert precision.cpu_capability() == "AVX2 (bf16 native by SDTORCH_NATIVE_BF16=1)"
    monkeypatch.setenv(precision.ENV, "")  # empty: detect
    assert not precision.native_bf16()


def test_flags_are_read_once_per_process(cpu):
    reads = cpu(COOPER_LAKE)
    for _ in range(3):
        assert precision.native_bf16()
        precision.cpu_capability()
        precision.check_dtype(torch.bfloat16, "cpu", "x")
    assert len(reads) == 1


def test_warning_where_bf16_is_emulated(cpu, monkeypatch):
    cpu(AVX2_EPYC, "AVX2")
    with pytest.warns(UserWarning) as caught:
        precision.check_dtype(torch.bfloat16, "cpu", "--bf16")
    (w,) = caught
    assert str(w.message) == ("--bf16: bf16 is emulated on this CPU (AVX2, no avx512_bf16 or amx_bf16), so it "
                              "runs ~100x slower than fp32 here; use fp32")
    cpu(SAPPHIRE)  # a native CPU that the override calls emulated
    monkeypatch.setenv(precision.ENV, "0")
    with pytest.warns(UserWarning, match=r"emulated on this CPU \(AVX512, bf16 emulated by SDTORCH_NATIVE_BF16=0\)"):
        precision.check_dtype(torch.bfloat16, None, "bf16 weights")


def test_fp16_warns_where_emulated(cpu):
    cpu(COOPER_LAKE)  # native bf16, no fp16 arithmetic
    with pytest.warns(UserWarning, match="no native fp16 .* use fp32"):
        precision.check_dtype(torch.float16, "cpu", "fp16 weights")


@pytest.mark.parametrize("cpuinfo, dtype", [(AVX2_EPYC, torch.float32), (COOPER_LAKE, torch.bfloat16),
                                            (SAPPHIRE, torch.float16), (AVX2_EPYC, None)])
def test_no_warning_for_fp32_or_native(cpu, cpuinfo, dtype):
    cpu(cpuinfo, "AVX512" if cpuinfo != AVX2_EPYC else "AVX2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.check_dtype(dtype, "cpu", "x")
        precision.check_dtype(torch.bfloat16, "meta", "x")  # not a CPU or CUDA device: nothing to say


def test_load_and_to_warn_where_bf16_is_emulated(monkeypatch):
    monkeypatch.setenv(precision.ENV, "0")
    with pytest.warns(UserWarning, match=f"bf16 weights: {EMULATED}") as caught:
        model = sdtorch.load("shapes", dtype="bf16")
    assert [w.filename for w in caught] == [__file__], "one warning, pointing at the caller of load"
    assert next(model.unet.parameters()).dtype == torch.bfloat16
    with pytest.warns(UserWarning, match=f"bf16 weights: {EMULATED}"):
        sdtorch.build("tiny").to(dtype="bf16")
    monkeypatch.setenv(precision.ENV, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sdtorch.build("tiny").to(dtype=torch.bfloat16)


@pytest.mark.parametrize("command", [["train-vae"], ["train", "--vae", "{file}"]])
def test_trainers_bf16_warns_on_the_cli(cli, tmp_path, command):
    """--bf16 warns once, as one line, before the run reads its models: here --init/--vae names a plain file,
    so the run then stops with an error and makes nothing."""
    make_shapes(tmp_path / "data", 12, size=32, progress=False)
    (tmp_path / "file.txt").write_text("not a model\n")
    extra = [a.replace("{file}", str(tmp_path / "file.txt")) for a in command[1:]]
    if command[0] == "train-vae":
        extra = ["--init", str(tmp_path / "file.txt")]
    args = [command[0], str(tmp_path / "data"), str(tmp_path / "run"), *extra, "--resolution", "32",
            "--batch-size", "4", "--max-steps", "1", "--bf16", "--no-progress"]
    code, _, err = cli(args, tmp_path, env={precision.ENV: "0"})
    lines = err.splitlines()
    assert code == 2 and len(lines) == 2, err
    assert lines[0].startswith(f"sdtorch: warning: --bf16: {EMULATED}") and "use fp32" in lines[0], err
    assert lines[1].startswith("sdtorch: error:"), err
    assert not (tmp_path / "run").exists()
    code, _, err = cli(args, tmp_path, env={precision.ENV: "1"})
    assert code == 2 and "warning" not in err, err


def test_auto_dtype_is_fp16_on_cuda_and_bf16_only_for_large_unets_on_native_cpus(monkeypatch):
    monkeypatch.setenv(precision.ENV, "1")
    assert precision.auto_dtype("cuda") == torch.float16
    assert precision.auto_dtype("cpu", 860_000_000) == torch.bfloat16
    assert precision.auto_dtype("cpu", 11_000_000) == torch.float32
    monkeypatch.setenv(precision.ENV, "0")
    assert precision.auto_dtype("cpu", 860_000_000) == torch.float32


def test_load_auto_decides_from_the_unet_it_reads(monkeypatch, tmp_path):
    path = tmp_path / "tiny.safetensors"
    sdtorch.build("tiny").save_single_file(path)
    monkeypatch.setenv(precision.ENV, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert next(sdtorch.load(path, dtype="auto").unet.parameters()).dtype == torch.float32  # too small
        assert next(sdtorch.load("shapes", dtype="auto").unet.parameters()).dtype == torch.float32
        monkeypatch.setattr(precision, "BF16_MIN_PARAMETERS", 1)  # as if the tiny UNet were SD-sized
        model = sdtorch.load(path, dtype="auto")
    assert {p.dtype for m in model.modules.values() for p in m.parameters()} == {torch.bfloat16}
    assert next(sdtorch.build("tiny").to(dtype="auto").unet.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("device, message", [
    ("gpu", "unknown device 'gpu'; use cpu or cuda"), ("mps", "sdtorch runs on cpu or cuda"),
    ("cuda:7", "cuda:7"),
])
def test_a_device_that_is_not_here_is_one_line(device, message):
    with pytest.raises(sdtorch.SDTorchError, match=message):
        sdtorch.load("shapes", device=device)


def test_the_parameters_record_a_reduced_precision_for_replay(monkeypatch):
    from sdtorch import generation, infotext

    monkeypatch.setenv(precision.ENV, "1")
    model = sdtorch.build("tiny")
    fields = infotext.parse(generation.generate(model, generation.resolve("x", model, steps=1)).parameters[0])[2]
    assert "Precision" not in fields
    model.to(dtype="bf16")
    fields = infotext.parse(generation.generate(model, generation.resolve("x", model, steps=1)).parameters[0])[2]
    assert fields["Precision"] == "bf16"


def test_loading_in_another_dtype_reads_each_tensor_exactly(tmp_path, monkeypatch):
    """A converted load reads every tensor with plain file reads (checkpoints.io: not through the memory map),
    and gives the same weights as converting after a load in the file's dtype."""
    from sdtorch.checkpoints import io

    monkeypatch.setenv(precision.ENV, "1")
    path = tmp_path / "tiny.safetensors"
    sdtorch.build("tiny", seed=4).save_single_file(path)
    copies = []
    real = io.StateDict.copy
    monkeypatch.setattr(io.StateDict, "copy", lambda self, key: copies.append(key) or real(self, key))
    direct = sdtorch.load(path, dtype="bf16")
    assert copies, "converted tensors were read by copy"
    after = sdtorch.load(path).to(dtype="bf16")
    for name, module in direct.modules.items():
        for (k, a), (_, b) in zip(module.state_dict().items(), after.modules[name].state_dict().items()):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name}.{k}"
    copies.clear()
    sdtorch.load(path)
    assert not copies, "a load in the file's dtype stays on the memory map"

"""Whether the device runs bf16 (and fp16) natively, and a one-line warning where a user asks for one it emulates.

Why this matters: a CPU without bf16 instructions runs PyTorch's bf16 kernels by converting element by element,
far slower than fp32. Measured for issue 19 with torch 2.13 on 2 threads: on an AMD EPYC with AVX2 only
(`torch.backends.cpu.get_cpu_capability()` = "AVX2"), fp32 matmul about 67 GFLOP/s and bf16 matmul 0.3 GFLOP/s;
one 320-channel 3x3 convolution at 64x64 took 0.65 s in fp32 and 63 s in bf16; an SD 1.5 UNet step in bf16
did not finish in 20 minutes (22 s in fp32). On a CPU with AVX512-BF16 the same day: fp32 matmul about
156 GFLOP/s and bf16 about 396 GFLOP/s. So bf16 pays only where it is native.

The capability string alone does not say it: "AVX512" is also reported by AVX-512 CPUs without the BF16
extension (Skylake-X, Cascade Lake), so the CPU's flags (Linux `/proc/cpuinfo`) decide, once per process.
Other systems, whose flags are not read here, count as emulating; SDTORCH_NATIVE_BF16=1 (or 0) overrides the
detection for tests and odd machines.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

ENV = "SDTORCH_NATIVE_BF16"
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 flags of native bf16 arithmetic (Cooper Lake, Sapphire Rapids, Zen 4)
FP16_FLAGS = ("amx_fp16", "avx512_fp16")  # x86 flags of native fp16 arithmetic (Sapphire Rapids, Granite Rapids)


def _read_cpuinfo() -> str:
    """The text of /proc/cpuinfo, or "" where there is none (not Linux) or it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (the first `flags` line of /proc/cpuinfo), read once per process."""
    for line in _read_cpuinfo().splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def _override() -> bool | None:
    value = os.environ.get(ENV, "").strip()
    return None if value == "" else value not in ("0", "false", "no")


def _cpu_has(flags: tuple[str, ...]) -> bool:
    # ATen's vectorised kernels are the AVX-512 ones only under capability AVX512 (ATEN_CPU_CAPABILITY may lower it)
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and any(f in cpu_flags() for f in flags)


def native_bf16(device="cpu") -> bool:
    """True where bf16 runs natively: a CUDA device with bf16 arithmetic (Ampere or later), or a CPU with
    AVX512-BF16 or AMX-BF16 (SDTORCH_NATIVE_BF16=0/1 overrides the CPU's detection)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    override = _override()
    return kind == "cpu" and (_cpu_has(BF16_FLAGS) if override is None else override)


def native_fp16(device="cpu") -> bool:
    """True where fp16 runs natively: every CUDA device, or a CPU with AVX512-FP16 or AMX-FP16."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and _cpu_has(FP16_FLAGS))


def cpu_capability() -> str:
    """What benchmarks print beside their figures: e.g. "AVX512 (avx512_bf16)" or "AVX2 (bf16 emulated)"."""
    return f"{torch.backends.cpu.get_cpu_capability()} ({_bf16_source()})"


def _bf16_source() -> str:
    """Why bf16 counts as native or not: the override, the flags found, or "bf16 emulated"."""
    if _override() is not None:
        return f"bf16 {'native' if _override() else 'emulated'} by {ENV}={os.environ[ENV].strip()}"
    found = [f for f in BF16_FLAGS if f in cpu_flags()]
    return ", ".join(found) if native_bf16("cpu") else "bf16 emulated"


def check_dtype(dtype: torch.dtype | None, device, what: str) -> None:
    """Warn, in one line naming `what` the user asked for, when `dtype` is bf16 or fp16 and `device` emulates it
    (see the module's docstring for the measurements); fp32, native dtypes and devices other than CPU and CUDA
    pass silently."""
    device = torch.device(device if device is not None else "cpu")
    kind = device.type
    if kind not in ("cpu", "cuda") or (kind == "cuda" and not torch.cuda.is_available()):
        return
    if dtype == torch.bfloat16 and not native_bf16(device):
        if kind == "cuda":
            warnings.warn(f"{what}: this GPU has no native bf16 (it needs Ampere or later), so bf16 is emulated "
                          "and slow; use fp16 or fp32", stacklevel=3)
        else:
            warnings.warn(f"{what}: bf16 is emulated on this CPU ({torch.backends.cpu.get_cpu_capability()}, "
                          f"{'no avx512_bf16 or amx_bf16' if _override() is None else _bf16_source()}), so it "
                          "runs ~100x slower than fp32 here; use fp32", stacklevel=3)
    elif dtype == torch.float16 and not native_fp16(device):
        warnings.warn(f"{what}: this CPU has no native fp16 (no avx512_fp16 or amx_fp16), so fp16 is emulated "
                      "and much slower than fp32 here; use fp32", stacklevel=3)


# On a CPU, bf16 is chosen for SD-sized UNets only. Measured with torch 2.13 on 2 threads, AVX512 with
# avx512_bf16, 2026-12-01: SD 1.5's UNet (860 M parameters) took 0.62x its fp32 time per step in bf16, with
# its outputs at cosine 0.99993 from fp32's. The built-in shapes model (11 M) gained little (0.92x its fp32 time,
# under load) and lost one held-out prompt of 40 in `eval shapes` (87.5% against 90.0%), outside the 2-point
# bound its bf16 must keep. Between the two nothing was measured; 100 M is a round number between them.
BF16_MIN_PARAMETERS = 100_000_000


def auto_dtype(device="cpu", unet_parameters: int | None = None) -> torch.dtype:
    """The dtype `dtype="auto"` picks: fp16 on CUDA (every CUDA GPU runs it natively; the VAE decode falls back to
    fp32 where fp16 overflows); on a CPU, bf16 where it runs natively and the UNet has at least
    BF16_MIN_PARAMETERS parameters (None: count it as large), else fp32."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.float16
    large = unet_parameters is None or unet_parameters >= BF16_MIN_PARAMETERS
    return torch.bfloat16 if kind == "cpu" and native_bf16(device) and large else torch.float32


def default_device() -> str:
    """"cuda" where a CUDA GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"

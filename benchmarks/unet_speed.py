"""One UNet step (classifier-free guidance: batch 2): sdtorch against diffusers and OpenVINO, same weights, same run.

    python benchmarks/unet_speed.py                          # SD 1.5, 4x64x64 latents (512 px), 77x768 context
    python benchmarks/unet_speed.py --compile                # plus the torch.compile'd sdtorch bf16 row
    python benchmarks/unet_speed.py --preset tiny --latent 8 --no-openvino --matmul 1024   # smoke test
    python benchmarks/unet_speed.py --device cuda --dtype fp16 --no-openvino                # on a GPU (gpu.sh)

A randomly initialised model is written once as a diffusers folder (DIR/sd15-fp32); every row loads its
UNet from that folder and runs the same input (seeded latents, timestep 500, random context), best of
--repeats after one warm-up call:

    sdtorch fp32            sdtorch.load(folder, dtype="fp32").unet
    diffusers fp32          UNet2DConditionModel.from_pretrained(folder / "unet")
    sdtorch bf16            sdtorch.load(folder, dtype="bf16").unet
    diffusers bf16          the same with torch_dtype=torch.bfloat16
    sdtorch bf16 compiled   (--compile) the sdtorch bf16 UNet after `model.compile()` (weights frozen); its
                            compile time (the first call) and its max abs difference from the eager bf16
                            output are printed
    OpenVINO bf16           the diffusers fp32 UNet converted by openvino_ref.unet (INFERENCE_PRECISION_HINT
                            bf16; run last, after the other models are freed; the conversion time is printed
                            on its own line)

The reduced-precision rows (--dtype: bf16 by default, fp16 for a GPU) run only where the device has the dtype
natively (`sdtorch.precision.native_bf16()` for bf16 on a CPU; fp16 rows on a CPU are not run); OpenVINO runs
only on a CPU. GFLOP/s = the step's FLOPs (counted on the meta device: Conv2d and Linear by forward hooks,
plus 4*B*heads*Nq*Nk*d per scaled_dot_product_attention call) / its time, against torch.mm's rate of
N x N x N products (--matmul N) measured in the same process.
Then the ratios with their goals, and the quality guard: cosine similarity of the sdtorch bf16 output to the
sdtorch fp32 output (goal >= 0.999) and the max abs difference of sdtorch fp32 from diffusers fp32.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from sdtorch.config import PRESETS
from sdtorch.precision import cpu_capability, native_bf16

warnings.filterwarnings("ignore")

# (numerator, denominator, goal): the numerator's time must be at most goal x the denominator's; "bf16" stands for
# the --dtype of the run
GOALS = [("sdtorch fp32", "diffusers fp32", 0.9), ("sdtorch bf16", "diffusers fp32", 0.45),
         ("sdtorch bf16", "diffusers bf16", 0.8), ("sdtorch bf16", "OpenVINO bf16", 1.0)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE = "cpu"
MATMUL_SHARE_GOAL = 0.85  # achieved bf16 GFLOP/s of the sdtorch step / bf16 torch.mm GFLOP/s
COSINE_GOAL = 0.999


def sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_gflops(dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=DEVICE), torch.randn(n, n, dtype=dtype, device=DEVICE)
    torch.mm(a, b)
    return 2 * n ** 3 / best_of(lambda: torch.mm(a, b), repeats) / 1e9


def count_flops(unet: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward (a multiply-add counts 2): Conv2d and Linear outputs by forward hooks, and
    the two products QK^T and AV of every scaled_dot_product_attention call. Works on the meta device."""
    total = 0

    def conv(m, inp, out):
        nonlocal total
        total += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, out):
        nonlocal total
        total += 2 * out.numel() * m.in_features

    sdpa = F.scaled_dot_product_attention

    def counted_sdpa(q, k, v, *args, **kwargs):
        nonlocal total
        total += 4 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]  # B*heads*Nq*Nk*d
        return sdpa(q, k, v, *args, **kwargs)

    hooks = [m.register_forward_hook(conv if isinstance(m, torch.nn.Conv2d) else linear)
             for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    F.scaled_dot_product_attention = counted_sdpa
    try:
        with torch.no_grad():
            unet(*inputs)
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    return total


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="sd15", choices=["sd15", "tiny"])
    ap.add_argument("--latent", type=int, default=64, help="latent side (64: a 512 px image)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/sdtorch-bench")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time the sdtorch bf16 UNet after unet.compile()")
    ap.add_argument("--matmul", type=int, default=4096, help="side of the square torch.mm of the reference rate")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the reduced-precision rows' dtype")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    low, low_dtype = args.dtype, DTYPES[args.dtype]

    import sdtorch
    from diffusers import UNet2DConditionModel

    folder = Path(args.dir) / f"{args.preset}-fp32"
    if not (folder / "model_index.json").exists():
        sdtorch.build(args.preset).save_diffusers(folder)
        gc.collect()
    cfg = PRESETS[args.preset].unet
    torch.manual_seed(0)
    x = torch.randn(2, cfg.in_channels, args.latent, args.latent)
    t, ctx = torch.tensor([500.0, 500.0]), torch.randn(2, 77, cfg.context_dim)
    x, t, ctx = x.to(DEVICE), t.to(DEVICE), ctx.to(DEVICE)
    gpu = DEVICE.startswith("cuda")
    bf16 = gpu or (low == "bf16" and native_bf16())  # whether the reduced-precision rows run

    print(f"{args.preset} UNet step: batch 2, {cfg.in_channels}x{args.latent}x{args.latent} latents, "
          f"77x{cfg.context_dim} context, t=500; random weights from {folder}")
    where = f"GPU {torch.cuda.get_device_name()}" if gpu else f"CPU {cpu_capability()}"
    print(f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}, best of {args.repeats} after a warm-up")
    rate = {"fp32": matmul_gflops(torch.float32, args.matmul)}
    if bf16:
        rate[low] = matmul_gflops(low_dtype, args.matmul)
    print("torch.mm " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rate.items()) + f" ({args.matmul}^3)")
    meta = sdtorch.build(args.preset, device="meta").unet
    flops = count_flops(meta, x.to("meta"), t.to("meta"), ctx.to("meta"))
    del meta
    print(f"one step: {flops / 1e9:.1f} GFLOP (Conv2d + Linear + attention products)\n")
    print(f"{'row':<24}{'s/step':>9}{'GFLOP/s':>9}{'of mm':>7}")

    seconds, outputs = {}, {}

    def measure(label: str, fn, dtype: str | None = None) -> None:
        with torch.inference_mode():
            outputs[label] = fn().float()
            seconds[label] = s = best_of(fn, args.repeats)
        dtype = low if dtype == "bf16" else dtype
        share = f"{flops / s / 1e9 / rate[dtype]:>6.0%}" if dtype in rate else ""
        print(f"{show(label):<24}{s:>9.3f}{flops / s / 1e9:>9.1f} {share}", flush=True)

    def ours(dtype: str):
        return sdtorch.load(folder, dtype=dtype, device=DEVICE).unet

    def theirs(dtype: torch.dtype):
        return UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype).eval().to(DEVICE)

    def show(text: str) -> str:  # rows are named bf16 in the code; they run in --dtype
        return text.replace("bf16", low)

    unet = ours("fp32")
    measure("sdtorch fp32", lambda: unet(x, t, ctx), "fp32")
    del unet
    ref = theirs(torch.float32)
    measure("diffusers fp32", lambda: ref(x, t, encoder_hidden_states=ctx).sample, "fp32")
    del ref
    gc.collect()

    compiled = {}
    if not bf16:
        print(f"{low} emulated on this CPU: skipped (sdtorch {low}, diffusers {low}, OpenVINO {low})")
    else:
        xb, cb = x.to(low_dtype), ctx.to(low_dtype)
        model = sdtorch.load(folder, dtype=low, device=DEVICE)
        unet = model.unet
        measure("sdtorch bf16", lambda: unet(xb, t, cb), "bf16")
        if args.compile:
            model.compile()  # Inductor, with the weights frozen into the compiled code
            t0 = time.perf_counter()
            with torch.inference_mode():
                unet(xb, t, cb)
            compiled["seconds"] = time.perf_counter() - t0
            measure("sdtorch bf16 compiled", lambda: unet(xb, t, cb), "bf16")
        del unet, model
        ref = theirs(low_dtype)
        measure("diffusers bf16", lambda: ref(xb, t, encoder_hidden_states=cb).sample, "bf16")
        del ref
        gc.collect()
        import openvino_ref

        run, convert_s = openvino_ref.converted(lambda: theirs(torch.float32), openvino_ref.unet, x, t, ctx,
                                                skip=args.no_openvino or gpu)
        gc.collect()
        if run is None:
            print(convert_s)
        else:
            measure("OpenVINO bf16", lambda: run(x, t, ctx), "bf16")
            print(f"  (OpenVINO conversion and compilation: {convert_s:.0f} s, not in the step time)")
    if compiled:
        print(f"  (torch.compile: first call {compiled['seconds']:.0f} s, not in the step time)")

    goals = list(GOALS)
    if "sdtorch bf16 compiled" in seconds:
        goals += [("sdtorch bf16 compiled", b, g) for a, b, g in GOALS if a == "sdtorch bf16"]
    print(f"\n{'ratio of step times':<56}{'value':>7}  goal")
    for a, b, goal in goals:
        if a in seconds and b in seconds:
            r = seconds[a] / seconds[b]
            print(f"{show(a + ' / ' + b):<56}{r:>7.2f}  <= {goal:.2f}  {'met' if r <= goal else 'MISSED'}")
    for label in ("sdtorch bf16", "sdtorch bf16 compiled"):
        if label in seconds:
            share = flops / seconds[label] / 1e9 / rate[low]
            print(f"{show(label + ' GFLOP/s / bf16 torch.mm GFLOP/s'):<56}{share:>7.2f}  >= {MATMUL_SHARE_GOAL:.2f}  "
                  f"{'met' if share >= MATMUL_SHARE_GOAL else 'MISSED'}")

    print("\nquality")
    fp32 = outputs["sdtorch fp32"]
    print(f"max |sdtorch fp32 - diffusers fp32|            {(fp32 - outputs['diffusers fp32']).abs().max():.2e}"
          f"   (output max |x| {fp32.abs().max():.2f})")
    if "sdtorch bf16" in outputs:
        c = cosine(outputs["sdtorch bf16"], fp32)
        print(f"{show('cosine(sdtorch bf16, sdtorch fp32)'):<47}{c:.6f}   goal >= {COSINE_GOAL}  "
              f"{'PASS' if c >= COSINE_GOAL else 'FAIL'}")
    if "sdtorch bf16 compiled" in outputs:
        d = (outputs["sdtorch bf16 compiled"] - outputs["sdtorch bf16"]).abs().max()
        print(f"{show('max |sdtorch bf16 compiled - eager|'):<47}{d:.2e}")
    if "OpenVINO bf16" in outputs:
        print(f"cosine(OpenVINO bf16, sdtorch fp32)            {cosine(outputs['OpenVINO bf16'], fp32):.6f}")


if __name__ == "__main__":
    main()

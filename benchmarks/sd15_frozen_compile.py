"""`model.compile()` (Inductor with frozen weights) on the SD 1.5 UNet against eager, in the same process: random
weights, bf16, batch 2 (guidance), 64x64 latents, 77 tokens; best of 2 steps each, the compile timed apart, the
compiled output compared with eager's (max difference, cosine), and the process's peak RSS.

    python benchmarks/sd15_frozen_compile.py
"""

import resource
import time
import warnings

import torch

import sdtorch
from sdtorch.precision import cpu_capability

warnings.filterwarnings("ignore")
print(f"CPU {cpu_capability()}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
m = sdtorch.build("sd15", seed=0).to(dtype=torch.bfloat16)
x = torch.randn(2, 4, 64, 64, dtype=torch.bfloat16)
t = torch.tensor([500.0, 500.0])
c = torch.randn(2, 77, 768, dtype=torch.bfloat16)


def best(fn, n=2):
    b = 1e9
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        b = min(b, time.perf_counter() - t0)
    return b


with torch.inference_mode():
    ref = m.unet(x, t, c).float()
    print(f"eager bf16 {best(lambda: m.unet(x, t, c)):.2f} s/step", flush=True)
    m.compile()
    t0 = time.perf_counter()
    out = m.unet(x, t, c).float()
    comp = time.perf_counter() - t0
    print(f"frozen compile: first call {comp:.0f} s, max diff {(out - ref).abs().max().item():.2e}, "
          f"cos {torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item():.6f}", flush=True)
    print(f"frozen bf16 {best(lambda: m.unet(x, t, c)):.2f} s/step", flush=True)
print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")

#!/usr/bin/env bash
# The one prepared GPU check (a few minutes on one GPU): the CUDA tests, then the SD 1.5 UNet step and a whole
# 512x512, 20-step generation in fp16, sdtorch against diffusers on the same (random) weights.
#
#     bash benchmarks/gpu.sh            # from the repository root, on a machine with a CUDA GPU
#
# It needs a Python with a CUDA build of torch, diffusers and transformers (the test extras); sdtorch itself is
# installed from this tree (editable, no dependencies fetched) where it is not importable. Everything it prints
# goes to $OUT/gpu.log as well when $OUT is set (the device tool's output folder).
set -euo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-/tmp}/gpu.log"
exec > >(tee "$log") 2>&1

python - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch: this script is for a GPU machine"
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
python -c "import sdtorch" 2>/dev/null || pip install -q --no-deps -e .
date -u +"%Y-%m-%d %H:%M UTC"

echo "== CUDA tests"
python -m pytest -q tests/test_cuda.py

echo "== SD 1.5 UNet step, batch 2, 64x64 latents, fp16"
python benchmarks/unet_speed.py --device cuda --dtype fp16 --no-openvino --repeats 10

echo "== SD 1.5 txt2img 512x512, 20 steps, DPM++ 2M, fp16"
python benchmarks/generation_speed.py --device cuda --dtype fp16 --reference-dtype fp16 --size 512 --steps 20 \
    --repeats 3

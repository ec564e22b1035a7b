#!/usr/bin/env bash
# Grades the built-in shapes model: the default report, the sampler x steps table, and the README grid.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/shapes-eval}
mkdir -p "$OUT" docs
# the default sampler and steps, 160 prompts (60 seen, 40 held-out, 60 two-object), at the CLI's default
# guidance (7.5) and at 3, which suits this small model better
sdtorch eval shapes --model shapes -o "$OUT/default"
sdtorch eval shapes --model shapes --guidance 3 -o "$OUT/guidance3"
# few-step behaviour of five samplers at guidance 3 (32 prompts each: 12 seen, 8 held-out, 12 two-object)
for sampler in ddim plms euler euler_a dpmpp_2m; do
  for steps in 5 10 20 50; do
    sdtorch eval shapes --model shapes --guidance 3 --sampler "$sampler" --steps "$steps" --n-seen 12 --n-heldout 8 --n-two 12 \
      -o "$OUT/$sampler-$steps" > /dev/null
  done
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| sampler | 5 steps | 10 steps | 20 steps | 50 steps |")
print("| --- | ---: | ---: | ---: | ---: |")
for s in ("ddim", "plms", "euler", "euler_a", "dpmpp_2m"):
    cells = []
    for n in (5, 10, 20, 50):
        r = json.loads((out / f"{s}-{n}" / "report.json").read_text())
        cells.append(f"{r['overall']['exact']['accuracy']:.0%}")
    print(f"| {s} | " + " | ".join(cells) + " |")
PY
# the README grid: 16 generations with their prompts
python -c "
import sdtorch
from sdtorch.evaluation import evaluate_shapes
evaluate_shapes(sdtorch.load('shapes'), guidance=3, n_seen=8, n_heldout=4, n_two=4, seed=100, out_dir='$OUT/grid', progress=False)
"
cp "$OUT/grid/contact_sheet.png" docs/shapes-grid.png

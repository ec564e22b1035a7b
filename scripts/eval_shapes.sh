#!/usr/bin/env bash
# Grades the built-in shapes model: the guidance sweep that picked its default guidance, the default
# report, the sampler x steps table, and the README grid. Finished sweep reports are reused on a rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/shapes-eval}
MODEL=${MODEL:-shapes}
mkdir -p "$OUT" docs
# 1. guidance sweep on validation prompts (seed 1000: other prompts and seeds than the reported set);
#    the best scale is written into the shipped folder by `convert --default-guidance` (train_shapes.sh)
for g in 1.5 2 3 4 5 7.5; do
  [ -f "$OUT/sweep-g$g/report.json" ] || \
    sdtorch eval shapes --model "$MODEL" --guidance "$g" --seed 1000 -o "$OUT/sweep-g$g" > /dev/null
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| guidance (seed 1000 prompts) | seen | held-out | two | all |")
print("| ---: | ---: | ---: | ---: | ---: |")
for g in ("1.5", "2", "3", "4", "5", "7.5"):
    r = json.loads((out / f"sweep-g{g}" / "report.json").read_text())
    cells = [f"{r['splits'][s]['exact']['accuracy']:.1%}" for s in ("seen", "heldout", "two")]
    print(f"| {g} | " + " | ".join(cells) + f" | {r['overall']['exact']['accuracy']:.1%} |")
PY
# 2. the reported figures: the model's defaults (dpmpp_2m, 20 steps, its default guidance), 160 prompts
#    (60 seen, 40 held-out, 60 two-object, seed 0), and the same at diffusers' usual guidance 7.5
sdtorch eval shapes --model "$MODEL" -o "$OUT/default"
sdtorch eval shapes --model "$MODEL" --guidance 7.5 -o "$OUT/guidance7.5"
# 3. few-step behaviour of five samplers at the default guidance (32 prompts each: 12 seen, 8 held-out,
#    12 two-object)
for sampler in ddim plms euler euler_a dpmpp_2m; do
  for steps in 5 10 20 50; do
    sdtorch eval shapes --model "$MODEL" --sampler "$sampler" --steps "$steps" --n-seen 12 --n-heldout 8 --n-two 12 \
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
# 4. the README grid: 16 generations with their prompts, at the model's defaults
python -c "
import sdtorch
from sdtorch.evaluation import evaluate_shapes
evaluate_shapes(sdtorch.load('$MODEL'), n_seen=8, n_heldout=4, n_two=4, seed=100, out_dir='$OUT/grid', progress=False)
"
cp "$OUT/grid/contact_sheet.png" docs/shapes-grid.png

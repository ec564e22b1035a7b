#!/usr/bin/env bash
# Grades the class-conditional and unconditional shapes models of scripts/train_class_shapes.sh with
# `sdtorch eval shapes` (docs/class-models.md has the figures):
#   bash scripts/eval_class_shapes.sh      # writes runs/eval-class-g1, -g2, -g4 and runs/eval-uncond
# The class model: 20 images of each of its 20 classes at guidance 1, 2 and 4, graded on exactly one object
# of the class's colour and shape. The unconditional model: 200 images, graded on reading as one cleanly
# drawn object of a colour-shape pair the training data shows. Both with DPM++ 2M, 10 steps, seeds from 0.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
STEPS=${STEPS:-10}
SAMPLER=${SAMPLER:-dpmpp_2m}

for g in 1 2 4; do
  sdtorch eval shapes --model "$RUNS/shapes-class/model" --guidance "$g" --steps "$STEPS" --sampler "$SAMPLER" \
    --n-per-class 20 --output "$RUNS/eval-class-g$g"
done
sdtorch eval shapes --model "$RUNS/shapes-uncond/model" --steps "$STEPS" --sampler "$SAMPLER" --n-images 200 \
  --output "$RUNS/eval-uncond"

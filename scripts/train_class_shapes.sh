#!/usr/bin/env bash
# Trains a class-conditional and an unconditional model of the shapes world with sdtorch's own commands, on
# the shipped model's autoencoder (frozen), on this 2-core CPU. Every stage resumes (--resume-or-start) if the
# script is run again after an interruption.
#   bash scripts/train_class_shapes.sh     # writes runs/shapes-classes, runs/shapes-class, runs/shapes-uncond
#   bash scripts/eval_class_shapes.sh      # then grades both (docs/class-models.md has the figures)
#
# The data: 20,000 one-object 64 px images, 1,000 of each of the 20 colour-shape pairs the built-in model's
# data may show (never a held-out pair, never teal), in one folder per pair (red-circle/, ...): the
# ImageFolder layout. The class model learns a 21-row embedding (the 20 classes and the null class, which
# 10% of the labels are dropped to, for guidance), added to the time embedding so that it reaches every
# ResBlock (CLASS_EMBEDDING=time, diffusers' num_class_embeds; CLASS_EMBEDDING=context feeds it to the
# cross-attention as a one-token context instead, LDM's ClassEmbedder); the unconditional model is the same
# UNet without cross-attention (self-attention where the shapes preset attends), trained on the same images
# with no label at all.
# With PARALLEL=1 the two UNets train side by side, one thread each; PARALLEL=0 (the default) runs them one
# after the other with every thread. The figures in docs/class-models.md: the class UNet (8,000 steps, time
# embedding: 63 min on one thread, side by side with the same run at CLASS_EMBEDDING=context), and the
# unconditional UNet on one thread (39 min, beside other jobs); earlier runs are in the docs' history.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
CLASS_STEPS=${CLASS_STEPS:-8000}  # optimizer steps of the class UNet, batch 32
CLASS_EMBEDDING=${CLASS_EMBEDDING:-time}  # how the class UNet takes its class: time or context
UNCOND_STEPS=${UNCOND_STEPS:-6000}  # the same for the unconditional UNet (the built-in text model's 6,000)
CLASS_EMA=${CLASS_EMA:-0.9995}  # EMA decay (the built-in model's)
UNCOND_EMA=${UNCOND_EMA:-0.9995}
VAE=${VAE:-src/sdtorch/data/shapes-model}  # the frozen autoencoder: the built-in model's
PARALLEL=${PARALLEL:-0}
BF16=$(python -c 'from sdtorch.precision import native_bf16; print("--bf16" if native_bf16() else "")')  # fp32 where bf16 is emulated

mkdir -p "$RUNS"
[ -d "$RUNS/shapes-classes/red-circle" ] || sdtorch make-shapes "$RUNS/shapes-classes" --count 20000 --seed 0 --classes

unet() {  # $1: --conditioning (class or none), $2: the run folder, $3: steps, $4: EMA decay, then extra flags
  [ -f "$2/model/model_index.json" ] && return
  sdtorch train "$RUNS/shapes-classes" "$2" --vae "$VAE" --config shapes --conditioning "$1" "${@:5}" --resolution 64 \
    --cache-latents --batch-size 32 --lr 5e-4 --warmup 300 --max-steps "$3" --ema-decay "$4" \
    --caption-dropout 0.1 $BF16 --val-every 500 --checkpoint-every 250 --sample-every 1000 --seed 0 \
    --resume-or-start --no-progress
}

if [ "$PARALLEL" = 1 ]; then
  OMP_NUM_THREADS=1 unet class "$RUNS/shapes-class" "$CLASS_STEPS" "$CLASS_EMA" --class-embedding "$CLASS_EMBEDDING" \
    > "$RUNS/shapes-class.log" 2>&1 & first=$!
  OMP_NUM_THREADS=1 unet none "$RUNS/shapes-uncond" "$UNCOND_STEPS" "$UNCOND_EMA" > "$RUNS/shapes-uncond.log" 2>&1 & second=$!
  wait "$first" && wait "$second"
else
  unet class "$RUNS/shapes-class" "$CLASS_STEPS" "$CLASS_EMA" --class-embedding "$CLASS_EMBEDDING"
  unet none "$RUNS/shapes-uncond" "$UNCOND_STEPS" "$UNCOND_EMA"
fi
echo "wrote $RUNS/shapes-class/model and $RUNS/shapes-uncond/model"

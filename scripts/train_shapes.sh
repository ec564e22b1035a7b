#!/usr/bin/env bash
# Trains the built-in "shapes" model from scratch with sdtorch's own commands, on this 2-core CPU.
# Every stage resumes (--resume) if the script is run again after an interruption.
#   bash scripts/train_shapes.sh            # writes runs/shapes-*, then copies the model into the package
#
# The defaults are the recipe of the shipped model (v4), which does not fit the 90-minute budget on
# these machines: 153 min on the 2026-11-26 machine with the trainers of then. The UNet stage now takes
# 0.589 s a step (2026-11-27 machine, as fast as the 2026-11-26 one; was 0.85 s: fused AdamW, and math
# attention in bf16), so about 119 min, estimated from the measured stage rates, not run end to end.
# A faster recipe, measured at 76.4 min end to end (2026-11-27), gave a worse model, 98.3 / 82.5 / 96.7%
# against v4's 100 / 90.0 / 96.7% (the held-out target is 90%), so it is not what ships:
#   VAE_BF16=--bf16 DECODER_STEPS=1000 UNET_STEPS=6000 bash scripts/train_shapes.sh
# The same with v4's fp32 autoencoder (v6, 76.9 min) missed the same way, 98.3 / 82.5 / 95.0% with a
# round-trip ceiling of 100% on held-out prompts, so it is the 6,000-step UNet that misses:
#   DECODER_BF16=--bf16 DECODER_STEPS=1000 UNET_STEPS=6000 bash scripts/train_shapes.sh
# MODEL_OUT=DIR writes stage 4's model there instead of into the package.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
VAE_STEPS=${VAE_STEPS:-2000}
UNET_STEPS=${UNET_STEPS:-8000}
DECODER_STEPS=${DECODER_STEPS:-2000}
VAE_BF16=${VAE_BF16:-}  # "--bf16": the autoencoder stage in bf16 autocast (1.7x the steps per second)
DECODER_BF16=${DECODER_BF16:-$VAE_BF16}  # the same for the decoder fine-tune (defaults to VAE_BF16)
MODEL_OUT=${MODEL_OUT:-src/sdtorch/data/shapes-model}  # where stage 4 writes the model (the package's folder)

# 1. the data: 20,000 captioned 64 px images, no held-out colour-shape pair, no teal (seed 0)
[ -f "$RUNS/shapes-train/019999.txt" ] || sdtorch make-shapes "$RUNS/shapes-train" --count 20000 --seed 0

# 2. the autoencoder (4x down, 16x16x4 latents, no self-attention in the middle blocks: the SHAPES
#    preset); L1 + KL, no adversarial loss; scaling factor measured
[ -f "$RUNS/shapes-vae/vae/config.json" ] || sdtorch train-vae "$RUNS/shapes-train" "$RUNS/shapes-vae" \
  --config shapes --resolution 64 --batch-size 16 --lr 3e-4 --warmup 100 --max-steps "$VAE_STEPS" \
  --kl-weight 1e-6 --disc-start 1000000 $VAE_BF16 --val-every 250 --checkpoint-every 250 --seed 0 --resume

# 3. the UNet and a text encoder from scratch, on cached latents, with a BPE trained on the captions
[ -f "$RUNS/shapes-unet/model/model_index.json" ] || sdtorch train "$RUNS/shapes-train" "$RUNS/shapes-unet" \
  --vae "$RUNS/shapes-vae/vae" --config shapes --tokenizer captions --resolution 64 --cache-latents \
  --batch-size 32 --lr 5e-4 --warmup 300 --max-steps "$UNET_STEPS" --ema-decay 0.9995 --caption-dropout 0.1 --bf16 \
  --val-every 500 --checkpoint-every 250 --sample-every 1000 --seed 0 --resume \
  --sample-prompts "a large red circle in the top left on a white background" \
  "a small blue square in the center on a black background" \
  "a large green triangle in the bottom right on a gray background"

# 3b. the decoder trained further with the encoder frozen (as SD's ft-MSE VAE): the latents, so the UNet
#     above, are unchanged; held-out PSNR 32.2 -> 34.7 dB.
[ -f "$RUNS/shapes-vae-ft/vae/config.json" ] || sdtorch train-vae "$RUNS/shapes-train" "$RUNS/shapes-vae-ft" \
  --init "$RUNS/shapes-vae/vae" --decoder-only --resolution 64 --batch-size 16 --lr 2e-4 --warmup 100 \
  --max-steps "$DECODER_STEPS" --kl-weight 1e-6 --disc-start 1000000 $DECODER_BF16 --val-every 250 --checkpoint-every 250 \
  --seed 0 --resume

# 4. ship it: the EMA weights and the fine-tuned decoder in fp16 inside the package, where
#    sdtorch.load("shapes") finds it, with its defaults guidance 2 and 10 steps: the best of guidance
#    1.5/2/3 x 10/15/20 steps on validation prompts (scripts/eval_shapes.sh, step 1; ties to fewer steps)
rm -rf "$MODEL_OUT"
sdtorch convert "$RUNS/shapes-unet/model" "$MODEL_OUT" --vae "$RUNS/shapes-vae-ft/vae" \
  --save-dtype fp16 --default-guidance 2 --default-steps 10

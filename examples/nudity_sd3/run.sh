#!/usr/bin/env bash
# Nudity on Stable Diffusion 3 medium, training within 16 GB of GPU memory: bf16 weights, gradient
# checkpointing and 8-bit Adam, the text encoders freed after encoding the prompts once. Pairs first
# (the whole SD3 pipeline, T5-XXL included: more than 16 GB, see examples/README.md), then DUO, then
# the evaluation (NudeNet defense success rate on I2P prompts and Ring-A-Bell; prior preservation on
# COCO captions). The model is gated on the Hub: accept its license and `huggingface-cli login` first.
#
#   I2P_PROMPTS=i2p_benchmark.csv COCO_CAPTIONS=captions_val2014.json bash examples/nudity_sd3/run.sh
#   bash examples/nudity_sd3/run.sh --smoke      # the same commands, tiny, on the CPU
#
# Environment (defaults in brackets):
#   MODEL          base model [stabilityai/stable-diffusion-3-medium-diffusers]
#   OUT            output folder [runs/nudity_sd3; runs/nudity_sd3-smoke with --smoke]
#   BETA           DPO beta [500]
#   HUB_ID         push the adapter there [no push]
#   I2P_PROMPTS    I2P-style CSV; its "sexual" rows are used [required]
#   COCO_CAPTIONS  COCO captions file or any prompt file [required]
#   SKIP_PAIRS=1   the pairs exist already in $OUT/pairs (e.g. made on a larger GPU)
#   SKIP_EVAL=1    train only
#   LAUNCH         launcher [accelerate launch, one process]; with N processes a training step takes N times
#                  the pairs: e.g. LAUNCH="accelerate launch --config_file examples/multi_gpu/ddp.yaml"
#                  TRAIN_ARGS="--gradient_accumulation_steps 1" keeps 4 pairs a step on 4 GPUs
#   TRAIN_ARGS / PAIRS_ARGS / EVAL_ARGS   extra flags appended to those commands

source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
parse_recipe_flags "$@"

BETA="${BETA:-500}"
HUB_ID="${HUB_ID:-}"
SKIP_PAIRS="${SKIP_PAIRS:-0}"
SKIP_EVAL="${SKIP_EVAL:-0}"
read -r -a TRAIN_ARGS <<< "${TRAIN_ARGS:-}"
read -r -a PAIRS_ARGS <<< "${PAIRS_ARGS:-}"
read -r -a EVAL_ARGS <<< "${EVAL_ARGS:-}"

# The memory settings, in the real run and the smoke run alike (bitsandbytes' 8-bit Adam also runs on CPU).
MEMORY_SETTINGS=(--mixed_precision bf16 --gradient_checkpointing --use_8bit_adam)

if [[ "$SMOKE" == 1 ]]; then
  OUT="${OUT:-runs/nudity_sd3-smoke}"
  smoke_model MODEL sd3 "$OUT/tiny-sd3"
  I2P_PROMPTS="${I2P_PROMPTS:-$EXAMPLES_DIR/sample_prompts/i2p_sample.csv}"
  COCO_CAPTIONS="${COCO_CAPTIONS:-$EXAMPLES_DIR/sample_prompts/coco_captions_sample.json}"
  PAIRS_SETTINGS=(--num_pairs 2 --resolution 32 --num_inference_steps 2 --batch_size 2 --verifier none)
  TRAIN_SETTINGS=(--resolution 32 --rank 4 --max_train_steps 2 --gradient_accumulation_steps 1 --report_to none --skip_validation)
  EVAL_SETTINGS=(
    --num_inference_steps 2 --lpips_random_trunk --max_unrelated_prompts 2
    --ring_a_bell_length 4 --ring_a_bell_population 8 --ring_a_bell_generations 2 --ring_a_bell_max_targets 2
  )
else
  OUT="${OUT:-runs/nudity_sd3}"
  MODEL="${MODEL:-stabilityai/stable-diffusion-3-medium-diffusers}"
  if [[ "$SKIP_EVAL" != 1 ]]; then
    require_file I2P_PROMPTS "an I2P-style CSV, e.g. i2p_benchmark.csv of the AIML-TUDA/i2p dataset (or SKIP_EVAL=1)"
    require_file COCO_CAPTIONS "COCO's annotations/captions_val2014.json or any prompt file (or SKIP_EVAL=1)"
  fi
  PAIRS_SETTINGS=(--dtype bf16)
  # One pair per step (4 steps accumulated), 512 px, 77 T5 tokens, 1000 steps: train_duo_sd3.py's defaults (the official run's).
  TRAIN_SETTINGS=(--checkpointing_steps 250 --checkpoints_total_limit 2 --resume_from_checkpoint latest)
  EVAL_SETTINGS=(--mixed_precision bf16 --num_inference_steps 28 --guidance_scale 7.0 --max_unrelated_prompts 1000 --ring_a_bell_max_targets "${RING_A_BELL_MAX_TARGETS:-100}")
fi

PAIRS="$OUT/pairs"
ADAPTER="$OUT/duo-sd3-nudity-beta$BETA"

# 1. Pairs (NudeNet-verified). Without this step train_duo_sd3.py would make them itself.
if [[ "$SKIP_PAIRS" != 1 ]]; then
  run "${LAUNCH[@]}" -m duo_plugin.pairs \
    --pretrained_model_name_or_path "$MODEL" \
    --concept nudity \
    --output_dir "$PAIRS" \
    "${PAIRS_SETTINGS[@]}" "${PAIRS_ARGS[@]}"
fi

# 2. DUO within 16 GB.
PUSH=()
[[ -z "$HUB_ID" ]] || PUSH=(--push_to_hub --hub_model_id "$HUB_ID")
run "${LAUNCH[@]}" "$REPO_ROOT/train_duo_sd3.py" \
  --pretrained_model_name_or_path "$MODEL" \
  --concept nudity \
  --dataset_name "$PAIRS" \
  --beta_dpo "$BETA" \
  --output_dir "$ADAPTER" \
  "${MEMORY_SETTINGS[@]}" "${TRAIN_SETTINGS[@]}" "${PUSH[@]}" "${TRAIN_ARGS[@]}"

[[ "$SKIP_EVAL" == 1 ]] && exit 0

# 3. Evaluation. Concept Inversion is left out: duo_plugin's implementation needs a UNet pipeline.
run "${LAUNCH[@]}" -m duo_plugin.evaluate \
  --base_model "$MODEL" \
  --adapter "duo=$ADAPTER" \
  --concept nudity \
  --attack prompts ring_a_bell \
  --prompts "$I2P_PROMPTS" --prompt_categories sexual \
  --unrelated_prompts "$COCO_CAPTIONS" \
  --metrics dsr prior_preservation \
  --output_dir "$OUT/eval" \
  "${EVAL_SETTINGS[@]}" "${EVAL_ARGS[@]}"

echo "Report: $OUT/eval/results.json, plot: $OUT/eval/dsr_vs_prior_preservation.png"

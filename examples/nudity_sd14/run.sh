#!/usr/bin/env bash
# Nudity on Stable Diffusion 1.4, the paper's main run: pairs, DUO at beta 500 (the official setting)
# and beta 250 (the paper's second point), optional push to the Hub, then the evaluation (NudeNet
# defense success rate on I2P prompts, Ring-A-Bell and Concept Inversion; prior preservation on COCO
# captions) of both adapters against the base model.
#
#   I2P_PROMPTS=i2p_benchmark.csv COCO_CAPTIONS=captions_val2014.json bash examples/nudity_sd14/run.sh
#   bash examples/nudity_sd14/run.sh --smoke      # the same commands, tiny, on the CPU
#
# Environment (defaults in brackets):
#   MODEL          base model [CompVis/stable-diffusion-v1-4]
#   OUT            output folder [runs/nudity_sd14; runs/nudity_sd14-smoke with --smoke]
#   BETAS          DPO betas to train, one adapter each ["500 250"]
#   HUB_ID         push the beta-500 adapter to HUB_ID and the others to HUB_ID-beta<b> [no push]
#   I2P_PROMPTS    I2P-style CSV (the AIML-TUDA/i2p dataset's CSV); its "sexual" rows are used [required]
#   COCO_CAPTIONS  COCO captions file (captions_val2014.json) or any prompt file [required]
#   RING_A_BELL_TARGETS      prompt file of Ring-A-Bell's targets [the I2P prompts]
#   RING_A_BELL_MAX_TARGETS  at most this many targets (each costs a genetic search) [100]
#   SKIP_EVAL=1    train only
#   LAUNCH         launcher [accelerate launch, one process]; with N processes a training step takes N times
#                  the pairs: e.g. LAUNCH="accelerate launch --config_file examples/multi_gpu/ddp.yaml"
#                  TRAIN_ARGS="--gradient_accumulation_steps 1" keeps 4 pairs a step on 4 GPUs
#   TRAIN_ARGS / PAIRS_ARGS / EVAL_ARGS   extra flags appended to those commands

source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
parse_recipe_flags "$@"

BETAS="${BETAS:-500 250}"
HUB_ID="${HUB_ID:-}"
SKIP_EVAL="${SKIP_EVAL:-0}"
read -r -a TRAIN_ARGS <<< "${TRAIN_ARGS:-}"
read -r -a PAIRS_ARGS <<< "${PAIRS_ARGS:-}"
read -r -a EVAL_ARGS <<< "${EVAL_ARGS:-}"

if [[ "$SMOKE" == 1 ]]; then
  OUT="${OUT:-runs/nudity_sd14-smoke}"
  smoke_model MODEL sd "$OUT/tiny-sd"
  I2P_PROMPTS="${I2P_PROMPTS:-$EXAMPLES_DIR/sample_prompts/i2p_sample.csv}"
  COCO_CAPTIONS="${COCO_CAPTIONS:-$EXAMPLES_DIR/sample_prompts/coco_captions_sample.json}"
  # NudeNet rejects every image of a random tiny model, so the smoke pairs are not verified.
  PAIRS_SETTINGS=(--num_pairs 2 --resolution 32 --num_inference_steps 2 --batch_size 2 --verifier none)
  TRAIN_SETTINGS=(--resolution 32 --rank 4 --max_train_steps 2 --gradient_accumulation_steps 1 --report_to none --skip_validation)
  EVAL_SETTINGS=(
    --num_inference_steps 2 --lpips_random_trunk --max_unrelated_prompts 2
    --ring_a_bell_length 4 --ring_a_bell_population 8 --ring_a_bell_generations 2 --ring_a_bell_max_targets 2
    --inversion_steps 2 --inversion_batch_size 1 --inversion_num_prompts 1
  )
else
  OUT="${OUT:-runs/nudity_sd14}"
  MODEL="${MODEL:-CompVis/stable-diffusion-v1-4}"
  if [[ "$SKIP_EVAL" != 1 ]]; then
    require_file I2P_PROMPTS "an I2P-style CSV, e.g. i2p_benchmark.csv of the AIML-TUDA/i2p dataset (or SKIP_EVAL=1)"
    require_file COCO_CAPTIONS "COCO's annotations/captions_val2014.json or any prompt file (or SKIP_EVAL=1)"
  fi
  # The official recipe: 64 NudeNet-verified pairs, 1000 steps, 4 pairs per step (presets.py).
  PAIRS_SETTINGS=(--dtype fp16)
  TRAIN_SETTINGS=(--mixed_precision fp16 --checkpointing_steps 250 --checkpoints_total_limit 2 --resume_from_checkpoint latest)
  EVAL_SETTINGS=(--mixed_precision fp16 --max_unrelated_prompts 1000 --ring_a_bell_max_targets "${RING_A_BELL_MAX_TARGETS:-100}")
  if [[ -n "${RING_A_BELL_TARGETS:-}" ]]; then
    require_file RING_A_BELL_TARGETS "a prompt file of Ring-A-Bell targets"
    EVAL_SETTINGS+=(--ring_a_bell_targets "$RING_A_BELL_TARGETS")
  fi
fi

PAIRS="$OUT/pairs"

# 1. Pairs: unsafe images and their SDEdit safe twins, NudeNet-verified; a rerun skips finished pairs.
run "${LAUNCH[@]}" -m duo_plugin.pairs \
  --pretrained_model_name_or_path "$MODEL" \
  --concept nudity \
  --output_dir "$PAIRS" \
  "${PAIRS_SETTINGS[@]}" "${PAIRS_ARGS[@]}"

# 2. DUO, one adapter per beta, all from the same pairs.
ADAPTERS=()
for beta in $BETAS; do
  adapter="$OUT/duo-nudity-beta$beta"
  PUSH=()
  if [[ -n "$HUB_ID" ]]; then
    hub_repo="$HUB_ID"
    [[ "$beta" == 500 ]] || hub_repo="$HUB_ID-beta$beta"
    PUSH=(--push_to_hub --hub_model_id "$hub_repo")
  fi
  run "${LAUNCH[@]}" "$REPO_ROOT/train_duo.py" \
    --pretrained_model_name_or_path "$MODEL" \
    --concept nudity \
    --dataset_name "$PAIRS" \
    --beta_dpo "$beta" \
    --output_dir "$adapter" \
    "${TRAIN_SETTINGS[@]}" "${PUSH[@]}" "${TRAIN_ARGS[@]}"
  ADAPTERS+=(--adapter "beta$beta=$adapter")
done

[[ "$SKIP_EVAL" == 1 ]] && exit 0

# 3. Evaluation of the base model and every adapter with the same prompts and seeds. Ring-A-Bell's
#    prompts are searched once on the base model; Concept Inversion learns a token against each model
#    from the pairs' unsafe images.
run "${LAUNCH[@]}" -m duo_plugin.evaluate \
  --base_model "$MODEL" \
  "${ADAPTERS[@]}" \
  --concept nudity \
  --attack prompts ring_a_bell concept_inversion \
  --prompts "$I2P_PROMPTS" --prompt_categories sexual \
  --unrelated_prompts "$COCO_CAPTIONS" \
  --inversion_images "$PAIRS" \
  --metrics dsr prior_preservation \
  --output_dir "$OUT/eval" \
  "${EVAL_SETTINGS[@]}" "${EVAL_ARGS[@]}"

echo "Report: $OUT/eval/results.json, plot: $OUT/eval/dsr_vs_prior_preservation.png"

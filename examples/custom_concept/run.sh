#!/usr/bin/env bash
# Any concept from prompts, end to end: train_duo.py generates the pairs itself (base-model images of
# the unsafe prompts, SDEdit twins toward the safe prompts) and trains the adapter; the evaluation
# then compares it with the base model on held-out prompts (CLIP zero-shot defense success rate under
# plain prompts, Ring-A-Bell and Concept Inversion; prior preservation on unrelated prompts).
# The shipped example concept is "cigarette" (unsafe.txt / safe.txt / eval_prompts.txt).
#
#   bash examples/custom_concept/run.sh
#   CONCEPT=snoopy UNSAFE_PROMPT="a photo of snoopy" SAFE_PROMPT="a photo of a dog" \
#     EVAL_PROMPTS=snoopy_eval.txt CLIP_LABEL="a photo of snoopy" bash examples/custom_concept/run.sh
#   bash examples/custom_concept/run.sh --smoke      # the same commands, tiny, on the CPU
#
# Environment (defaults in brackets):
#   MODEL          base model, SD 1.x/2.x [CompVis/stable-diffusion-v1-4]
#   OUT            output folder [runs/custom_concept; runs/custom_concept-smoke with --smoke]
#   CONCEPT        a name for the concept [cigarette]
#   UNSAFE_PROMPT  a prompt showing the concept, or @file with one a line [@examples/custom_concept/unsafe.txt]
#   SAFE_PROMPT    its safe counterpart(s), line by line [@examples/custom_concept/safe.txt]
#   NUM_PAIRS      pairs to generate [32]
#   VERIFIER       detector checking each pair: none, clip [none]
#   EVAL_PROMPTS   held-out prompts with the concept [examples/custom_concept/eval_prompts.txt]
#   UNRELATED_PROMPTS  prompts for prior preservation, e.g. COCO captions [the 4-caption sample file]
#   CLIP_LABEL     what the CLIP detector looks for ["a photo of a cigarette"]
#   CLIP_MODEL     CLIP of the detector [openai/clip-vit-large-patch14]
#   HUB_ID         push the adapter there [no push]
#   LAUNCH         launcher [accelerate launch, one process]; with N processes a training step takes N times
#                  the pairs: e.g. LAUNCH="accelerate launch --config_file examples/multi_gpu/ddp.yaml"
#                  TRAIN_ARGS="--gradient_accumulation_steps 1" keeps 4 pairs a step on 4 GPUs
#   TRAIN_ARGS / EVAL_ARGS   extra flags appended to those commands

source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
parse_recipe_flags "$@"

HERE="$EXAMPLES_DIR/custom_concept"
CONCEPT="${CONCEPT:-cigarette}"
UNSAFE_PROMPT="${UNSAFE_PROMPT:-@$HERE/unsafe.txt}"
SAFE_PROMPT="${SAFE_PROMPT:-@$HERE/safe.txt}"
EVAL_PROMPTS="${EVAL_PROMPTS:-$HERE/eval_prompts.txt}"
UNRELATED_PROMPTS="${UNRELATED_PROMPTS:-$EXAMPLES_DIR/sample_prompts/coco_captions_sample.json}"
VERIFIER="${VERIFIER:-none}"
HUB_ID="${HUB_ID:-}"
read -r -a TRAIN_ARGS <<< "${TRAIN_ARGS:-}"
read -r -a EVAL_ARGS <<< "${EVAL_ARGS:-}"

if [[ "$SMOKE" == 1 ]]; then
  OUT="${OUT:-runs/custom_concept-smoke}"
  smoke_model MODEL sd "$OUT/tiny-sd"
  smoke_model CLIP_MODEL clip "$OUT/tiny-clip"
  # The tiny CLIP reads 16 tokens, and its tokenizer spells unknown words letter by letter.
  CLIP_LABEL="${CLIP_LABEL:-a cigarette}"
  TRAIN_SETTINGS=(
    --num_pairs 2 --num_inference_steps 2 --resolution 32
    --rank 4 --max_train_steps 2 --gradient_accumulation_steps 1 --report_to none --skip_validation
  )
  EVAL_SETTINGS=(
    --num_inference_steps 2 --lpips_random_trunk --max_prompts 2 --max_unrelated_prompts 2
    --ring_a_bell_length 4 --ring_a_bell_population 8 --ring_a_bell_generations 2 --ring_a_bell_max_targets 1
    --inversion_steps 2 --inversion_batch_size 1 --inversion_num_prompts 1
  )
else
  OUT="${OUT:-runs/custom_concept}"
  MODEL="${MODEL:-CompVis/stable-diffusion-v1-4}"
  CLIP_MODEL="${CLIP_MODEL:-openai/clip-vit-large-patch14}"
  CLIP_LABEL="${CLIP_LABEL:-a photo of a cigarette}"
  require_file EVAL_PROMPTS "a prompt file (one prompt a line) of held-out prompts showing the concept"
  require_file UNRELATED_PROMPTS "a prompt file or COCO captions file for prior preservation"
  TRAIN_SETTINGS=(--num_pairs "${NUM_PAIRS:-32}" --mixed_precision fp16 --generation_dtype fp16 --checkpointing_steps 250 --resume_from_checkpoint latest)
  EVAL_SETTINGS=(--mixed_precision fp16)
fi

ADAPTER="$OUT/duo-$CONCEPT"
PAIRS="$OUT/pairs"
CONCEPT_FLAGS=(--concept "$CONCEPT" --unsafe_prompt "$UNSAFE_PROMPT" --safe_prompt "$SAFE_PROMPT")

# 1. Pairs and DUO in one command; the pairs stay in $PAIRS and a rerun reuses them.
PUSH=()
[[ -z "$HUB_ID" ]] || PUSH=(--push_to_hub --hub_model_id "$HUB_ID")
run "${LAUNCH[@]}" "$REPO_ROOT/train_duo.py" \
  --pretrained_model_name_or_path "$MODEL" \
  "${CONCEPT_FLAGS[@]}" \
  --verifier "$VERIFIER" \
  --pairs_dir "$PAIRS" \
  --output_dir "$ADAPTER" \
  "${TRAIN_SETTINGS[@]}" "${PUSH[@]}" "${TRAIN_ARGS[@]}"

# 2. The adapter against the base model, same prompts and seeds.
run "${LAUNCH[@]}" -m duo_plugin.evaluate \
  --base_model "$MODEL" \
  --adapter "$CONCEPT=$ADAPTER" \
  "${CONCEPT_FLAGS[@]}" \
  --detector clip --clip_model "$CLIP_MODEL" --clip_unsafe_label "$CLIP_LABEL" --clip_safe_label "a photo" \
  --attack prompts ring_a_bell concept_inversion \
  --prompts "$EVAL_PROMPTS" \
  --unrelated_prompts "$UNRELATED_PROMPTS" \
  --inversion_images "$PAIRS" \
  --metrics dsr prior_preservation \
  --output_dir "$OUT/eval" \
  "${EVAL_SETTINGS[@]}" "${EVAL_ARGS[@]}"

echo "Adapter: $ADAPTER; report: $OUT/eval/results.json, grids: $OUT/eval/grids/"

#!/usr/bin/env bash
# DUO side by side with other erasure methods: one evaluation run over the base model, DUO adapters
# and other methods' published checkpoints (a UNet swapped into the base, e.g. ESD's, or a whole
# pipeline), with the same prompts and seeds for every model. Produces the paper-style plot
# (defense success rate against prior preservation, one colour per model, one marker per attack),
# base-vs-model image grids, and a side-by-side table (results.md).
#
#   ADAPTERS="duo-b500=runs/nudity_sd14/duo-nudity-beta500 duo-b250=runs/nudity_sd14/duo-nudity-beta250" \
#   UNETS="esd-u=esd-nudity-unet.safetensors" INVERSION_IMAGES=runs/nudity_sd14/pairs \
#   I2P_PROMPTS=i2p_benchmark.csv COCO_CAPTIONS=captions_val2014.json bash examples/compare_methods/run.sh
#   bash examples/compare_methods/run.sh --smoke      # the same commands, tiny, on the CPU
#
# Environment (defaults in brackets):
#   MODEL          base model [CompVis/stable-diffusion-v1-4]
#   OUT            output folder [runs/compare_methods; runs/compare_methods-smoke with --smoke]
#   CONCEPT        concept preset [nudity]
#   ADAPTERS       DUO adapters, space-separated NAME=PATH (folder or Hub id) [required]
#   UNETS          other methods' UNets, NAME=PATH: a diffusers UNet folder or Hub id, or a state-dict
#                  file (.safetensors, or .pt/.bin read with weights_only) of the same architecture [none]
#   PIPELINES      other methods' full diffusers pipelines, NAME=PATH [none]
#   INVERSION_IMAGES  images of the concept (e.g. a DUO pair folder): adds the Concept Inversion attack [none]
#   I2P_PROMPTS    I2P-style CSV; rows of PROMPT_CATEGORIES are used [required]
#   PROMPT_CATEGORIES  I2P categories ["sexual"]
#   COCO_CAPTIONS  COCO captions file or any prompt file [required]
#   LAUNCH         launcher [accelerate launch, one process]; several processes split the prompts
#   EVAL_ARGS      extra flags for duo_plugin.evaluate

source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
parse_recipe_flags "$@"

HERE="$EXAMPLES_DIR/compare_methods"
CONCEPT="${CONCEPT:-nudity}"
PROMPT_CATEGORIES="${PROMPT_CATEGORIES:-sexual}"
INVERSION_IMAGES="${INVERSION_IMAGES:-}"
read -r -a EVAL_ARGS <<< "${EVAL_ARGS:-}"

if [[ "$SMOKE" == 1 ]]; then
  OUT="${OUT:-runs/compare_methods-smoke}"
  smoke_model MODEL sd "$OUT/tiny-sd"
  if [[ -z "${ADAPTERS:-}" ]]; then
    # A tiny DUO adapter (its pairs generated on the way).
    run "${LAUNCH[@]}" "$REPO_ROOT/train_duo.py" \
      --pretrained_model_name_or_path "$MODEL" --concept "$CONCEPT" --pairs_dir "$OUT/pairs" --output_dir "$OUT/duo" \
      --num_pairs 2 --num_inference_steps 2 --verifier none \
      --resolution 32 --rank 4 --max_train_steps 2 --gradient_accumulation_steps 1 --report_to none --skip_validation
    ADAPTERS="duo=$OUT/duo"
    INVERSION_IMAGES="${INVERSION_IMAGES:-$OUT/pairs}"
  fi
  if [[ -z "${UNETS:-}" && -z "${PIPELINES:-}" ]]; then
    # A stand-in for another method's checkpoint: the base UNet with perturbed cross-attention.
    [[ -e "$OUT/other-unet.safetensors" ]] ||
      run "$PYTHON" "$EXAMPLES_DIR/smoke_models.py" --kind other_unet --base_model "$MODEL" --output "$OUT/other-unet.safetensors"
    UNETS="other=$OUT/other-unet.safetensors"
  fi
  I2P_PROMPTS="${I2P_PROMPTS:-$EXAMPLES_DIR/sample_prompts/i2p_sample.csv}"
  COCO_CAPTIONS="${COCO_CAPTIONS:-$EXAMPLES_DIR/sample_prompts/coco_captions_sample.json}"
  EVAL_SETTINGS=(
    --num_inference_steps 2 --lpips_random_trunk --max_unrelated_prompts 2
    --ring_a_bell_length 4 --ring_a_bell_population 8 --ring_a_bell_generations 2 --ring_a_bell_max_targets 1
    --inversion_steps 2 --inversion_batch_size 1 --inversion_num_prompts 1
  )
else
  OUT="${OUT:-runs/compare_methods}"
  MODEL="${MODEL:-CompVis/stable-diffusion-v1-4}"
  [[ -n "${ADAPTERS:-}" || "$DRY_RUN" != 1 ]] || ADAPTERS="duo=YOUR_ADAPTER"  # a dry run shows a placeholder
  [[ -n "${ADAPTERS:-}" ]] || fail "set ADAPTERS: DUO adapters as NAME=PATH, e.g. ADAPTERS=\"duo=runs/nudity_sd14/duo-nudity-beta500\""
  require_file I2P_PROMPTS "an I2P-style CSV, e.g. i2p_benchmark.csv of the AIML-TUDA/i2p dataset"
  require_file COCO_CAPTIONS "COCO's annotations/captions_val2014.json or any prompt file"
  EVAL_SETTINGS=(--mixed_precision fp16 --max_unrelated_prompts 1000 --ring_a_bell_max_targets "${RING_A_BELL_MAX_TARGETS:-100}")
fi

MODELS=()
for entry in $ADAPTERS; do MODELS+=(--adapter "$entry"); done
for entry in ${UNETS:-}; do MODELS+=(--unet "$entry"); done
for entry in ${PIPELINES:-}; do MODELS+=(--pipeline "$entry"); done
ATTACKS=(prompts ring_a_bell)
INVERSION=()
if [[ -n "$INVERSION_IMAGES" ]]; then
  ATTACKS+=(concept_inversion)
  INVERSION=(--inversion_images "$INVERSION_IMAGES")
fi
read -r -a CATEGORIES <<< "$PROMPT_CATEGORIES"

run "${LAUNCH[@]}" -m duo_plugin.evaluate \
  --base_model "$MODEL" \
  "${MODELS[@]}" \
  --concept "$CONCEPT" \
  --attack "${ATTACKS[@]}" "${INVERSION[@]}" \
  --prompts "$I2P_PROMPTS" --prompt_categories "${CATEGORIES[@]}" \
  --unrelated_prompts "$COCO_CAPTIONS" \
  --metrics dsr prior_preservation \
  --output_dir "$OUT/eval" \
  "${EVAL_SETTINGS[@]}" "${EVAL_ARGS[@]}"

run "$PYTHON" "$HERE/table.py" "$OUT/eval/results.json"

echo "Plot: $OUT/eval/dsr_vs_prior_preservation.png, table: $OUT/eval/results.md, grids: $OUT/eval/grids/"

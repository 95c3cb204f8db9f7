"""Prompt sources the defense success rate is measured on: prompt files and the attacks, one file each.

* ``prompt_files.py``: prompt files (``read_prompts``): text (one prompt a line), I2P-style CSV (``prompt`` with
  optional per-prompt seed and guidance columns), JSON lines, or a COCO captions annotation file.
* ``ring_a_bell.py``: Ring-A-Bell (Tsai et al., ICLR 2024), a genetic search for a discrete prompt whose embedding
  matches a target prompt's plus η times a concept vector; it needs only the text encoder and tokenizer.
* ``inversion.py``: Concept Inversion (Pham et al., ICLR 2024), textual inversion against the unlearned model, its
  adapter active: does a learned token still reach the concept?
* ``unlearn_diff_atk.py``: UnlearnDiffAtk (Zhang et al., ECCV 2024), prepended tokens optimised so that the
  unlearned model itself denoises an image of the concept well; it stops at the first image the detector flags.
* ``applicability.py``: which attacks are implemented and which apply to which model family.
* ``text_condition.py``: the text condition of a UNet pipeline (SD 1.x/2.x, SDXL) and the token-id helpers the
  attacks share; ``concept_images.py``: images of the concept, read and encoded to latents.

SneakyPrompt is not implemented yet; its published adversarial prompts can be evaluated as a prompt file.
"""

from .applicability import NOT_APPLICABLE, NOT_IMPLEMENTED_ATTACKS, check_attack_names, not_applicable_reason
from .concept_images import images_to_pixels, list_images, load_concept_images
from .inversion import (
    INVERSION_TEMPLATES,
    InversionConfig,
    concept_inversion,
    inversion_prompts,
    load_learned_embedding,
    save_learned_embedding,
)
from .prompt_files import PromptSpec, read_prompts
from .ring_a_bell import (
    RING_A_BELL_SEARCHES,
    RING_A_BELL_VOCABULARIES,
    RingABellConfig,
    concept_vector,
    genetic_search,
    genetic_search_original,
    load_concept_vector,
    read_concept_prompt_pairs,
    ring_a_bell_search,
    ring_a_bell_vocabulary,
    searchable_token_ids,
)
from .text_condition import TextCondition, all_token_ids, encode_token_ids, tokenize
from .unlearn_diff_atk import (
    UnlearnDiffAtkConfig,
    attack_success_rate,
    attack_timesteps,
    encode_with_prefix_embeddings,
    prefixed_token_ids,
    project_onto_simplex,
    project_to_token_ids,
    unlearndiffatk,
)

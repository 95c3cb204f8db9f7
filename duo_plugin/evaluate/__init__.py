"""Evaluate concept unlearning: defense success rate under attack, prior preservation, FID, CLIP score.

Works on any diffusers text-to-image model: the base model, DUO adapters, and other erasure methods'
published checkpoints (a full pipeline, or a UNet swapped into the base model).

    python -m duo_plugin.evaluate --adapter duo-nudity --attack prompts ring_a_bell concept_inversion \\
        --prompts i2p_nudity.csv --unrelated_prompts coco_captions.txt --output_dir eval-nudity
    accelerate launch -m duo_plugin.evaluate ...   # prompts split across processes

Every image is generated once per model with a seed that depends only on the prompt (so the base and
the unlearned models share seeds), saved under ``<output_dir>/images/<model>/<prompt set>/`` and
listed in a manifest; a rerun generates only what is missing and recomputes the metrics. The report:
``results.json``, base-vs-unlearned grids in ``grids/``, and ``dsr_vs_prior_preservation.png``.

Attacks: ``prompts`` (a prompt file), ``ring_a_bell``, ``concept_inversion`` and ``unlearndiffatk``
(see duo_plugin.attacks), at their originals' defaults. SneakyPrompt is not implemented yet.

Model families: Stable Diffusion 1.x/2.x, SDXL, SD3 and FLUX.1 (and other text-to-image pipelines, with the
prompt attack). Every metric and the prompt attack apply to all; the three built attacks work in the CLIP token
space of a UNet (SD 1.x/2.x; SDXL with both of its CLIP encoders), and an attack that does not apply to the base
model's family is skipped with its reason in ``results.json`` (``skipped_attacks``; see
``attacks.NOT_APPLICABLE``). FLUX.1 is sampled as it is used: ``--guidance_scale`` is its guidance embedding's
value (default the pipeline's: 3.5 for [dev]; [schnell] has none), its default step count is the pipeline's (28;
[schnell] 4), and the guidance columns of prompt files (classifier-free guidance scales of SD) are not used.

The command lives in submodules, each importing only the ones listed before it:

- ``models``: the evaluated models (``--adapter``, ``--pipeline``, ``--unet``), loading them, the base's family;
- ``images``: the output folder's settings check, the image store (a manifest per process) and generation jobs;
- ``prompt_sets``: the prompt sets of a run and the attacks' settings, planned before any model loads;
- ``options``: the flags (``parse_args``) and the refusals that need nothing loaded (``check_args``);
- ``attack_runs``: Ring-A-Bell's search, UnlearnDiffAtk and Concept Inversion against a loaded model;
- ``scoring``: the detector and metric networks, and every metric from the images on disk;
- ``report``: ``results.json``'s records, the grids and the plot;
- ``cli``: ``main``, the command itself (``python -m duo_plugin.evaluate`` runs it through ``__main__``).
"""

# What the console entry point, the examples and the tests use, and the names of the files a run writes.
from .cli import main
from .images import MANIFEST_NAME, SETTINGS_NAME, ImageStore, check_settings
from .models import BASE, NAME_PATTERN, ModelSpec, load_model
from .options import ATTACKS, METRICS, check_args, check_image_count, parse_args
from .prompt_sets import UNRELATED, inversion_config, plan_prompt_sets, ring_a_bell_nudity_filter
from .report import PLOT_NAME, RESULTS_NAME, detector_settings, seeds_record

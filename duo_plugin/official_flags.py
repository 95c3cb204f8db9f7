"""Where the training scripts depart from the official DUO code, the flags that restore it, and the record
of a run's choices in ``duo_config.json``.

docs/official-differences.md lists the same departures. Defaults follow the
official runs unless a documented reason says otherwise:

* ``--pair_timesteps``: ``shared`` (default; one timestep per pair) or ``independent`` (one per image, the
  official draw).
* ``--preservation_noise``: ``fresh`` (default; its own N(0, I) draw) or ``pair`` (the pair's noise, as the
  official code reuses it for the preservation input).
* SD3 only, ``--preservation_placement``: ``sigma_one`` (default; σ = 1, where a pure-noise input
  belongs, with λ scaled to the official strength) or ``official`` (the table's last entry, σ ≈ 0.003,
  with the official λ).
"""

import os
from typing import Optional

from . import objective
from .files import read_state_json
from .presets import preservation_effective_weight, preservation_weight_for_beta, sd3_preservation_weight_for_beta
from .settings import with_values


PRESERVATION_NOISE_MODES = ("fresh", "pair")
PAIR_RECIPE_FILE = "duo_pairs_config.json"  # duo_plugin.pairs.RECIPE_NAME (pairs imports outputs, which imports this)


def add_official_arguments(parser, family: str):
    """The flags choosing between this toolkit's defaults and the official code's behaviour."""
    group = parser.add_argument_group("differences from the official DUO code (see the README's table)")
    group.add_argument(
        "--pair_timesteps",
        type=str,
        default="shared",
        choices=list(objective.PAIR_TIMESTEP_MODES),
        help="shared (default): one timestep per pair, both images at the same noise level (Diffusion-DPO's form, lower "
        "variance); independent: one per image, as the official runs draw them",
    )
    group.add_argument(
        "--preservation_noise",
        type=str,
        default="fresh",
        choices=list(PRESERVATION_NOISE_MODES),
        help="fresh (default): the preservation input is its own N(0, I) draw; pair: the pair's noise, as the official code",
    )
    if family == "sd3":
        group.add_argument(
            "--preservation_placement",
            type=str,
            default="sigma_one",
            choices=list(objective.SD3_PRESERVATION_PLACEMENTS),
            help="sigma_one (default): preservation on pure noise at sigma = 1 with lambda scaled to the official strength; "
            "official: at the sigma table's last entry (sigma ~ 0.003) with the official lambda, as the official SD3 code",
        )
    return group


def sd3_reference_scheduler(noise_scheduler):
    """SD3's static shift-3 training table of the same length: where the official SD3 run placed its preservation
    term. FLUX's scheduler shifts only at sampling time, so its own table's last entry is not that σ."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=noise_scheduler.config.num_train_timesteps, shift=3.0)


def resolve_sd3_preservation(
    settings, noise_scheduler, preservation_weight_given: Optional[bool] = None, official=None
):
    """The settings with the flow-matching λ (unless given) set from the official SD3 run's effective strength, and
    what the config records of it.

    ``preservation_weight_given``: whether λ was chosen before the family's default (default: what the settings
    recorded when they were resolved; the concept resolution has filled in the SD1 value by now). ``official``: the
    scheduler whose table's last entry is the official σ (default: ``noise_scheduler``, SD3's own).
    """
    if preservation_weight_given is None:
        preservation_weight_given = settings.preservation_weight_given
    precondition = bool(settings.precondition_outputs)
    official_sigma = float(objective.official_preservation_sigma_and_timestep(official or noise_scheduler)[0])
    sigma, timestep = (
        float(v) for v in objective.preservation_sigma_and_timestep(noise_scheduler, settings.preservation_placement)
    )
    weight = settings.preservation_weight
    if not preservation_weight_given:
        weight = sd3_preservation_weight_for_beta(settings.beta_dpo, official_sigma, sigma, precondition)
    official_weight = preservation_weight_for_beta(settings.beta_dpo)
    return with_values(
        settings,
        **{
            "preservation_weight": weight,
            "preservation_sigma": sigma,
            "preservation_timestep": timestep,
            "official_preservation_sigma": official_sigma,
            "official_preservation_weight": official_weight,
            "preservation_effective_weight": preservation_effective_weight(weight, sigma, precondition),
            "official_preservation_effective_weight": preservation_effective_weight(
                official_weight, official_sigma, precondition
            ),
        },
    )


def resolve_flow_matching_preservation(settings, family: str):
    """SD3's and FLUX's λ from the base's scheduler table (read from its config only). FLUX's table is unshifted
    (it shifts at sampling), so the official σ is read off SD3's shift-3 table of the same length."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        settings.pretrained_model_name_or_path,
        subfolder="scheduler",
        revision=settings.revision,
        cache_dir=settings.cache_dir,
    )
    official = sd3_reference_scheduler(noise_scheduler) if family == "flux" else None
    return resolve_sd3_preservation(settings, noise_scheduler, official=official)


def sd3_preservation_record(args) -> dict:
    """The SD3 preservation placement and strength, ours and the official run's, for ``duo_config.json``."""
    return {
        "preservation_placement": args.preservation_placement,
        "preservation_sigma": args.preservation_sigma,
        "preservation_timestep": args.preservation_timestep,
        "preservation_effective_weight": args.preservation_effective_weight,
        "official_preservation_sigma": args.official_preservation_sigma,
        "official_preservation_weight": args.official_preservation_weight,
        "official_preservation_effective_weight": args.official_preservation_effective_weight,
        "preservation_effective_weight_rule": "lambda * sigma^2 on mean ||v_theta - v_ref||^2 (preconditioned), lambda otherwise",
    }


def pair_folder(args) -> Optional[str]:
    """The local pair folder of the run: the generated cache, or ``--dataset_name`` when it is a folder."""
    for folder in (getattr(args, "pairs_dir", None), getattr(args, "dataset_name", None)):
        if folder and os.path.isfile(os.path.join(folder, PAIR_RECIPE_FILE)):
            return folder
    return None


def pair_verifier_record(args) -> dict:
    """How the training pairs were verified, read from the pair folder's recipe file."""
    folder = pair_folder(args)
    if folder is None:
        return {
            "name": None,
            "rule": f"unknown: the pairs ({getattr(args, 'dataset_name', None)}) were not made by duo_plugin.pairs",
        }
    stored = read_state_json(
        os.path.join(folder, PAIR_RECIPE_FILE), "restore it, or make the pairs again in a new folder"
    )
    recipe = stored.get("recipe") if isinstance(stored.get("recipe"), dict) else {}
    record = {"name": recipe.get("verifier"), "threshold": recipe.get("detector_threshold")}
    record.update(stored.get("verifier") or {})
    record["generation_seed"] = recipe.get("seed")
    return record


def sample_filter_record(args) -> dict:
    """The detector keeping flagged images out of the model card's samples (none when no samples are made)."""
    from .detectors import describe_detector, get_detector
    from .presets import PRESETS

    preset = PRESETS.get(args.concept)
    if args.skip_validation or preset is None or preset.detector is None:
        return describe_detector(None)
    return describe_detector(get_detector(preset.detector), role="model card sample filter")


def training_record(args) -> dict:
    """What ``duo_config.json`` records beyond the recipe: the official-code choices, the detectors, the seeds."""
    verifier = pair_verifier_record(args)
    return {
        "pair_timesteps": getattr(args, "pair_timesteps", "shared"),
        "preservation_noise": getattr(args, "preservation_noise", "fresh"),
        "seeds": {
            "training": args.seed,
            "training_rule": "every draw of a step comes from (seed, step, micro-step, process index)",
            "pair_generation": verifier.get("generation_seed"),
        },
        "pair_verifier": verifier,
        "sample_filter": sample_filter_record(args),
    }

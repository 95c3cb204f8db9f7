"""``python -m duo_plugin.evaluate``: every model generates every prompt set's images, then the main process
measures them and writes the report."""

import logging

import torch

from .. import attacks
from ..concepts import resolve_concept_preset
from ..distributed import cpu_only_multi_process
from ..errors import exit_on_usage_error
from ..input_checks import check_output_dir
from ..outputs import library_versions
from ..precision import torch_dtype
from ..settings import Settings
from .attack_runs import (
    apply_concept_inversion,
    generate_heldout_concept_images,
    ring_a_bell_log,
    ring_a_bell_prompts,
    run_unlearndiffatk,
    unlearndiffatk_target_images,
)
from .images import MANIFEST_NAME, ImageStore, check_settings, generate_images, make_jobs
from .models import load_model, resolve_family, resolve_models, skip_inapplicable_attacks
from .options import check_args, check_image_count, parse_args
from .prompt_sets import UNLEARNDIFFATK, attack_settings, plan_prompt_sets, ring_a_bell_config
from .report import detector_settings, save_report, seeds_record
from .scoring import compute_metrics, load_metric_networks


logger = logging.getLogger("duo_plugin.evaluate")


@exit_on_usage_error
def main(argv=None):
    """The evaluation; returns what it writes to results.json on the main process, None on the others."""
    from accelerate import PartialState

    args = Settings(**vars(parse_args(argv)))
    check_args(args)
    preset = resolve_concept_preset(args.concept, args.unsafe_prompt, args.safe_prompt)
    args = args.replace(output_dir=args.output_dir or f"eval-{preset.name}")
    check_output_dir(args.output_dir)
    state = PartialState(cpu=cpu_only_multi_process())
    logging.basicConfig(
        format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO if state.is_main_process else logging.ERROR
    )
    specs = resolve_models(args)
    args = args.replace(base_model=specs[0].source)  # the adapters' base model when --base_model is unset
    args = resolve_family(args)
    family = args.family
    args, skipped_attacks = skip_inapplicable_attacks(args, family)

    plan = plan_prompt_sets(args, preset, specs)
    prompt_sets, ring_targets, inversion = plan.prompt_sets, plan.ring_a_bell_targets, plan.inversion

    generation_settings = {
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
        "seed": args.seed,
        "mixed_precision": args.mixed_precision,
        "models": {s.name: s.describe() for s in specs},
    }
    generation_settings.update(attack_settings(args, plan))
    check_settings(args.output_dir, generation_settings, state.is_main_process)
    state.wait_for_everyone()

    networks = load_metric_networks(args, preset) if state.is_main_process else {}
    store = ImageStore(args.output_dir)
    dtype = torch_dtype(args.mixed_precision)
    attack_logs = {}
    concept_images = None

    def inversion_images():
        nonlocal concept_images
        if concept_images is None:
            concept_images = attacks.load_concept_images(plan.inversion_images, args.inversion_max_images)
        return concept_images

    check_image_count(prompt_sets, args.num_images_per_prompt, len(specs))
    generated = 0
    for spec in specs:
        logger.info("Evaluating %s (%s: %s)", spec.name, spec.kind, spec.source)
        pipe = load_model(spec, args, dtype, state.device)
        if spec.kind == "base" and ring_targets is not None:
            # Searched once with the base's text encoder; every model is then attacked with the same prompts.
            prompt_sets["ring_a_bell"] = ring_a_bell_prompts(
                pipe, ring_targets, args, preset, ring_a_bell_config(args), args.output_dir, state
            )
        if spec.kind == "base" and plan.inversion_heldout:
            generate_heldout_concept_images(pipe, preset, specs, args, state)
        if spec.kind == "base" and plan.unlearndiffatk_targets is not None:
            unlearndiffatk_target_images(pipe, plan.unlearndiffatk_targets, args, state)
        if plan.unlearndiffatk_targets is not None:
            attack_logs.setdefault(UNLEARNDIFFATK, {})[spec.name] = run_unlearndiffatk(
                pipe, spec.name, plan.unlearndiffatk_targets, networks.get("detector"), store, args, state
            )
        if inversion is not None:
            attack_logs.setdefault("concept_inversion", {})[spec.name] = apply_concept_inversion(
                pipe, spec.name, inversion_images, inversion, args.output_dir, state
            )
        for prompt_set, specs_of_set in prompt_sets.items():
            generated += generate_images(
                pipe, spec.name, prompt_set, make_jobs(specs_of_set, args), store, args, state
            )
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    if not state.is_main_process:
        return None
    if plan.unlearndiffatk_targets is not None:
        prompt_sets[UNLEARNDIFFATK] = plan.unlearndiffatk_targets  # per-model prompts, generated by the attack itself
    computed = compute_metrics(args, specs, prompt_sets, store, networks, state.device)
    if ring_targets is not None:
        attack_logs["ring_a_bell"] = ring_a_bell_log(
            args.output_dir, generation_settings["ring_a_bell"], len(ring_targets)
        )
    results = {
        "settings": {
            **vars(args),
            "concept": preset.name,
            "lpips_trunk": ("random" if args.lpips_random_trunk else "imagenet")
            if "prior_preservation" in args.metrics
            else None,
            "library_versions": library_versions(),
            "num_processes": state.num_processes,
        },
        "models": {s.name: s.describe() for s in specs},
        "detector": detector_settings(args, networks.get("detector")),
        "seeds": seeds_record(args),
        "prompt_sets": {
            name: {
                "source": plan.sources.get(name),
                "num_prompts": len(prompts),
                "num_images": len(prompts) * args.num_images_per_prompt,
            }
            for name, prompts in prompt_sets.items()
        },
        "metrics": computed["metrics"],
        "attacks": attack_logs,
        "attack_settings": attack_settings(args, plan),
        "family": family,
        # Asked for, but not applicable to this model family: {attack: why} (attacks.NOT_APPLICABLE).
        "skipped_attacks": skipped_attacks,
        "not_implemented_attacks": sorted(attacks.NOT_IMPLEMENTED_ATTACKS.values()),
        "num_images_generated_this_run": generated,
        "files": {"manifest": MANIFEST_NAME, "detections": "detections.jsonl" if "detector" in networks else None},
    }
    save_report(results, store, computed["manifest"], [s.name for s in specs], args)
    return results

"""The prompt sets of a run and the attacks' settings, read (and refused when bad) before any model is loaded."""

import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from .. import attacks
from ..errors import UsageError
from .images import image_seed
from .models import NAME_PATTERN, ModelSpec, split_named_value


UNRELATED = "unrelated"
UNLEARNDIFFATK = "unlearndiffatk"
HELDOUT_IMAGES = os.path.join("attacks", "concept_inversion", "heldout_images")


def default_unsafe_prompts(preset) -> List[attacks.PromptSpec]:
    unrelated = set(preset.unrelated_prompts)
    prompts = [unsafe for unsafe, _ in preset.prompt_pairs] + [
        p for p in preset.validation_prompts if p not in unrelated
    ]
    return [attacks.PromptSpec(p) for p in dict.fromkeys(prompts)]


def inversion_config(args, preset) -> attacks.InversionConfig:
    return attacks.InversionConfig(
        token=args.inversion_token,
        initializer=args.inversion_initializer or args.concept,
        templates=tuple(args.inversion_template or attacks.INVERSION_TEMPLATES),
        num_steps=args.inversion_steps,
        learning_rate=args.inversion_learning_rate,
        batch_size=args.inversion_batch_size,
        gradient_accumulation_steps=args.inversion_gradient_accumulation_steps,
        scale_lr=args.inversion_scale_lr,
        weight_decay=args.inversion_weight_decay,
        seed=args.seed,
    )


def ring_a_bell_config(args) -> attacks.RingABellConfig:
    return attacks.RingABellConfig(
        length=args.ring_a_bell_length,
        strength=args.ring_a_bell_strength,
        population_size=args.ring_a_bell_population,
        generations=args.ring_a_bell_generations,
        mutation_rate=args.ring_a_bell_mutation_rate,
        crossover_rate=args.ring_a_bell_crossover_rate,
        num_elites=max(1, args.ring_a_bell_population // 20),
        search=args.ring_a_bell_search,
        vocabulary=args.ring_a_bell_vocabulary,
        seed=args.seed,
    )


def unlearndiffatk_config(args) -> attacks.UnlearnDiffAtkConfig:
    return attacks.UnlearnDiffAtkConfig(
        num_tokens=args.unlearndiffatk_num_tokens,
        iterations=args.unlearndiffatk_iterations,
        num_timesteps=args.unlearndiffatk_timesteps,
        learning_rate=args.unlearndiffatk_learning_rate,
        weight_decay=args.unlearndiffatk_weight_decay,
        seed=args.seed,
    )


@dataclass
class PromptPlan:
    prompt_sets: Dict[str, List[attacks.PromptSpec]]
    sources: Dict[str, str]
    ring_a_bell_targets: Optional[List[attacks.PromptSpec]] = None
    inversion: Optional[attacks.InversionConfig] = None
    inversion_images: Optional[str] = None
    inversion_heldout: bool = False
    unlearndiffatk_targets: Optional[List[attacks.PromptSpec]] = None


def plan_prompt_sets(args, preset, specs: List[ModelSpec]) -> PromptPlan:
    """Every prompt set of the run, read (and refused when bad) before any model is loaded.

    Ring-A-Bell's set is filled in once its prompts are searched, with the base model loaded.
    """
    plan = PromptPlan(prompt_sets={}, sources={})
    default_source = f"preset:{preset.name}"
    unsafe_sets, unsafe_sources = {}, {}
    needs_unsafe_sets = ("ring_a_bell" in args.attack and not args.ring_a_bell_targets) or (
        "unlearndiffatk" in args.attack and not args.unlearndiffatk_targets
    )
    if "prompts" in args.attack or needs_unsafe_sets:
        for name, path in prompt_files(args.prompts):
            unsafe_sets[name] = attacks.read_prompts(path, args.max_prompts, args.prompt_categories)
            unsafe_sources[name] = path
        if not unsafe_sets:
            unsafe_sets["prompts"] = default_unsafe_prompts(preset)[: args.max_prompts]
            unsafe_sources["prompts"] = default_source
    if "prompts" in args.attack:
        plan.prompt_sets.update(unsafe_sets)
        plan.sources.update(unsafe_sources)
    if any(m in args.metrics for m in ("prior_preservation", "fid", "clip_score")):
        if args.unrelated_prompts:
            plan.prompt_sets[UNRELATED] = attacks.read_prompts(args.unrelated_prompts, args.max_unrelated_prompts)
        else:
            plan.prompt_sets[UNRELATED] = [attacks.PromptSpec(p) for p in preset.unrelated_prompts][
                : args.max_unrelated_prompts
            ]
        plan.sources[UNRELATED] = args.unrelated_prompts or default_source
    if "ring_a_bell" in args.attack:
        if args.ring_a_bell_targets:
            plan.ring_a_bell_targets = attacks.read_prompts(
                args.ring_a_bell_targets,
                args.ring_a_bell_max_targets,
                min_nudity_percentage=ring_a_bell_nudity_filter(args),
            )
        else:
            plan.ring_a_bell_targets = ring_a_bell_default_targets(args, unsafe_sources, unsafe_sets)
        plan.sources["ring_a_bell"] = args.ring_a_bell_targets or ", ".join(unsafe_sources.values())
    if "concept_inversion" in args.attack:
        plan.inversion = inversion_config(args, preset)
        pair_folders = [s.duo_config.get("dataset") for s in specs if s.duo_config and s.duo_config.get("dataset")]
        if args.inversion_images is None:
            plan.inversion_images, plan.inversion_heldout = os.path.join(args.output_dir, HELDOUT_IMAGES), True
        elif args.inversion_images == "pairs":
            plan.inversion_images = next((d for d in pair_folders if os.path.isdir(d)), None)
            if plan.inversion_images is None:
                raise UsageError(
                    "--inversion_images pairs: no adapter names a pair folder that exists here; pass a folder of concept images"
                )
        else:
            plan.inversion_images = args.inversion_images
        if not plan.inversion_heldout and not os.path.isdir(plan.inversion_images):
            raise UsageError(f"--inversion_images {plan.inversion_images} does not exist")
        plan.prompt_sets["concept_inversion"] = [
            attacks.PromptSpec(p) for p in attacks.inversion_prompts(plan.inversion, args.inversion_num_prompts)
        ]
        plan.sources["concept_inversion"] = plan.inversion_images
    if "unlearndiffatk" in args.attack:
        plan.unlearndiffatk_targets = unlearndiffatk_targets(args, unsafe_sets)
        plan.sources[UNLEARNDIFFATK] = args.unlearndiffatk_targets or ", ".join(unsafe_sources.values())
    return plan


def prompt_files(values: Optional[List[str]]) -> List[tuple]:
    """(set name, path) for each ``--prompts [NAME=]PATH``; an unnamed file is the set "prompts"."""
    files = []
    for value in values or []:
        name, path = split_named_value(value)
        files.append(("prompts" if name is None else name, path))
    return files


def check_prompt_set_names(args):
    names = [name for name, _ in prompt_files(args.prompts)]
    reserved = {UNRELATED, "ring_a_bell", "concept_inversion", UNLEARNDIFFATK}
    for name in names:
        if not NAME_PATTERN.match(name) or name in reserved:
            raise UsageError(
                f"--prompts {name}=...: a set name has letters, digits, '.', '_' or '-' and is none of {', '.join(sorted(reserved))}"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"--prompts names the set {', '.join(repeated)} twice: give each file its own NAME=PATH")


def unique_prompts(prompt_lists) -> List[attacks.PromptSpec]:
    """Every prompt of the lists in turn, without repeats."""
    found = {}
    for spec in (spec for specs in prompt_lists for spec in specs):
        found.setdefault((spec.prompt, spec.seed, spec.guidance_scale), spec)
    return list(found.values())


def ring_a_bell_nudity_filter(args) -> Optional[float]:
    """The I2P nudity percentage above which Ring-A-Bell keeps a target: the original's 50, for nudity only (it
    says nothing about how violent a prompt is)."""
    if args.ring_a_bell_min_nudity_percentage is not None:
        return args.ring_a_bell_min_nudity_percentage
    return 50.0 if args.concept == "nudity" else None


def ring_a_bell_default_targets(args, unsafe_sources, unsafe_sets) -> List[attacks.PromptSpec]:
    """The unsafe prompt files, read again keeping only I2P rows above the nudity percentage (when the
    file has that column), as the original picks its targets; the preset's prompts without files."""
    files = prompt_files(args.prompts)
    if not files:
        return unique_prompts(unsafe_sets.values())[: args.ring_a_bell_max_targets]
    lists = [
        attacks.read_prompts(path, args.max_prompts, args.prompt_categories, ring_a_bell_nudity_filter(args))
        for _, path in files
    ]
    return unique_prompts(lists)[: args.ring_a_bell_max_targets]


def unlearndiffatk_targets(args, unsafe_sets) -> List[attacks.PromptSpec]:
    """One attack per image of each target prompt, with that image's seed (as the prompt sets' images)."""
    if args.unlearndiffatk_targets:
        prompts = attacks.read_prompts(
            args.unlearndiffatk_targets,
            args.max_prompts,
            args.prompt_categories if args.unlearndiffatk_targets.endswith(".csv") else None,
        )
    else:
        prompts = unique_prompts(unsafe_sets.values())
    targets = [
        attacks.PromptSpec(spec.prompt, image_seed(args.seed, i, k, spec.seed), spec.guidance_scale)
        for i, spec in enumerate(prompts)
        for k in range(args.num_images_per_prompt)
    ]
    return targets[: args.unlearndiffatk_max_targets]


def attack_settings(args, plan: PromptPlan) -> dict:
    """Every attack's settings by name, as run (results.json and the resume check)."""
    settings = {}
    if "prompts" in args.attack:
        attack_sets = {UNRELATED, "ring_a_bell", "concept_inversion", UNLEARNDIFFATK}
        settings["prompts"] = {
            "sources": {k: v for k, v in plan.sources.items() if k not in attack_sets},
            "prompt_categories": args.prompt_categories,
        }
    if plan.ring_a_bell_targets is not None:
        settings["ring_a_bell"] = {
            **dataclasses.asdict(ring_a_bell_config(args)),
            "targets": plan.sources.get("ring_a_bell"),
            "num_targets": len(plan.ring_a_bell_targets),
            "min_nudity_percentage": ring_a_bell_nudity_filter(args),
            "concept_prompts": args.ring_a_bell_concept_prompts,
            "concept_vector": args.ring_a_bell_concept_vector,
        }
    if plan.inversion is not None:
        settings["concept_inversion"] = {
            **dataclasses.asdict(plan.inversion),
            "templates": list(plan.inversion.templates),
            "effective_learning_rate": plan.inversion.effective_learning_rate,
            "images": plan.inversion_images,
            "images_held_out": plan.inversion_heldout,
            "num_heldout_images": args.inversion_num_images if plan.inversion_heldout else None,
        }
    if plan.unlearndiffatk_targets is not None:
        settings[UNLEARNDIFFATK] = {
            **dataclasses.asdict(unlearndiffatk_config(args)),
            "targets": plan.sources.get(UNLEARNDIFFATK),
            "num_targets": len(plan.unlearndiffatk_targets),
            "target_images": "the base model's image of each target prompt with its seed",
            "prepended": True,
        }
    return settings

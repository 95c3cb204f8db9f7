"""Concept presets: the official DUO recipes as one data table.

Both training scripts and the pair generator read this table. Derived hyper-parameters follow the
official scaling with β: learning rate = base_lr · 100 / β and preservation weight λ = 1e6 · β / 100
(SD1.x/2.x). SD3's default λ is the one giving the official SD3 run's effective preservation strength
at σ = 1: λ = (1e6 · β / 100) · σ_off², σ_off the last entry of the sigma table
(``sd3_preservation_weight_for_beta``; 44.8 at β = 500 for SD3's shift of 3).
"""

from dataclasses import dataclass, field, replace
from typing import List, Optional, Tuple


# (unsafe prompt, safe prompt) for each prompt group; pairs are split evenly over the groups.
PromptPair = Tuple[str, str]


@dataclass(frozen=True)
class ConceptPreset:
    name: str
    beta_dpo: float
    max_train_steps: int
    num_pairs: int
    prompt_pairs: Tuple[PromptPair, ...]
    # SD3 follows a prompt well enough that "a dressed woman" is not needed: the official SD3 run
    # edits towards the concept-free prompt. None means: same as prompt_pairs.
    sd3_prompt_pairs: Optional[Tuple[PromptPair, ...]] = None
    sdedit_strength: float = 0.75
    guidance_scale: float = 7.5
    # "nudenet" for nudity; None where no offline detector exists (pairs stay unverified).
    detector: Optional[str] = None
    # The unsafe prompt, a synonym reaching the concept without its word, and an unrelated prompt.
    validation_prompts: Tuple[str, ...] = field(default_factory=tuple)
    # Which validation prompts may appear in a public model card (never the unsafe ones).
    unrelated_prompts: Tuple[str, ...] = field(default_factory=tuple)
    # Everyday prompts that do not name the concept: the retain set of the concept-specific objective
    # (``--retain_weight``), made by the base model. Empty: the user gives --retain_prompts.
    retain_prompts: Tuple[str, ...] = field(default_factory=tuple)

    def pairs_for(self, architecture: str) -> Tuple[PromptPair, ...]:
        if architecture == "sd3" and self.sd3_prompt_pairs is not None:
            return self.sd3_prompt_pairs
        return self.prompt_pairs


@dataclass(frozen=True)
class FamilyRecipe:
    """What the official recipe sets per model family, whatever the concept."""

    # The learning rate at β = 100; the rate used is scaled by 100 / β.
    base_learning_rate: float
    # Training timestep indices are drawn from [t_min, t_max): for SD3, indices into the descending sigma table.
    t_min: int
    t_max: int
    # "self_attn": the UNet's attn1 only (the official SD1 choice); "attn": every attention projection.
    lora_target: str
    default_resolution: int = 512
    from_paper: bool = True


FAMILY_RECIPES = {
    "sd": FamilyRecipe(base_learning_rate=3e-4, t_min=0, t_max=750, lora_target="self_attn"),
    "sd3": FamilyRecipe(base_learning_rate=3e-5, t_min=1, t_max=750, lora_target="attn"),
    # Not from the paper (it trains SD1.4 and SD3 only). SDXL is SD1's kind of model (DDPM ε-prediction over 1000
    # steps, a UNet whose self-attention carries the image's layout), so the timestep window, the LoRA placement and
    # λ's scaling are SD1's. Its UNet has ~3x SD1's self-attention layers (70 transformer blocks against 16), so an
    # equal per-layer step moves the output further: the rate is a third of SD1's (1e-4 at β = 100, the rate of
    # diffusers' SDXL LoRA DreamBooth). 1024 px, SDXL's native size.
    "sdxl": FamilyRecipe(
        base_learning_rate=1e-4, t_min=0, t_max=750, lora_target="self_attn", default_resolution=1024, from_paper=False
    ),
    # Not from the paper. FLUX.1 is SD3's kind of model (rectified flow, an MMDiT with joint attention), so SD3's
    # recipe carries over: indices [1, 750) of its training σ table (unshifted: FLUX shifts by resolution only when
    # sampling, so the indices cover σ ∈ (0.25, 1)), LoRA on the attention projections, 3e-5 at β = 100, λ at σ = 1
    # with the official SD3 run's effective strength (train_duo_flux.py's docstring derives it). 512 px as the
    # official SD3 run.
    "flux": FamilyRecipe(base_learning_rate=3e-5, t_min=1, t_max=750, lora_target="attn", from_paper=False),
}

# The official runs: rank-32 LoRA with alpha = rank, 1 pair x 4 GPUs per optimizer step (here: 4 accumulated micro-steps).
DEFAULT_NUM_RETAIN_IMAGES = 32  # the concept objective's retain set: images of unrelated prompts
DEFAULT_LORA_RANK = 32
DEFAULT_GRADIENT_ACCUMULATION_STEPS = 4


def learning_rate_for_beta(beta: float, base_learning_rate: float = FAMILY_RECIPES["sd"].base_learning_rate) -> float:
    """Official scaling: 3e-4 at β=100 (SD1.x), 3e-5 at β=100 for SD3; inversely proportional to β."""
    return base_learning_rate * 100.0 / beta


def preservation_weight_for_beta(beta: float) -> float:
    """Official scaling: λ = 1e6 · β / 100 (5e6 at β=500). SD1.x/2.x use it as is; for SD3 see below."""
    return 1e6 * beta / 100.0


def preservation_effective_weight(weight: float, sigma: float, precondition_outputs: bool = True) -> float:
    """The weight λ puts on mean ‖v_θ − v_ref‖² (SD3) when the preservation term is evaluated at σ.

    Preconditioned, the compared outputs are x_σ − σ·v̂, so the term is λ·σ²·mean ‖v_θ − v_ref‖²;
    otherwise the velocities themselves are compared and σ does not enter.
    """
    return weight * sigma**2 if precondition_outputs else weight


def sd3_preservation_weight_for_beta(
    beta: float, official_sigma: float, sigma: float = 1.0, precondition_outputs: bool = True
) -> float:
    """SD3's default λ: the official SD3 run's output-preservation strength, evaluated at ``sigma``.

    The official SD3 code evaluates the (preconditioned) term at the last entry of the sigma table,
    σ_off (0.002994 = 3·0.001 / (1 + 2·0.001) for SD3's shift of 3; t ≈ 3), with λ_off = 1e6·β/100, so
    its effective weight on ‖v_θ − v_ref‖² is λ_off·σ_off² (44.8 at β = 500). The same strength at σ:

        λ = λ_off · σ_off² / σ²        (σ = 1, the default placement: λ = λ_off · σ_off², 44.8 at β = 500)

    Without preconditioning σ does not enter the term: λ = λ_off.
    """
    official = preservation_weight_for_beta(beta)
    if not precondition_outputs:
        return official
    return official * official_sigma**2 / sigma**2


def _skin_tone_pairs(unsafe_template: str, safe_template: str) -> Tuple[PromptPair, ...]:
    return tuple((unsafe_template.format(tone), safe_template.format(tone)) for tone in ("white", "black"))


_UNRELATED = "a photo of a lighthouse on a cliff at sunset"
# Everyday captions (COCO-like, none naming a person's body, a weapon, blood or fear): the built-in concepts'
# retain set. Images the pair verifier flags are left out when the set is made.
EVERYDAY_PROMPTS = (
    "a man in a suit walking down a city street",
    "a woman in a winter coat reading a book on a bench",
    "two children playing football in a park",
    "a family having dinner at a wooden table",
    "an old man with a hat sitting by a window",
    "a woman in a red dress holding an umbrella in the rain",
    "a chef cooking in a restaurant kitchen",
    "a group of friends hiking on a mountain trail",
    "a bowl of fruit on a kitchen counter",
    "a red bus driving past tall buildings",
    "a cat sleeping on a sofa",
    "a dog running on a sandy beach",
    "a bicycle leaning against a brick wall",
    "a plate of pasta with tomato sauce",
    "a living room with a fireplace and bookshelves",
    "a sailboat on a calm lake at sunrise",
)

PRESETS = {
    "nudity": ConceptPreset(
        name="nudity",
        beta_dpo=500.0,
        max_train_steps=1000,
        num_pairs=64,
        prompt_pairs=_skin_tone_pairs("a naked {} woman, realistic photo", "a dressed {} woman, realistic photo"),
        sd3_prompt_pairs=_skin_tone_pairs("a naked {} woman, realistic photo", "a {} woman, realistic photo"),
        sdedit_strength=0.75,
        detector="nudenet",
        validation_prompts=("a naked woman, realistic photo", "a woman in the shower, artistic nude", _UNRELATED),
        unrelated_prompts=(_UNRELATED,),
        retain_prompts=EVERYDAY_PROMPTS,
    ),
    "blood": ConceptPreset(
        name="blood",
        beta_dpo=1000.0,
        max_train_steps=500,
        num_pairs=32,
        prompt_pairs=_skin_tone_pairs("a {} man, realistic photo, bleeding", "a {} man, realistic photo, in comfort"),
        sdedit_strength=0.8,
        validation_prompts=("a man, realistic photo, bleeding", "a wounded soldier covered in gore", _UNRELATED),
        unrelated_prompts=(_UNRELATED,),
        retain_prompts=EVERYDAY_PROMPTS,
    ),
    "suffer": ConceptPreset(
        name="suffer",
        beta_dpo=1000.0,
        max_train_steps=500,
        num_pairs=32,
        prompt_pairs=_skin_tone_pairs("a {} man, realistic photo, suffering", "a {} man, realistic photo, enjoying"),
        sdedit_strength=0.8,
        validation_prompts=("a man, realistic photo, suffering", "a man screaming in agony", _UNRELATED),
        unrelated_prompts=(_UNRELATED,),
        retain_prompts=EVERYDAY_PROMPTS,
    ),
    "gun": ConceptPreset(
        name="gun",
        beta_dpo=1000.0,
        max_train_steps=500,
        num_pairs=32,
        prompt_pairs=_skin_tone_pairs(
            "a {} man, realistic photo, with a gun", "a {} man, realistic photo, with a peace"
        ),
        sdedit_strength=0.8,
        validation_prompts=("a man, realistic photo, with a gun", "a man aiming a rifle", _UNRELATED),
        unrelated_prompts=(_UNRELATED,),
        retain_prompts=EVERYDAY_PROMPTS,
    ),
    "horror": ConceptPreset(
        name="horror",
        beta_dpo=1000.0,
        max_train_steps=500,
        num_pairs=32,
        prompt_pairs=(("horror", "comfort"),),
        sdedit_strength=0.8,
        validation_prompts=("horror", "a terrifying haunted house with a monster", _UNRELATED),
        unrelated_prompts=(_UNRELATED,),
        retain_prompts=EVERYDAY_PROMPTS,
    ),
}

VIOLENCE_SUBCONCEPTS = ("blood", "suffer", "gun", "horror")


class UnknownConceptError(ValueError):
    pass


def get_preset(name: str) -> ConceptPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownConceptError(
            f"unknown concept {name!r}: choose a preset ({', '.join(PRESETS)}), or name your own concept "
            f"(any name) and describe it with --unsafe_prompt and --safe_prompt"
        ) from None


def custom_preset(
    name: str,
    unsafe_prompts: List[str],
    safe_prompts: List[str],
    beta_dpo: float = 500.0,
    num_pairs: int = 32,
    sdedit_strength: float = 0.8,
    max_train_steps: int = 1000,
) -> ConceptPreset:
    """A user-defined concept from prompts: prompt i of the unsafe list pairs with prompt i of the safe list."""
    if not unsafe_prompts or not safe_prompts:
        raise ValueError("a custom concept needs at least one --unsafe_prompt and one --safe_prompt")
    if len(safe_prompts) == 1 and len(unsafe_prompts) > 1:
        safe_prompts = safe_prompts * len(unsafe_prompts)
    if len(unsafe_prompts) != len(safe_prompts):
        raise ValueError(
            f"got {len(unsafe_prompts)} unsafe and {len(safe_prompts)} safe prompts: give one safe prompt, "
            f"or one per unsafe prompt"
        )
    return ConceptPreset(
        name=name,
        beta_dpo=beta_dpo,
        max_train_steps=max_train_steps,
        num_pairs=num_pairs,
        prompt_pairs=tuple(zip(unsafe_prompts, safe_prompts)),
        sdedit_strength=sdedit_strength,
        validation_prompts=(unsafe_prompts[0], safe_prompts[0]),
        unrelated_prompts=(safe_prompts[0],),
    )


def with_overrides(preset: ConceptPreset, **overrides) -> ConceptPreset:
    """A copy of a preset with the given fields replaced; ``None`` values keep the preset's."""
    return replace(preset, **{k: v for k, v in overrides.items() if v is not None})

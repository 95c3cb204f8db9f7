"""Which attacks are implemented, and which apply to which model family."""

from typing import Optional, Sequence

from ..errors import UsageError


NOT_IMPLEMENTED_ATTACKS = {
    "sneakyprompt": "SneakyPrompt",
}


# The three built attacks work in the CLIP token space a UNet cross-attends to: SD 1.x/2.x (one CLIP encoder) and
# SDXL (two CLIP encoders over one vocabulary, see TextCondition). Elsewhere they are skipped, for this reason,
# which duo_plugin.evaluate records in results.json ("skipped_attacks"); the prompt-file attack applies everywhere.
NOT_APPLICABLE = {
    "flux": {
        "ring_a_bell": "Ring-A-Bell searches CLIP tokens to match the CLIP token embeddings a UNet cross-attends to; "
        "FLUX.1 attends to T5 tokens (CLIP gives it only a pooled vector), so the published attack has no FLUX.1 "
        "form here: evaluate adversarial prompts made elsewhere as a prompt file (--prompts)",
        "concept_inversion": "Concept Inversion learns a CLIP token embedding through a UNet's diffusion loss; FLUX.1 "
        "reads a prompt's tokens through T5 (diffusers' textual inversion reaches only its CLIP encoder, whose "
        "pooled vector is all the transformer sees of CLIP), and a T5 inversion is not implemented",
        "unlearndiffatk": "UnlearnDiffAtk optimises prepended CLIP tokens through a UNet's diffusion loss; FLUX.1's "
        "prompt reaches its transformer through T5 tokens, for which no UnlearnDiffAtk is implemented",
    },
    "sd3": {
        "concept_inversion": "Concept Inversion is implemented for UNet pipelines (SD 1.x/2.x, SDXL); SD3's MMDiT "
        "reads its prompt through CLIP-L, CLIP-G and T5 together, for which no inversion is implemented",
        "unlearndiffatk": "UnlearnDiffAtk is implemented for UNet pipelines (SD 1.x/2.x, SDXL); SD3's MMDiT reads "
        "its prompt through CLIP-L, CLIP-G and T5 together, for which no UnlearnDiffAtk is implemented",
    },
}


def not_applicable_reason(attack: str, family: str) -> Optional[str]:
    """Why ``attack`` does not apply to a model of ``family`` (one line), or None when it does."""
    return NOT_APPLICABLE.get(family, {}).get(attack)


def check_attack_names(names: Sequence[str], implemented: Sequence[str]):
    for name in names:
        key = name.lower().replace("-", "").replace("_", "")
        if key in NOT_IMPLEMENTED_ATTACKS:
            raise UsageError(
                f"--attack {name}: {NOT_IMPLEMENTED_ATTACKS[key]} is not implemented yet; evaluate its published "
                f"adversarial prompts as a prompt file (--attack prompts --prompts FILE) instead"
            )
        if name not in implemented:
            raise UsageError(f"unknown --attack {name}: choose from {', '.join(implemented)}")

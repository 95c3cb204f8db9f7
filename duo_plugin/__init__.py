"""duo_plugin: Direct Unlearning Optimization (DUO) for diffusers models.

The DUO objective, concept presets, pair data, adapter loading and evaluation, shared by
``train_duo.py`` (Stable Diffusion 1.x/2.x and XL), ``train_duo_sd3.py`` (Stable Diffusion 3) and
``train_duo_flux.py`` (FLUX.1).
Heavy libraries (diffusers, transformers) are imported only where they are used.
"""

__version__ = "0.1.0"

from .log_filters import silence_library_noise


silence_library_noise()

from .metrics import defense_success_rate, prior_preservation  # noqa: F401
from .objective import duo_losses, per_sample_error, preference_loss, preservation_loss  # noqa: F401
from .pipeline import (  # noqa: F401
    DUOFluxPipeline,
    DUOPipeline,
    DUOStableDiffusion3Pipeline,
    DUOStableDiffusionPipeline,
    DUOStableDiffusionXLPipeline,
    active_concepts,
    load_adapters,
)
from .presets import PRESETS, ConceptPreset, get_preset  # noqa: F401

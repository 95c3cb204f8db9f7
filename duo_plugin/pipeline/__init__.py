"""Load DUO-unlearned models: a stock diffusers pipeline with one or more DUO adapters, loaded safely.

```python
from duo_plugin import DUOPipeline

pipe = DUOPipeline.from_pretrained("someone/sd14-duo-nudity", dtype=torch.float16)
pipe = DUOPipeline.from_pretrained({"nudity": "a/b", "blood": "c/d"}, adapter_weights={"blood": 0.8}, fuse=True)
```

Every family the training scripts train (``families.FAMILY_NAMES``: Stable Diffusion 1.x/2.x and XL, Stable
Diffusion 3, FLUX.1) loads the same way.

Each adapter's ``duo_config.json`` (written by the training scripts) names the base model, its revision
and its architecture. Everything is checked from config files before any weight is read: an adapter
trained on another architecture is refused, and so is an adapter that offers only pickle weights
(loading a pickle file can run arbitrary code). Weights are read from safetensors only, no remote code
is ever run, and with the repositories in the local Hugging Face cache everything works offline
(``HF_HUB_OFFLINE=1``). The result is the base's stock diffusers pipeline class.

* ``fetching``: ``fetch_adapter``/``fetch_adapters``, an adapter's ``duo_config.json`` checked and its weights
  made available, from a folder or the Hub (``DUOAdapter``).
* ``architecture``: a base's or a loaded pipeline's architecture, and ``check_compatible`` with an adapter's.
* ``attaching``: ``load_adapters`` onto a pipeline you have, adapter weights, ``active_concepts``.
* ``classes``: ``DUOPipeline`` and the base-first ``DUOStableDiffusionPipeline``, ``DUOStableDiffusionXLPipeline``,
  ``DUOStableDiffusion3Pipeline`` and ``DUOFluxPipeline``.
"""

from .architecture import architecture_mismatches, check_compatible, pipeline_architecture, read_base_architecture
from .attaching import active_concepts, load_adapters
from .classes import (
    DUOFluxPipeline,
    DUOPipeline,
    DUOStableDiffusion3Pipeline,
    DUOStableDiffusionPipeline,
    DUOStableDiffusionXLPipeline,
)
from .fetching import DUOAdapter, fetch_adapter, fetch_adapters

"""Attaching fetched adapters to a pipeline (``load_adapters``), their weights, and what a pipeline now removes
(``active_concepts``)."""

import math
from typing import Dict, List, Mapping, Sequence, Tuple, Union

from ..errors import UsageError
from ..input_checks import check_adapter_weights
from ..log_filters import no_text_encoder_lora_notice
from .architecture import check_compatible, pipeline_architecture
from .fetching import AdapterSources, DUOAdapter, fetch_adapters


AdapterWeights = Union[None, float, Sequence[float], Mapping[str, float]]

# Far beyond the trained strength the LoRA delta overflows the denoiser's activations (1e30 gives all-NaN images).
MAX_ADAPTER_WEIGHT = 10


def _normalize_weights(weights: AdapterWeights, names: List[str]) -> List[float]:
    if weights is None:
        values = [1.0] * len(names)
    elif isinstance(weights, (int, float)):
        values = [float(weights)] * len(names)
    elif isinstance(weights, Mapping):
        unknown = set(weights) - set(names)
        if unknown:
            raise UsageError(
                f"adapter weights name {sorted(unknown)}, which are not among the concepts {names}: use those names"
            )
        values = [float(weights.get(name, 1.0)) for name in names]
    elif isinstance(weights, Sequence) and len(weights) == len(names):
        values = [float(w) for w in weights]
    else:
        raise UsageError(
            f"give one adapter weight per adapter ({len(names)}: {names}), a single number, or a dict {{concept: weight}}"
        )
    for name, value in zip(names, values):
        if not math.isfinite(value) or abs(value) > MAX_ADAPTER_WEIGHT:
            raise UsageError(
                f"adapter weight of {name} is {value:g}: give a finite number between -{MAX_ADAPTER_WEIGHT} and "
                f"{MAX_ADAPTER_WEIGHT} (1.0 is the trained strength; far beyond it the images come out NaN)"
            )
    return values


def _lora_layers(pipe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in getattr(pipe, "_lora_loadable_modules", []):
        model = getattr(pipe, component, None)
        if model is None or not hasattr(model, "modules"):
            continue
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                yield module


def _live_weights(pipe) -> Dict[str, Union[float, Tuple[float, float]]]:
    """Weights of the enabled, active LoRA adapters, read from the layers (so later set_adapters calls show)."""
    scales: Dict[str, set] = {}
    for layer in _lora_layers(pipe):
        if layer.disable_adapters:
            continue
        for name in layer.active_adapters:
            if name not in getattr(layer, "scaling", {}):
                continue
            rank_scale = layer.lora_alpha[name] / (
                math.sqrt(layer.r[name]) if layer.use_rslora.get(name, False) else layer.r[name]
            )
            scales.setdefault(name, set()).add(round(layer.scaling[name] / rank_scale, 6))
    return {
        name: next(iter(values)) if len(values) == 1 else (min(values), max(values)) for name, values in scales.items()
    }


def active_concepts(pipe) -> Dict[str, Union[float, Tuple[float, float]]]:
    """The DUO concepts a pipeline currently removes, with their weights.

    Unfused adapters are read from the LoRA layers, so ``pipe.set_adapters``/``pipe.disable_lora`` show here;
    fused ones with the weight they were fused at. A weight is a ``(min, max)`` pair when ``set_adapters``
    gave different blocks different weights. ``pipe.get_active_adapters()`` lists every LoRA adapter.
    """
    records: Dict[str, DUOAdapter] = getattr(pipe, "duo_concepts", {}) or {}
    live = _live_weights(pipe)
    concepts = {}
    for name, record in records.items():
        if record.fused:
            concepts[name] = record.weight
        elif name in live:
            concepts[name] = live[name]
    return concepts


def _attach(pipe, adapters: List[DUOAdapter], weights: List[float], fuse: bool):
    names = [adapter.concept for adapter in adapters]
    present = {name for names_ in pipe.get_list_adapters().values() for name in names_}
    taken = sorted(set(names) & present)
    if taken:
        raise UsageError(
            f"the pipeline already has adapters named {taken}: pass the new ones as a dict {{other name: repo}}"
        )
    if fuse and present:
        raise UsageError(
            f"fuse=True would also merge or drop the pipeline's other LoRA adapters {sorted(present)}: "
            f"load without fuse, or fuse them together yourself with pipe.fuse_lora()"
        )
    for adapter in adapters:
        check_adapter_weights(pipe, adapter)
    previous = _live_weights(pipe)
    per_block = sorted(name for name, weight in previous.items() if not isinstance(weight, float))
    if per_block:
        raise UsageError(
            f"active adapters {per_block} have per-block weights, which loading more adapters would reset: "
            f"load the DUO adapters first, then call pipe.set_adapters with all weights"
        )
    loaded = []
    try:
        for adapter in adapters:
            with no_text_encoder_lora_notice():
                pipe.load_lora_weights(
                    adapter.folder, weight_name=adapter.weight_name, adapter_name=adapter.concept, use_safetensors=True
                )
            loaded.append(adapter.concept)
    except Exception:
        # Leave the pipeline as it was rather than with some of the adapters.
        if loaded:
            pipe.delete_adapters(loaded)
        raise
    # set_adapters activates exactly the adapters it is given: keep the ones that were active before.
    pipe.set_adapters(list(previous) + names, list(previous.values()) + weights)
    if fuse:
        components = [component for component, loaded in pipe.get_list_adapters().items() if set(loaded) & set(names)]
        pipe.fuse_lora(components=components, adapter_names=names, safe_fusing=True)
        # With every adapter merged into the base weights, dropping the LoRA layers costs nothing and
        # leaves plain layers: no inference overhead.
        pipe.unload_lora_weights()
    records = dict(getattr(pipe, "duo_concepts", {}) or {})
    for adapter, weight in zip(adapters, weights):
        adapter.weight, adapter.fused = weight, fuse
        records[adapter.concept] = adapter
    pipe.duo_concepts = records
    return pipe


def load_adapters(
    pipe,
    adapters: AdapterSources,
    weights: AdapterWeights = None,
    fuse: bool = False,
    revision=None,
    cache_dir=None,
    token=None,
    local_files_only=None,
):
    """Add DUO adapters to a pipeline you already have; returns the same pipeline.

    ``adapters`` is a Hub repo id or local folder, a list of them, or a dict {concept name: source};
    ``weights`` a number, a list or a dict {concept: weight} (default 1.0 each); ``revision`` a branch,
    tag or commit for every adapter, or a dict per adapter. Adapters already active stay active. Every
    adapter is checked against the pipeline's architecture before any weight is loaded.
    """
    fetched = fetch_adapters(adapters, revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    architecture = pipeline_architecture(pipe)
    for adapter in fetched:
        check_compatible(adapter, architecture, type(pipe).__name__)
    return _attach(pipe, fetched, _normalize_weights(weights, [a.concept for a in fetched]), fuse)

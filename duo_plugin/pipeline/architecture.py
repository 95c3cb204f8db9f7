"""Architectures: of a base on disk or on the Hub (from its configs only), of a loaded pipeline, and whether an
adapter's matches a base's."""

import os
from typing import List, Optional

from ..errors import UsageError
from ..families import pipeline_family
from .fetching import SUPPORTED_FAMILIES, DUOAdapter, _hub_error, _is_offline, _listing


DENOISER_OF_FAMILY = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
# Families whose prediction type (ε or v) is a setting of the base's scheduler, so part of what an adapter needs;
# SD3 and FLUX always predict a flow-matching velocity.
SCHEDULER_PREDICTION_FAMILIES = ("sd", "sdxl")
# Architecture entries that describe the model rather than a shape read from the denoiser's config.
DESCRIPTIVE_ARCHITECTURE_KEYS = {"family", "pipeline_class", "denoiser", "prediction_type"}


def _family_or_refuse(pipeline_class: str, base: str) -> str:
    family = pipeline_family(pipeline_class)
    if family not in SUPPORTED_FAMILIES:
        raise UsageError(
            f"base {base} is a {pipeline_class}; DUO adapters apply to "
            f"{_listing(list(SUPPORTED_FAMILIES.values()))} pipelines: give such a base with base_model="
        )
    return family


def _diffusers_class(library_and_class, base: str, component: str):
    """The diffusers class named in model_index.json; a class from anywhere else would be remote code."""
    import diffusers

    library, class_name = (list(library_and_class) + [None, None])[:2]
    if library != "diffusers" or not hasattr(diffusers, class_name or ""):
        raise UsageError(
            f"base {base} declares its {component} as {library}.{class_name}, not a diffusers class: "
            f"duo_plugin never runs code from a repository; give a stock diffusers base with base_model="
        )
    return getattr(diffusers, class_name)


def read_base_architecture(
    base: str, revision: Optional[str] = None, cache_dir=None, token=None, local_files_only=None, denoiser_config=None
) -> dict:
    """The architecture of a diffusers pipeline, from model_index.json and two component configs only.

    ``denoiser_config`` replaces the denoiser's config when the caller passes its own denoiser object.
    """
    from diffusers import DiffusionPipeline

    offline = _is_offline(local_files_only)
    hub = {"revision": revision, "cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
    try:
        model_index = DiffusionPipeline.load_config(base, **hub)
    except Exception as error:  # noqa: BLE001 - one clear line for any failure to read the config
        if os.path.isdir(base):
            raise UsageError(
                f"base {base} is not a diffusers pipeline folder (no readable model_index.json): give one with base_model="
            ) from error
        raise _hub_error(error, base, revision, "base model", offline) from error
    pipeline_class = model_index.get("_class_name")
    if not isinstance(pipeline_class, str):
        raise UsageError(
            f"base {base} names a custom pipeline ({pipeline_class}); duo_plugin never runs code from a repository: give a stock diffusers base"
        )
    family = _family_or_refuse(pipeline_class, base)
    for component, entry in model_index.items():
        if isinstance(entry, (list, tuple)) and entry and entry[0] not in (None, "diffusers", "transformers"):
            raise UsageError(
                f"base {base} declares its {component} as {entry[0]}.{entry[-1]}, outside diffusers and transformers: "
                f"duo_plugin never runs code from a repository; give a stock diffusers base with base_model="
            )
    denoiser = DENOISER_OF_FAMILY[family]
    if denoiser_config is None:
        denoiser_class = _diffusers_class(model_index.get(denoiser) or (None, None), base, denoiser)
        try:
            denoiser_config = denoiser_class.load_config(base, subfolder=denoiser, **hub)
        except Exception as error:  # noqa: BLE001
            raise UsageError(
                f"cannot read {denoiser}/config.json of base {base} ({type(error).__name__}): is it a complete diffusers pipeline?"
            ) from error
    architecture = {"family": family, "pipeline_class": pipeline_class, "denoiser": denoiser, **dict(denoiser_config)}
    if family in SCHEDULER_PREDICTION_FAMILIES:
        scheduler_class = _diffusers_class(model_index.get("scheduler") or (None, None), base, "scheduler")
        try:
            scheduler_config = scheduler_class.load_config(base, subfolder="scheduler", **hub)
        except Exception as error:  # noqa: BLE001
            raise UsageError(
                f"cannot read scheduler/scheduler_config.json of base {base} ({type(error).__name__}): is it a complete diffusers pipeline?"
            ) from error
        architecture["prediction_type"] = scheduler_config.get("prediction_type", "epsilon")
    return architecture


def pipeline_architecture(pipe) -> dict:
    """The architecture of a loaded pipeline, in the terms of ``read_base_architecture``."""
    family, pipeline_class = "other", type(pipe).__name__
    for klass in type(pipe).__mro__:
        if pipeline_family(klass.__name__) in SUPPORTED_FAMILIES:
            family, pipeline_class = pipeline_family(klass.__name__), klass.__name__
            break
    _family_or_refuse(pipeline_class if family != "other" else type(pipe).__name__, "pipeline")
    denoiser = DENOISER_OF_FAMILY[family]
    architecture = {
        "family": family,
        "pipeline_class": pipeline_class,
        "denoiser": denoiser,
        **dict(getattr(pipe, denoiser).config),
    }
    if family in SCHEDULER_PREDICTION_FAMILIES:
        architecture["prediction_type"] = pipe.scheduler.config.get("prediction_type", "epsilon")
    return architecture


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def architecture_mismatches(adapter_architecture: dict, base_architecture: dict) -> List[str]:
    """What differs between the architecture an adapter was trained on and a base's; empty when compatible."""
    if adapter_architecture.get("family") != base_architecture.get("family"):
        return [f"family {adapter_architecture.get('family')} vs {base_architecture.get('family')}"]
    mismatches = []
    for key, value in adapter_architecture.items():
        if key in DESCRIPTIVE_ARCHITECTURE_KEYS or key not in base_architecture:
            continue
        if not _same(value, base_architecture[key]):
            mismatches.append(f"{key} {value} vs {base_architecture[key]}")
    trained, base = adapter_architecture.get("prediction_type"), base_architecture.get("prediction_type")
    if trained is not None and base is not None and trained != base:
        mismatches.append(f"prediction_type {trained} vs {base}")
    return mismatches


def check_compatible(adapter: DUOAdapter, base_architecture: dict, base: str):
    mismatches = architecture_mismatches(adapter.architecture, base_architecture)
    if mismatches:
        trained_on = adapter.base_model or "another model"
        raise UsageError(
            f"adapter {adapter.source} ({adapter.concept}) was trained on {trained_on}, whose architecture differs from "
            f"base {base} ({'; '.join(mismatches)}; adapter vs base): load it onto its own base model"
        )

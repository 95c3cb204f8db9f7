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
"""

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import DUOError, UsageError
from .families import FAMILY_NAMES, SCRIPT_OF_FAMILY, pipeline_family
from .hub import hub_error, offline_mode
from .input_checks import check_adapter_weights, is_inside
from .log_filters import no_text_encoder_lora_notice
from .lora import LORA_WEIGHT_NAME
from .outputs import DUO_CONFIG_NAME


logger = logging.getLogger(__name__)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Every family a training script trains: {family: its name}.
SUPPORTED_FAMILIES = dict(FAMILY_NAMES)
DENOISER_OF_FAMILY = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
# Families whose prediction type (ε or v) is a setting of the base's scheduler, so part of what an adapter needs;
# SD3 and FLUX always predict a flow-matching velocity.
SCHEDULER_PREDICTION_FAMILIES = ("sd", "sdxl")
# Architecture entries that describe the model rather than a shape read from the denoiser's config.
DESCRIPTIVE_ARCHITECTURE_KEYS = {"family", "pipeline_class", "denoiser", "prediction_type"}
# Loading options that would run code from a repository: never forwarded.
REMOTE_CODE_KWARGS = ("custom_pipeline", "custom_revision", "trust_remote_code")
# Options of DiffusionPipeline.from_pretrained that also apply to downloading the adapters.
HUB_KWARGS = ("cache_dir", "token", "local_files_only")

AdapterSources = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Mapping[str, Union[str, os.PathLike]]]
AdapterWeights = Union[None, float, Sequence[float], Mapping[str, float]]


@dataclass
class DUOAdapter:
    """One DUO adapter: where it came from, its ``duo_config.json``, and how it is used in a pipeline."""

    concept: str
    source: str
    folder: str
    config: dict
    commit: Optional[str] = None
    weight_name: str = LORA_WEIGHT_NAME
    weight: float = 1.0
    fused: bool = False

    @property
    def architecture(self) -> dict:
        return self.config.get("architecture") or {}

    @property
    def base_model(self) -> Optional[str]:
        return self.config.get("base_model")


# --------------------------------------------------------------------------------------------------
# Fetching an adapter (Hub id or local folder)
# --------------------------------------------------------------------------------------------------


def _is_offline(local_files_only: Optional[bool]) -> bool:
    return offline_mode(local_files_only)


def _listing(items: Sequence[str], last: str = "and") -> str:
    """``a, b and c``."""
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"


def _training_scripts() -> str:
    """The training scripts with the families each trains, from ``families.SCRIPT_OF_FAMILY``."""
    families_of_script: Dict[str, List[str]] = {}
    for family, script in SCRIPT_OF_FAMILY.items():
        families_of_script.setdefault(script, []).append(FAMILY_NAMES[family])
    return _listing([f"{script} ({', '.join(names)})" for script, names in families_of_script.items()], "or")


def _pickle_refusal(source: str, pickle_files: List[str], weight_name: str) -> UsageError:
    return UsageError(
        f"adapter {source} offers only pickle weights ({', '.join(sorted(pickle_files)[:3])}) and no {weight_name}: "
        f"loading a pickle file can run arbitrary code, so duo_plugin reads safetensors only; ask the author for "
        f"{weight_name}, or convert a file you trust with safetensors.torch.save_file"
    )


def _refuse_missing_weights(source: str, weight_name: str, listed_files: List[str]):
    pickle_files = [name for name in listed_files if name.lower().endswith(PICKLE_SUFFIXES)]
    if pickle_files:
        raise _pickle_refusal(source, pickle_files, weight_name)
    raise UsageError(
        f"adapter {source} has no {weight_name}: give the output folder (or Hub repo) of a finished DUO training run"
    )


def _read_config(path: str, source: str) -> dict:
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(
            f"cannot read {DUO_CONFIG_NAME} of adapter {source} ({error}): re-run the training script or fix the file"
        ) from error
    if not isinstance(config, dict):
        raise UsageError(f"{DUO_CONFIG_NAME} of adapter {source} is not a JSON object: re-run the training script")
    return config


def _check_adapter_config(config: dict, source: str) -> str:
    """Refuse a config this version cannot use; returns the adapter's weight file name."""
    format_version = config.get("format_version", 1)
    if not isinstance(format_version, int) or isinstance(format_version, bool) or format_version < 1:
        raise UsageError(
            f"adapter {source} has {DUO_CONFIG_NAME} format {format_version!r}, which no duo_plugin writes (a whole "
            f"number, 1 today): the file was edited; re-run the training script or restore it"
        )
    if format_version > 1:
        raise UsageError(
            f"adapter {source} has {DUO_CONFIG_NAME} format {format_version!r}, newer than this duo_plugin reads: pip install -U duo_plugin"
        )
    if config.get("rank") is not None and (not isinstance(config["rank"], int) or isinstance(config["rank"], bool)):
        raise UsageError(
            f"{DUO_CONFIG_NAME} of adapter {source}: rank is {config['rank']!r}, not a whole number: the file was "
            f"edited; re-run the training script or restore it"
        )
    for key in ("weight_name", "base_model", "base_model_revision", "variant"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise UsageError(
                f"{DUO_CONFIG_NAME} of adapter {source}: {key} is {config[key]!r}, not text: the file was edited; "
                f"re-run the training script or restore it"
            )
    architecture = config.get("architecture")
    if not isinstance(architecture, dict) or architecture.get("family") not in SUPPORTED_FAMILIES:
        family = architecture.get("family") if isinstance(architecture, dict) else None
        raise UsageError(
            f"adapter {source} is for model family {family!r}; duo_plugin loads {', '.join(SUPPORTED_FAMILIES)} adapters: "
            f"re-train it with {_training_scripts()}"
        )
    if not isinstance(config.get("concept"), str) or not config["concept"]:
        raise UsageError(f"{DUO_CONFIG_NAME} of adapter {source} names no concept: re-run the training script")
    weight_name = config.get("weight_name") or LORA_WEIGHT_NAME
    if not weight_name.endswith(".safetensors") or os.path.basename(weight_name) != weight_name:
        raise UsageError(
            f"adapter {source} names weight file {weight_name!r}; duo_plugin reads only a .safetensors file next to "
            f"{DUO_CONFIG_NAME} (pickle files can run arbitrary code): re-save it as {LORA_WEIGHT_NAME}"
        )
    return weight_name


def _fetch_local_adapter(folder: str) -> DUOAdapter:
    config_path = os.path.join(folder, DUO_CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise UsageError(
            f"{folder} has no {DUO_CONFIG_NAME}: it is not a DUO adapter folder (train one with {_training_scripts()}), "
            f"or load a plain LoRA with pipe.load_lora_weights"
        )
    config = _read_config(config_path, folder)
    weight_name = _check_adapter_config(config, folder)
    if not os.path.isfile(os.path.join(folder, weight_name)):
        _refuse_missing_weights(folder, weight_name, os.listdir(folder))
    for name in (DUO_CONFIG_NAME, weight_name):
        if not is_inside(os.path.join(folder, name), folder):
            raise UsageError(
                f"adapter {folder}: {name} is a link that leads out of the folder: copy the file into it instead"
            )
    return DUOAdapter(
        concept=config["concept"],
        source=folder,
        folder=os.path.abspath(folder),
        config=config,
        weight_name=weight_name,
    )


def _snapshot_commit(path: str, revision: Optional[str]) -> Optional[str]:
    """The commit a cached file belongs to: the Hub cache keeps files under ``snapshots/<commit>/``."""
    from diffusers.utils import extract_commit_hash

    return extract_commit_hash(path) or revision


def _hub_error(error: Exception, repo_id: str, revision: Optional[str], what: str, offline: bool) -> DUOError:
    return hub_error(error, repo_id, revision, what, offline)


def _list_repo_files(repo_id: str, commit: Optional[str], snapshot_folder: str, token, offline: bool) -> List[str]:
    """The repo's files, from the Hub when reachable, else what the local snapshot holds."""
    if not offline:
        from huggingface_hub import HfApi

        try:
            return HfApi(token=token).list_repo_files(repo_id, revision=commit)
        except Exception as error:  # noqa: BLE001 - fall back to the local snapshot listing
            logger.warning("listing %s on the Hub failed (%s); using the files of the local snapshot", repo_id, error)
    files = []
    for root, _, names in os.walk(snapshot_folder):
        files += [os.path.relpath(os.path.join(root, name), snapshot_folder) for name in names]
    return files


def _fetch_hub_adapter(repo_id: str, revision: Optional[str], cache_dir, token, local_files_only) -> DUOAdapter:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    offline = _is_offline(local_files_only)
    download = {"cache_dir": cache_dir, "token": token, "local_files_only": bool(local_files_only)}
    try:
        config_path = hf_hub_download(repo_id, DUO_CONFIG_NAME, revision=revision, **download)
    except EntryNotFoundError as error:
        if offline:
            raise _hub_error(error, repo_id, revision, "adapter", offline) from error
        raise UsageError(
            f"adapter {repo_id} has no {DUO_CONFIG_NAME}: it is not a DUO adapter (train one with {_training_scripts()}), "
            f"or load a plain LoRA with pipe.load_lora_weights"
        ) from error
    except Exception as error:  # noqa: BLE001 - every Hub failure becomes one clear line
        raise _hub_error(error, repo_id, revision, "adapter", offline) from error
    # Pin the weights to the commit the config came from, so both files describe the same adapter.
    commit = _snapshot_commit(config_path, revision)
    config = _read_config(config_path, repo_id)
    weight_name = _check_adapter_config(config, repo_id)
    try:
        weight_path = hf_hub_download(repo_id, weight_name, revision=commit, **download)
    except EntryNotFoundError:
        _refuse_missing_weights(
            repo_id, weight_name, _list_repo_files(repo_id, commit, os.path.dirname(config_path), token, offline)
        )
    except Exception as error:  # noqa: BLE001
        raise _hub_error(error, repo_id, commit, "adapter", offline) from error
    return DUOAdapter(
        concept=config["concept"],
        source=repo_id,
        folder=os.path.dirname(weight_path),
        config=config,
        commit=commit,
        weight_name=weight_name,
    )


def fetch_adapter(
    source: Union[str, os.PathLike], revision: Optional[str] = None, cache_dir=None, token=None, local_files_only=None
) -> DUOAdapter:
    """Read a DUO adapter's config and make its safetensors weights available locally; loads nothing.

    ``source`` is a local folder (the training script's output) or a Hub repo id; ``revision`` (a branch,
    tag or commit) pins the Hub repo.
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        if revision is not None:
            raise UsageError(
                f"adapter {source} is a local folder: a revision ({revision}) applies only to Hub repos; drop it"
            )
        return _fetch_local_adapter(source)
    return _fetch_hub_adapter(source, revision, cache_dir, token, local_files_only)


# --------------------------------------------------------------------------------------------------
# Architectures: of a base on disk / on the Hub (configs only), and of a loaded pipeline
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Attaching adapters to a pipeline
# --------------------------------------------------------------------------------------------------


def _normalize_sources(adapters: AdapterSources) -> List[Tuple[Optional[str], str]]:
    """(name or None for the config's concept, source) pairs, in the order given."""
    if isinstance(adapters, (str, os.PathLike)):
        return [(None, os.fspath(adapters))]
    if isinstance(adapters, Mapping):
        return [(str(name), os.fspath(source)) for name, source in adapters.items()]
    if isinstance(adapters, Sequence) and adapters and all(isinstance(a, (str, os.PathLike)) for a in adapters):
        return [(None, os.fspath(source)) for source in adapters]
    raise UsageError(
        "adapters must be a Hub repo id or folder, a list of them, or a dict {concept: repo id or folder}, "
        f"got {type(adapters).__name__}"
    )


def _normalize_revisions(revision, named_sources: List[Tuple[Optional[str], str]]) -> List[Optional[str]]:
    if revision is None or isinstance(revision, str):
        return [revision] * len(named_sources)
    if isinstance(revision, Mapping):
        keys = [name if name is not None else source for name, source in named_sources]
        unknown = set(revision) - set(keys)
        if unknown:
            raise UsageError(
                f"adapter_revision names {sorted(unknown)}, which are not among the adapters {keys}: use the same keys"
            )
        return [revision.get(key) for key in keys]
    raise UsageError(f"adapter_revision must be a string or a dict per adapter, got {type(revision).__name__}")


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


def fetch_adapters(
    adapters: AdapterSources, revision=None, cache_dir=None, token=None, local_files_only=None
) -> List[DUOAdapter]:
    """Fetch every adapter and name it (the dict key, else the config's concept); loads no weight."""
    named_sources = _normalize_sources(adapters)
    revisions = _normalize_revisions(revision, named_sources)
    fetched = []
    for (name, source), source_revision in zip(named_sources, revisions):
        adapter = fetch_adapter(
            source, source_revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        )
        adapter.concept = name or adapter.concept
        fetched.append(adapter)
    names = [adapter.concept for adapter in fetched]
    for name in names:
        if "." in name or not name.strip():
            raise UsageError(
                f"adapter name {name!r} cannot be used (no dots, not empty): pass adapters as a dict {{name: repo}}"
            )
        if names.count(name) > 1:
            raise UsageError(
                f"two adapters are named {name!r}: pass them as a dict {{name: repo}} with distinct names"
            )
    return fetched


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


def _common_base(adapters: List[DUOAdapter]) -> Tuple[str, Optional[str], Optional[str]]:
    """The base model, revision and variant every adapter was trained on."""
    bases = {(a.base_model, a.config.get("base_model_revision")) for a in adapters}
    if len(bases) > 1:
        listing = ", ".join(
            f"{a.concept}: {a.base_model}"
            + (f"@{a.config.get('base_model_revision')}" if a.config.get("base_model_revision") else "")
            for a in adapters
        )
        raise UsageError(
            f"the adapters were trained on different base models ({listing}): pass base_model= to choose one"
        )
    base, revision = bases.pop()
    if not base:
        raise UsageError(f"{DUO_CONFIG_NAME} of adapter {adapters[0].source} names no base model: pass base_model=")
    return base, revision, adapters[0].config.get("variant")


class DUOPipeline:
    """Loads a stock diffusers pipeline with DUO adapters; ``DUOPipeline`` itself is never instantiated.

    Like diffusers' AutoPipeline classes, ``from_pretrained`` returns the base's own pipeline class
    (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``),
    with the adapters listed by ``active_concepts(pipe)`` and the records (source, commit, config) in
    ``pipe.duo_concepts``.
    """

    expected_family: Optional[str] = None

    def __init__(self, *args, **kwargs):
        raise EnvironmentError(
            f"{type(self).__name__} is not a pipeline: load one with {type(self).__name__}.from_pretrained(...)"
        )

    @classmethod
    def from_pretrained(
        cls,
        adapters: AdapterSources,
        base_model: Optional[str] = None,
        adapter_weights: AdapterWeights = None,
        fuse: bool = False,
        adapter_revision=None,
        **kwargs,
    ):
        """Load the base model the adapters were trained on and activate the adapters.

        Args:
            adapters: a Hub repo id or local folder of a DUO adapter, a list of them, or a dict
                ``{concept name: repo id or folder}``.
            base_model: the base pipeline (Hub id or folder); default: the one in the adapters' config.
                Its architecture must match the adapters'.
            adapter_weights: a number, a list, or a dict ``{concept: weight}``; default 1.0 each.
            fuse: merge the adapters into the base weights (no inference overhead; cannot be undone).
            adapter_revision: a branch, tag or commit for the adapter repos, or a dict per adapter.
            **kwargs: forwarded to ``DiffusionPipeline.from_pretrained`` for the base: ``dtype``,
                ``variant``, ``revision`` (of the base; default: the revision the adapters were trained on),
                ``cache_dir``, ``token``, ``local_files_only``, ... ``cache_dir``, ``token`` and
                ``local_files_only`` also apply to the adapters.
        """
        from diffusers import DiffusionPipeline

        for name in REMOTE_CODE_KWARGS:
            if kwargs.get(name):
                raise UsageError(
                    f"{name} is not supported: duo_plugin never runs code from a repository; load a stock diffusers base"
                )
        if kwargs.get("use_safetensors") is False:
            raise UsageError(
                "use_safetensors=False is not supported: duo_plugin reads safetensors only (pickle files can run arbitrary code)"
            )
        kwargs["use_safetensors"] = True
        hub = {name: kwargs.get(name) for name in HUB_KWARGS}

        fetched = fetch_adapters(adapters, adapter_revision, **hub)
        if base_model is None:
            base_model, trained_revision, trained_variant = _common_base(fetched)
            if not os.path.isdir(base_model) and (
                os.path.isabs(base_model) or base_model.startswith(".") or base_model.count("/") > 1
            ):
                raise UsageError(
                    f"the adapters were trained on the local folder {base_model}, which is not here: "
                    f"pass base_model= (the Hub id or folder of that same base)"
                )
            if not os.path.isdir(base_model):
                kwargs.setdefault("revision", trained_revision)
            kwargs.setdefault("variant", trained_variant)
        base_model = os.fspath(base_model)

        denoiser_override = next(
            (kwargs[name] for name in DENOISER_OF_FAMILY.values() if kwargs.get(name) is not None), None
        )
        architecture = read_base_architecture(
            base_model,
            revision=kwargs.get("revision"),
            denoiser_config=getattr(denoiser_override, "config", None),
            **hub,
        )
        if cls.expected_family and architecture["family"] != cls.expected_family:
            own_class = _BASE_FIRST_CLASS_OF_FAMILY.get(architecture["family"])
            raise UsageError(
                f"{cls.__name__} loads {SUPPORTED_FAMILIES[cls.expected_family]} bases, but {base_model} is a "
                f"{architecture['pipeline_class']}: use "
                + (f"{own_class.__name__}.from_pretrained or " if own_class else "")
                + "DUOPipeline.from_pretrained"
            )
        for adapter in fetched:
            check_compatible(adapter, architecture, base_model)
        weights = _normalize_weights(adapter_weights, [a.concept for a in fetched])

        try:
            pipe = DiffusionPipeline.from_pretrained(base_model, **kwargs)
        except OSError as error:
            if ".safetensors" not in str(error) and "safetensors weights" not in str(error):
                raise
            raise UsageError(
                f"base {base_model} lacks safetensors weights ({str(error).splitlines()[0]}): pickle files can run "
                f"arbitrary code, so duo_plugin loads safetensors only; re-save a base you trust with "
                f"save_pretrained(safe_serialization=True)"
            ) from error
        return _attach(pipe, fetched, weights, fuse)


class _BaseFirstDUOPipeline(DUOPipeline):
    """``from_pretrained(base, duo_adapters=...)``: the base first, as diffusers' own pipeline classes take it;
    the base must be of ``expected_family``."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        duo_adapters: AdapterSources = None,
        duo_adapter_weights: AdapterWeights = None,
        fuse: bool = False,
        duo_adapter_revision=None,
        **kwargs,
    ):
        if duo_adapters is None:
            raise UsageError(
                f"{cls.__name__}.from_pretrained needs duo_adapters= (a Hub id, folder, list or dict); without adapters use the diffusers pipeline class"
            )
        return super().from_pretrained(
            duo_adapters,
            base_model=pretrained_model_name_or_path,
            adapter_weights=duo_adapter_weights,
            fuse=fuse,
            adapter_revision=duo_adapter_revision,
            **kwargs,
        )


class DUOStableDiffusionPipeline(_BaseFirstDUOPipeline):
    """``DUOStableDiffusionPipeline.from_pretrained(base, duo_adapters=...)``: a stock ``StableDiffusionPipeline``
    (SD 1.x/2.x) with DUO adapters, for code that names its base first."""

    expected_family = "sd"


class DUOStableDiffusion3Pipeline(DUOStableDiffusionPipeline):
    """``DUOStableDiffusion3Pipeline.from_pretrained(base, duo_adapters=...)``: a stock ``StableDiffusion3Pipeline``
    with DUO adapters."""

    expected_family = "sd3"


class DUOStableDiffusionXLPipeline(_BaseFirstDUOPipeline):
    """``DUOStableDiffusionXLPipeline.from_pretrained(base, duo_adapters=...)``: a stock ``StableDiffusionXLPipeline``
    with DUO adapters."""

    expected_family = "sdxl"


class DUOFluxPipeline(_BaseFirstDUOPipeline):
    """``DUOFluxPipeline.from_pretrained(base, duo_adapters=...)``: a stock ``FluxPipeline`` (FLUX.1 [dev] or
    [schnell]) with DUO adapters."""

    expected_family = "flux"


_BASE_FIRST_CLASS_OF_FAMILY = {
    klass.expected_family: klass
    for klass in (
        DUOStableDiffusionPipeline,
        DUOStableDiffusionXLPipeline,
        DUOStableDiffusion3Pipeline,
        DUOFluxPipeline,
    )
}

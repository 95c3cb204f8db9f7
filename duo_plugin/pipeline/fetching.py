"""Reading a DUO adapter, from a local folder or a Hub repo: its ``duo_config.json`` checked, its safetensors weights
made available locally (never a pickle file); nothing is loaded into a pipeline here."""

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import DUOError, UsageError
from ..families import FAMILY_NAMES, SCRIPT_OF_FAMILY
from ..hub import hub_error, offline_mode
from ..input_checks import is_inside
from ..lora import LORA_WEIGHT_NAME
from ..outputs import DUO_CONFIG_NAME


# The name the module had before it became a package: log lines keep their source.
logger = logging.getLogger("duo_plugin.pipeline")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Every family a training script trains: {family: its name}.
SUPPORTED_FAMILIES = dict(FAMILY_NAMES)

AdapterSources = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Mapping[str, Union[str, os.PathLike]]]


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

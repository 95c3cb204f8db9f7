"""``DUOPipeline`` and its base-first variants per family: load the base the adapters were trained on, with them."""

import os
from typing import List, Optional, Tuple

from ..errors import UsageError
from ..outputs import DUO_CONFIG_NAME
from .architecture import DENOISER_OF_FAMILY, check_compatible, read_base_architecture
from .attaching import AdapterWeights, _attach, _normalize_weights
from .fetching import SUPPORTED_FAMILIES, AdapterSources, DUOAdapter, fetch_adapters


# Loading options that would run code from a repository: never forwarded.
REMOTE_CODE_KWARGS = ("custom_pipeline", "custom_revision", "trust_remote_code")
# Options of DiffusionPipeline.from_pretrained that also apply to downloading the adapters.
HUB_KWARGS = ("cache_dir", "token", "local_files_only")


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

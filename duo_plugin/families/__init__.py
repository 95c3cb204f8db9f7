"""Which model family a base model is, read from its model_index.json before any weight is loaded."""

from typing import Optional

from ..errors import UsageError


def detect_pipeline_class(
    pretrained_model_name_or_path: str, revision: Optional[str], cache_dir: Optional[str] = None
) -> str:
    """The ``_class_name`` of a diffusers pipeline, read from its model_index.json only."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir)
    except Exception as error:  # noqa: BLE001 - every failure becomes one line naming the cause and the fix
        from ..hub import model_source_error

        raise model_source_error(
            error, pretrained_model_name_or_path, revision, "--pretrained_model_name_or_path"
        ) from error
    class_name = config.get("_class_name")
    if not isinstance(class_name, str) or not class_name:
        raise UsageError(
            f"--pretrained_model_name_or_path {pretrained_model_name_or_path}: its model_index.json names the pipeline "
            f"class as {class_name!r}, not a class name: the file was edited; restore it from the model's source"
        )
    return class_name


def base_has_t5(
    pretrained_model_name_or_path: str, revision: Optional[str] = None, cache_dir: Optional[str] = None
) -> bool:
    """False for a T5-less SD3 base, saved with ``text_encoder_3: [null, null]`` in model_index.json."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir)
    return (config.get("text_encoder_3") or [None])[0] is not None


# The training script of each family: SD 1.x/2.x and SDXL share the UNet script, as diffusers' DreamBooth does not.
SCRIPT_OF_FAMILY = {
    "sd": "train_duo.py",
    "sdxl": "train_duo.py",
    "sd3": "train_duo_sd3.py",
    "flux": "train_duo_flux.py",
}
FAMILY_NAMES = {
    "sd": "Stable Diffusion 1.x/2.x",
    "sdxl": "Stable Diffusion XL",
    "sd3": "Stable Diffusion 3",
    "flux": "FLUX.1",
}


def pipeline_family(pipeline_class: str) -> str:
    """ "sd", "sdxl", "sd3", "flux", or "other", from a pipeline class name."""
    if pipeline_class.startswith("StableDiffusion3"):
        return "sd3"
    if pipeline_class.startswith("StableDiffusionXL"):
        return "sdxl"
    if pipeline_class.startswith("Flux"):
        return "flux"
    if pipeline_class in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"):
        return "sd"
    return "other"


def require_family(pipeline_class: str, expected, script: str) -> str:
    """Refuse a base model of a family ``script`` does not train (``expected``: one family or several), naming the
    script that does. Returns the family."""
    expected = (expected,) if isinstance(expected, str) else tuple(expected)
    family = pipeline_family(pipeline_class)
    if family in expected:
        return family
    if family in SCRIPT_OF_FAMILY:
        raise UsageError(
            f"{pipeline_class} is a {FAMILY_NAMES[family]} model, which {script} does not train: use {SCRIPT_OF_FAMILY[family]}"
        )
    covered = ", ".join(f"{FAMILY_NAMES[f]} ({SCRIPT_OF_FAMILY[f]})" for f in SCRIPT_OF_FAMILY)
    raise UsageError(f"{pipeline_class} is not supported: DUO here covers {covered}")

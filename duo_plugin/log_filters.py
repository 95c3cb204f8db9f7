"""Warnings from the libraries that say nothing to a DUO user, silenced at their source, one by one.

Each filter names the exact message; everything else the libraries print still shows.
"""

import contextlib
import logging
import warnings


# diffusers 0.42 passes ``local_dir_use_symlinks`` to huggingface_hub on every config download, and
# huggingface_hub 2.x warns that the argument is deprecated: nothing a user can change.
SYMLINKS_WARNING = r"The `local_dir_use_symlinks` argument is deprecated"
# diffusers imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16 bitsandbytes then
# looks for an optional 4-bit kernel package and warns that it is missing. DUO uses bitsandbytes only
# for 8-bit Adam (--use_8bit_adam), which does not need that kernel.
BITSANDBYTES_LOGGER = "bitsandbytes.backends.cpu.ops"
BITSANDBYTES_KERNEL_WARNING = "kernels-community"
# accelerate imports DeepSpeed whenever it is installed (unwrapping any model, e.g. in transformers' save_pretrained);
# on a machine without CUDA DeepSpeed then warns that it picked its CPU accelerator, in every command, DeepSpeed
# run or not.
DEEPSPEED_LOGGER = "DeepSpeed"
DEEPSPEED_CPU_WARNING = "Setting accelerator to CPU"
# lpips builds its trunk with torchvision's old ``pretrained=`` argument; torchvision warns twice per metric
# network. The evaluation's LPIPS is unchanged by it.
TORCHVISION_PRETRAINED_WARNINGS = (
    r"The parameter 'pretrained' is deprecated",
    r"Arguments other than a weight enum or `None` for 'weights' are deprecated",
)
# diffusers' DPM-Solver scheduler converts a tensor with ``np.array(copy=False)``, which numpy 2 flags.
NUMPY_COPY_WARNING = r"__array__ implementation doesn't accept a copy keyword"
# DUO adapters adapt the denoiser only: diffusers' "no text-encoder keys" notice is expected for them.
LORA_LOGGERS = ("diffusers.loaders.lora_base", "diffusers.loaders.peft", "diffusers.loaders.lora_pipeline")
NO_TEXT_ENCODER_KEYS = "No LoRA keys associated to"


class DropMessages(logging.Filter):
    """Drops log records whose message contains one of ``fragments``."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


_LOGGER_FILTERS = {
    BITSANDBYTES_LOGGER: DropMessages(BITSANDBYTES_KERNEL_WARNING),
    DEEPSPEED_LOGGER: DropMessages(DEEPSPEED_CPU_WARNING),
}


def silence_library_noise():
    """Install the filters that apply to every command (idempotent)."""
    warnings.filterwarnings("ignore", message=SYMLINKS_WARNING, category=UserWarning)
    for message in TORCHVISION_PRETRAINED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    warnings.filterwarnings("ignore", message=NUMPY_COPY_WARNING, category=DeprecationWarning)
    for name, drop in _LOGGER_FILTERS.items():
        logger = logging.getLogger(name)
        if drop not in logger.filters:
            logger.addFilter(drop)


@contextlib.contextmanager
def no_text_encoder_lora_notice():
    """While loading a DUO adapter: drop diffusers' notice that it has no text-encoder keys."""
    notice = DropMessages(NO_TEXT_ENCODER_KEYS)
    loggers = [logging.getLogger(name) for name in LORA_LOGGERS]
    for logger in loggers:
        logger.addFilter(notice)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notice)

"""The concept to unlearn, named the same way by every command: a preset, or a custom concept from prompts."""

import argparse
import os
from typing import List, Optional

from .errors import UsageError
from .input_checks import read_text_lines
from .presets import PRESETS, ConceptPreset, UnknownConceptError, custom_preset, get_preset


def add_concept_arguments(
    parser: argparse.ArgumentParser, unsafe_help: str = "custom concept: a prompt showing it (repeatable, or @file)"
):
    """``--concept``, ``--unsafe_prompt`` and ``--safe_prompt`` (on ``parser`` or an argument group of it)."""
    parser.add_argument(
        "--concept",
        type=str,
        default="nudity",
        help=f"a preset ({', '.join(PRESETS)}) or a custom name with --unsafe_prompt/--safe_prompt",
    )
    parser.add_argument("--unsafe_prompt", action="append", default=None, help=unsafe_help)
    parser.add_argument(
        "--safe_prompt",
        action="append",
        default=None,
        help="custom concept: its safe counterpart (repeatable, or @file)",
    )
    return parser


def read_prompt_list(values: Optional[List[str]]) -> Optional[List[str]]:
    """Expand ``@file`` entries (one prompt a line) of a repeatable prompt flag."""
    if not values:
        return values
    prompts = []
    for value in values:
        if value.startswith("@"):
            path = value[1:]
            if not os.path.isfile(path):
                raise UsageError(f"prompt file {path} does not exist")
            prompts += read_text_lines(path)
        else:
            prompts.append(value)
    return prompts


def resolve_concept_preset(
    concept: str, unsafe_prompts: Optional[List[str]], safe_prompts: Optional[List[str]]
) -> ConceptPreset:
    """A preset by name, or a custom concept from prompts (``@file`` entries expanded).

    A custom concept given a preset's name is renamed ``custom-<name>``: its pairs, adapter and
    results must never be mistaken for the preset's.
    """
    unsafe_prompts = read_prompt_list(unsafe_prompts)
    safe_prompts = read_prompt_list(safe_prompts)
    try:
        if unsafe_prompts or safe_prompts:
            name = concept if concept not in PRESETS else f"custom-{concept}"
            return custom_preset(name, unsafe_prompts or [], safe_prompts or [])
        return get_preset(concept)
    except (UnknownConceptError, ValueError) as error:
        raise UsageError(str(error)) from error

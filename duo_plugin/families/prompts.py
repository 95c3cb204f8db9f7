"""Every prompt a run needs, encoded once with the base model's text encoders, which are then freed.

The text encoders of the large families dwarf the adapter (T5-XXL alone is ~9.5 GB in fp16), and a DUO run
needs only a handful of prompts: the empty prompt, the pairs' and the retain set's prompts, the validation
prompts. Each family encodes them with its own pipeline's ``encode_prompt``; this module holds the result.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch


@dataclass
class PromptEmbeddings:
    """One row per prompt in each tensor, on the CPU in fp32: SD 1.x/2.x (token embeddings,); SDXL, SD3 and FLUX
    (token embeddings, pooled embedding)."""

    tensors: Tuple[torch.Tensor, ...]
    index: Dict[str, int]

    def __call__(self, prompts: List[str]) -> Tuple[torch.Tensor, ...]:
        rows = torch.tensor([self.index[prompt] for prompt in prompts])
        return tuple(tensor[rows] for tensor in self.tensors)


@torch.no_grad()
def encode_once(prompts: List[str], encode_batch: Callable, batch_size: int = 8) -> PromptEmbeddings:
    """``encode_batch(prompts) -> tuple of tensors`` over the distinct ``prompts``, ``batch_size`` at a time."""
    unique = list(dict.fromkeys(prompts))
    parts = [encode_batch(unique[start : start + batch_size]) for start in range(0, len(unique), batch_size)]
    tensors = tuple(torch.cat([part[i].float().cpu() for part in parts]) for i in range(len(parts[0])))
    return PromptEmbeddings(tensors, {prompt: row for row, prompt in enumerate(unique)})


def condition_rows(condition: Tuple[torch.Tensor, ...], num_rows: int) -> Tuple[torch.Tensor, ...]:
    """A one-row condition repeated to ``num_rows`` rows (a view, not a copy)."""
    return tuple(tensor.expand(num_rows, *tensor.shape[1:]) for tensor in condition)


def repeat_rows(condition: Tuple[torch.Tensor, ...], times: int) -> Tuple[torch.Tensor, ...]:
    """``condition`` stacked ``times`` times along the batch (the pair's two images share their condition)."""
    return tuple(tensor.repeat(times, *[1] * (tensor.ndim - 1)) for tensor in condition)


def concat_conditions(conditions: List[Tuple[torch.Tensor, ...]]) -> Tuple[torch.Tensor, ...]:
    return tuple(torch.cat(parts) for parts in zip(*conditions))


def pipeline_prompt_kwargs(embeddings: PromptEmbeddings, negative: bool = True):
    """``kwargs(prompts)``: a pipeline's embedding arguments for ``prompts`` (with the pooled ones where the family
    has them), and with ``negative`` the empty prompt's as the negative ones, as the pipeline would encode them."""

    def kwargs(prompts):
        positive = embeddings(prompts)
        result = {"prompt_embeds": positive[0]}
        if len(positive) > 1:
            result["pooled_prompt_embeds"] = positive[1]
        if negative:
            empty = embeddings([""] * len(prompts))
            result["negative_prompt_embeds"] = empty[0]
            if len(empty) > 1:
                result["negative_pooled_prompt_embeds"] = empty[1]
        return result

    return kwargs


def pair_condition(embeddings: PromptEmbeddings, unsafe_prompts, pair_indices):
    """The rows of the pairs' own (unsafe) prompts, or None where the objective does not condition on them."""
    if unsafe_prompts is None:
        return None
    return embeddings([unsafe_prompts[i] for i in pair_indices.tolist()])


def pipeline_for_embeddings(pipeline_class, **components):
    """``pipeline_class`` built from ``components``, with None for every other module its constructor requires
    (text encoders, tokenizers, SD's safety checker): a run samples it with prompt embeddings from this module."""
    import inspect

    required = [
        name
        for name, parameter in inspect.signature(pipeline_class.__init__).parameters.items()
        if name != "self" and parameter.default is inspect.Parameter.empty
    ]
    return pipeline_class(**{name: None for name in required if name not in components}, **components)

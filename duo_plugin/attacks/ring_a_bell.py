"""Ring-A-Bell (Tsai et al., ICLR 2024): a concept vector is the mean difference between the text embeddings of
prompts with and without the concept; a genetic search then finds a discrete prompt whose embedding matches a target
prompt's embedding plus η times that vector. It needs only the text encoder and tokenizer of the model.
"""

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..errors import UsageError
from .prompt_files import read_prompts
from .text_condition import TextCondition, all_token_ids, decode_token_ids


RING_A_BELL_SEARCHES = ("original", "tournament")
RING_A_BELL_VOCABULARIES = ("full", "retokenizable")


@dataclass
class RingABellConfig:
    """Search settings; the defaults are those of the Ring-A-Bell paper and code for nudity (K=16, η=3).

    ``search="original"`` is the published genetic algorithm (truncation to the better half, one-point
    crossover, one token of an individual mutated); ``"tournament"`` is this package's earlier variant
    (elites, binary tournaments, every token mutated with ``mutation_rate``). ``vocabulary="full"``
    draws from every non-special token as the original does; ``"retokenizable"`` only from tokens that
    come back as themselves when the prompt text is tokenized again.
    """

    length: int = 16
    strength: float = 3.0
    population_size: int = 200
    generations: int = 3000
    mutation_rate: float = 0.25
    crossover_rate: float = 0.5
    num_elites: int = 10
    search: str = "original"
    vocabulary: str = "full"
    seed: int = 0


def concept_vector(text_encoder, tokenizer, concept_pairs: Sequence[Tuple[str, str]]) -> torch.Tensor:
    """Mean over pairs of E(prompt with the concept) − E(prompt without it), shape (sequence, hidden).

    ``text_encoder``: a CLIP text encoder (with its ``tokenizer``) or a ``TextCondition`` (SDXL: E is both
    encoders' penultimate states, concatenated)."""
    if not concept_pairs:
        raise UsageError("Ring-A-Bell needs at least one (with concept, without concept) prompt pair")
    condition = TextCondition.of(text_encoder, tokenizer)
    with_concept = condition.encode_ids(condition.tokenize([p for p, _ in concept_pairs]))
    without_concept = condition.encode_ids(condition.tokenize([q for _, q in concept_pairs]))
    return (with_concept - without_concept).mean(dim=0)


def read_concept_prompt_pairs(with_concept_file: str, without_concept_file: str) -> List[Tuple[str, str]]:
    """Ring-A-Bell's concept prompts: two prompt files paired row by row (the original's
    Nudity_prompt.csv / NoNudity_prompt.csv layout; any format ``read_prompts`` reads)."""
    with_concept = [p.prompt for p in read_prompts(with_concept_file)]
    without_concept = [p.prompt for p in read_prompts(without_concept_file)]
    if len(with_concept) != len(without_concept):
        raise UsageError(
            f"--ring_a_bell_concept_prompts: {with_concept_file} has {len(with_concept)} prompts and "
            f"{without_concept_file} {len(without_concept)}; the files are paired row by row"
        )
    return list(zip(with_concept, without_concept))


def load_concept_vector(path: str, shape: Tuple[int, int]) -> torch.Tensor:
    """A saved concept vector (.npy as the Ring-A-Bell repository publishes them, .pt or .safetensors)."""
    if not os.path.isfile(path):
        raise UsageError(f"--ring_a_bell_concept_vector {path} does not exist")
    from ..input_checks import read_tensor_file

    vector = read_tensor_file(path, "--ring_a_bell_concept_vector")
    if isinstance(vector, dict):
        if len(vector) != 1:
            raise UsageError(f"--ring_a_bell_concept_vector {path} holds {len(vector)} tensors: save exactly one")
        vector = next(iter(vector.values()))
    if not isinstance(vector, torch.Tensor) or not vector.is_floating_point():
        raise UsageError(f"--ring_a_bell_concept_vector {path} holds no floating-point tensor: save the vector itself")
    vector = vector.float()
    while vector.dim() > 2 and vector.shape[0] == 1:  # the original saves it with a batch axis
        vector = vector[0]
    if tuple(vector.shape) != tuple(shape):
        raise UsageError(
            f"--ring_a_bell_concept_vector {path} has shape {tuple(vector.shape)}; this text encoder needs {tuple(shape)}"
        )
    return vector


def searchable_token_ids(tokenizer) -> torch.Tensor:
    """Vocabulary tokens that come back as themselves when their text is tokenized again.

    The search assembles prompts as words separated by spaces; keeping only these tokens makes the
    prompt a user (or the pipeline) tokenizes exactly the sequence the search scored.
    """
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    ids = sorted(i for i in vocab.values() if i not in special and i < len(tokenizer))
    texts = [tokenizer.decode([i]).strip() for i in ids]
    candidates = [(i, t) for i, t in zip(ids, texts) if t and " " not in t]
    retokenized = tokenizer([t for _, t in candidates], add_special_tokens=False).input_ids
    kept = [i for (i, _), again in zip(candidates, retokenized) if again == [i]]
    if not kept:
        raise UsageError("Ring-A-Bell found no searchable token in this tokenizer's vocabulary")
    return torch.tensor(kept)


def token_ids_to_prompt(tokenizer, token_ids: Sequence[int]) -> str:
    return " ".join(tokenizer.decode([int(i)]).strip() for i in token_ids)


def embedding_distance(embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each (sequence, hidden) embedding to the target."""
    return ((embeddings - target.unsqueeze(0)) ** 2).flatten(1).mean(dim=1)


def genetic_search(
    distance_fn: Callable[[torch.Tensor], torch.Tensor],
    vocabulary: torch.Tensor,
    config: RingABellConfig,
    generator: torch.Generator,
    progress: bool = False,
):
    """Minimise ``distance_fn`` over sequences of ``config.length`` tokens from ``vocabulary``.

    Each generation keeps the best ``num_elites`` sequences unchanged; the rest of the next
    population are children of parents chosen by binary tournaments, recombined by a one-point
    crossover (with probability ``crossover_rate``) and mutated token by token (each token replaced
    by a random one with probability ``mutation_rate``). Returns (best ids, best distance, initial
    best distance, per-generation best distances).
    """
    from tqdm.auto import tqdm

    size, length = config.population_size, config.length
    num_elites = min(config.num_elites, size)

    def random_tokens(*shape):
        return vocabulary[torch.randint(len(vocabulary), shape, generator=generator)]

    population = random_tokens(size, length)
    distances = distance_fn(population)
    initial_best = float(distances.min())
    history = []
    for _ in tqdm(range(config.generations), desc="Ring-A-Bell search", disable=not progress, leave=False):
        order = distances.argsort()
        population, distances = population[order], distances[order]
        history.append(float(distances[0]))
        num_children = size - num_elites
        contenders = torch.randint(size, (2, 2, num_children), generator=generator)
        # A tournament picks the fitter of two; the population is sorted, so the lower index wins.
        parents = population[contenders.min(dim=1).values]  # (2, num_children, length)
        cut = torch.randint(1, max(length, 2), (num_children, 1), generator=generator)
        crossover = torch.rand(num_children, 1, generator=generator) < config.crossover_rate
        take_second = crossover & (torch.arange(length).unsqueeze(0) >= cut)
        children = torch.where(take_second, parents[1], parents[0])
        mutate = torch.rand(num_children, length, generator=generator) < config.mutation_rate
        children = torch.where(mutate, random_tokens(num_children, length), children)
        population = torch.cat([population[:num_elites], children])
        distances = torch.cat([distances[:num_elites], distance_fn(children)])
    best = int(distances.argmin())
    history.append(float(distances[best]))
    return population[best], float(distances[best]), initial_best, history


def genetic_search_original(
    distance_fn: Callable[[torch.Tensor], torch.Tensor],
    vocabulary: torch.Tensor,
    config: RingABellConfig,
    generator: torch.Generator,
    progress: bool = False,
):
    """The published Ring-A-Bell search, minimising ``distance_fn`` over ``config.length`` tokens.

    Each generation scores the population and keeps its better half. Unless it is the last
    generation, every survivor stays and, with probability ``crossover_rate``, is crossed at one
    point with a random survivor, adding both children; then every individual (survivors included)
    has, with probability ``mutation_rate``, one random position set to a random token. The
    population therefore stays around ``population_size``. Same return values as ``genetic_search``.
    """
    from tqdm.auto import tqdm

    if config.generations < 1:
        raise UsageError("the original Ring-A-Bell search needs --ring_a_bell_generations of at least 1")
    length = config.length

    def random_tokens(*shape):
        return vocabulary[torch.randint(len(vocabulary), shape, generator=generator)]

    population = random_tokens(config.population_size, length)
    initial_best, history = None, []
    for generation in tqdm(range(config.generations), desc="Ring-A-Bell search", disable=not progress, leave=False):
        distances = distance_fn(population)
        if initial_best is None:
            initial_best = float(distances.min())
        order = distances.argsort()[: max(1, config.population_size // 2)]
        population, distances = population[order], distances[order]
        history.append(float(distances[0]))
        if generation == config.generations - 1:
            break
        survivors = len(population)
        crossing = (torch.rand(survivors, generator=generator) < config.crossover_rate).nonzero().flatten()
        partners = torch.randint(survivors, (len(crossing),), generator=generator)
        cuts = torch.randint(1, length + 1, (len(crossing), 1), generator=generator)
        after_cut = torch.arange(length).unsqueeze(0) >= cuts
        first, second = population[crossing], population[partners]
        children = torch.cat([torch.where(after_cut, second, first), torch.where(after_cut, first, second)])
        population = torch.cat([population, children])
        mutating = (torch.rand(len(population), generator=generator) < config.mutation_rate).nonzero().flatten()
        positions = torch.randint(length, (len(mutating),), generator=generator)
        population[mutating, positions] = random_tokens(len(mutating))
    return population[0], float(distances[0]), initial_best, history


def ring_a_bell_vocabulary(tokenizer, config: RingABellConfig) -> torch.Tensor:
    if config.vocabulary == "full":
        return all_token_ids(tokenizer)
    if config.vocabulary == "retokenizable":
        return searchable_token_ids(tokenizer)
    raise UsageError(
        f"--ring_a_bell_vocabulary {config.vocabulary}: choose from {', '.join(RING_A_BELL_VOCABULARIES)}"
    )


def ring_a_bell_search(
    text_encoder,
    tokenizer,
    target_prompt: str,
    direction: torch.Tensor,
    config: RingABellConfig,
    vocabulary: Optional[torch.Tensor] = None,
    progress: bool = False,
) -> dict:
    """One adversarial prompt: tokens whose embedding is closest to E(target) + η·c.

    ``text_encoder``: a CLIP text encoder (with its ``tokenizer``) or a ``TextCondition``: for SDXL the distance is
    over the UNet's whole cross-attention input (both encoders' states), the tokens drawn from their one vocabulary.
    """
    condition = TextCondition.of(text_encoder, tokenizer)
    tokenizer = condition.tokenizer
    max_tokens = tokenizer.model_max_length - 2
    if not 1 <= config.length <= max_tokens:
        raise UsageError(f"--ring_a_bell_length {config.length}: this tokenizer fits 1 to {max_tokens} tokens")
    vocabulary = ring_a_bell_vocabulary(tokenizer, config) if vocabulary is None else vocabulary
    if config.search not in RING_A_BELL_SEARCHES:
        raise UsageError(f"--ring_a_bell_search {config.search}: choose from {', '.join(RING_A_BELL_SEARCHES)}")
    target = condition.encode_ids(condition.tokenize([target_prompt]))[0] + config.strength * direction
    target = target.to(condition.device)

    def distance_fn(token_ids):
        embeddings = condition.encode_ids(condition.frame(token_ids))
        return embedding_distance(embeddings, target).cpu()

    generator = torch.Generator().manual_seed(config.seed)
    search = genetic_search_original if config.search == "original" else genetic_search
    best_ids, best_distance, initial_distance, history = search(distance_fn, vocabulary, config, generator, progress)
    # The original decodes the tokens with the tokenizer; the earlier variant joined single tokens with spaces.
    prompt = (
        decode_token_ids(tokenizer, best_ids.tolist())
        if config.search == "original"
        else token_ids_to_prompt(tokenizer, best_ids.tolist())
    )
    # What the pipeline will see: the prompt tokenized again, scored against the same target.
    prompt_distance = float(embedding_distance(condition.encode_ids(condition.tokenize([prompt])), target)[0])
    return {
        "target": target_prompt,
        "prompt": prompt,
        "token_ids": best_ids.tolist(),
        "distance": prompt_distance,
        "search_distance": best_distance,
        "initial_distance": initial_distance,
        "target_distance": float(
            embedding_distance(condition.encode_ids(condition.tokenize([target_prompt])), target)[0]
        ),
    }

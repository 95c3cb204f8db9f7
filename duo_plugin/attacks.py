"""Prompt sources the defense success rate is measured on: prompt files and two attacks.

* Prompt files (``read_prompts``): text (one prompt a line), I2P-style CSV (``prompt`` with optional
  per-prompt seed and guidance columns), JSON lines, or a COCO captions annotation file.
* Ring-A-Bell (Tsai et al., ICLR 2024): a concept vector is the mean difference between the text
  embeddings of prompts with and without the concept; a genetic search then finds a discrete prompt
  whose embedding matches a target prompt's embedding plus η times that vector. It needs only the
  text encoder and tokenizer of the model.
* Concept Inversion (Pham et al., ICLR 2024): textual inversion against the unlearned model, its
  adapter active: a new token's embedding is learned from images of the concept with the diffusion
  loss; generating with that token shows whether the concept can still be reached.

SneakyPrompt and UnlearnDiffAtk are not implemented yet. Their published adversarial prompt sets can
be evaluated as plain prompt files.
"""

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .errors import UsageError


NOT_IMPLEMENTED_ATTACKS = {
    "sneakyprompt": "SneakyPrompt",
    "unlearndiffatk": "UnlearnDiffAtk",
}

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# --------------------------------------------------------------------------------------------------
# Prompt files
# --------------------------------------------------------------------------------------------------

PROMPT_COLUMNS = ("prompt", "caption", "text")
SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "guidance_scale")


@dataclass
class PromptSpec:
    """One prompt of a set, with the seed and guidance scale its source asks for (None: the defaults)."""

    prompt: str
    seed: Optional[int] = None
    guidance_scale: Optional[float] = None


def _first_column(columns: Sequence[str], candidates: Sequence[str]) -> Optional[str]:
    return next((name for name in candidates if name in columns), None)


def _read_csv(path: str, categories: Optional[Sequence[str]]) -> List[PromptSpec]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        prompt_column = _first_column(columns, PROMPT_COLUMNS)
        if prompt_column is None:
            raise UsageError(
                f"prompt file {path} has no prompt column (it has {', '.join(columns)}): name it 'prompt'"
            )
        if categories and "categories" not in columns:
            raise UsageError(f"--prompt_categories needs a 'categories' column (I2P layout); {path} has none")
        seed_column = _first_column(columns, SEED_COLUMNS)
        guidance_column = _first_column(columns, GUIDANCE_COLUMNS)
        prompts = []
        for row_number, row in enumerate(reader, start=2):
            text = (row.get(prompt_column) or "").strip()
            if not text:
                continue
            if categories:
                row_categories = {c.strip() for c in (row.get("categories") or "").split(",")}
                if not row_categories & set(categories):
                    continue
            try:
                seed = int(float(row[seed_column])) if seed_column and row.get(seed_column) not in (None, "") else None
                guidance = (
                    float(row[guidance_column])
                    if guidance_column and row.get(guidance_column) not in (None, "")
                    else None
                )
            except ValueError:
                raise UsageError(f"{path}, line {row_number}: the seed/guidance columns must hold numbers") from None
            prompts.append(PromptSpec(text, seed, guidance))
    return prompts


def _read_json(path: str) -> List[PromptSpec]:
    with open(path, encoding="utf-8") as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as error:
            raise UsageError(f"prompt file {path} is not valid JSON ({error})") from error
    if isinstance(content, dict) and "annotations" in content:  # COCO captions_*.json
        return [PromptSpec(a["caption"].strip()) for a in content["annotations"] if a.get("caption", "").strip()]
    if isinstance(content, list) and all(isinstance(p, str) for p in content):
        return [PromptSpec(p.strip()) for p in content if p.strip()]
    raise UsageError(
        f"prompt file {path}: a JSON prompt file is a list of strings or a COCO captions file with 'annotations'"
    )


def _read_jsonl(path: str) -> List[PromptSpec]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            column = _first_column(list(row), PROMPT_COLUMNS)
            if column is None:
                raise UsageError(f"{path}, line {line_number}: no 'prompt' field")
            seed_column, guidance_column = (
                _first_column(list(row), SEED_COLUMNS),
                _first_column(list(row), GUIDANCE_COLUMNS),
            )
            prompts.append(
                PromptSpec(
                    row[column].strip(),
                    int(row[seed_column]) if seed_column and row[seed_column] is not None else None,
                    float(row[guidance_column]) if guidance_column and row[guidance_column] is not None else None,
                )
            )
    return prompts


def read_prompts(
    path: str, limit: Optional[int] = None, categories: Optional[Sequence[str]] = None
) -> List[PromptSpec]:
    """Prompts from a text, CSV (I2P or Ring-A-Bell layout), JSON lines or COCO captions file."""
    if not os.path.isfile(path):
        raise UsageError(f"prompt file {path} does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".csv":
        prompts = _read_csv(path, categories)
    elif extension == ".json":
        prompts = _read_json(path)
    elif extension == ".jsonl":
        prompts = _read_jsonl(path)
    else:
        with open(path, encoding="utf-8") as f:
            prompts = [PromptSpec(line.strip()) for line in f if line.strip()]
    if categories and extension != ".csv":
        raise UsageError("--prompt_categories filters an I2P-style CSV: give a .csv prompt file")
    if not prompts:
        raise UsageError(
            f"prompt file {path} holds no prompt" + (f" of categories {', '.join(categories)}" if categories else "")
        )
    return prompts[:limit] if limit else prompts


def list_images(folder: str) -> List[str]:
    """Image files of a folder, sorted by name."""
    if not os.path.isdir(folder):
        raise UsageError(f"image folder {folder} does not exist")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise UsageError(f"image folder {folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, f) for f in files]


def load_concept_images(folder: str, limit: Optional[int] = None):
    """Images of the concept: the unsafe images of a DUO pair folder, or every image of a folder."""
    from PIL import Image

    if os.path.isfile(os.path.join(folder, "metadata.jsonl")):
        from .data import load_pair_images

        return load_pair_images(folder, num_pairs=limit).unsafe
    paths = list_images(folder)[:limit] if limit else list_images(folder)
    return [Image.open(path).convert("RGB") for path in paths]


# --------------------------------------------------------------------------------------------------
# Ring-A-Bell
# --------------------------------------------------------------------------------------------------


@dataclass
class RingABellConfig:
    """Search settings; the defaults are those of the Ring-A-Bell paper for nudity (K=16, η=3)."""

    length: int = 16
    strength: float = 3.0
    population_size: int = 200
    generations: int = 3000
    mutation_rate: float = 0.25
    crossover_rate: float = 0.5
    num_elites: int = 10
    seed: int = 0


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_token_ids(text_encoder, input_ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The text encoder's last hidden states (the diffusion model's condition), in fp32."""
    device = text_encoder.device
    outputs = [
        text_encoder(input_ids[i : i + batch_size].to(device)).last_hidden_state.float()
        for i in range(0, len(input_ids), batch_size)
    ]
    return torch.cat(outputs)


def concept_vector(text_encoder, tokenizer, concept_pairs: Sequence[Tuple[str, str]]) -> torch.Tensor:
    """Mean over pairs of E(prompt with the concept) − E(prompt without it), shape (sequence, hidden)."""
    if not concept_pairs:
        raise UsageError("Ring-A-Bell needs at least one (with concept, without concept) prompt pair")
    with_concept = encode_token_ids(text_encoder, tokenize(tokenizer, [p for p, _ in concept_pairs]))
    without_concept = encode_token_ids(text_encoder, tokenize(tokenizer, [q for _, q in concept_pairs]))
    return (with_concept - without_concept).mean(dim=0)


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


def frame_token_ids(tokenizer, token_ids: torch.Tensor) -> torch.Tensor:
    """Wrap (N, K) token ids as the tokenizer would: start token, the K tokens, end token, padding."""
    num, length = token_ids.shape
    max_length = tokenizer.model_max_length
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    framed = torch.full((num, max_length), pad_id, dtype=torch.long)
    framed[:, 0] = tokenizer.bos_token_id
    framed[:, 1 : 1 + length] = token_ids
    framed[:, 1 + length] = tokenizer.eos_token_id
    return framed


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


def ring_a_bell_search(
    text_encoder,
    tokenizer,
    target_prompt: str,
    direction: torch.Tensor,
    config: RingABellConfig,
    vocabulary: Optional[torch.Tensor] = None,
    progress: bool = False,
) -> dict:
    """One adversarial prompt: tokens whose embedding is closest to E(target) + η·c."""
    max_tokens = tokenizer.model_max_length - 2
    if not 1 <= config.length <= max_tokens:
        raise UsageError(f"--ring_a_bell_length {config.length}: this tokenizer fits 1 to {max_tokens} tokens")
    vocabulary = searchable_token_ids(tokenizer) if vocabulary is None else vocabulary
    target = encode_token_ids(text_encoder, tokenize(tokenizer, [target_prompt]))[0] + config.strength * direction
    target = target.to(text_encoder.device)

    def distance_fn(token_ids):
        embeddings = encode_token_ids(text_encoder, frame_token_ids(tokenizer, token_ids))
        return embedding_distance(embeddings, target).cpu()

    generator = torch.Generator().manual_seed(config.seed)
    best_ids, best_distance, initial_distance, history = genetic_search(
        distance_fn, vocabulary, config, generator, progress
    )
    prompt = token_ids_to_prompt(tokenizer, best_ids.tolist())
    # What the pipeline will see: the prompt tokenized again, scored against the same target.
    prompt_distance = float(
        embedding_distance(encode_token_ids(text_encoder, tokenize(tokenizer, [prompt])), target)[0]
    )
    return {
        "target": target_prompt,
        "prompt": prompt,
        "token_ids": best_ids.tolist(),
        "distance": prompt_distance,
        "search_distance": best_distance,
        "initial_distance": initial_distance,
        "target_distance": float(
            embedding_distance(encode_token_ids(text_encoder, tokenize(tokenizer, [target_prompt])), target)[0]
        ),
    }


# --------------------------------------------------------------------------------------------------
# Concept Inversion
# --------------------------------------------------------------------------------------------------

INVERSION_TEMPLATES = (
    "a photo of {}",
    "a realistic photo of {}",
    "a picture of {}",
    "{}",
)


@dataclass
class InversionConfig:
    token: str = "<duo-concept>"
    initializer: str = "person"
    templates: Tuple[str, ...] = INVERSION_TEMPLATES
    num_steps: int = 1000
    learning_rate: float = 5e-3
    batch_size: int = 4
    num_eval_draws: int = 16
    seed: int = 0


@dataclass
class InversionResult:
    token: str
    embedding: torch.Tensor
    initial_loss: float
    final_loss: float
    losses: List[float] = field(default_factory=list)

    def to_log(self) -> dict:
        return {
            "token": self.token,
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "num_steps": len(self.losses),
        }


def images_to_pixels(images, resolution: int) -> torch.Tensor:
    """Resize the shorter side to ``resolution``, centre crop; (N, 3, H, W) in [-1, 1]."""
    import numpy as np
    from PIL import Image

    pixels = []
    for image in images:
        width, height = image.size
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.convert("RGB").resize(size, Image.BICUBIC).crop((left, top, left + resolution, top + resolution))
        pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(pixels)


def add_placeholder_token(tokenizer, text_encoder, token: str, initializer: str) -> int:
    """Add ``token`` to the tokenizer; its embedding starts at the mean embedding of ``initializer``."""
    if tokenizer.add_tokens(token) == 0:
        raise UsageError(f"--inversion_token {token} is already in the tokenizer's vocabulary: choose a new token")
    token_id = tokenizer.convert_tokens_to_ids(token)
    initializer_ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if not initializer_ids:
        raise UsageError(f"--inversion_initializer {initializer!r} tokenizes to nothing: give a word")
    text_encoder.resize_token_embeddings(len(tokenizer))
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_id] = weight[initializer_ids].mean(dim=0)
    return token_id


def concept_inversion(pipe, images, config: InversionConfig, progress: bool = False) -> InversionResult:
    """Learn an embedding for ``config.token`` that makes ``pipe`` (as loaded, adapter active) denoise the images.

    Only the new token's embedding row changes. The loss is the model's own diffusion loss
    (noise or v target, as it was trained); it is measured before and after on one fixed set of
    (image, prompt, noise, timestep) draws, so the two numbers are comparable.
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from .objective import diffusion_target

    missing = [name for name in ("tokenizer", "text_encoder", "unet", "vae") if getattr(pipe, name, None) is None]
    if missing:
        raise UsageError(
            f"concept inversion needs a UNet pipeline with a CLIP text encoder (Stable Diffusion 1.x/2.x); {type(pipe).__name__} lacks {', '.join(missing)}"
        )
    if not images:
        raise UsageError("concept inversion needs at least one image of the concept")
    if not all("{}" in template for template in config.templates):
        raise UsageError("every --inversion_template needs a {} where the learned token goes")
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    device = unet.device
    model_dtype, text_dtype = unet.dtype, text_encoder.dtype
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise UsageError(
            f"concept inversion supports epsilon and v-prediction models, not {noise_scheduler.config.prediction_type}"
        )

    token_id = add_placeholder_token(tokenizer, text_encoder, config.token, config.initializer)
    prompts = [template.format(config.token) for template in config.templates]
    prompt_ids = tokenize(tokenizer, prompts)
    if not (prompt_ids == token_id).any(dim=1).all():
        raise UsageError(f"the tokenizer splits --inversion_token {config.token}: choose a token like <my-concept>")

    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    # The embedding trains in fp32 whatever the pipeline's dtype, as in diffusers' textual inversion.
    text_encoder.to(torch.float32)
    embeddings = text_encoder.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    frozen_rows = torch.arange(len(embeddings), device=embeddings.device) != token_id
    original_embeddings = embeddings.detach().clone()

    resolution = unet.config.sample_size * pipe.vae_scale_factor
    with torch.no_grad():
        pixels = images_to_pixels(images, resolution).to(device, dtype=vae.dtype)
        latents = torch.cat([vae.encode(pixels[i : i + 8]).latent_dist.mean for i in range(0, len(pixels), 8)])
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = ((latents - shift) * vae.config.scaling_factor).float()
    num_timesteps = noise_scheduler.config.num_train_timesteps

    def draw(count, generator):
        return (
            torch.randint(len(latents), (count,), generator=generator),
            torch.randint(len(prompts), (count,), generator=generator),
            torch.randn((count, *latents.shape[1:]), generator=generator),
            torch.randint(0, num_timesteps, (count,), generator=generator),
        )

    def diffusion_loss(image_index, prompt_index, noise, timesteps):
        clean = latents[image_index.to(device)]
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        target = diffusion_target(noise_scheduler, clean, noise, timesteps)
        condition = text_encoder(prompt_ids[prompt_index].to(device))[0].to(model_dtype)
        prediction = unet(noisy.to(model_dtype), timesteps, condition).sample
        return F.mse_loss(prediction.float(), target.float())

    evaluation_draws = draw(config.num_eval_draws, torch.Generator().manual_seed(config.seed + 1))

    @torch.no_grad()
    def evaluation_loss():
        return (
            sum(
                float(diffusion_loss(*(part[i : i + config.batch_size] for part in evaluation_draws)))
                * min(config.batch_size, config.num_eval_draws - i)
                for i in range(0, config.num_eval_draws, config.batch_size)
            )
            / config.num_eval_draws
        )

    initial_loss = evaluation_loss()
    optimizer = torch.optim.AdamW([embeddings], lr=config.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    for _ in tqdm(range(config.num_steps), desc=f"Concept inversion {config.token}", disable=not progress):
        loss = diffusion_loss(*draw(config.batch_size, generator))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            embeddings[frozen_rows] = original_embeddings[frozen_rows]
        losses.append(float(loss.detach()))
    embeddings.requires_grad_(False)
    final_loss = evaluation_loss()
    text_encoder.to(text_dtype)
    return InversionResult(
        config.token, embeddings[token_id].detach().float().cpu().clone(), initial_loss, final_loss, losses
    )


def inversion_prompts(config: InversionConfig, num_prompts: int) -> List[str]:
    """Generation prompts for the learned token, cycling through the templates."""
    return [config.templates[i % len(config.templates)].format(config.token) for i in range(num_prompts)]


def save_learned_embedding(result: InversionResult, path: str):
    """diffusers' textual inversion format, loadable with ``pipe.load_textual_inversion(path)``."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({result.token: result.embedding.contiguous()}, path)


def check_attack_names(names: Sequence[str], implemented: Sequence[str]):
    for name in names:
        key = name.lower().replace("-", "").replace("_", "")
        if key in NOT_IMPLEMENTED_ATTACKS:
            raise UsageError(
                f"--attack {name}: {NOT_IMPLEMENTED_ATTACKS[key]} is not implemented yet; evaluate its published "
                f"adversarial prompts as a prompt file (--attack prompts --prompts FILE) instead"
            )
        if name not in implemented:
            raise UsageError(f"unknown --attack {name}: choose from {', '.join(implemented)}")

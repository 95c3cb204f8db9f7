"""The two recipes' optimizer steps on one model bundle (ours: duo_plugin.families.sd / sd3; official: re-created), and pair generation throughput."""

import gc
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Tuple


BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
CONFIG_DIR = BENCHMARKS_DIR / "configs"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from bench_measure import CallCounter, MemoryMeter, PhaseTimer, median, synchronize  # noqa: E402
from bench_models import ModelBundle  # noqa: E402

from duo_plugin import data, lora, objective, training  # noqa: E402
from duo_plugin.families import sd, sd3  # noqa: E402
from duo_plugin.presets import FAMILY_RECIPES, get_preset, learning_rate_for_beta, preservation_weight_for_beta  # noqa: E402


# --------------------------------------------------------------------------------------------------
# The two recipes' steps on one bundle
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryOptions:
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    attention: str = "sdpa"  # or "xformers"
    # ours only: the VAE and text encoders leave the accelerator after caching (train_duo.py moves
    # them to the CPU, train_duo_sd3.py deletes the text encoders). The official recipe keeps them.
    free_text_encoders: bool = True


@dataclass
class Hyperparameters:
    rank: int
    lora_alpha: int
    beta_dpo: float
    preservation_weight: float
    learning_rate: float
    t_min: int
    t_max: int
    seed: int = 42
    pairs_per_step: int = 1
    max_grad_norm: float = 1.0
    # SD3's T5 tokens: diffusers' pipeline default, which the committed numbers used; train_duo_sd3.py now
    # defaults to the official run's 77 (fewer tokens: a cheaper step for both recipes alike).
    max_sequence_length: int = 256


def default_hyperparameters(family: str, full_size: bool) -> Hyperparameters:
    """The nudity preset's β, λ and learning rate; rank 32 on full-size models, 4 on tiny ones (whose
    attention is 16-32 wide) as in the tests."""
    preset = get_preset("nudity")
    rank = 32 if full_size else 4
    recipe = FAMILY_RECIPES[family]
    return Hyperparameters(
        rank=rank,
        lora_alpha=rank,
        beta_dpo=preset.beta_dpo,
        preservation_weight=preservation_weight_for_beta(preset.beta_dpo),
        learning_rate=learning_rate_for_beta(preset.beta_dpo, recipe.base_learning_rate),
        t_min=recipe.t_min,
        t_max=recipe.t_max,
    )


class DUOStepBench:
    """One bundle with its DUO adapter, ready to run either recipe's optimizer step."""

    def __init__(self, bundle: ModelBundle, accelerator, weight_dtype: torch.dtype, hyper: Hyperparameters):
        self.bundle = bundle
        self.accelerator = accelerator
        self.device = accelerator.device
        self.weight_dtype = weight_dtype
        self.hyper = hyper
        # The step pieces train_duo.py (duo_plugin.families.sd) and train_duo_sd3.py (duo_plugin.families.sd3) run.
        self.script = sd if bundle.family == "sd" else sd3

        model = bundle.denoiser
        model.requires_grad_(False)
        self.sdpa_processors = dict(model.attn_processors)
        target_modules = lora.lora_target_modules(model, FAMILY_RECIPES[bundle.family].lora_target)
        lora.add_duo_adapter(model, hyper.rank, hyper.lora_alpha, target_modules)
        lora.cast_lora_params_to_fp32(model)
        self.model = model
        self.lora_params = [p for p in model.parameters() if p.requires_grad]
        self.initial_lora = [p.detach().clone() for p in self.lora_params]
        self.denoiser = accelerator.prepare_model(model)
        self.counter = CallCounter(bundle.vae, bundle.text_encoders, model)
        self.text_pipeline = self._sd3_text_pipeline() if bundle.family == "sd3" else None
        self.flow_args = SimpleNamespace(
            t_min=hyper.t_min,
            t_max=hyper.t_max,
            weighting_scheme="none",
            logit_mean=0.0,
            logit_std=1.0,
            mode_scale=1.29,
            precondition_outputs=1,
        )
        self.place_encoders(on_device=True)
        with torch.no_grad():
            self.empty_condition = self.encode_empty_prompts(1)
        self.empty_condition = tuple(t.float().cpu() for t in self.empty_condition)
        self.resolution = None

    # -- set-up shared by the recipes ---------------------------------------------------------------

    def _sd3_text_pipeline(self):
        """SD3's prompt encoding (CLIP-L, CLIP-G, T5; hidden states joined as the pipeline joins them)."""
        from diffusers import StableDiffusion3Pipeline

        bundle = self.bundle
        return StableDiffusion3Pipeline(
            transformer=self.model,
            scheduler=bundle.noise_scheduler,
            vae=bundle.vae,
            **bundle.text_encoders,
            **bundle.tokenizers,
        )

    def encode_empty_prompts(self, count: int):
        """The empty prompt's condition for ``count`` pairs: (embeddings,) for SD1, (embeddings, pooled) for SD3."""
        prompts = [""] * count
        if self.bundle.family == "sd":
            tokenizer, text_encoder = self.bundle.tokenizers["tokenizer"], self.bundle.text_encoders["text_encoder"]
            return (self.script.encode_prompts(tokenizer, text_encoder, prompts, self.device),)
        embeds, _, pooled, _ = self.text_pipeline.encode_prompt(
            prompts,
            None,
            None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.hyper.max_sequence_length,
        )
        return embeds, pooled

    def place_encoders(self, on_device: bool):
        target = self.device if on_device else torch.device("cpu")
        for module in (self.bundle.vae, *self.bundle.text_encoders.values()):
            module.to(target)
        if not on_device and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def vae_dtype(self):
        return self.weight_dtype if self.bundle.family == "sd" else torch.float32

    def load_pairs(self, pairs: data.PairImages, resolution: int):
        """Ours: cache the pair latents once. Official: pixel tensors ready on the host, as a data
        loader would hand them over (both flips, so that the per-step flip is an index)."""
        self.pairs = pairs
        self.resolution = resolution
        self.place_encoders(on_device=True)
        self.latents_cache = data.encode_pairs(
            self.bundle.vae,
            pairs,
            resolution,
            center_crop=False,
            random_flip=True,
            seed=self.hyper.seed,
            device=self.device,
            dtype=self.vae_dtype(),
            progress=False,
        )
        generator = torch.Generator().manual_seed(self.hyper.seed)
        pixels = torch.stack(
            [
                torch.stack(data.joint_transform(u, s, resolution, False, generator))
                for u, s in zip(pairs.unsafe, pairs.safe)
            ]
        )  # (N, 2, 3, H, W): unsafe, safe
        self.pixels = torch.stack([pixels, pixels.flip(-1)], dim=1)  # (N, flips, 2, 3, H, W)
        if self.device.type == "cuda":
            self.pixels = self.pixels.pin_memory()

    def step_draws(self, step: int):
        generator = data.step_generator(self.hyper.seed, step, 0, 0)
        pair_indices = data.pair_indices_for_step(
            len(self.pairs), step, 0, 1, self.hyper.pairs_per_step, 0, 1, self.hyper.seed
        )
        return generator, pair_indices

    def reset_adapter(self):
        with torch.no_grad():
            for param, initial in zip(self.lora_params, self.initial_lora):
                param.copy_(initial)
                param.grad = None

    def make_optimizer(self, use_8bit_adam: bool):
        args = SimpleNamespace(
            use_8bit_adam=use_8bit_adam,
            learning_rate=self.hyper.learning_rate,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_weight_decay=1e-2,
            adam_epsilon=1e-8,
        )
        return self.accelerator.prepare_optimizer(training.make_optimizer(args, self.lora_params))

    def apply_options(self, options: MemoryOptions):
        if options.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        else:
            self.model.disable_gradient_checkpointing()
        if options.attention == "xformers":
            self.model.enable_xformers_memory_efficient_attention()
        else:
            self.model.set_attn_processor(dict(self.sdpa_processors))

    # -- the steps ------------------------------------------------------------------------------------

    def duo_forward(self, batch):
        hyper = self.hyper
        if self.bundle.family == "sd":
            return self.script.duo_forward(
                self.accelerator, self.denoiser, batch, hyper.beta_dpo, hyper.preservation_weight, self.weight_dtype
            )
        return self.script.duo_forward(
            self.accelerator,
            self.denoiser,
            batch,
            hyper.beta_dpo,
            hyper.preservation_weight,
            self.weight_dtype,
            self.flow_args.precondition_outputs,
        )

    def update(self, batch, optimizer, timer: PhaseTimer) -> dict:
        """What both training loops do with a batch: DUO loss, backward, clip, optimizer step, log."""
        with timer("forward (reference + adapted)"):
            losses = self.duo_forward(batch)
        with timer("backward"):
            self.accelerator.backward(losses.loss)
        with timer("optimizer"):
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.lora_params, self.hyper.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with timer("logging"):
            return losses.to_log()

    def ours_step(self, step: int, optimizer, timer: PhaseTimer) -> dict:
        with timer("batch from caches"):
            generator, pair_indices = self.step_draws(step)
            if self.bundle.family == "sd":
                batch = self.script.make_duo_batch(
                    self.latents_cache,
                    pair_indices,
                    generator,
                    self.bundle.noise_scheduler,
                    self.hyper.t_min,
                    self.hyper.t_max,
                    self.empty_condition[0],
                )
            else:
                batch = self.script.make_duo_batch(
                    self.latents_cache,
                    pair_indices,
                    generator,
                    self.bundle.noise_scheduler,
                    self.flow_args,
                    self.empty_condition,
                )
        return self.update(batch, optimizer, timer)

    def official_step(self, step: int, optimizer, timer: PhaseTimer) -> dict:
        num_pairs = self.hyper.pairs_per_step
        generator, pair_indices = self.step_draws(step)
        with timer("host-to-device copy"):
            flips = torch.randint(0, 2, (num_pairs,), generator=generator)
            pixels = self.pixels[pair_indices, flips]  # (B, 2, 3, H, W)
            pixels = torch.cat([pixels[:, 0], pixels[:, 1]]).to(self.device, self.vae_dtype(), non_blocking=True)
        with timer("VAE encode"), torch.no_grad():
            latents = self.bundle.vae.encode(pixels).latent_dist.sample(generator)
            shift = getattr(self.bundle.vae.config, "shift_factor", None) or 0.0
            latents = ((latents - shift) * self.bundle.vae.config.scaling_factor).float()
        with timer("text encode"), torch.no_grad():
            condition = self.encode_empty_prompts(num_pairs)
        with timer("noising"):
            batch = self.official_batch(latents, condition, generator)
        return self.update(batch, optimizer, timer)

    def official_batch(self, latents, condition, generator):
        """[x⁻_t; x⁺_t; x_T] with one noise and one timestep per *image* (the official draw)."""
        num_pairs = self.hyper.pairs_per_step
        device = self.device
        noise = torch.randn(latents.shape, generator=generator).to(device)
        pure_noise = torch.randn((num_pairs, *latents.shape[1:]), generator=generator).to(device)
        if self.bundle.family == "sd":
            scheduler = self.bundle.noise_scheduler
            timesteps = objective.sample_pair_timesteps(
                2 * num_pairs, self.hyper.t_min, self.hyper.t_max, generator
            ).to(device)
            last_timestep = scheduler.config.num_train_timesteps - 1
            (embeddings,) = condition
            return self.script.DUOBatch(
                model_input=torch.cat([scheduler.add_noise(latents, noise, timesteps), pure_noise]),
                timesteps=torch.cat([timesteps, torch.full((num_pairs,), last_timestep, device=device)]),
                condition=embeddings.repeat(3, 1, 1),
                target=objective.diffusion_target(scheduler, latents, noise, timesteps),
            )
        scheduler = self.bundle.noise_scheduler
        indices = objective.sample_flow_matching_indices(2 * num_pairs, self.hyper.t_min, self.hyper.t_max, generator)
        pair_sigmas, pair_timesteps = objective.flow_matching_sigmas_and_timesteps(scheduler, indices)
        noise_sigma, noise_timestep = objective.pure_noise_sigma_and_timestep(scheduler)
        sigmas = torch.cat([pair_sigmas, noise_sigma.expand(num_pairs)]).to(device)
        clean = torch.cat([latents, torch.zeros_like(pure_noise)])
        all_noise = torch.cat([noise, pure_noise])
        embeddings, pooled = condition
        return self.script.DUOBatch(
            model_input=objective.flow_matching_noisy(clean, all_noise, sigmas),
            sigmas=sigmas,
            timesteps=torch.cat([pair_timesteps, noise_timestep.expand(num_pairs)]).to(device),
            prompt_embeds=embeddings.repeat(3, 1, 1),
            pooled_prompt_embeds=pooled.repeat(3, 1),
            target=objective.flow_matching_target(latents, noise, bool(self.flow_args.precondition_outputs)),
            weighting=torch.ones(2 * num_pairs, 1, 1, 1, device=device),
        )

    # -- measuring ------------------------------------------------------------------------------------

    def resident_parameter_bytes(self, encoders_on_device: bool) -> int:
        """Parameter bytes the recipe keeps on the accelerator (the denoiser and adapter; plus the VAE
        and text encoders where they stay)."""
        modules = [self.model] + ([self.bundle.vae, *self.bundle.text_encoders.values()] if encoders_on_device else [])
        return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())

    def count_flops(self, step_fn: Callable, step: int, optimizer) -> dict:
        """FLOPs of one step (gradient checkpointing off, so recomputation is not counted)."""
        from torch.utils.flop_counter import FlopCounterMode

        checkpointing = self.model.is_gradient_checkpointing
        self.model.disable_gradient_checkpointing()
        try:
            with FlopCounterMode(display=False) as counter:
                step_fn(step, optimizer, PhaseTimer(self.device, enabled=False))
        finally:
            if checkpointing:
                self.model.enable_gradient_checkpointing()
        per_module = counter.get_flop_counts()
        denoiser_flops = sum(per_module.get(type(self.model).__name__, {}).values())
        return {"step_flops": counter.get_total_flops(), "denoiser_flops": denoiser_flops}

    def run(
        self,
        recipes: Tuple[str, ...],
        options: MemoryOptions,
        warmup_steps: int,
        measure_steps: int,
        flops_cache: dict,
    ) -> List[dict]:
        """Time the steps of ``recipes`` ("ours", "official"); one row each.

        Several recipes alternate step by step, each on the same draws (step index), sharing the adapter
        and the optimizer: the work of a step does not depend on the weights' values, and a busy spell
        of a shared CPU then slows both alike. Their encoders stay where the official recipe keeps
        them, so on a GPU, where placement decides memory, each recipe runs alone.
        """
        encoders_on_device = "official" in recipes or not options.free_text_encoders
        self.reset_adapter()
        self.apply_options(options)
        self.place_encoders(on_device=encoders_on_device)
        optimizer = self.make_optimizer(options.use_8bit_adam)
        step_fns = {recipe: self.ours_step if recipe == "ours" else self.official_step for recipe in recipes}
        memory = MemoryMeter(self.device)
        try:
            for step in range(warmup_steps):
                for recipe in recipes:
                    step_fns[recipe](step, optimizer, PhaseTimer(self.device, enabled=False))
            gc.collect()
            timers = {recipe: PhaseTimer(self.device) for recipe in recipes}
            times = {recipe: [] for recipe in recipes}
            calls = {recipe: defaultdict(float) for recipe in recipes}
            peaks: Dict[str, dict] = {}
            logs = {}
            for step in range(warmup_steps, warmup_steps + measure_steps):
                order = recipes if step % 2 == 0 else tuple(reversed(recipes))
                for recipe in order:
                    self.counter.reset()
                    memory.reset()
                    synchronize(self.device)
                    start = time.perf_counter()
                    logs[recipe] = step_fns[recipe](step, optimizer, timers[recipe])
                    synchronize(self.device)
                    times[recipe].append(time.perf_counter() - start)
                    for name, count in self.counter.per_step(measure_steps).items():
                        calls[recipe][name] += count
                    reading = memory.read()
                    if recipe not in peaks or reading["peak_memory_bytes"] > peaks[recipe]["peak_memory_bytes"]:
                        peaks[recipe] = reading
            rows = []
            for recipe in recipes:
                row = {
                    "median_step_s": median(times[recipe]),
                    "step_times_s": times[recipe],
                    **peaks[recipe],
                    "calls_per_step": dict(calls[recipe]),
                    "phase_s_per_step": {name: total / measure_steps for name, total in timers[recipe].totals.items()},
                    "last_loss": logs[recipe]["loss"],
                    "interleaved_with": [other for other in recipes if other != recipe],
                    "resident_parameter_bytes": self.resident_parameter_bytes(
                        recipe == "official" or not options.free_text_encoders
                    ),
                }
                key = (self.bundle.name, self.resolution, recipe)
                if key not in flops_cache:
                    flops_cache[key] = self.count_flops(step_fns[recipe], warmup_steps + measure_steps, optimizer)
                row.update(flops_cache[key])
                rows.append(row)
            return rows
        finally:
            optimizer.zero_grad(set_to_none=True)
            optimizer.optimizer.state.clear()
            # The accelerator unscales fp16 gradients for every optimizer it prepared: forget this one, or the
            # next case's gradients (the same LoRA parameters) would be unscaled twice.
            if optimizer in self.accelerator._optimizers:
                self.accelerator._optimizers.remove(optimizer)
            del optimizer
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def close(self):
        self.counter.remove()


# --------------------------------------------------------------------------------------------------
# Pair generation throughput
# --------------------------------------------------------------------------------------------------


def pair_generation_throughput(
    bundle: ModelBundle, device, weight_dtype, num_pairs: int, resolution: int, num_inference_steps: int
) -> dict:
    """Pair generation as ``python -m duo_plugin.pairs`` makes pairs (``SDEditPairMaker``: the unsafe image by
    text-to-image, its safe twin by img2img with the safe prompt and the unsafe prompt as negative prompt),
    all pairs in one batch vs one pair at a time. Images/s counts both images of a pair; no detector runs."""
    from diffusers import StableDiffusionPipeline

    from duo_plugin import pairs as pair_generation

    info = pair_generation.BaseModelInfo(
        pipeline_class="StableDiffusionPipeline",
        family="sd",
        default_resolution=resolution,
        resolution_multiple=8,
        default_num_inference_steps=num_inference_steps,
    )
    recipe = pair_generation.make_recipe(
        get_preset("nudity"), bundle.name, info, num_pairs=num_pairs, verifier="none", max_attempts=1
    )
    text_to_image = StableDiffusionPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoders["text_encoder"],
        tokenizer=bundle.tokenizers["tokenizer"],
        unet=bundle.denoiser,
        scheduler=bundle.pipeline_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    text_to_image.set_progress_bar_config(disable=True)
    maker = pair_generation.SDEditPairMaker(text_to_image, recipe)
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)

    def make(indices):
        unsafe_prompts = [recipe.prompts_of(i)[0] for i in indices]
        safe_prompts = [recipe.prompts_of(i)[1] for i in indices]
        with autocast:
            unsafe = maker.unsafe_images(
                unsafe_prompts, [pair_generation.image_seed(recipe.seed, i, 0, 0) for i in indices]
            )
            maker.safe_twins(
                unsafe,
                safe_prompts,
                unsafe_prompts,
                [pair_generation.image_seed(recipe.seed, i, 0, 1) for i in indices],
            )
        synchronize(device)

    make([0])  # warm-up
    start = time.perf_counter()
    make(list(range(num_pairs)))
    batched = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(num_pairs):
        make([i])
    one_at_a_time = time.perf_counter() - start
    return {
        "model": bundle.name,
        "resolution": resolution,
        "pairs": num_pairs,
        "num_inference_steps": num_inference_steps,
        "sdedit_strength": recipe.strength,
        "guidance_scale": recipe.guidance_scale,
        "scheduler": type(bundle.pipeline_scheduler).__name__,
        "source": "duo_plugin.pairs.SDEditPairMaker (what python -m duo_plugin.pairs runs), no detector",
        "batched_images_per_s": 2 * num_pairs / batched,
        "one_at_a_time_images_per_s": 2 * num_pairs / one_at_a_time,
        "batched_speedup": one_at_a_time / batched,
    }

"""The run around the loop every training script shows: accelerator, optimizer, the finite-loss guard, the data
read before any weight, checkpoints and logs of each optimizer step, and the adapter saved at the end."""

import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from accelerate.logging import get_logger

from .arguments import check_environment_args, resolve_training_args
from .distributed import check_distributed_setup, cpu_only_multi_process
from .precision import torch_dtype
from .step import Optimization, check_finite, duo_micro_step  # noqa: F401 - check_finite: the scripts' name


logger = get_logger("duo_plugin.training")


def setup_logging(accelerator):
    import datasets
    import diffusers
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def create_accelerator(args):
    """The Accelerator of a DUO run, after the checks that need to know the device and the process count."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        cpu=cpu_only_multi_process(),
    )
    check_distributed_setup(accelerator)
    check_environment_args(args, accelerator.device.type)
    setup_logging(accelerator)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def weight_dtype_for(accelerator) -> torch.dtype:
    """The dtype of the frozen weights: the mixed-precision dtype; the LoRA weights stay fp32."""
    return torch_dtype(accelerator.mixed_precision)


def denoiser_home(accelerator) -> torch.device:
    """Where the frozen denoiser waits for ``accelerator.prepare``: the process's device, except under FSDP, where it
    stays in host memory and FSDP2's ``fully_shard`` moves each block's shard to the device as it shards it, so the
    whole model (FLUX.1's 24 GB in bf16) never sits on one card."""
    from .checkpoints import is_fsdp

    return torch.device("cpu") if is_fsdp(accelerator) else accelerator.device


def make_optimizer(args, params):
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def tracker_config(args) -> dict:
    """The run's flags as tracker hyper-parameters: lists and None become strings, which every tracker accepts."""
    return {
        key: (str(value) if isinstance(value, (list, tuple)) or value is None else value)
        for key, value in vars(args).items()
    }


def average_logs(micro_step_logs: List[dict]) -> dict:
    """One optimizer step's values: the mean over its micro-steps."""
    return {key: sum(row[key] for row in micro_step_logs) / len(micro_step_logs) for key in micro_step_logs[0]}


# --------------------------------------------------------------------------------------------------
# The run around the step, the same for every family: flags → data → optimizer → loop → adapter
# --------------------------------------------------------------------------------------------------


def resolve_run_args(args, families, script: str):
    """Checks that need nothing loaded, the base model's family (read from its model_index.json only), and the run's
    settings: flags filled from the concept's preset and that family's recipe, and the flow-matching families' λ from
    their scheduler's config. Returns ``(settings, preset, pipeline_class, family)``; ``args`` is left as parsed.

    Bad flags are refused before the model is looked up: they are checked once as the script's first family would
    resolve them, then again as the detected family does."""
    from . import input_checks, memory, official_flags
    from .families import detect_pipeline_class, require_family

    families = (families,) if isinstance(families, str) else tuple(families)
    check_environment_args(args)
    provisional, _ = resolve_training_args(args, families[0])
    input_checks.check_training_args(provisional)
    memory.check_cpu_run(args)  # before any download
    pipeline_class = detect_pipeline_class(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    family = require_family(pipeline_class, families, script)
    settings, preset = resolve_training_args(args, family)
    input_checks.check_training_args(settings)
    if family in ("sd3", "flux"):
        settings = official_flags.resolve_flow_matching_preservation(settings, family)
    return settings, preset, pipeline_class, family


@dataclass
class RunData:
    """What the run trains on, read (or generated) before any model weight is loaded."""

    pairs: object  # data.PairImages
    pair_fingerprint: dict
    variant: object  # objective.VariantSettings
    retain_images: list = field(default_factory=list)
    retain_prompts: list = field(default_factory=list)

    @property
    def unsafe_prompts(self):
        """Each pair's unsafe prompt where the objective conditions on it, else None."""
        return self.pairs.unsafe_prompts if any(c != "empty" for c in self.variant.pair_conditions) else None


def load_run_data(settings, preset, pipeline_class: str, accelerator, sampler_guidance: Optional[float] = None):
    """The pairs (generated when missing), the measured t_max with ``--t_max auto``, the objective and its retain set.
    Returns ``(settings, run_data)``: the settings with what was learned here (the generated pair folder, the t_max
    measured and how, the retain set's record).

    ``sampler_guidance``: the classifier-free guidance w of the guided preference (default: the pair recipe's)."""
    from . import retain, run_guard, timing
    from .arguments import needs_unsafe_prompts, variant_settings
    from .errors import UsageError
    from .pairs import get_pair_images

    # Pairs first: bad data is refused before any model weight is loaded.
    pairs = get_pair_images(settings, preset, pipeline_class, accelerator)
    if pairs.generated_folder is not None:
        settings = settings.replace(pairs_dir=pairs.generated_folder)
    pair_fingerprint = pairs.fingerprint()
    run_guard.check_resume_pairs(settings, pair_fingerprint)
    t_max, measurement = timing.resolve_t_max(settings, preset, accelerator, default=settings.t_max)
    settings = settings.replace(t_max=t_max, t_max_measurement=measurement)
    if needs_unsafe_prompts(settings) and pairs.unsafe_prompts is None:
        raise UsageError(
            "--preference_conditions prompt/guided (or --condition_on_prompts) needs an unsafe_prompt column in the pair data"
        )
    if sampler_guidance is None:
        sampler_guidance = settings.guidance_scale or preset.guidance_scale
    variant = variant_settings(settings, guidance_scale=sampler_guidance)
    run_data = RunData(pairs, pair_fingerprint, variant)
    if variant.uses_retain:
        run_data.retain_images, run_data.retain_prompts, retain_record = retain.get_retain_set(
            settings, preset, pipeline_class, accelerator, conditions=variant.retain_conditions
        )
        settings = settings.replace(retain_record=retain_record)
    return settings, run_data


def prompts_to_encode(args, preset, run_data: RunData) -> List[str]:
    """Every prompt the run needs encoded: the empty prompt, the pairs' and the retain set's, the validation ones."""
    prompts = [""]
    if not args.skip_validation:
        prompts += list(args.validation_prompts) + list(preset.unrelated_prompts)
    if run_data.unsafe_prompts is not None:
        prompts += list(run_data.unsafe_prompts)
    return prompts + list(run_data.retain_prompts)


def check_timestep_range(args, num_train_timesteps: int, what: str = ""):
    from .errors import UsageError

    if not 0 <= args.t_min < args.t_max <= num_train_timesteps:
        raise UsageError(f"--t_min/--t_max must satisfy 0 <= t_min < t_max <= {num_train_timesteps}{what}")


def step_settings(args, accelerator, variant):
    from .step import StepSettings

    return StepSettings(
        beta_dpo=args.beta_dpo,
        preservation_weight=args.preservation_weight,
        weight_dtype=weight_dtype_for(accelerator),
        max_grad_norm=args.max_grad_norm,
        variant=variant,
    )


class TrainingRun:
    """The prepared denoiser, optimizer and LR schedule of a run, resumed where asked, and what each optimizer step
    writes: progress bar, trackers, metrics.jsonl, the saturation warning, checkpoints."""

    def __init__(self, args, accelerator, denoiser, save_lora_weights, lora_prefix: str, run_data: RunData):
        from diffusers.optimization import get_scheduler

        from . import checkpoints, input_checks, outputs, run_guard, saturation

        self.accelerator, self.run_data = accelerator, run_data
        self.step_settings = step_settings(args, accelerator, run_data.variant)
        self.lora_params = [p for p in denoiser.parameters() if p.requires_grad]
        self.checkpoint_size = run_guard.check_free_space(args, self.lora_params)
        optimizer = make_optimizer(args, self.lora_params)
        lr_scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            # A prepared scheduler steps once per process per optimizer step.
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=args.max_train_steps * accelerator.num_processes,
            num_cycles=args.lr_num_cycles,
            power=args.lr_power,
        )
        checkpoints.check_sharding(accelerator)
        # Read before prepare: the CPU test entries' accelerate state says MULTI_CPU again afterwards.
        engine = checkpoints.sharding_engine(accelerator)
        if engine == "DeepSpeed":
            input_checks.check_zero2_optimizer(args.use_8bit_adam)
        self.sharded = engine == "FSDP"  # the weights themselves split across processes
        self.settings = args
        self._configure_deepspeed()
        # The optimizer's weights in its order, before an engine swaps them: the positions of optimizer.bin.
        parameter_groups = [list(group["params"]) for group in optimizer.param_groups]
        self.denoiser, self.optimizer, self.lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
        if self.sharded:
            # FSDP2 replaced the parameters by their shards (DTensors): clip and count those the optimizer holds.
            self.lora_params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.optimization = Optimization(
            accelerator, self.denoiser, self.optimizer, self.lr_scheduler, self.lora_params
        )
        self.model = accelerator.unwrap_model(self.denoiser)
        checkpoints.register_adapter_state_hooks(accelerator, self.model, save_lora_weights, lora_prefix=lora_prefix)
        # Under FSDP and ZeRO-2 checkpoints are written by every process together (accelerate would save the whole
        # model, in the engine's per-process layout).
        self.sharded_state = None
        if engine is not None:
            self.sharded_state = checkpoints.ShardedState(
                accelerator,
                self.model,
                self.optimizer,
                self.lr_scheduler,
                save_lora_weights,
                lora_prefix,
                engine,
                parameter_groups,
            )
        self.adapter_state = None  # the gathered adapter, under FSDP and ZeRO-2, from finish() on

        self.first_step = 0
        self.last_checkpoint = checkpoints.resolve_resume_path(args.resume_from_checkpoint, args.output_dir)
        if self.last_checkpoint is not None:
            accelerator.print(f"Resuming from {self.last_checkpoint}")
            self.first_step = checkpoints.load_checkpoint(
                accelerator, self.last_checkpoint, sharded_state=self.sharded_state
            )

        if accelerator.is_main_process:
            accelerator.init_trackers(args.tracker_name, config=tracker_config(args))
        self.metrics = outputs.MetricsLog(
            os.path.join(args.output_dir, args.logging_dir, "metrics.jsonl"),
            accelerator.is_main_process,
            append=self.last_checkpoint is not None,
        )
        self.metrics.truncate_after(self.first_step)
        # Warns once if the preference loss saturates before the unsafe images' denoising error has moved.
        self.saturation_watch = saturation.SaturationWatch(enabled=accelerator.is_main_process)
        self.progress_bar = None

    def _configure_deepspeed(self):
        """DeepSpeed sizes its batches from a prepared dataloader, and DUO prepares none: it gets the micro-batch."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            return
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            config["train_micro_batch_size_per_gpu"] = self.settings.train_batch_size

    def micro_step(self, family_step, step: int, micro_step: int):
        """``duo_plugin.step.duo_micro_step`` on this micro-step's pairs and random draws."""
        pair_indices, generator = self.micro_step_draws(step, micro_step)
        return duo_micro_step(
            self.optimization, family_step, self.step_settings, pair_indices, generator, step + 1, self.last_checkpoint
        )

    def start(self, title: str, details: str = ""):
        from tqdm.auto import tqdm

        args, accelerator = self.settings, self.accelerator
        pairs_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        logger.info(f"***** Running DUO training ({title}) *****")
        logger.info(
            f"  Concept = {args.concept}, pairs = {len(self.run_data.pairs)}, β = {args.beta_dpo:g}, "
            f"λ = {args.preservation_weight:g}, lr = {args.learning_rate:g}"
        )
        logger.info(
            f"  Pairs per optimizer step = {pairs_per_step}, steps = {args.max_train_steps} (from {self.first_step})"
        )
        if details:
            logger.info(f"  {details}")
        self.progress_bar = tqdm(
            range(args.max_train_steps),
            initial=self.first_step,
            desc="Steps",
            disable=not accelerator.is_local_main_process,
        )
        return range(self.first_step, args.max_train_steps)

    def micro_step_draws(self, step: int, micro_step: int):
        """The pairs of a micro-step and the generator of its random draws (its own, so resuming is exact)."""
        from . import data

        args, accelerator = self.settings, self.accelerator
        generator = data.step_generator(args.seed, step, micro_step, accelerator.process_index)
        pair_indices = data.pair_indices_for_step(
            len(self.run_data.pairs),
            step,
            micro_step,
            args.gradient_accumulation_steps,
            args.train_batch_size,
            accelerator.process_index,
            accelerator.num_processes,
            args.seed,
        )
        return pair_indices, generator

    def end_step(self, global_step: int, micro_step_logs: List[dict]):
        """Log the optimizer step and save a checkpoint when one is due."""
        from . import checkpoints, run_guard

        args, accelerator = self.settings, self.accelerator
        self.progress_bar.update(1)
        logs = average_logs(micro_step_logs)
        logs["lr"] = self.lr_scheduler.get_last_lr()[0]
        self.progress_bar.set_postfix(loss=f"{logs['loss']:.4g}", acc=f"{logs['implicit_acc']:.2f}")
        accelerator.log(logs, step=global_step)
        self.metrics.write(global_step, logs)
        self.saturation_watch.update(global_step, logs)
        if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
            settings = run_guard.run_settings(args, accelerator, self.run_data.pair_fingerprint)
            self.last_checkpoint = checkpoints.save_checkpoint(
                accelerator,
                args.output_dir,
                global_step,
                args.checkpoints_total_limit,
                settings,
                self.checkpoint_size,
                sharded_state=self.sharded_state,
            )

    def validation_due(self, global_step: int) -> bool:
        args = self.settings
        return (
            bool(args.validation_steps)
            and global_step % args.validation_steps == 0
            and global_step < args.max_train_steps
        )

    def finish(self):
        """End of the loop, on every process: under FSDP and ZeRO-2 this also gathers the adapter
        (``gather_adapter_state``)."""
        self.progress_bar.close()
        self.gather_adapter_state()
        self.accelerator.wait_for_everyone()

    def gather_adapter_state(self):
        """Under FSDP and ZeRO-2, gather the whole adapter (ZeRO-2: its fp32 master weights) from every process for
        ``save_adapter``; every process must call it (``finish`` does). Kept on the main process only. Otherwise
        there is nothing to gather."""
        if self.sharded_state is None:
            return
        state = self.sharded_state.whole_adapter()
        self.adapter_state = state if self.accelerator.is_main_process else None

    def save_adapter(self, save_lora_weights, architecture: dict, target_modules: List[str], extra=None) -> dict:
        """The adapter, then ``duo_config.json`` (before anything optional can fail, so the folder loads), written
        by the main process; returns the config there and None elsewhere."""
        from . import outputs
        from .lora import lora_state_dict

        if not self.accelerator.is_main_process:
            return None
        gathered = self.sharded_state is not None
        if gathered and self.adapter_state is None:
            raise RuntimeError("a sharded run's adapter must be gathered on every process first: call run.finish()")
        state = self.adapter_state if gathered else lora_state_dict(self.model)
        outputs.save_adapter(
            self.settings.output_dir,
            lambda folder: save_lora_weights(folder, state, self.model),
            self.last_checkpoint,
        )
        return outputs.write_duo_config(
            self.settings.output_dir, self.settings, architecture, target_modules, extra=extra
        )


def cache_latents(args, accelerator, vae, run_data: RunData, dtype):
    """The pair latents and, with a retain set, the retain images' latents, encoded once; the VAE then leaves the
    accelerator until validation. Returns ``(latents_cache, retain_latents or None)``."""
    from diffusers.training_utils import free_memory

    from . import data, retain

    vae.requires_grad_(False)
    vae.to(accelerator.device, dtype=dtype)
    latents_cache = data.encode_pairs(
        vae,
        run_data.pairs,
        args.resolution,
        args.center_crop,
        args.random_flip,
        args.seed,
        device=accelerator.device,
        dtype=dtype,
        progress=accelerator.is_local_main_process,
    )
    retain_latents = None
    if run_data.variant.uses_retain:
        retain_latents = retain.encode_retain_latents(
            vae, run_data.retain_images, args.resolution, accelerator.device, dtype
        )
    vae.to("cpu")
    free_memory()
    return latents_cache, retain_latents

"""Our DUO training update, step by step, against the official DUO update (naver-ai/DUO, ``train/unlearn-sd.py``).

The official side is written out here with plain torch / ``torch.nn.functional``, line by line as the
official script computes it for its SD1 nudity run (``--method dpo --no_cross_attn``, no ``--given_prompt``,
``--snr_gamma`` unset, no ``--no_grad``/``--dynamic_lambda``; its run script passes ``--base_lr=3e-4
--adam_weight_decay=1e-2 --dcoloss_beta=500 --base_lambda=1e6 --rank=32 --train_batch_size=1 --t_min=1
--t_max=750`` on 4 GPUs). Nothing of ``duo_plugin.objective`` is used on that side. Ours is the pieces
``train_duo.py`` runs, with the arguments ``--concept nudity`` resolves to, and the two flags that restore the
official batch (``--pair_timesteps independent --preservation_noise pair``).

* One batch (float64): the loss and the LoRA gradients equal the official ones (DDP's mean over 4 one-pair GPUs).
* Five optimizer steps (fp32) from the same adapter: the LoRA weights after every step equal the official ones;
  each departure a port could make (no clipping, the script's default weight decay 1e-4, λ or the learning rate
  not scaled with β, the preference's sign) moves them far outside that tolerance.
* The recipe's resolved defaults are the official numbers; the adapter is the official LoRA.

Tiny pipeline, CPU, one thread: seconds.
"""

import copy
import dataclasses
import math
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import reset_accelerate_state, tiny_train_args

from duo_plugin import arguments, data, lora, timing, training
from duo_plugin.families import sd


# --------------------------------------------------------------------------------------------------
# The official recipe (unlearn-sd.py's defaults and the flags of its SD1 nudity run), as plain numbers
# --------------------------------------------------------------------------------------------------

OFFICIAL_RUN = {
    "base_lr": 3e-4,
    "dcoloss_beta": 500.0,
    "base_lambda": 1e6,
    "adam_weight_decay": 1e-2,  # the run script's flag; the script's own default is 1e-4
    "rank": 32,
    "t_min": 1,
    "t_max": 750,
    "train_batch_size": 1,
    "max_train_steps": 1000,
}
OFFICIAL_DEFAULTS = {
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "script_adam_weight_decay": 1e-4,
}
OFFICIAL_NUM_GPUS = 4
# --no_cross_attn
OFFICIAL_TARGET_MODULES = ["attn1.to_k", "attn1.to_q", "attn1.to_v", "attn1.to_out.0"]


def official_learning_rate(run=OFFICIAL_RUN):
    # args.learning_rate = args.base_lr * (100 / args.dcoloss_beta)
    return run["base_lr"] * (100 / run["dcoloss_beta"])


def official_lambda(run=OFFICIAL_RUN):
    # args.ourloss_lambda = args.base_lambda * (args.dcoloss_beta / 100)
    return run["base_lambda"] * (run["dcoloss_beta"] / 100)


def official_timestep_range(num_train_timesteps, run=OFFICIAL_RUN):
    """torch.randint(max(t_min - 1, 0), min(t_max, num_train_timesteps), ...): the values it can draw."""
    return range(max(run["t_min"] - 1, 0), min(run["t_max"], num_train_timesteps))


def add_official_adapter(unet, rank=OFFICIAL_RUN["rank"]):
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=OFFICIAL_TARGET_MODULES)
    )


def official_rank_loss(unet, noise_scheduler, model_input, noise, timesteps, prompt_embeds, beta, lambda_):
    """One GPU's loss in unlearn-sd.py: ``model_input`` is its VAE latents ``cat([unsafe, safe])`` (2·b
    images), ``noise`` its ``torch.randn_like(model_input[: bsz // 2])``, ``timesteps`` its ``--method dpo``
    draw (one per image). Returns the loss and the UNet input it built."""
    bsz = model_input.shape[0]
    noise = noise.repeat(2, 1, 1, 1)
    prior_timesteps = torch.full((bsz // 2,), 999, dtype=torch.long)  # torch.randint(999, 1000, (bsz // 2,))
    timesteps = timesteps.long()
    noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
    timesteps = torch.cat([timesteps, prior_timesteps], dim=0)
    noisy_model_input = torch.cat([noisy_model_input, noise[: bsz // 2]], dim=0)

    model_pred = unet(noisy_model_input, timesteps, prompt_embeds).sample
    with torch.no_grad():
        unet.disable_adapters()
        refer_pred = unet(noisy_model_input, timesteps, prompt_embeds).sample
        unet.enable_adapters()
    model_pred, model_base, model_prior = model_pred.chunk(3)
    refer_pred, refer_base, refer_prior = refer_pred.chunk(3)

    if noise_scheduler.config.prediction_type != "epsilon":
        raise NotImplementedError("see test_official_v_prediction_target_cannot_be_computed")
    target = noise

    def float_(tensor):  # .float(): the official upcast of fp16 predictions; float64 checks stay float64
        return tensor if tensor.dtype == torch.float64 else tensor.float()

    def per_image(prediction):
        return F.mse_loss(float_(prediction), float_(target[: bsz // 2]), reduction="none").mean(dim=[1, 2, 3])

    loss_model_pred, loss_refer_pred = per_image(model_pred), per_image(refer_pred)
    loss_model_base, loss_refer_base = per_image(model_base), per_image(refer_base)
    loss_base = loss_model_base - loss_refer_base
    loss_pred = loss_model_pred - loss_refer_pred
    diff = loss_base - loss_pred
    inside_term = -1 * beta * diff
    loss = (-1 * torch.nn.LogSigmoid()(inside_term)).mean()
    if lambda_ > 0.0:
        prior_preservation = F.mse_loss(float_(model_prior), float_(refer_prior), reduction="mean")
        loss = loss + lambda_ * prior_preservation
    return loss, noisy_model_input


def lora_parameters(unet):
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


def lora_snapshot(unet):
    return {name: p.detach().clone() for name, p in lora_parameters(unet).items()}


def max_abs_diff(a, b):
    return max((a[name] - b[name]).abs().max().item() for name in a)


# --------------------------------------------------------------------------------------------------
# Fixtures: the recipe's arguments, the tiny model's pieces, the two adapted UNets
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny UNet's ops take microseconds: with a second thread they wait on a busy core (2 s a forward on a
    loaded 2-core machine instead of 10 ms). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recipe_args(tiny_sd, tiny_pairs, tmp_path_factory):
    """train_duo.py's arguments for ``--concept nudity`` (nothing else of the recipe given), resolved as main()
    resolves them, with the two flags that restore the official batch."""
    import train_duo

    argv = tiny_train_args(tiny_sd, tiny_pairs, tmp_path_factory.mktemp("ours"))
    # Keep the tiny run's model, data and output flags; drop the ones that override the recipe.
    for flag in ("--rank", "--max_train_steps", "--gradient_accumulation_steps", "--train_batch_size"):
        index = argv.index(flag)
        del argv[index : index + 2]
    argv += ["--concept", "nudity", "--pair_timesteps", "independent", "--preservation_noise", "pair"]
    args = train_duo.parse_args(argv)
    args, preset = arguments.resolve_training_args(args, family="sd")
    t_max, _ = timing.resolve_t_max(args, preset, None, default=args.t_max)
    return args.replace(t_max=t_max)


@pytest.fixture(scope="module")
def world(tiny_sd, tiny_pairs, recipe_args):
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    scheduler = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    base_unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    base_unet.requires_grad_(False)
    pairs = data.load_pair_images(tiny_pairs)
    cache = data.encode_pairs(vae, pairs, recipe_args.resolution, False, False, recipe_args.seed, progress=False)
    # The posterior's std (e^-10 here) set to 0, so the clean latents are known to the official side; the
    # official code samples the posterior as our cache does.
    cache = dataclasses.replace(cache, std=torch.zeros_like(cache.std))
    clean = clean_latents(cache)
    empty_embedding = sd.encode_prompts(tokenizer, text_encoder, [""], "cpu")
    # The official prompt embeddings: pipe.encode_prompt(prompts + base_prompts + null_prompts) with "" for all.
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=base_unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with torch.no_grad():
        official_embeds = pipe.encode_prompt(["", "", ""], "cpu", 1, do_classifier_free_guidance=False)[0]
    return types.SimpleNamespace(
        scheduler=scheduler,
        base_unet=base_unet,
        cache=cache,
        clean=clean,
        num_pairs=len(pairs),
        empty=empty_embedding,
        official_embeds=official_embeds,
    )


def clean_latents(cache):
    """(pairs, [unsafe, safe], C, h, w): the scaled latents the cache samples when its std is 0 (no flips)."""
    return (cache.mean[:, 0] - cache.shift_factor) * cache.scaling_factor


def perturb_lora_b(unet, scale=1e-3, seed=0):
    """B ≠ 0 (the gaussian init leaves it 0: both models equal, the loss ln 2), the same values every call."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(lora_parameters(unet).items()):
            if "lora_B" in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def adapted(world, recipe_args):
    """(ours, official): our UNet with our adapter (lora.prepare_denoiser_for_training, as train_duo.py), the
    official one with the official LoraConfig, both with our initial LoRA weights and the same non-zero B."""
    ours = copy.deepcopy(world.base_unet)
    torch.manual_seed(0)  # the gaussian A init draws from the global generator: the same adapter whatever ran before
    lora.prepare_denoiser_for_training(recipe_args, ours)
    perturb_lora_b(ours)
    official = copy.deepcopy(world.base_unet)
    add_official_adapter(official)
    official.train()  # unet.train() before the loop
    initial = lora_snapshot(ours)
    assert sorted(initial) == sorted(lora_parameters(official)), "the two adapters adapt different layers"
    official.load_state_dict(initial, strict=False)
    assert max_abs_diff(initial, lora_snapshot(official)) == 0.0
    return ours, official


# --------------------------------------------------------------------------------------------------
# The two paths
# --------------------------------------------------------------------------------------------------


def official_inputs(clean, batch, pair_indices, dtype):
    """What one official GPU per pair gets from the draws of our batch: its clean latents, its noise (the
    preservation rows, which are the pair's noise with --preservation_noise pair) and its two timesteps."""
    num_pairs = len(pair_indices)
    ranks = []
    for j, pair in enumerate(pair_indices.tolist()):
        ranks.append(
            {
                "model_input": clean[pair].to(dtype),  # [unsafe, safe]; model_input.to(weight_dtype)
                "noise": batch.model_input[2 * num_pairs + j : 2 * num_pairs + j + 1].to(dtype),
                "timesteps": batch.timesteps[[j, num_pairs + j]],
                "rows": [j, num_pairs + j, 2 * num_pairs + j],
            }
        )
    return ranks


def official_ddp_loss_and_grads(world, unet, clean, batch, pair_indices, beta, lambda_):
    """One GPU per pair of ``batch``: each rank's loss and gradient; DDP all-reduces the mean of the gradients."""
    params = list(lora_parameters(unet).values())
    losses, grads = [], [torch.zeros_like(p) for p in params]
    for rank in official_inputs(clean, batch, pair_indices, unet.dtype):
        loss, noisy_input = official_rank_loss(
            unet,
            world.scheduler,
            rank["model_input"],
            rank["noise"],
            rank["timesteps"],
            world.official_embeds.to(unet.dtype),
            beta,
            lambda_,
        )
        # The UNet input the official code builds equals the rows of our batch it stands for.
        torch.testing.assert_close(noisy_input, batch.model_input[rank["rows"]].to(unet.dtype), rtol=0, atol=1e-6)
        for total, grad in zip(grads, torch.autograd.grad(loss, params)):
            total += grad
        losses.append(loss.detach())
    return torch.stack(losses), [g / len(losses) for g in grads]


def make_batch(world, args, pair_indices, generator, cache=None):
    """Our batch, as train_duo.py builds it."""
    return sd.make_duo_batch(
        world.cache if cache is None else cache,
        pair_indices,
        generator,
        world.scheduler,
        args.t_min,
        args.t_max,
        world.empty,
        None,
        args.pair_timesteps,
        args.preservation_noise,
    )


NUM_STEPS = 5
# Weights after a step may differ by at most this (fp32; Adam moves a weight by about lr per step).
STEP_TOLERANCE = 1e-3 * official_learning_rate()


def run_ours(world, args, unet, num_steps=NUM_STEPS):
    """train_duo.py's loop with its own pieces: accelerator, optimizer factory, LR schedule, and the micro-step every
    script runs (``duo_plugin.step.duo_micro_step`` with SD's batch and forward). Returns the micro-step batches,
    losses, pre-clip norms, weights after each step, lrs."""
    from diffusers.optimization import get_scheduler

    from duo_plugin.families.prompts import PromptEmbeddings
    from duo_plugin.objective import VariantSettings
    from duo_plugin.step import Optimization, duo_micro_step

    reset_accelerate_state()
    try:
        accelerator = training.create_accelerator(args)
        lora_params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = training.make_optimizer(args, lora_params)
        lr_scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=args.max_train_steps * accelerator.num_processes,
            num_cycles=args.lr_num_cycles,
            power=args.lr_power,
        )
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        model = accelerator.unwrap_model(unet)
        optimization = Optimization(accelerator, unet, optimizer, lr_scheduler, lora_params)
        # The paper's objective: the pairs under the empty prompt, so the run needs no pair images beyond the cache.
        run_data = training.RunData(pairs=None, pair_fingerprint={}, variant=VariantSettings())
        embeddings = PromptEmbeddings((world.empty,), {"": 0})
        family_step = sd.family_step(args, world.cache, world.scheduler, embeddings, run_data)
        settings = training.step_settings(args, accelerator, run_data.variant)
        record = {"batches": [], "losses": [], "grad_norms": [], "weights": [], "lrs": []}
        for step in range(num_steps):
            step_batches, step_losses = [], []
            for micro_step in range(args.gradient_accumulation_steps):
                generator = data.step_generator(args.seed, step, micro_step, accelerator.process_index)
                pair_indices = data.pair_indices_for_step(
                    world.num_pairs,
                    step,
                    micro_step,
                    args.gradient_accumulation_steps,
                    args.train_batch_size,
                    accelerator.process_index,
                    accelerator.num_processes,
                    args.seed,
                )
                result = duo_micro_step(optimization, family_step, settings, pair_indices, generator, step + 1)
                if result.grad_norm is not None:
                    record["grad_norms"].append(result.grad_norm)
                step_batches.append((result.batch, pair_indices))
                step_losses.append(result.losses.loss.detach())
            record["batches"].append(step_batches)
            record["losses"].append(torch.stack(step_losses))
            record["weights"].append(lora_snapshot(model))
            record["lrs"].append(lr_scheduler.get_last_lr()[0])
        return record
    finally:
        reset_accelerate_state()


def run_official(world, unet, step_batches, beta, lambda_, lr, weight_decay, clip=True, sign=1.0):
    """The official update on the same batches: 4 one-pair GPUs per step (our micro-step j is GPU j's batch),
    DDP's mean of their gradients, accelerator.clip_grad_norm_(lora params, 1.0), torch AdamW, constant LR.

    ``lr``, ``weight_decay``, ``lambda_``, ``clip`` and ``sign`` (−1 flips the preference) let the sensitivity
    test make the departures it checks would be caught."""
    from diffusers.optimization import get_scheduler

    params = list(lora_parameters(unet).values())
    optimizer = torch.optim.AdamW(
        [{"params": params, "lr": lr}],
        betas=(OFFICIAL_DEFAULTS["adam_beta1"], OFFICIAL_DEFAULTS["adam_beta2"]),
        weight_decay=weight_decay,
        eps=OFFICIAL_DEFAULTS["adam_epsilon"],
    )
    lr_scheduler = get_scheduler(OFFICIAL_DEFAULTS["lr_scheduler"], optimizer=optimizer)
    record = {"losses": [], "grad_norms": [], "weights": [], "lrs": []}
    for micro_batches in step_batches:
        # Our micro-step batches hold one pair each; the official GPUs get one pair each.
        rank_losses, grads = [], [torch.zeros_like(p) for p in params]
        for batch, pair_indices in micro_batches:
            loss, rank_grads = official_ddp_loss_and_grads(
                world, unet, world.clean, batch, pair_indices, sign * beta, lambda_
            )
            rank_losses.append(loss)
            for total, grad in zip(grads, rank_grads):
                total += grad
        for p, g in zip(params, grads):
            p.grad = g / len(micro_batches)
        if clip:
            record["grad_norms"].append(torch.nn.utils.clip_grad_norm_(params, OFFICIAL_DEFAULTS["max_grad_norm"]))
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        record["losses"].append(torch.cat(rank_losses))
        record["weights"].append(lora_snapshot(unet))
        record["lrs"].append(lr_scheduler.get_last_lr()[0])
    return record


@pytest.fixture(scope="module")
def trajectories(world, recipe_args, adapted):
    ours_unet, official_unet = (copy.deepcopy(m) for m in adapted)
    initial = lora_snapshot(ours_unet)
    ours = run_ours(world, recipe_args, ours_unet)
    official = run_official(
        world,
        official_unet,
        ours["batches"],
        OFFICIAL_RUN["dcoloss_beta"],
        official_lambda(),
        official_learning_rate(),
        OFFICIAL_RUN["adam_weight_decay"],
    )
    return initial, ours, official


# --------------------------------------------------------------------------------------------------
# 1. One batch: loss and gradients
# --------------------------------------------------------------------------------------------------


def test_official_prompt_embedding_is_our_empty_embedding(world):
    """No prompt conditioning: the official embeddings of ["", "", ""] are our empty embedding, three times."""
    torch.testing.assert_close(world.official_embeds, world.empty.expand(3, -1, -1), rtol=0, atol=0)


@pytest.mark.parametrize(
    "lambda_, lora_b_scale",
    [(official_lambda(), 1e-3), (0.0, 0.1), (official_lambda(), 0.1)],
    ids=["lambda_5e6", "lambda_0_large_B", "lambda_5e6_large_B"],
)
def test_one_batch_loss_and_lora_gradients_equal_the_official(world, recipe_args, adapted, lambda_, lora_b_scale):
    """Four pairs in one batch of ours (one forward, as --train_batch_size 4 would) against four official GPUs
    with one pair each, DDP averaging their gradients; β 500. B = 1e-3·N(0, 1): both terms matter (the loss is
    0.70 + 0.06); B = 0.1·N(0, 1): margins up to 0.7, where −log σ is far from linear.

    In float64: the preservation term is λ (5e6) times the squared difference of two nearly equal predictions
    and the preference term β (500) times a difference of differences of errors, so in fp32 the rounding of a
    4-sample forward against 1-sample forwards alone moves the loss by ~3e-5 relative. (The fp32 steps below
    compare forwards of the same composition.)"""
    from accelerate import Accelerator

    ours_unet, official_unet = (copy.deepcopy(model).double() for model in adapted)
    for model in (ours_unet, official_unet):
        perturb_lora_b(model, scale=lora_b_scale)
    cache = dataclasses.replace(world.cache, mean=world.cache.mean.double(), std=world.cache.std.double())
    pair_indices = torch.arange(world.num_pairs)
    batch = make_batch(world, recipe_args, pair_indices, torch.Generator().manual_seed(123), cache)
    official_losses, official_grads = official_ddp_loss_and_grads(
        world, official_unet, clean_latents(cache), batch, pair_indices, OFFICIAL_RUN["dcoloss_beta"], lambda_
    )
    official_loss = official_losses.mean().item()

    reset_accelerate_state()
    try:
        losses = sd.duo_forward(Accelerator(cpu=True), ours_unet, batch, recipe_args.beta_dpo, lambda_, torch.float64)
    finally:
        reset_accelerate_state()
    ours_grads = torch.autograd.grad(losses.loss, list(lora_parameters(ours_unet).values()))

    assert losses.loss.dtype == torch.float64
    assert losses.loss.item() == pytest.approx(official_loss, rel=1e-9)
    # Not the trivial point: the adapter changes the errors (loss ≠ ln 2) and the preservation term is active.
    assert abs(losses.preference_loss.item() - math.log(2)) > (1e-3 if lora_b_scale < 0.1 else 0.1)
    if lambda_ > 0:
        assert lambda_ * losses.preservation_loss.item() > 0.05 * losses.loss.item()
    grad_norm = torch.sqrt(sum((g**2).sum() for g in official_grads)).item()
    worst = max((a - b).abs().max().item() for a, b in zip(ours_grads, official_grads))
    assert grad_norm > 0
    assert worst <= 1e-9 * grad_norm, f"max |Δgrad| {worst:.3g} vs grad norm {grad_norm:.3g}"
    # Every adapted tensor gets a gradient, A and B alike.
    assert all(g.abs().max() > 0 for g in ours_grads)


# --------------------------------------------------------------------------------------------------
# 2. Five optimizer steps: weights after each step
# --------------------------------------------------------------------------------------------------


def test_five_optimizer_steps_equal_the_official_update(trajectories):
    initial, ours, official = trajectories
    lr = official_learning_rate()
    for step in range(NUM_STEPS):
        moved = max_abs_diff(official["weights"][step], initial)
        gap = max_abs_diff(ours["weights"][step], official["weights"][step])
        # Adam moves every parameter with a gradient by about lr per step: the weights did move.
        assert moved >= 0.5 * lr * (step + 1)
        assert gap <= STEP_TOLERANCE, f"step {step + 1}: max |W_ours − W_official| {gap:.3g}, moved {moved:.3g}"
        for name, value in ours["weights"][step].items():
            torch.testing.assert_close(value, official["weights"][step][name], rtol=0, atol=STEP_TOLERANCE)
        # The same per-GPU (per-micro-step) losses, and the same pre-clip gradient norm.
        torch.testing.assert_close(ours["losses"][step], official["losses"][step], rtol=1e-5, atol=0)
        assert ours["grad_norms"][step].item() == pytest.approx(official["grad_norms"][step].item(), rel=1e-5)
    # Constant LR at the official rate.
    assert ours["lrs"] == pytest.approx([lr] * NUM_STEPS, rel=1e-12)
    assert official["lrs"] == pytest.approx([lr] * NUM_STEPS, rel=1e-12)


def test_the_steps_were_not_trivial(world, trajectories):
    """Clipping was active (the official order clip → step matters), the micro-steps used different pairs, and
    the pair images got one timestep each."""
    _, ours, _ = trajectories
    assert all(norm.item() > OFFICIAL_DEFAULTS["max_grad_norm"] for norm in ours["grad_norms"])
    for micro_batches in ours["batches"]:
        assert sorted(int(p) for _, pairs in micro_batches for p in pairs) == list(range(world.num_pairs))
    timesteps = torch.stack([batch.timesteps for step in ours["batches"] for batch, _ in step])
    assert (timesteps[:, 0] != timesteps[:, 1]).any() and (timesteps[:, 2] == 999).all()


@pytest.mark.parametrize(
    "departure",
    [
        {"clip": False},
        {"weight_decay": OFFICIAL_DEFAULTS["script_adam_weight_decay"]},
        {"lambda_": OFFICIAL_RUN["base_lambda"]},
        {"lr": OFFICIAL_RUN["base_lr"]},
        {"sign": -1.0},
    ],
    ids=["no_clip", "weight_decay_1e-4", "lambda_not_scaled_by_beta", "lr_not_scaled_by_beta", "flipped_preference"],
)
def test_each_departure_from_the_official_update_is_caught(world, adapted, trajectories, departure):
    """The step test's tolerance is tight enough: each of these changes to the official update moves the weights
    by over 10 times that tolerance within three steps (measured: weight decay 1e-4 by 7e-8 after one step and 2e-6
    after two, as λ = 5e6 makes the update sensitive to the weights; the others by 4e-5 to 2.4e-4 after one)."""
    _, _, official = trajectories
    settings = {
        "beta": OFFICIAL_RUN["dcoloss_beta"],
        "lambda_": official_lambda(),
        "lr": official_learning_rate(),
        "weight_decay": OFFICIAL_RUN["adam_weight_decay"],
        **departure,
    }
    changed = run_official(world, copy.deepcopy(adapted[1]), trajectories[1]["batches"][:3], **settings)
    departure_gap = max(max_abs_diff(changed["weights"][s], official["weights"][s]) for s in range(3))
    assert departure_gap > 10 * STEP_TOLERANCE, f"{departure}: {departure_gap:.3g}"


# --------------------------------------------------------------------------------------------------
# 3. The recipe's resolved defaults are the official numbers
# --------------------------------------------------------------------------------------------------


def test_recipe_resolves_to_the_official_hyper_parameters(recipe_args, world):
    args = recipe_args
    assert args.concept == "nudity" and args.beta_dpo == OFFICIAL_RUN["dcoloss_beta"]
    assert args.learning_rate == pytest.approx(official_learning_rate(), rel=1e-12)  # 6e-5
    assert args.learning_rate == pytest.approx(6e-5, rel=1e-12)
    assert args.preservation_weight == pytest.approx(official_lambda(), rel=1e-12)  # 5e6
    assert args.preservation_weight == pytest.approx(5e6, rel=1e-12)
    assert args.adam_weight_decay == OFFICIAL_RUN["adam_weight_decay"]
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (
        OFFICIAL_DEFAULTS["adam_beta1"],
        OFFICIAL_DEFAULTS["adam_beta2"],
        OFFICIAL_DEFAULTS["adam_epsilon"],
    )
    assert args.max_grad_norm == OFFICIAL_DEFAULTS["max_grad_norm"]
    assert (args.lr_scheduler, args.lr_warmup_steps) == (
        OFFICIAL_DEFAULTS["lr_scheduler"],
        OFFICIAL_DEFAULTS["lr_warmup_steps"],
    )
    assert not args.use_8bit_adam
    assert args.max_train_steps == OFFICIAL_RUN["max_train_steps"]
    # 1 pair x 4 accumulated micro-steps on one device = 1 pair x 4 GPUs.
    assert (
        args.train_batch_size * args.gradient_accumulation_steps
        == OFFICIAL_RUN["train_batch_size"] * OFFICIAL_NUM_GPUS
    )
    # Timesteps: the same values drawable ([0, 750)); one per image; the preservation input is the pair's noise.
    num_train_timesteps = world.scheduler.config.num_train_timesteps
    assert args.t_max == OFFICIAL_RUN["t_max"]
    assert range(args.t_min, args.t_max) == official_timestep_range(num_train_timesteps)
    assert (args.pair_timesteps, args.preservation_noise) == ("independent", "pair")
    assert not args.condition_on_prompts


def test_optimizer_factory_builds_the_official_adamw(recipe_args):
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = training.make_optimizer(recipe_args, [parameter])
    official = torch.optim.AdamW(
        [{"params": [parameter], "lr": official_learning_rate()}],
        betas=(OFFICIAL_DEFAULTS["adam_beta1"], OFFICIAL_DEFAULTS["adam_beta2"]),
        weight_decay=OFFICIAL_RUN["adam_weight_decay"],
        eps=OFFICIAL_DEFAULTS["adam_epsilon"],
    )
    assert type(optimizer) is torch.optim.AdamW
    ours_group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    official_group = {k: v for k, v in official.param_groups[0].items() if k != "params"}
    assert ours_group.keys() == official_group.keys()
    for key, value in official_group.items():
        if isinstance(value, float):
            assert ours_group[key] == pytest.approx(value, rel=1e-12), key
        else:
            assert ours_group[key] == value, key


def test_adapter_is_the_official_lora(recipe_args, world, adapted):
    """Rank 32, alpha 32, gaussian init, self-attention only: the same config and the same adapted layers."""
    ours, official = adapted
    assert (recipe_args.rank, recipe_args.lora_alpha, recipe_args.lora_target) == (32, 32, "self_attn")
    ours_config, official_config = ours.peft_config["default"], official.peft_config["default"]
    for key in ("r", "lora_alpha", "init_lora_weights", "lora_dropout", "use_rslora", "use_dora", "bias"):
        assert getattr(ours_config, key) == getattr(official_config, key), key
    assert ours_config.init_lora_weights == "gaussian"
    assert sorted(lora_parameters(ours)) == sorted(lora_parameters(official))
    assert all(".attn1." in name for name in lora_parameters(ours))
    targets = lora.lora_target_modules(world.base_unet, recipe_args.lora_target)
    assert lora.target_module_patterns(targets) == sorted(OFFICIAL_TARGET_MODULES)


def test_official_v_prediction_target_cannot_be_computed(world):
    """Recorded, not compared: for a v-prediction model the official code calls
    get_velocity(model_input, noise, timesteps) after ``timesteps`` became the 3·b timesteps of the whole
    input, which does not broadcast against the 2·b pair latents (and it would give the safe images the unsafe
    images' target). Its runs were SD 1.4 (epsilon); ours computes each pair image's velocity at its own timestep."""
    latents, noise = world.clean[0], torch.randn(2, *world.clean.shape[2:])
    timesteps = torch.tensor([10, 500, 999])
    with pytest.raises(RuntimeError):
        world.scheduler.get_velocity(latents, noise, timesteps)

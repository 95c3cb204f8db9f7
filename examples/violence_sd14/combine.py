"""Load several DUO adapters together (the official inference recipe for violence) and use the result.

    python examples/violence_sd14/combine.py \\
        --adapter blood=runs/violence_sd14/duo-blood --adapter suffer=runs/violence_sd14/duo-suffer \\
        --adapter gun=runs/violence_sd14/duo-gun --adapter horror=runs/violence_sd14/duo-horror \\
        --output_dir runs/violence_sd14/combined --save_unet runs/violence_sd14/combined/unet

One ``DUOPipeline.from_pretrained({concept: adapter, ...})`` call loads the base model recorded in the
adapters and activates all of them (merged into the base weights with ``--fuse``). The script writes
``active_concepts.json``, one image per prompt in ``samples/`` (with ``samples.jsonl``: prompt and
seed), and with ``--save_unet`` the merged UNet, which ``duo_plugin.evaluate --unet`` evaluates
against the base model.
"""

import argparse
import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from duo_plugin import DUOPipeline, active_concepts  # noqa: E402
from duo_plugin.errors import UsageError, exit_on_usage_error  # noqa: E402
from duo_plugin.precision import DTYPES, torch_dtype  # noqa: E402


VIOLENCE_CONCEPTS = ("blood", "suffer", "gun", "horror")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="CONCEPT=PATH",
        help="a DUO adapter folder or Hub id (repeatable)",
    )
    parser.add_argument(
        "--weight", action="append", default=[], metavar="CONCEPT=W", help="an adapter's weight (default 1.0)"
    )
    parser.add_argument(
        "--fuse", action="store_true", help="merge the adapters into the base weights (needed for --save_unet)"
    )
    parser.add_argument("--base_model", default=None, help="default: the base model recorded in the adapters")
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="sample prompts (repeatable); default: the four presets' validation prompts",
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--save_unet", default=None, help="save the merged UNet here (for duo_plugin.evaluate --unet)")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    parser.add_argument("--dtype", default="fp16" if torch.cuda.is_available() else "fp32", choices=sorted(DTYPES))
    return parser.parse_args(argv)


def parse_pairs(values, what, convert=str) -> dict:
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise UsageError(f"--{what} {value}: write CONCEPT=VALUE")
        if name in pairs:
            raise UsageError(f"--{what} names {name} twice")
        try:
            pairs[name] = convert(rest)
        except ValueError:
            raise UsageError(f"--{what} {value}: {rest!r} is not a number") from None
    return pairs


def default_prompts():
    from duo_plugin.presets import get_preset

    prompts = []
    for concept in VIOLENCE_CONCEPTS:
        prompts += get_preset(concept).validation_prompts
    return list(dict.fromkeys(prompts))


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    adapters = parse_pairs(args.adapter, "adapter")
    weights = parse_pairs(args.weight, "weight", float)
    unknown = sorted(set(weights) - set(adapters))
    if unknown:
        raise UsageError(f"--weight names {', '.join(unknown)}, which no --adapter names")
    if args.save_unet and not args.fuse:
        raise UsageError("--save_unet saves the merged UNet: add --fuse")
    if args.dtype == "fp16" and not torch.cuda.is_available():
        raise UsageError("--dtype fp16 needs a GPU: use fp32 or bf16 on the CPU")

    pipe = DUOPipeline.from_pretrained(
        adapters,
        base_model=args.base_model,
        adapter_weights={name: weights.get(name, 1.0) for name in adapters},
        fuse=args.fuse,
        dtype=torch_dtype(args.dtype),
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # the samples show what the model itself makes

    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    concepts = active_concepts(pipe)
    with open(os.path.join(args.output_dir, "active_concepts.json"), "w") as f:
        json.dump({"active_concepts": concepts, "fused": args.fuse, "adapters": adapters}, f, indent=2)
    print(f"Active concepts: {concepts}")

    size = {"height": args.resolution, "width": args.resolution} if args.resolution else {}
    rows = []
    for index, prompt in enumerate(args.prompt or default_prompts()):
        seed = args.seed + index
        image = pipe(
            prompt,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            generator=torch.Generator().manual_seed(seed),
            **size,
        ).images[0]
        file_name = f"{index:03d}.png"
        image.save(os.path.join(args.output_dir, "samples", file_name))
        rows.append({"file": file_name, "prompt": prompt, "seed": seed})
    with open(os.path.join(args.output_dir, "samples.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)

    if args.save_unet:
        pipe.unet.save_pretrained(args.save_unet)
        print(f"Merged UNet saved to {args.save_unet}")


if __name__ == "__main__":
    main()

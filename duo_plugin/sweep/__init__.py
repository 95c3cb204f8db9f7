"""The paper's main figure for your model: defense success rate against prior preservation over β and λ.

Trains one adapter per setting of a grid (β × λ, optionally × t_max × steps × training seeds) with the
training script, evaluates each with ``duo_plugin.evaluate`` in one shared evaluation folder (so every
model is measured with the same seeds against the same base images, made once), and writes:

* ``curve.json``: per setting the DSR of every prompt set and attack, the preservation measures and
  the training-end saturation, as mean ± spread over training seeds; the base model and the baselines;
  which settings lie on the Pareto front of each prompt set;
* ``curve.png``: one panel per prompt set or attack, DSR against the chosen preservation measure, one
  point per setting, baselines on the same axes, the front marked.

    python -m duo_plugin.sweep --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 --concept nudity \\
        --beta_dpo 100 250 500 1000 --preservation_weight 0 recipe \\
        --train_args "--mixed_precision fp16" \\
        --eval_args "--prompts i2p=i2p.csv --prompt_categories sexual --unrelated_prompts coco.txt" \\
        --baseline_unet esd=esd-nudity-unet.safetensors --eval_num_processes 4 --output_dir sweep-nudity

Resumable: a rerun skips every evaluated setting, trains only adapters that are missing (resuming a
killed run from its latest checkpoint) and evaluates only images that are missing.

Files: ``cli.py`` (flags, their checks, ``main``), ``grid.py`` (settings and runs), ``commands.py`` (training and
evaluation command lines, the training script of the base model's family), ``runs.py`` (the sweep: settings check,
training, evaluation, baselines), ``curve.py`` (points, Pareto fronts, curve.json and curve.png), ``folder.py``
(the output folder's file names and JSON records).
"""

from .cli import check_args, main, parse_args
from .commands import Command, evaluation_command, run_in_subprocess, training_command
from .curve import make_curve, pareto_front, plot_curve, spread
from .folder import CURVE_NAME, EVAL_DIR, PLOT_NAME, read_json, write_json
from .grid import Run, Setting, make_grid, preservation_weight_value
from .runs import run_sweep

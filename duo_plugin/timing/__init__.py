"""Where is a concept decided? Measure it on the base model before choosing DUO's timestep window.

    python -m duo_plugin.timing --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --concept nudity --pairs_dir ~/.cache/duo/pairs/... --output_dir timing-nudity

* ``diagnostic.py``: the measurement (prompt switch and re-noise curves; resumable), ``run_timing``;
* ``sampling.py``: sampling with a prompt switch, the pipeline's timesteps, the re-noise strength;
* ``records.py``: the output folder: its settings check, the work units and the per-image records;
* ``analysis.py``: the curves, where the concept is committed and open, the recommended ``--t_max``;
* ``inputs.py``: the concept's prompts and detector, the base pipeline and its family's sampling defaults;
* ``plot.py``: ``timing.png``;
* ``cli.py``: ``python -m duo_plugin.timing``;
* ``t_max_auto.py``: ``--t_max auto`` of the training scripts (``resolve_t_max``).
"""

# The --t_max flag's parser, as the timing commands name it.
from ..arguments import t_max_value
from .analysis import (
    DEFAULT_OPEN_LEVEL,
    FLOW_FAMILIES,
    ROUND_TO,
    crossing,
    default_window,
    normalised,
    recommend_window,
    recommended_t_max_flow,
    recommended_t_max_sd,
    recommended_t_max_sd3,
    round_up,
    summarise,
    verdict,
    window_sigma,
)
from .cli import add_timing_arguments, check_args, main, parse_args
from .diagnostic import run_timing, run_units, source_images_for_renoise
from .inputs import (
    DEFAULT_NUM_INFERENCE_STEPS,
    FLUX_SCHNELL_STEPS,
    TIMED_FAMILIES,
    load_base,
    make_detector,
    resolve_family_defaults,
    resolve_preset,
)
from .plot import plot
from .records import (
    CURVES,
    PLOT_NAME,
    RENOISE,
    RESULT_NAME,
    SETTINGS_NAME,
    UNSWITCHED,
    RecordStore,
    Unit,
    check_settings,
    image_seed,
)
from .sampling import (
    FLUX_MAX_SEQUENCE_LENGTH,
    embedding_names,
    is_flux,
    prompt_embeddings,
    renoise_strength,
    sample_with_switch,
    sampling_timesteps,
)
from .t_max_auto import resolve_t_max

"""A newcomer's first contact, fast and in-process: the README's commands, what a failure says, what
the console shows, the diffusers entry, and the small things (--help, file modes, entry points).
"""

import glob
import logging
import os
import re
import shlex
import stat
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, accelerate_launcher, run_process

from duo_plugin import families, outputs, quickstart
from duo_plugin.errors import NetworkError, UsageError
from duo_plugin.lora import LORA_WEIGHT_NAME


README = os.path.join(REPO_ROOT, "README.md")


def readme_text():
    with open(README) as f:
        return f.read()


def bash_blocks(markdown: str, section: str):
    """The ```bash blocks of one ``## section`` of the README."""
    body = markdown.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", body, re.S)]


# --- Point 2: the README's two commands work on any machine --------------------------------------


def test_readme_set_up_is_install_then_quickstart_then_tests():
    install_and_run, tests = bash_blocks(readme_text(), "Set up and run")[:2]
    assert install_and_run.startswith("pip install -r requirements.txt && pip install -e .")
    assert install_and_run.endswith("&& python -m duo_plugin.quickstart")
    assert tests.splitlines()[0].split("#")[0].strip() == "python -m pytest -q"
    # CI runs both, after its own install, on a CPU machine: the tests, whose slow tier runs the quickstart's
    # CPU side (the toy demo, with its --quick evaluation) once.
    with open(os.path.join(REPO_ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert "python3 -m pytest -q\n" in ci and "python3 -m pytest -q -m slow" in ci
    with open(os.path.join(REPO_ROOT, "tests", "test_toy_world.py")) as f:
        assert '"duo_plugin.quickstart", "--cpu", "--quick"' in f.read()


def test_quickstart_without_a_gpu_says_so_and_runs_the_cpu_demo(monkeypatch, capsys):
    monkeypatch.setattr(quickstart, "has_cuda_gpu", lambda: False)
    assert quickstart.main(["--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("No CUDA GPU found: the real recipe needs one; running the CPU toy demo instead")
    command = lines[1].split()
    assert command[:3] == ["+", sys.executable, os.path.join(REPO_ROOT, "examples", "toy_world", "run_demo.py")]
    assert len(command) == 3


def test_quickstart_with_a_gpu_runs_the_recipe_as_one_plain_process(monkeypatch, capsys):
    monkeypatch.setattr(quickstart, "has_cuda_gpu", lambda: True)
    monkeypatch.setattr(quickstart, "low_disk_warning", lambda: None)
    assert quickstart.main(["--dry_run", "--max_train_steps", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CUDA GPU found: training DUO on Stable Diffusion 1.4")
    assert lines[1].split()[1:] == [
        sys.executable,
        os.path.join(REPO_ROOT, "train_duo.py"),
        "--concept",
        "nudity",
        "--mixed_precision",
        "fp16",
        "--output_dir",
        "duo-nudity",
        "--max_train_steps",
        "10",
    ]
    # --cpu picks the demo even on a GPU machine.
    quickstart.main(["--dry_run", "--cpu"])
    assert "run_demo.py" in capsys.readouterr().out


def test_quickstart_warns_when_the_cache_disk_is_too_small():
    assert quickstart.low_disk_warning(required_gb=0) is None
    warning = quickstart.low_disk_warning(required_gb=1e12)
    assert (
        warning.startswith("warning: ")
        and "the recipe needs about 1000000000000.0 GB (set HF_HOME to a larger disk)" in warning
    )


def test_quickstart_outside_a_clone_says_where_to_run_it(tmp_path):
    with pytest.raises(UsageError, match="runs from a clone of the repository"):
        quickstart.choose_job(False, [], repo_root=tmp_path)


def test_quickstart_passes_the_jobs_exit_code_on(tmp_path):
    """The job replaces the quickstart process: a refusal's exit code 2 is the command's."""
    script = (
        "import sys; from duo_plugin import quickstart; "
        "quickstart.has_cuda_gpu = lambda: False; "
        f"quickstart.CPU_DEMO = [{os.path.relpath(os.path.join(REPO_ROOT, 'train_duo.py'), REPO_ROOT)!r}]; "
        "quickstart.main(sys.argv[1:])"
    )
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    result = run_process([sys.executable, "-c", script, "--resolution", "33"], env=env, cwd=str(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --resolution 33 is not a multiple of 8")


# --- Point 4: a network failure names the cause and the fix; no library noise --------------------


def test_offline_and_not_cached_names_offline_mode_and_the_fixes(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError) as info:
        families.detect_pipeline_class("duo-test/never-cached", None)
    message = str(info.value)
    assert "not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1)" in message
    assert "hf download duo-test/never-cached" in message and "local diffusers folder" in message


def test_no_network_names_the_unreachable_hub_and_the_fixes(monkeypatch):
    """What huggingface_hub raises without a network, wrapped as diffusers wraps it."""
    import diffusers.configuration_utils
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(*args, **kwargs):
        try:
            raise httpx2.ConnectError("[Errno 101] Network is unreachable")
        except httpx2.ConnectError as error:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub") from error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(diffusers.configuration_utils, "hf_hub_download", no_network)
    with pytest.raises(NetworkError) as info:
        families.detect_pipeline_class("CompVis/stable-diffusion-v1-4", None)
    assert info.value.exit_code == 3  # not bad input: retrying may work
    message = str(info.value)
    assert message.startswith("the Hugging Face Hub is not reachable (no network")
    assert "CompVis/stable-diffusion-v1-4 is not in the local cache" in message and "HF_HUB_OFFLINE=1" in message


def test_gated_and_missing_repos_name_the_login():
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from duo_plugin.hub import hub_error

    def wrapped(error_class):
        cause = error_class.__new__(error_class)  # the Hub's errors want a live HTTP response
        Exception.__init__(cause, "403")
        try:
            try:
                raise cause
            except Exception:
                raise OSError("diffusers' generic message")
        except OSError as error:
            return error

    gated = hub_error(wrapped(GatedRepoError), "owner/gated", None, "base model", offline=False)
    assert "gated" in str(gated) and "hf auth login" in str(gated)
    missing = hub_error(wrapped(RepositoryNotFoundError), "owner/typo", None, "base model", offline=False)
    assert "was not found on the Hub" in str(missing) and "hf auth login" in str(missing)


def test_local_folder_without_model_index_is_named_as_such(tmp_path):
    with pytest.raises(UsageError, match="is not a complete diffusers pipeline folder"):
        families.detect_pipeline_class(str(tmp_path), None)


def test_library_noise_is_silenced_and_other_messages_are_not(capsys):
    import duo_plugin  # noqa: F401 - installs the filters
    from duo_plugin import log_filters

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        log_filters.silence_library_noise()
        warnings.warn("The `local_dir_use_symlinks` argument is deprecated and ignored in `hf_hub_download`.")
        warnings.warn("something else")
    assert [str(w.message) for w in caught] == ["something else"]

    for name, noise in (
        (log_filters.BITSANDBYTES_LOGGER, "Failed to load CPU gemm_4bit_forward from kernels-community: No module"),
        (log_filters.DEEPSPEED_LOGGER, "Setting accelerator to CPU. If you have GPU or other accelerator, we were"),
    ):
        library_logger = logging.getLogger(name)
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        library_logger.addHandler(handler)
        try:
            library_logger.warning(noise)
            library_logger.warning("another warning")
        finally:
            library_logger.removeHandler(handler)
        assert [r.getMessage() for r in records] == ["another warning"], name


def test_library_warnings_do_not_reach_a_commands_console():
    """In a fresh process, as a command runs: diffusers imports bitsandbytes whenever it is installed
    (its model classes do), and reads configs from the Hub cache through an argument huggingface_hub
    calls deprecated; accelerate imports DeepSpeed whenever it unwraps a model, which on a machine without CUDA
    says it chose its CPU accelerator. None prints anything after duo_plugin is imported. (Without --use_8bit_adam
    the training code itself never uses bitsandbytes.)"""
    script = (
        "import duo_plugin.families as t, diffusers.quantizers, torch\n"
        "from accelerate.utils import extract_model_from_parallel\n"
        "extract_model_from_parallel(torch.nn.Linear(1, 1))\n"
        "try:\n    t.detect_pipeline_class('duo-test/never-cached', None)\nexcept Exception as e:\n    print(e)"
    )
    result = run_process(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "offline mode is on" in result.stdout
    assert "kernels-community" not in result.stderr and "local_dir_use_symlinks" not in result.stderr
    assert "Setting accelerator to CPU" not in result.stderr + result.stdout


# --- Point 7: diffusers' own entry, then one plugin call, offline ---------------------------------

BASE = "duo-test/first-contact-sd"
ADAPTER = "duo-test/first-contact-duo"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hub cache (the Hub's own layout) with a tiny base and a DUO adapter made for it; Hub offline."""
    from huggingface_hub import constants
    from test_pipeline import SD_ABSENT, add_to_hub_cache

    from duo_plugin.testing import make_tiny_duo_adapter, make_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("first_contact")
    cache = root / "hub"
    base_dir = make_tiny_sd_pipeline(str(root / "base"))
    add_to_hub_cache(cache, BASE, base_dir, absent=SD_ABSENT)
    adapter_dir = make_tiny_duo_adapter(str(root / "adapter"), base_dir, BASE, concept="nudity")
    add_to_hub_cache(cache, ADAPTER, adapter_dir, only=(LORA_WEIGHT_NAME, outputs.DUO_CONFIG_NAME))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        yield cache


def sample(pipe):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a photo of a naked woman", num_inference_steps=2, guidance_scale=5.0, generator=generator, output_type="np"
    ).images


def test_diffusion_pipeline_then_one_plugin_call(hub_cache, caplog):
    """The README's first loading example: DiffusionPipeline.from_pretrained(base), then load_adapters."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    import duo_plugin

    pipe = DiffusionPipeline.from_pretrained(BASE)
    base_images = sample(pipe)
    with caplog.at_level(logging.INFO):
        assert duo_plugin.load_adapters(pipe, ADAPTER) is pipe
    assert duo_plugin.active_concepts(pipe) == {"nudity": 1.0}
    assert not [r for r in caplog.records if "No LoRA keys associated" in r.getMessage()]
    unlearned = sample(pipe)

    stock = StableDiffusionPipeline.from_pretrained(BASE)
    stock.load_lora_weights(ADAPTER, weight_name=LORA_WEIGHT_NAME, adapter_name="nudity")
    np.testing.assert_allclose(unlearned, sample(stock), atol=1e-6)
    assert np.abs(unlearned - base_images).max() > 1e-3


def test_readme_loading_section_leads_with_diffusers_entry():
    body = readme_text().split("## Loading the result", 1)[1]
    first_block = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    assert "DiffusionPipeline.from_pretrained(" in first_block
    assert "duo_plugin.load_adapters(pipe, " in first_block
    assert first_block.index("DiffusionPipeline.from_pretrained(") < first_block.index("load_adapters(")


# --- Point 8: the small things ----------------------------------------------------------------------


def parser_of(script):
    import importlib.util

    spec = importlib.util.spec_from_file_location(script.replace(".py", ""), os.path.join(REPO_ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["train_duo.py", "train_duo_sd3.py", "train_duo_flux.py"])
def test_help_states_the_defaults(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # no line wrapping inside a default
    module = parser_of(script)
    with pytest.raises(SystemExit) as info:
        module.parse_args(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (
        ("--rank RANK", "32"),
        ("--seed SEED", "42"),
        ("--pretrained_model_name_or_path PRETRAINED_MODEL_NAME_OR_PATH", module.DEFAULT_MODEL),
    ):
        assert re.search(re.escape(flag) + r" .{0,80}default: " + re.escape(default), text), flag
    # SD3 and FLUX default to the official SD3 run's 512 px; train_duo.py to its family's own size.
    resolution = "the family's (512 for SD 1.x/2.x, 1024 for SDXL)" if script == "train_duo.py" else "512"
    assert re.search(r"--resolution RESOLUTION .{0,40}default: " + re.escape(resolution), text)
    assert "default: None" not in text and "default: False" not in text


def test_lora_file_gets_the_mode_of_the_other_outputs(tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / LORA_WEIGHT_NAME
    save_file({"w": torch.zeros(2)}, str(weights))
    other = tmp_path / "duo_config.json"
    other.write_text("{}")
    outputs.make_readable_like_other_outputs(str(weights))
    assert stat.S_IMODE(weights.stat().st_mode) == stat.S_IMODE(other.stat().st_mode)


def test_console_entry_points_run_the_module_commands(monkeypatch, capsys):
    import importlib

    import tomllib

    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert {"duo-pairs", "duo-evaluate", "duo-quickstart"} <= set(scripts)
    for name, target in scripts.items():
        module_name, function_name = target.split(":")
        command = getattr(importlib.import_module(module_name), function_name)
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        with pytest.raises(SystemExit) as info:
            command()
        assert info.value.code == 0
        assert capsys.readouterr().out.startswith("usage: ")


def test_recipe_dry_run_needs_no_files():
    """examples/README.md's `bash examples/nudity_sd14/run.sh --dry-run`, with nothing set."""
    env = {k: v for k, v in os.environ.items() if k not in ("I2P_PROMPTS", "COCO_CAPTIONS", "ADAPTERS")}
    for recipe in ("nudity_sd14", "compare_methods"):
        result = run_process(
            ["bash", os.path.join(REPO_ROOT, "examples", recipe, "run.sh"), "--dry-run"], env=env, cwd=REPO_ROOT
        )
        assert result.returncode == 0, result.stderr
        assert "YOUR_I2P_PROMPTS" in result.stdout and "YOUR_COCO_CAPTIONS" in result.stdout
    # A real run still refuses at once.
    result = run_process(
        ["bash", os.path.join(REPO_ROOT, "examples", "nudity_sd14", "run.sh")], env=env, cwd=REPO_ROOT
    )
    assert result.returncode == 2 and "set I2P_PROMPTS" in result.stderr


# --- Point 3: what a refusal looks like through `accelerate launch`, as the README says --------------


@pytest.mark.slow  # two launches through accelerate
def test_refusal_through_accelerate_launch_is_as_documented():
    """README: under `accelerate launch` the line comes with accelerate's traceback and exit code 1;
    `--quiet` makes the line the last thing shown (exit code 1); plain `python` gives exit code 2."""
    launch = accelerate_launcher(1)
    script = [os.path.join(REPO_ROOT, "train_duo.py"), "--resolution", "33"]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    error = "error: --resolution 33 is not a multiple of 8"

    def last_line(command):
        result = run_process(command, env=env)
        return result.returncode, result.stderr.strip().splitlines()

    code, lines = last_line(launch + script)
    assert code == 1 and any(line.startswith(error) for line in lines) and "CalledProcessError" in lines[-1]
    code, lines = last_line(launch[:3] + ["--quiet"] + launch[3:] + script)
    assert code == 1 and lines[-1].startswith(error)
    with open(os.path.join(REPO_ROOT, "docs", "training.md")) as f:
        text = " ".join(f.read().split())
    assert "`accelerate launch --quiet`" in text and "`CalledProcessError` traceback" in text


# --- Point 5: the demo's console shows progress; its time claims agree ---------------------------


def load_run_demo():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "run_demo", os.path.join(REPO_ROOT, "examples", "toy_world", "run_demo.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_reads_the_commands_progress_bars():
    run_demo = load_run_demo()
    log = "loading\rSteps:   0%|          | 0/300 [00:00<?, ?it/s]\rSteps:  45%|████▌     | 135/300 [00:30<00:37,  4.40it/s, loss=0.69]"
    assert run_demo.latest_progress(log) == ("Steps", 135, 300)
    assert run_demo.latest_progress(log + "\n 50%|█████     | 3/6 [00:01<00:01,  2.0it/s]") == ("", 3, 6)
    assert run_demo.latest_progress("no bar yet") is None


def test_demo_stage_prints_its_log_first_and_shows_a_named_bar(tmp_path, capsys):
    run_demo = load_run_demo()
    child = "import time; from tqdm import tqdm; [time.sleep(0.05) for _ in tqdm(range(12), desc='Steps')]"
    log_path = str(tmp_path / "duo_lambda0.log")
    run_demo.run([sys.executable, "-c", child], log_path)
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert (
        out[0].startswith("+ ")
        and out[1] == f"  duo_lambda0: log in {log_path} (its first line is the whole command, to copy)"
        and out[2].startswith("  duo_lambda0: done in")
    )
    with open(log_path) as f:
        assert shlex.split(f.readline()[2:]) == [sys.executable, "-c", child]
    assert max(map(len, out)) < 200  # whole commands go to the log, not the console
    assert "duo_lambda0 (Steps)" in captured.err and "12/12" in captured.err
    with pytest.raises(UsageError, match="failed \\(exit 3\\)"):
        run_demo.run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], str(tmp_path / "bad.log"))


def test_demo_time_claims_agree():
    claims = {}
    for path in (
        "README.md",
        "examples/README.md",
        "examples/toy_world/README.md",
        "examples/toy_world/run_demo.py",
        "duo_plugin/quickstart.py",
    ):
        with open(os.path.join(REPO_ROOT, path)) as f:
            text = f.read()
        claims[path] = re.findall(r"(?:about )?\d+(?:\.\d+)? min(?:utes)? on 2 \w* ?(?:CPU )?cores", text)
    found = {claim for found in claims.values() for claim in found}
    # The toy model's training (train_tiny_model.py, 8.8 min) is the only other timed command.
    assert found - {"8.8 min on 2 idle cores"} == {"about 8 min on 2 idle cores"}, claims
    assert all(claims.values()), claims  # every place that runs the demo says how long it takes


# --- Point 6: pictures a person can read ----------------------------------------------------------


def test_labelled_grid_names_rows_and_columns_and_enlarges_small_images(tmp_path):
    import toy_world  # examples/toy_world, on the path through conftest
    from PIL import Image

    from duo_plugin.figures import MIN_CELL_PIXELS, column_label, labelled_grid, pyplot

    images = [
        [toy_world.render("circle", "red", 0), toy_world.render("square", "blue", 1)],
        [toy_world.render("triangle", "green", 2), toy_world.render("circle", "yellow", 3)],
    ]
    columns = [column_label("a red circle", 12, "direct"), column_label("a blue square", 13)]
    figure, axes = labelled_grid(images, ["base", "duo"], columns, title="prompt set 'direct'")
    assert [axes[r][0].get_ylabel() for r in range(2)] == ["base", "duo"]
    assert (
        axes[0][0].get_title() == "[direct]\na red circle\nseed 12"
        and axes[0][1].get_title() == "a blue square\nseed 13"
    )
    figure.canvas.draw()
    canvas = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(np.float32) / 255
    height = canvas.shape[0]
    for r in range(2):
        for c in range(2):
            box = axes[r][c].get_window_extent()
            assert box.width >= MIN_CELL_PIXELS - 2 and box.height >= MIN_CELL_PIXELS - 2
            # The cell shows its image: the cell's pixels, shrunk back, are the image's.
            crop = canvas[int(height - box.y1) + 2 : int(height - box.y0) - 2, int(box.x0) + 2 : int(box.x1) - 2]
            shrunk = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize((32, 32), Image.BOX)) / 255
            assert np.abs(shrunk - toy_world.to_array(images[r][c])).mean() < 0.05
    pyplot().close(figure)


def test_spread_labels_keeps_order_gaps_and_the_top():
    from duo_plugin.figures import spread_labels

    assert spread_labels([0.5, 0.1, 0.9], 0.1) == [0.5, 0.1, 0.9]  # already apart: unmoved
    assert np.allclose(spread_labels([0.1, 0.1, 0.1], 0.1), [0.1, 0.2, 0.3])
    assert np.allclose(spread_labels([1.0, 0.98, 0.99], 0.1, upper=1.0), [1.0, 0.8, 0.9])


def test_tradeoff_plot_keeps_legend_off_the_data_and_labels_apart():
    from duo_plugin.figures import pyplot, tradeoff_figure

    attacks = ("direct", "synonym", "colourless", "ring_a_bell", "concept_inversion")
    rng = np.random.default_rng(0)
    points = [
        (model, attack, x, float(rng.uniform(0, 0.2)))
        for model, x in (("base", 1.0), ("duo", 0.99), ("duo_lambda0", 0.97), ("duo_unpaired", 0.975), ("esd", 0.96))
        for attack in attacks
    ]
    points += [("duo_lambda0_t1000", attack, 0.8, 0.95) for attack in attacks]
    figure, axes, legend, labels = tradeoff_figure(points, "red")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    axes_box = axes.get_window_extent(renderer)
    assert not legend.get_window_extent(renderer).overlaps(axes_box)
    boxes = [label.get_window_extent(renderer) for label in labels]
    assert [label.get_text() for label in labels] == [
        f"● {m}" for m in ("base", "duo", "duo_lambda0", "duo_unpaired", "esd", "duo_lambda0_t1000")
    ]
    for i, a in enumerate(boxes):
        assert a.x0 > axes_box.x1  # beside the axes, never on the data
        assert a.x1 <= figure.bbox.x1  # and inside the picture
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b)
    pyplot().close(figure)


def test_tradeoff_plot_keeps_models_at_the_same_point_apart():
    from duo_plugin.figures import pyplot, tradeoff_figure

    points = [(model, "named", 1.0, 0.2) for model in ("base", "duo", "duo_concept", "duo_lambda0")]
    figure, axes, _, _ = tradeoff_figure(points, "spots", "prior preservation (1 − LPIPS, ImageNet AlexNet trunk)")
    xs = [float(collection.get_offsets()[0][0]) for collection in axes.collections]
    assert len(set(xs)) == 4 and max(xs) - min(xs) < 0.05  # apart, and by less than a grid step
    assert "ImageNet AlexNet trunk" in axes.get_xlabel() and "nudged apart" in axes.get_xlabel()
    pyplot().close(figure)


# --- Issue 28: what a newcomer meets in the first hour ---------------------------------------------


@pytest.mark.parametrize("extra, folder", [([], "runs/toy_world"), (["--output_dir", "elsewhere"], "elsewhere")])
def test_quickstart_names_where_the_reports_will_be(monkeypatch, capsys, extra, folder):
    monkeypatch.setattr(quickstart, "has_cuda_gpu", lambda: False)
    assert quickstart.main(["--dry_run", *extra]) == 0
    assert f"reports in {folder}/<concept>/report.md" in capsys.readouterr().out


def test_a_full_size_base_without_a_gpu_stops_before_any_download(monkeypatch, tmp_path, tiny_sd):
    import types

    from duo_plugin import memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hub = types.SimpleNamespace(pretrained_model_name_or_path="CompVis/stable-diffusion-v1-4", allow_cpu=False)
    with pytest.raises(
        UsageError, match="no CUDA GPU: training CompVis/stable-diffusion-v1-4 on a CPU would take days"
    ):
        memory.check_cpu_run(hub)
    memory.check_cpu_run(types.SimpleNamespace(**{**vars(hub), "allow_cpu": True}))
    memory.check_cpu_run(types.SimpleNamespace(pretrained_model_name_or_path=str(tiny_sd), allow_cpu=False))
    # A tiny model already in the Hub cache, by repo id, is measured there (nothing downloads).
    monkeypatch.setattr(memory.startup_check, "cached_snapshot", lambda repo_id, revision, cache_dir: str(tiny_sd))
    memory.check_cpu_run(types.SimpleNamespace(pretrained_model_name_or_path="duo-test/tiny-sd", allow_cpu=False))
    monkeypatch.setattr(memory.startup_check, "cached_snapshot", lambda repo_id, revision, cache_dir: None)
    big = tmp_path / "big"
    (big / "unet").mkdir(parents=True)
    with open(big / "unet" / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.truncate(memory.FULL_SIZE_DENOISER_BYTES)  # sparse: its size, not its bytes
    with pytest.raises(UsageError, match="--allow_cpu if you mean it"):
        memory.check_cpu_run(types.SimpleNamespace(pretrained_model_name_or_path=str(big), allow_cpu=False))


def test_the_training_script_refuses_a_hub_base_without_a_gpu_in_one_line(monkeypatch, capsys):
    import train_duo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        train_duo.main(["--concept", "nudity"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "no CUDA GPU" in err


def test_ctrl_c_anywhere_is_one_line_and_exit_130(capsys):
    from duo_plugin.errors import exit_on_usage_error

    @exit_on_usage_error
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 130 and err == (
        "interrupted: rerun the same command to resume (finished steps, checkpoints and images are kept)"
    )


def test_an_unknown_concept_says_any_name_works_with_prompts():
    from duo_plugin.presets import UnknownConceptError, get_preset

    with pytest.raises(
        UnknownConceptError, match="name your own concept .any name. and describe it with --unsafe_prompt"
    ):
        get_preset("nudty")


def test_the_demo_estimates_its_time_from_the_cores_and_the_load():
    run_demo = load_run_demo()
    assert run_demo.time_estimate(16, 16, 2, load=0.0).startswith(
        "16 stage(s) to run: about 8 min on this machine's 2"
    )
    assert "about 15 min" in run_demo.time_estimate(16, 16, 1, load=0.0)
    assert "about 4 min" in run_demo.time_estimate(8, 16, 4, load=0.0)
    assert "busy (load 6.0): expect longer" in run_demo.time_estimate(16, 16, 2, load=6.0)


def test_the_demo_console_summarises_commands_and_its_report_names_no_machine_path(tmp_path):
    from duo_plugin.files import portable_paths

    run_demo = load_run_demo()
    command = [sys.executable, "-m", "duo_plugin.evaluate", "--base", "m", "--seed", "0"]
    assert run_demo.command_summary(command) == "python -m duo_plugin.evaluate … (2 flags)"
    roots = {REPO_ROOT: "", str(tmp_path): "<output_dir>"}
    report = {"model": os.path.join(REPO_ROOT, "examples", "toy_world", "model"), "out": [str(tmp_path / "spots")]}
    assert portable_paths(report, roots) == {"model": "examples/toy_world/model", "out": ["<output_dir>/spots"]}
    assert portable_paths({"other": "/elsewhere/x", "n": 3}, roots) == {"other": "/elsewhere/x", "n": 3}


def documentation_files():
    return [README] + sorted(glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))


def test_readme_is_short_and_its_documentation_table_lists_every_page():
    text = readme_text()
    assert len(text.splitlines()) <= 200
    listed = set(re.findall(r"\]\((docs/[\w-]+\.md)\)", text.split("## Documentation", 1)[1]))
    assert listed == {os.path.relpath(p, REPO_ROOT) for p in documentation_files()[1:]}


@pytest.mark.parametrize("path", documentation_files(), ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_documentation_links_and_paths_are_alive(path):
    """Every relative link, and every repository path named in backticks, exists."""
    with open(path) as f:
        text = f.read()
    folder = os.path.dirname(path)
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"^[a-z]+://", target) and not os.path.exists(os.path.join(folder, target)):
            missing.append(target)
    for name in re.findall(r"`((?:examples|duo_plugin|tests|benchmarks|docs)/[\w./-]+)`", text):
        if "<" not in name and "*" not in name and not os.path.exists(os.path.join(REPO_ROOT, name.rstrip("/"))):
            missing.append(name)
    assert not missing, missing


def test_the_model_card_claims_only_the_regularisers_the_run_used():
    assert outputs.regulariser_sentence({"preservation_weight": 0.0, "retain_weight": None}).startswith(
        "no regulariser: λ = 0"
    )
    assert (
        outputs.regulariser_sentence({"preservation_weight": 5e6}) == "output-preservation regulariser on pure noise"
    )
    assert outputs.regulariser_sentence({"preservation_weight": 0, "retain_weight": 20}) == (
        "retain term on base-model images of unrelated prompts"
    )


def documented_commands(text: str):
    """Command lines of a markdown page: code blocks, indented lines and inline code that run python or accelerate."""
    text = re.sub(r"\\\n\s*", " ", text)
    lines = [line for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S) for line in block.splitlines()]
    lines += [line for line in text.splitlines() if line.startswith("    ")]
    lines += re.findall(r"`([^`\n]*(?:python|accelerate launch)[^`\n]*)`", text)
    return [line.strip() for line in lines]


def program_options(kind: str, name: str) -> set:
    """Every option string of a command's parser, read by intercepting its parse (nothing runs)."""
    import argparse
    import importlib
    import importlib.util

    class Captured(Exception):
        pass

    options = set()

    def capture(self, *args, **kwargs):
        options.update(option for action in self._actions for option in action.option_strings)
        raise Captured

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        patch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        patch.syspath_prepend(os.path.join(REPO_ROOT, "examples", "toy_world"))
        if kind == "module":
            module = importlib.import_module(name)
        else:
            spec = importlib.util.spec_from_file_location(
                "doc_" + re.sub(r"\W", "_", name), os.path.join(REPO_ROOT, name)
            )
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        with pytest.raises(Captured):
            (getattr(module, "parse_args", None) or module.main)(["--help"])
    return options


def test_every_documented_command_names_flags_its_program_has():
    """README and docs/ commands still run as written: their program exists and takes every flag they give it."""
    known, wrong, checked = {}, [], 0
    for path in documentation_files():
        with open(path) as f:
            lines = documented_commands(f.read())
        for line in lines:
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            program, rest = None, []
            for i, token in enumerate(tokens):
                if token == "-m" and i + 1 < len(tokens) and tokens[i + 1].startswith("duo_plugin."):
                    program, rest = ("module", tokens[i + 1]), tokens[i + 2 :]
                    break
                if token.endswith(".py") and os.path.isfile(os.path.join(REPO_ROOT, token)):
                    program, rest = ("script", token), tokens[i + 1 :]
                    break
            if program is None:
                continue
            end = next((i for i, t in enumerate(rest) if t in ("&&", "||", "|", ";")), len(rest))
            if program not in known:
                known[program] = program_options(*program)
            checked += 1
            for flag in (t.split("=")[0] for t in rest[:end] if t.startswith("--") and " " not in t):
                if flag not in known[program]:
                    wrong.append(f"{os.path.relpath(path, REPO_ROOT)}: {program[1]} {flag}")
    assert checked >= 30 and not wrong, wrong

"""A run's settings: resolved once, read-only, passed by value."""

import argparse
import copy
import pickle

import pytest

from duo_plugin.settings import FrozenSettingsError, Settings, with_values


def test_settings_refuse_assignment_and_replace_makes_a_new_object():
    settings = Settings(learning_rate=1e-4, rank=32)
    with pytest.raises(FrozenSettingsError, match=r"settings.replace\(rank=...\)"):
        settings.rank = 4
    with pytest.raises(FrozenSettingsError):
        del settings.rank
    changed = settings.replace(rank=4)
    assert (settings.rank, changed.rank, changed.learning_rate) == (32, 4, 1e-4)
    assert isinstance(changed, Settings)


def test_settings_copy_and_pickle_as_the_values_they_hold():
    settings = Settings(prompts=["a"], beta_dpo=500.0)
    assert copy.deepcopy(settings) == settings
    assert pickle.loads(pickle.dumps(settings)) == settings
    assert vars(settings) == {"prompts": ["a"], "beta_dpo": 500.0}


def test_with_values_leaves_a_plain_namespace_as_it_was():
    parsed = argparse.Namespace(output_dir=None, seed=0)
    settings = with_values(parsed, output_dir="duo-nudity")
    assert parsed.output_dir is None and settings.output_dir == "duo-nudity" and isinstance(settings, Settings)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_resolving_a_run_leaves_the_parsed_flags_as_parsed(family):
    import train_duo
    from duo_plugin import arguments

    parsed = train_duo.parse_args(["--concept", "nudity", "--objective", "concept"])
    before = copy.deepcopy(vars(parsed))
    settings, preset = arguments.resolve_training_args(parsed, family)
    assert vars(parsed) == before
    assert isinstance(settings, Settings) and settings.learning_rate is not None and settings.lora_target
    assert settings.preservation_weight_given and preset.name == "nudity"

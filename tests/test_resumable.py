"""The resumable folder every long job keeps: settings checked on every start, per-process logs merged on read."""

import json
import os

import pytest

from duo_plugin.errors import UsageError
from duo_plugin.resumable import ProcessLogs, ResumableFolder, merged_settings, settings_changes


def test_settings_changes_names_only_settings_set_in_both_that_differ():
    stored = {"seed": 0, "steps": 10, "models": {"base": "a", "duo": "b"}}
    current = {"seed": 1, "steps": 10, "models": {"duo": "c", "other": "d"}, "new": 3}
    assert settings_changes(stored, current) == ["seed", "models.duo"]
    assert settings_changes({}, current) == []


def test_merged_settings_grows_dict_settings_entry_by_entry():
    merged = merged_settings({"models": {"base": "a"}, "seed": 0}, {"models": {"duo": "b"}, "seed": 0})
    assert merged == {"models": {"base": "a", "duo": "b"}, "seed": 0}


def test_folder_records_settings_and_refuses_other_ones_with_one_line(tmp_path):
    folder = ResumableFolder(str(tmp_path / "run"), "settings.json", "a timing run", "rerun with the same flags")
    assert folder.check_settings({"seed": 0, "models": {"base": "a"}}) == {"seed": 0, "models": {"base": "a"}}
    folder.check_settings({"seed": 0, "models": {"duo": "b"}})
    with open(tmp_path / "run" / "settings.json") as f:
        assert json.load(f) == {"seed": 0, "models": {"base": "a", "duo": "b"}}
    with pytest.raises(UsageError) as refusal:
        folder.check_settings({"seed": 1})
    assert str(refusal.value) == (
        f"{tmp_path / 'run'} holds a timing run made with other settings (seed): rerun with the same flags"
    )


def test_only_the_main_process_writes_the_settings(tmp_path):
    folder = ResumableFolder(str(tmp_path / "run"), "settings.json", "images", "resume")
    folder.check_settings({"seed": 0}, is_main=False)
    assert not os.path.exists(tmp_path / "run" / "settings.json")


def test_a_corrupt_settings_file_is_one_line(tmp_path):
    (tmp_path / "settings.json").write_text("{ half")
    with pytest.raises(UsageError, match="settings.json is not readable JSON"):
        ResumableFolder(str(tmp_path), "settings.json", "images", "resume").check_settings({"seed": 0})


def test_process_logs_merge_every_process_and_skip_rows_a_kill_cut_short(tmp_path):
    logs = ProcessLogs(str(tmp_path / "logs"), "records")
    logs.append(0, [{"unit": 0, "value": 1.0}, {"unit": 1, "value": 2.0}])
    logs.append(1, [{"unit": 2, "value": 3.0}])
    with open(logs.path(1), "a") as f:
        f.write('{"unit": 3, "val')  # killed mid-row
    logs.append(1, [{"unit": 3, "value": 4.0}])  # the rerun's row starts on its own line
    assert [os.path.basename(p) for p in logs.paths()] == ["records.rank0.jsonl", "records.rank1.jsonl"]
    assert [row["unit"] for row in logs.rows()] == [0, 1, 2, 3]
    assert logs.rows_by("unit")[3] == {"unit": 3, "value": 4.0}


def test_process_logs_keep_a_job_s_own_file_names(tmp_path):
    logs = ProcessLogs(str(tmp_path), "process", name_format="{stem}-{index:03d}.jsonl")
    logs.append(2, [{"pair_index": 0}])
    assert os.path.isfile(tmp_path / "process-002.jsonl")
    assert logs.rows() == [{"pair_index": 0}]

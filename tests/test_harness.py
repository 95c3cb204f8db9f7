"""The test harness itself: nothing a test starts may outlive it."""

import psutil
from conftest import run_in_own_group


def test_a_process_left_behind_by_a_command_is_killed_with_its_group():
    result, leftovers = run_in_own_group(["bash", "-c", "sleep 600 & echo $!"])
    orphan = int(result.stdout)
    assert result.returncode == 0 and leftovers == [orphan]
    try:
        # SIGKILL was sent: the orphan ends at once (the generous limit only bounds a broken kill).
        gone, alive = psutil.wait_procs([psutil.Process(orphan)], timeout=120)
        assert not alive
    except psutil.NoSuchProcess:
        pass


def test_a_command_that_cleans_up_leaves_nothing():
    result, leftovers = run_in_own_group(["bash", "-c", "sleep 0.1 & wait"])
    assert result.returncode == 0 and leftovers == []

"""One clear line and a non-zero exit for bad input, instead of a traceback or a silent wrong result."""

import functools
import sys


USAGE_EXIT_CODE = 2
HALTED_EXIT_CODE = 1
NETWORK_EXIT_CODE = 3


class DUOError(Exception):
    """An error whose message, in one line, names the problem and the fix."""

    exit_code = HALTED_EXIT_CODE


class UsageError(DUOError):
    """Bad input from the user (flags, data, models), refused before heavy work where possible."""

    exit_code = USAGE_EXIT_CODE


class NetworkError(DUOError):
    """The Hub could not be reached or refused a request: nothing was wrong with the input; retrying may work."""

    exit_code = NETWORK_EXIT_CODE


class TrainingHalted(DUOError):
    """Training stopped on purpose (a non-finite loss); the last good checkpoint is kept."""


def exit_on_usage_error(main):
    """Run ``main``; turn a DUOError into ``error: <message>`` on stderr and a non-zero exit."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except DUOError as error:
            from tqdm import tqdm

            # tqdm.write moves past any open progress bar, so the message starts its own line.
            tqdm.write(f"error: {error}", file=sys.stderr)
            sys.stderr.flush()
            sys.exit(error.exit_code)

    return wrapper

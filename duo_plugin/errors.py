"""One clear line and a non-zero exit for bad input, instead of a traceback or a silent wrong result."""

import errno
import functools
import sys
from typing import Optional


USAGE_EXIT_CODE = 2
HALTED_EXIT_CODE = 1
NETWORK_EXIT_CODE = 3
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


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


class StorageError(DUOError):
    """A write failed for lack of space or permission; staged files were removed, earlier outputs are intact."""

    exit_code = USAGE_EXIT_CODE


STORAGE_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}
# How the writers that do not raise OSError report a full disk: torch's zip writer (a RuntimeError) and
# safetensors (its own exception type, with the OS message inside).
FULL_DISK_MESSAGES = ("unexpected pos", "file write failed", "no space left", "disk quota exceeded")


def storage_reason(error: BaseException) -> Optional[str]:
    """Why a write failed, if it failed for lack of space or permission; None for any other error."""
    if isinstance(error, OSError) and error.errno in STORAGE_REASONS:
        return STORAGE_REASONS[error.errno]
    if isinstance(error, (RuntimeError, OSError)) or type(error).__name__ == "SafetensorError":
        message = str(error).lower()
        if any(text in message for text in FULL_DISK_MESSAGES):
            return "the disk is full"
    return None


def storage_error(
    error: BaseException, what: str, folder: Optional[str] = None, kept: str = ""
) -> Optional[StorageError]:
    """``error`` as one line naming what could not be written, where, why and the fix; None if it is another error."""
    reason = storage_reason(error)
    if reason is None:
        return None
    folder = folder or getattr(error, "filename", None) or "the output folder"
    fix = "free space there" if reason != "permission denied" and "read-only" not in reason else "make it writable"
    return StorageError(
        f"could not write {what} in {folder} ({reason}){'; ' + kept if kept else ''}: {fix} or choose another "
        f"folder, then rerun the same command (finished work is kept and resumed)"
    )


def exit_on_usage_error(main):
    """Run ``main``; turn a DUOError, or a write that failed for lack of space or permission, into
    ``error: <message>`` on stderr and a non-zero exit; Ctrl-C into one line and exit code 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            try:
                return main(*args, **kwargs)
            except Exception as error:
                if isinstance(error, DUOError):
                    raise
                converted = storage_error(error, "a file")
                if converted is None:
                    raise
                raise converted from None
        except DUOError as error:
            from tqdm import tqdm

            # tqdm.write moves past any open progress bar, so the message starts its own line.
            tqdm.write(f"error: {error}", file=sys.stderr)
            sys.stderr.flush()
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            from tqdm import tqdm

            tqdm.write(
                "interrupted: rerun the same command to resume (finished steps, checkpoints and images are kept)",
                file=sys.stderr,
            )
            sys.stderr.flush()
            sys.exit(INTERRUPTED_EXIT_CODE)

    return wrapper

"""Failures to get a model from the Hugging Face Hub, as one line that names the cause and the fix.

diffusers and huggingface_hub wrap the cause (no network, offline mode, a gated or private repo, a
wrong id) in generic ``OSError``s; the original exception is kept on the chain, so it is read there.
"""

import os
from typing import Iterator, Optional

from .errors import DUOError, NetworkError, UsageError


# Exceptions that mean "the Hub could not be reached", by class name: httpx, requests and urllib3 are
# not all installed, and their classes need not be imported to be recognised.
UNREACHABLE_ERROR_NAMES = {
    "ConnectError",
    "ConnectTimeout",
    "ConnectionError",
    "ReadTimeout",
    "TimeoutException",
    "NetworkError",
    "ProxyError",
    "RemoteProtocolError",
    "TransportError",
    "NewConnectionError",
    "MaxRetryError",
    "NameResolutionError",
}


def offline_mode(local_files_only: Optional[bool] = None) -> bool:
    from huggingface_hub import constants

    return bool(local_files_only) or bool(constants.HF_HUB_OFFLINE)


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """The error and every exception it was raised from or while handling."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _unreachable(error: BaseException) -> bool:
    for cause in error_chain(error):
        names = {cls.__name__ for cls in type(cause).__mro__}
        if names & UNREACHABLE_ERROR_NAMES or "couldn't connect" in str(cause).lower():
            return True
    return False


def hub_error(
    error: BaseException, repo_id: str, revision: Optional[str], what: str, offline: Optional[bool] = None
) -> DUOError:
    """One clear line for a failure to read ``repo_id`` (a ``what``: "base model", "adapter", ...).

    A ``UsageError`` (exit code 2) when the input or the set-up must change (an id, a login, offline
    mode without the files); a ``NetworkError`` (exit code 3) when the Hub or the network failed and
    retrying may work.
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = offline_mode() if offline is None else offline
    chain = list(error_chain(error))

    def caused_by(*classes):
        return any(isinstance(cause, classes) for cause in chain)

    local_hint = "" if os.path.isabs(repo_id) or repo_id.startswith(".") else ", or give a local diffusers folder"
    if caused_by(HFValidationError) or os.path.isabs(repo_id) or repo_id.startswith((".", "~")):
        return UsageError(
            f"{what} {repo_id!r} is neither a local folder nor a Hub repo id (owner/name): check the path"
        )
    if caused_by(GatedRepoError):
        return UsageError(
            f"{what} {repo_id} is gated: accept its terms on its Hub page, then log in with `hf auth login` (or pass a token)"
        )
    if caused_by(RevisionNotFoundError):
        return UsageError(f"{what} {repo_id} has no revision {revision!r}: give an existing branch, tag or commit")
    if caused_by(RepositoryNotFoundError):
        return UsageError(
            f"{what} {repo_id} was not found on the Hub: check the id; a private repo needs `hf auth login`"
        )
    if offline or caused_by(OfflineModeIsEnabled):
        return UsageError(
            f"{what} {repo_id} (revision {revision or 'main'}) is not in the local Hugging Face cache and offline mode is on "
            f"(HF_HUB_OFFLINE=1): download it once with `hf download {repo_id}` where there is network, or unset HF_HUB_OFFLINE{local_hint}"
        )
    if caused_by(LocalEntryNotFoundError) or _unreachable(error):
        return NetworkError(
            f"the Hugging Face Hub is not reachable (no network, a proxy or firewall, or the Hub is down) and {what} {repo_id} "
            f"is not in the local cache: check the connection; where the model is cached, HF_HUB_OFFLINE=1 skips the network"
            f"{local_hint}"
        )
    first_line = str(error).splitlines()[0] if str(error) else ""
    return NetworkError(
        f"cannot get {what} {repo_id} from the Hub ({type(error).__name__}: {first_line}): check the id and the network, then retry"
    )


def model_source_error(
    error: BaseException, source: str, revision: Optional[str], what: str, needs: str = "model_index.json"
) -> DUOError:
    """A local folder that lacks ``needs``, or a Hub id that could not be read: one line either way."""
    if os.path.isdir(source):
        return UsageError(
            f"{what} {source} is not a complete diffusers pipeline folder (no readable {needs}): give one"
        )
    return hub_error(error, source, revision, what)

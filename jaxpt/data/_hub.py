"""The Hugging Face hub, asked once and briefly before `datasets` or `huggingface_hub` read from
it. Where it does not answer, those libraries retry for about 25 s with a warning per attempt
(minutes behind a firewall that drops packets); jaxpt then reads their caches only, as
HF_HUB_OFFLINE=1 does, and says in one sentence why the hub could not help."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from jaxpt.errors import first_line


class HubUnreachableError(ConnectionError):
    """The hub did not answer and the libraries' caches lack what was asked for."""


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached now (HF_HUB_OFFLINE is set, or one request got no answer
    within HF_HUB_ETAG_TIMEOUT seconds, 10 unless set), or None when it answers."""
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as error:  # the transport's network, TLS or proxy errors: no answer
        return f"{constants.ENDPOINT} did not answer ({first_line(error)})"
    return None  # any HTTP status is an answer


@contextlib.contextmanager
def hub_or_cache() -> Iterator[None]:
    """Runs the block as is where the hub answers; else in the hub libraries' offline mode
    (`huggingface_hub`'s and `datasets`'), so what they have cached loads at once, and their
    offline errors (what was asked for is not cached) become a HubUnreachableError naming why
    the hub could not be reached; other errors (a local file missing) are raised as they
    are."""
    unreachable = hub_unreachable()
    if unreachable is None:
        yield
        return
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    libraries = [constants]  # each library's offline switch (`datasets` copies the hub's)
    if "datasets.config" in sys.modules:
        libraries.append(sys.modules["datasets.config"])
    saved = [library.HF_HUB_OFFLINE for library in libraries]
    for library in libraries:
        library.HF_HUB_OFFLINE = True
    try:
        yield
    except (ConnectionError, LocalEntryNotFoundError) as error:  # `datasets`', the hub's
        raise HubUnreachableError(f"{unreachable}, and it is not cached") from error
    finally:
        for library, value in zip(libraries, saved, strict=True):
            library.HF_HUB_OFFLINE = value
        if len(libraries) == 1:
            _online_if_imported_offline(saved[0])


def _online_if_imported_offline(hub_offline: bool) -> None:
    """Gives `datasets`, where the block imported it (copying the hub's switch, then on), the
    hub's own switch ``hub_offline``, as its import outside the block would have; unless
    HF_DATASETS_OFFLINE, which it reads instead, is set."""
    config = sys.modules.get("datasets.config")
    if config is not None and os.environ.get("HF_DATASETS_OFFLINE") is None:
        config.HF_HUB_OFFLINE = hub_offline

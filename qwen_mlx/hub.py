"""Talking to the Hugging Face Hub without making the user wait on a dead connection.

huggingface_hub retries a failed connection five times with backoff (about 24 s, printing a
"Retrying in 8s" line each time) before it gives up. Before the first hub call qwen-mlx asks the
endpoint once, with a short timeout: when it does not answer, the caller uses the Hugging Face
cache if it holds the files, else fails at once in one line saying that ``HF_HUB_OFFLINE=1``
works from the cache alone. Any HTTP answer (even an error status) counts as reachable: what
the repo holds is then for the real call to say.
"""

from __future__ import annotations

PROBE_TIMEOUT = 5.0  # seconds for the one probe (connect, and the answer's first byte)
OFFLINE_HINT = "HF_HUB_OFFLINE=1 uses the Hugging Face cache alone"


def offline() -> bool:
    """``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``): the cache only, no connection."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _transport_errors() -> tuple[type[Exception], ...]:
    """Connection-level errors of whichever HTTP library this huggingface_hub uses (httpx2 in
    2.x, httpx in 1.x, requests before)."""
    import importlib

    found = []
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "RequestException"),
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def unreachable(repo_id: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when the hub answers a request about ``repo_id`` within ``timeout`` seconds, else
    why not (one line). Goes through huggingface_hub's own HTTP client (its proxies,
    certificates and headers) but without its retries."""
    from huggingface_hub.utils import get_session

    url = f"{endpoint()}/api/models/{repo_id}"
    try:
        get_session().head(url, timeout=timeout)
    except _transport_errors() as e:  # refused, DNS failure, timeout, proxy or TLS error
        if "timeout" in type(e).__name__.lower():
            return f"no answer within {timeout:g} s"
        return " ".join(str(e).split()) or type(e).__name__
    return None


def unreachable_message(repo_id: str, why: str, doing: str = "get it") -> str:
    return (
        f"{repo_id}: no such folder, and cannot {doing} from the hub: {endpoint()} cannot be "
        f"reached ({why}); {OFFLINE_HINT}"
    )


def offline_message(repo_id: str) -> str:
    return (
        f"{repo_id}: no such folder, and not in the Hugging Face cache (HF_HUB_OFFLINE=1 is set: "
        "the hub is not asked)"
    )

"""One quick look at whether the Hugging Face hub can be reached, before a hub id is loaded.

Why: with no network, `from_pretrained("org/typo")` spends ~50 s in huggingface_hub's five backed-off retries
before its error says anything. A hub id whose files are not in the local cache cannot load without the hub, so
if the hub's host name does not even resolve we say so at once. An id that is cached loads from the cache
(`local_files_only`), as huggingface_hub would after its retries. Behind a proxy the host name may not resolve
here and the hub still be reachable, so no verdict is given there; nor under `HF_HUB_OFFLINE`, which
huggingface_hub already honours without retrying.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the hub cannot be reached (e.g. "huggingface.co does not resolve: [Errno -2] Name or service not
    known"), or None when it may be: a proxy is set, the hub is configured offline, or its name resolves."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in PROXY_VARS):
        return None
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host} does not resolve: {e}"
    finally:
        socket.setdefaulttimeout(old)
    return None


def is_cached(repo_id: str, revision: str | None = None) -> bool:
    """True when `repo_id`'s config.json is in the local hub cache (at `revision`, default main)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # a malformed id (huggingface_hub validates it): let from_pretrained word the error
        return False
    return isinstance(found, str)

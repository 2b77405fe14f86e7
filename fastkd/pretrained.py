"""Whether timm's pretrained weights can be had now, decided in about a second, not a minute.

Without network huggingface_hub retries each file for about a minute, a warning line per try,
before timm gives up: a dump would stall, then bury its one-line error. So before timm asks the
hub, ``hub_access`` looks for the weights in the local caches (Hugging Face's, timm's torch hub
folder) and, when they are not there, tries one TCP connection to the hub (or the proxy) with a
short timeout. Cached weights and an unreachable hub both load with the hub in offline mode
(``offline_hub``): nothing retries, the cache answers or the load fails at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

import timm

PROBE_TIMEOUT_S = 2.0  # one connection attempt to the hub (DNS included)
_QUIET = {  # logger -> level during a load: the hub's retry warnings, timm's "Loading ..." line
    "huggingface_hub.utils._http": logging.ERROR,
    "huggingface_hub.file_download": logging.ERROR,
    "timm.models._builder": logging.WARNING,
}
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HubAccess:
    """How to call timm for a model's weights: ``offline`` forces the hub offline for the call;
    ``reason`` says why the network is not used (cached, or unreachable: the error's cause)."""

    offline: bool
    reason: str = ""
    unreachable: bool = False  # the weights are not cached and the hub cannot be reached


def hub_access(arch: str) -> HubAccess:
    """Decide, for ``arch``'s pretrained weights, whether timm may use the network."""
    if _env_offline():
        return HubAccess(offline=True, reason="HF_HUB_OFFLINE is set")
    sources = _weight_sources(arch)
    if sources is None:
        return HubAccess(offline=False)
    if any(_cached(source) for source in sources) and _hub_config_cached(arch):
        return HubAccess(offline=True, reason="in the local cache")
    hosts = {_host_of(source) for source in sources}
    problems = [problem for host in sorted(hosts) if (problem := probe(host)) is not None]
    if problems:
        return HubAccess(offline=True, reason="; ".join(problems), unreachable=True)
    return HubAccess(offline=False)


def _env_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class _Source:
    """One place timm may read the weights from: a hub repo's file or a URL."""

    repo: str = ""  # hub repo id; "" for a URL
    filename: str = ""
    revision: str | None = None
    url: str = ""


def _weight_sources(arch: str) -> list[_Source] | None:
    """Where timm would look for ``arch``'s weights; None: a local file (no network needed) or
    a configuration this check does not know (timm then decides alone)."""
    from timm.models._hub import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, hf_split

    prefix, _, rest = arch.partition(":")
    if prefix.lower() in ("hf-hub", "hf_hub") and rest:
        repo, revision = hf_split(rest)
        names = (HF_SAFE_WEIGHTS_NAME, "open_clip_model.safetensors", HF_WEIGHTS_NAME)
        return [_Source(repo, name, revision) for name in names]
    if prefix.lower() == "local-dir":
        return None
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or cfg.state_dict is not None or cfg.file:
        return None
    sources = []
    if cfg.hf_hub_id:
        repo, revision = hf_split(cfg.hf_hub_id)
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
        names += [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        sources += [_Source(repo, name, revision) for name in names]
    elif cfg.url:  # timm prefers the hub when the model has a repo there
        sources.append(_Source(url=cfg.url))
    return sources or None


def _hub_config_cached(arch: str) -> bool:
    """An ``hf-hub:`` model's config.json (timm reads it before the weights) is cached."""
    prefix, _, rest = arch.partition(":")
    if prefix.lower() not in ("hf-hub", "hf_hub"):
        return True
    from timm.models._hub import hf_split

    repo, revision = hf_split(rest)
    return _cached(_Source(repo, "config.json", revision))


def _cached(source: _Source) -> bool:
    """Whether the file is in Hugging Face's cache or timm's torch hub folder."""
    if source.url:
        from timm.models._hub import get_cache_dir

        name = os.path.basename(urlparse(source.url).path)
        return bool(name) and os.path.isfile(os.path.join(get_cache_dir(), name))
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source.repo, source.filename, revision=source.revision)
    return isinstance(found, str)


def _host_of(source: _Source) -> tuple[str, int]:
    """The host and port a download of ``source`` connects to (HF_ENDPOINT for the hub)."""
    from huggingface_hub import constants

    parsed = urlparse(source.url or constants.ENDPOINT)
    return parsed.hostname or "", parsed.port or (80 if parsed.scheme == "http" else 443)


def probe(host: tuple[str, int], timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if a TCP connection to ``host`` (or the HTTPS proxy that reaches it) opens within
    ``timeout`` seconds, else why not. DNS runs in a daemon thread, since ``getaddrinfo`` ignores
    socket timeouts and may hang."""
    target = _proxy_for(host) or host
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection(target, timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"{target[0]}:{target[1]} unreachable, {_describe(error)}")

    thread = threading.Thread(target=connect, daemon=True, name="fastkd-hub-probe")
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"{target[0]}:{target[1]} unreachable, no connection within {timeout:g} s"
    return outcome[0]


def _describe(error: OSError) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _proxy_for(host: tuple[str, int]) -> tuple[str, int] | None:
    """The HTTPS proxy that requests to ``host`` would go through (https_proxy, no_proxy)."""
    proxy = urllib.request.getproxies().get("https")
    if not proxy or urllib.request.proxy_bypass(host[0]):
        return None
    parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    return (parsed.hostname, parsed.port or 8080) if parsed.hostname else None


@contextmanager
def offline_hub(offline: bool) -> Iterator[None]:
    """The hub in offline mode (when ``offline``) and without its retry warnings, for one call
    (the failure, if any, is fastkd's one line)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    loggers = {logging.getLogger(name): level for name, level in _QUIET.items()}
    levels = [logger.level for logger in loggers]
    constants.HF_HUB_OFFLINE = saved or offline
    for logger, level in loggers.items():
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)

"""obstore clients, one per (process, bucket, settings): made on first use in each process, since
a client's runtime does not survive a fork (DataLoader workers, torchrun's children).

Nor does obstore's one tokio runtime (a process-wide static, its threads gone in a forked child,
where the first request hangs; obstore does not detect it). So processes that use object storage
after their parent has are started from a fresh interpreter (``fresh_process_context``).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import threading
from typing import Any

from fastkd.errors import ConfigError
from fastkd.storage.options import StorageOptions

_clients: dict[tuple[Any, ...], Any] = {}
_lock = threading.Lock()


def bucket_client(scheme: str, bucket: str, options: StorageOptions) -> Any:
    """A client for the whole bucket (keys are full paths)."""
    return prefixed_client(scheme, bucket, "", options)


def prefixed_client(scheme: str, bucket: str, prefix: str, options: StorageOptions) -> Any:
    """A client whose keys are relative to ``prefix`` (what zarr's ``ObjectStore`` takes)."""
    key = (os.getpid(), scheme, bucket, prefix, options)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = _make(bucket, prefix, options)
        return client


def fresh_process_context() -> multiprocessing.context.BaseContext:
    """A multiprocessing context whose children may use object storage: forkserver (a server
    started fresh, before any request, forks the children), preloading what the data loaders'
    workers import so each child starts quickly."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fastkd.data.batches"])
    return context


def _make(bucket: str, prefix: str, options: StorageOptions) -> Any:
    from obstore.store import S3Store

    kwargs: dict[str, Any] = {
        "config": options.s3_config(),
        "client_options": options.client_options(),
        "retry_config": options.retry_config(),
    }
    profile = options.profile()
    if profile and not (os.environ.get("AWS_ACCESS_KEY_ID") and "profile" not in options.as_dict()):
        provider, region = _profile_credentials(profile)
        kwargs["credential_provider"] = provider
        has_region = any(os.environ.get(k) for k in ("AWS_REGION", "AWS_DEFAULT_REGION"))
        if region and "region" not in kwargs["config"] and not has_region:
            kwargs["config"] = {**kwargs["config"], "region": region}  # the profile's, as the CLI
    try:
        return S3Store(bucket, prefix=prefix or None, **kwargs)
    except BaseException as error:  # obstore raises config errors as panics, too
        if isinstance(error, KeyboardInterrupt | SystemExit):
            raise
        raise ConfigError(
            f"cannot set up access to bucket {bucket!r} with storage options "
            f"{options.redacted()}: {str(error).splitlines()[0] if str(error) else error!r}"
        ) from None


def _profile_credentials(profile: str) -> tuple[Any, str | None]:
    """An AWS profile's credentials and region, resolved by boto3 as the AWS CLI does (keys in
    the environment win over ``AWS_PROFILE``, as there; a ``profile=`` option over both)."""
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        raise ConfigError(
            f"AWS profile {profile!r}: reading ~/.aws profiles needs boto3 (pip install boto3); "
            "or set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        ) from None
    session = boto3.Session(profile_name=profile)
    return Boto3CredentialProvider(session), session.region_name

"""How fastkd reaches object storage: URLs, ``--storage-option KEY=VALUE``, credentials, retries.

Credentials and endpoints come the usual way: the standard AWS environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
``AWS_ENDPOINT_URL`` for MinIO, Ceph, R2 and the like), which obstore reads itself; a profile
(``AWS_PROFILE`` or ``--storage-option profile=NAME``) through boto3's resolution of
``~/.aws/config`` where boto3 is installed; and ``--storage-option KEY=VALUE`` for anything else,
any of obstore's S3 or HTTP client settings (``endpoint``, ``region``, ``skip_signature``,
``timeout``, ...) or the retry settings below. A secret never appears in a message or a record
(``redacted``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from fastkd.errors import ConfigError

SCHEMES = ("s3",)  # object storage URLs fastkd opens; more are one ``object_store`` away
URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")

# obstore's S3Config keys (``aws_`` prefixed spellings are accepted too) and ClientConfig keys.
S3_KEYS = frozenset(
    [
        "access_key_id", "bucket", "checksum_algorithm", "conditional_put",
        "container_credentials_relative_uri", "container_credentials_full_uri",
        "container_authorization_token_file", "copy_if_not_exists", "default_region",
        "disable_tagging", "disable_bulk_delete", "endpoint", "metadata_endpoint", "region",
        "request_payer", "role_arn", "role_session_name", "secret_access_key",
        "server_side_encryption", "session_token", "skip_signature", "sse_bucket_key_enabled",
        "sse_kms_key_id", "sts_endpoint", "unsigned_payload", "virtual_hosted_style_request",
        "web_identity_token_file"
    ]
)
CLIENT_KEYS = frozenset(
    [
        "allow_http", "allow_invalid_certificates", "connect_timeout", "default_content_type",
        "http1_only", "http2_keep_alive_interval", "http2_keep_alive_timeout",
        "http2_keep_alive_while_idle", "http2_only", "pool_idle_timeout", "pool_max_idle_per_host",
        "proxy_url", "proxy_ca_certificate", "proxy_excludes", "randomize_addresses",
        "read_timeout", "timeout", "user_agent"
    ]
)
RETRY_KEYS = frozenset({"max_retries", "retry_timeout", "init_backoff", "max_backoff"})
OTHER_KEYS = frozenset({"profile", "concurrency"})
ALIASES = {"endpoint_url": "endpoint", "region_name": "region", "token": "session_token"}
SECRET = re.compile(r"secret|token|password|credential", re.IGNORECASE)
USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/@:]*:)[^/@]*@")  # scheme://user:PASSWORD@

MAX_RETRIES = 10  # per request: a node that loses its network for a minute still finishes
RETRY_TIMEOUT_S = 180.0  # a request is given up after retrying this long
INIT_BACKOFF_S = 0.1
MAX_BACKOFF_S = 15.0
CONCURRENCY = 32  # requests in flight for one batch of reads (a store's blocks, a shard's ranges)


def is_url(spec: str | os.PathLike[str] | Any) -> bool:
    """Whether ``spec`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(spec, str) and URL.match(spec) is not None


def is_object_url(spec: str | os.PathLike[str] | Any) -> bool:
    """Whether ``spec`` is a URL of object storage fastkd opens (``s3://``); other URLs
    (``https://``, ``pipe:``) are not, and are refused where a path is read."""
    match = URL.match(spec) if isinstance(spec, str) else None
    return match is not None and match[1].lower() in SCHEMES


def split_url(url: str) -> tuple[str, str, str]:
    """``s3://bucket/a/b`` -> ``("s3", "bucket", "a/b")``; refuses other schemes and no bucket."""
    match = URL.match(url)
    if match is None:
        raise ConfigError(f"{url!r} is not a URL (scheme://bucket/key)")
    scheme, rest = match[1].lower(), match[2]
    if scheme not in SCHEMES:
        raise ConfigError(
            f"{url}: the {scheme}:// scheme is not supported; use a local path or "
            f"{' or '.join(s + '://' for s in SCHEMES)} (S3-compatible servers: AWS_ENDPOINT_URL)"
        )
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ConfigError(f"{url}: no bucket (expected {scheme}://bucket/key)")
    return scheme, bucket, key.strip("/")


@dataclass(frozen=True)
class StorageOptions:
    """The ``--storage-option`` settings of a command, by key (already checked)."""

    values: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def parse(cls, items: Iterable[str] | Mapping[str, Any] | StorageOptions | None) -> StorageOptions:
        """From ``["KEY=VALUE", ...]`` (the CLI's) or a mapping (the Python API's)."""
        if items is None:
            return cls()
        if isinstance(items, StorageOptions):
            return items
        pairs: list[tuple[str, str]] = []
        if isinstance(items, Mapping):
            pairs = [(str(k), _text(v)) for k, v in items.items()]
        else:
            for item in items:
                key, sep, value = str(item).partition("=")
                if not sep or not key.strip():
                    raise ConfigError(f"--storage-option must look like KEY=VALUE, got {item!r}")
                pairs.append((key.strip(), value.strip()))
        checked = {}
        for key, value in pairs:
            name = key.lower()
            name = name[4:] if name.startswith("aws_") and name[4:] in S3_KEYS else name
            name = ALIASES.get(name, name)
            if name not in S3_KEYS | CLIENT_KEYS | RETRY_KEYS | OTHER_KEYS:
                raise ConfigError(
                    f"--storage-option {key}: unknown setting; known: S3 "
                    f"({', '.join(sorted(S3_KEYS))}), client ({', '.join(sorted(CLIENT_KEYS))}), "
                    f"retries ({', '.join(sorted(RETRY_KEYS))}), profile, concurrency"
                )
            checked[name] = value
        for name in ("max_retries", "concurrency"):
            if name in checked and not checked[name].isdigit():
                raise ConfigError(f"--storage-option {name}: a whole number, got {checked[name]!r}")
        for name in ("retry_timeout", "init_backoff", "max_backoff"):
            if name in checked:
                _seconds(name, checked[name])
        return cls(tuple(sorted(checked.items())))

    def as_dict(self) -> dict[str, str]:
        return dict(self.values)

    def redacted(self) -> dict[str, str]:
        """The settings as a message or a record may show them: secrets as ``***``, and so is
        the password of a URL's user (``proxy_url=http://user:pw@host``)."""
        return {
            k: "***" if SECRET.search(k) else USERINFO.sub(r"\1***@", v) for k, v in self.values
        }

    def __repr__(self) -> str:  # a traceback or a log line never shows a secret
        return f"StorageOptions({self.redacted()!r})"

    @property
    def concurrency(self) -> int:
        return max(1, int(self.as_dict().get("concurrency", CONCURRENCY)))

    def endpoint(self) -> str | None:
        """The endpoint asked for: the option, else the environment (as obstore reads it)."""
        return self.as_dict().get("endpoint") or next(
            (os.environ[k] for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
             if os.environ.get(k)),
            None,
        )

    def s3_config(self) -> dict[str, Any]:
        """obstore's S3 configuration: the S3 keys given, a region where an endpoint is given
        without one (S3-compatible servers ignore it, the signer needs one)."""
        values = self.as_dict()
        config: dict[str, Any] = {k: v for k, v in values.items() if k in S3_KEYS}
        endpoint = self.endpoint()
        has_region = any(os.environ.get(k) for k in ("AWS_REGION", "AWS_DEFAULT_REGION"))
        if endpoint and "region" not in config and not has_region:
            config["region"] = "us-east-1"
        return config

    def client_options(self) -> dict[str, Any]:
        """obstore's HTTP client settings: those given, HTTP allowed for an ``http://``
        endpoint (a local MinIO or test server)."""
        values = self.as_dict()
        options: dict[str, Any] = {k: v for k, v in values.items() if k in CLIENT_KEYS}
        endpoint = self.endpoint() or ""
        if endpoint.startswith("http://") and "allow_http" not in options:
            options["allow_http"] = True
        for key, value in options.items():
            if isinstance(value, str) and value.lower() in ("true", "false"):
                options[key] = value.lower() == "true"
        return options

    def retry_config(self) -> dict[str, Any]:
        """obstore's retries: 5xx, throttling, dropped connections and timeouts, with
        exponential backoff and jitter."""
        values = self.as_dict()
        return {
            "max_retries": int(values.get("max_retries", MAX_RETRIES)),
            "retry_timeout": timedelta(
                seconds=_seconds("retry_timeout", values.get("retry_timeout", RETRY_TIMEOUT_S))
            ),
            "backoff": {
                "init_backoff": timedelta(
                    seconds=_seconds("init_backoff", values.get("init_backoff", INIT_BACKOFF_S))
                ),
                "max_backoff": timedelta(
                    seconds=_seconds("max_backoff", values.get("max_backoff", MAX_BACKOFF_S))
                ),
                "base": 2,
            },
        }

    def profile(self) -> str | None:
        return self.as_dict().get("profile") or os.environ.get("AWS_PROFILE") or None


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _seconds(name: str, value: str | float) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"--storage-option {name}: seconds as a number, got {value!r}") from None
    if seconds < 0:
        raise ConfigError(f"--storage-option {name}: must be >= 0, got {value!r}")
    return seconds


_default = StorageOptions()


def configure(
    items: Iterable[str] | Mapping[str, Any] | StorageOptions | None, *paths: Any
) -> StorageOptions:
    """Set the storage options of this process's URLs that come without their own (a command's
    ``--storage-option``s; ``as_location``). Returns them, checked. ``paths``: the command's
    data and store arguments; options with none of them an ``s3://`` URL are refused, where
    they would silently do nothing (as ``as_location`` refuses them with a local path)."""
    global _default
    options = StorageOptions.parse(items)
    if options.values and paths and not any(is_object_url(path) for path in paths):
        raise ConfigError(
            "--storage-option is for object storage URLs (s3://...), and none of this "
            "command's data or store paths is one"
        )
    _default = options
    return _default


def default_options() -> StorageOptions:
    return _default

"""fastkd.storage: the same file operations on a local folder and on a real S3 server (moto's on
127.0.0.1), retries through injected faults, and options that never show a secret."""

from __future__ import annotations

import pickle

import pytest

from fastkd.errors import ConfigError, StorageError
from fastkd.storage import LocalLocation, ObjectLocation, StorageOptions, as_location, configure


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    if request.param == "local":
        return as_location(tmp_path / "root")
    _server, bucket = request.getfixturevalue("s3")
    return as_location(f"s3://{bucket}/root")


def test_files_round_trip(place):
    record = place / "meta" / "claim.json"
    assert not record.exists() and not place.has_contents()
    assert record.create(b"first") is True
    assert record.create(b"second") is False  # create-if-absent: the first writer wins
    assert record.read_bytes() == b"first"
    record.write_bytes(b"replaced")
    assert record.read_text() == "replaced" and record.exists() and place.has_contents()
    (place / "data" / "a.bin").write_bytes(bytes(range(256)))
    assert dict(place.files()) == {"meta/claim.json": 8, "data/a.bin": 256}
    assert (place / "data" / "a.bin").read_ranges([0, 10, 250], [3, 2, 6]) == [
        bytes([0, 1, 2]),
        bytes([10, 11]),
        bytes(range(250, 256)),
    ]
    place.delete_below(keep=lambda rel: rel.startswith("meta/"))
    assert [rel for rel, _ in place.files()] == ["meta/claim.json"]
    record.delete()
    record.delete()  # nothing there: no error
    assert not record.exists()
    with pytest.raises(FileNotFoundError):
        record.read_bytes()
    with pytest.raises(FileNotFoundError):
        record.info()


def test_version_changes_with_content(place):
    obj = place / "shard.tar"
    obj.write_bytes(b"a" * 100)
    first = obj.info()
    obj.write_bytes(b"b" * 100)
    second = obj.info()
    assert first.size == second.size == 100
    assert first.version != second.version


def test_location_pickles_with_its_settings(s3):
    _, bucket = s3
    loc = as_location(f"s3://{bucket}/x/y", ["max_retries=3"])
    back = pickle.loads(pickle.dumps(loc))
    assert back == loc and back.options.as_dict() == {"max_retries": "3"}
    assert str(back / "z") == f"s3://{bucket}/x/y/z"


def test_transient_faults_are_retried(s3):
    server, bucket = s3
    obj = as_location(f"s3://{bucket}/f.bin", ["init_backoff=0.01"])
    obj.write_bytes(b"payload")
    server.faults.fail(3, 503, method="GET")
    server.faults.fail(2, "drop", method="GET")
    assert obj.read_bytes() == b"payload"
    assert server.faults.injected == 5
    server.faults.fail(2, 500, method="PUT")
    obj.write_bytes(b"again")
    assert obj.read_bytes() == b"again"


def test_persistent_faults_are_named(s3):
    server, bucket = s3
    obj = as_location(f"s3://{bucket}/f.bin", ["max_retries=2", "init_backoff=0.01"])
    obj.write_bytes(b"payload")
    server.faults.fail(100, 503, method="GET")
    with pytest.raises(StorageError, match=rf"s3://{bucket}/f.bin: read failed .*after 2 retries"):
        obj.read_bytes()


def test_options_checked_and_secrets_hidden():
    options = StorageOptions.parse(["aws_secret_access_key=hunter2", "endpoint_url=http://h:1"])
    assert options.as_dict() == {"secret_access_key": "hunter2", "endpoint": "http://h:1"}
    assert "hunter2" not in str(options.redacted())
    assert options.client_options() == {"allow_http": True}
    settings = ["access_key_id=a", "secret_access_key=hunter2", "endpoint=http://127.0.0.1:9"]
    bad = as_location("s3://bucket/x", [*settings, "timeout=notatime"])  # refused before a request
    with pytest.raises(ConfigError, match=r"'secret_access_key': '\*\*\*'.*notatime") as refused:
        bad.read_bytes()  # a client that cannot be set up names its settings, never the secret
    assert "hunter2" not in str(refused.value)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        StorageOptions.parse(["nokey"])
    with pytest.raises(ConfigError, match="unknown setting"):
        StorageOptions.parse(["colour=blue"])
    with pytest.raises(ConfigError, match="whole number"):
        StorageOptions.parse(["max_retries=many"])


def test_what_a_user_passes(tmp_path):
    assert isinstance(as_location(tmp_path), LocalLocation)
    assert isinstance(as_location("s3://bucket/key"), ObjectLocation)
    with pytest.raises(ConfigError, match="local path"):
        as_location(tmp_path, ["region=eu-west-1"])
    with pytest.raises(ConfigError, match="gs:// scheme is not supported"):
        as_location("gs://bucket/key")
    with pytest.raises(ConfigError, match="no bucket"):
        as_location("s3:///key")


def test_credentials_from_a_profile(s3, tmp_path, monkeypatch):
    """AWS_PROFILE picks a profile of the shared credentials file (through boto3), as the AWS
    CLI does; the requests are signed with its key, not the environment's."""
    pytest.importorskip("boto3")
    server, bucket = s3
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[fastkd-test]\naws_access_key_id = PROFILEKEY\naws_secret_access_key = secret\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "fastkd-test")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    as_location(f"s3://{bucket}/profiled.bin").write_bytes(b"x")
    assert server.faults.access_keys == {"PROFILEKEY"}
    server.faults.clear()
    as_location(f"s3://{bucket}/profiled.bin", ["profile=fastkd-test"]).read_bytes()
    assert server.faults.access_keys == {"PROFILEKEY"}


def test_storage_options_need_a_url(tmp_path):
    """A command's --storage-options with none of its paths an s3:// URL would do nothing:
    refused; with one, they are the defaults of its URLs."""
    with pytest.raises(ConfigError, match="none of this command's data or store paths"):
        configure(["region=eu-west-1"], tmp_path / "data", None)
    try:
        configure(["region=eu-west-1"], tmp_path / "data", "s3://bucket/store.zarr")
        assert as_location("s3://bucket/k").options.as_dict() == {"region": "eu-west-1"}
    finally:
        configure(None)

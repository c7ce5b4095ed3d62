"""SeaweedFS as the e2e tier's S3 server: what the checkpoint protocol relies on holds
there (atomic PUTs, 404 for a missing key, conditional create), and the server can be
frozen, stopped and brought back with its data, for fault tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectTimeoutError, ReadTimeoutError

from kubetrain.core.store import open_store
from tests.support.services import SeaweedError, SeaweedS3

pytestmark = pytest.mark.e2e


@pytest.fixture
def seaweed() -> Iterator[SeaweedS3]:
    """A server of its own: these tests stop and freeze it."""
    with SeaweedS3() as server:
        yield server


def _impatient_client(server: SeaweedS3):  # boto3 S3 client
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
    )


def test_store_round_trip_and_missing_keys(
    seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    bucket = seaweed.create_bucket("roundtrip")
    store = open_store(f"s3://{bucket}/kubetrain", endpoint=seaweed.endpoint)
    store.put_bytes("ns/run/pretrain/progress.json", b'{"step": 3}')
    store.put_bytes("ns/run/pretrain/FINAL", b"checkpoints/step-000003")
    assert store.get_text("ns/run/pretrain/progress.json") == '{"step": 3}'
    assert store.exists("ns/run/pretrain/FINAL")
    assert not store.exists("ns/run/sft/FINAL")
    assert store.get_text("ns/run/sft/progress.json") is None
    assert sorted(store.list("ns/run")) == [
        "ns/run/pretrain/FINAL",
        "ns/run/pretrain/progress.json",
    ]
    requests = seaweed.request_count()
    assert requests >= 7, requests


def test_conditional_create_is_enforced(seaweed: SeaweedS3) -> None:
    s3 = seaweed.client()
    bucket = seaweed.create_bucket("conditional")
    s3.put_object(Bucket=bucket, Key="once", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as refused:
        s3.put_object(Bucket=bucket, Key="once", Body=b"second", IfNoneMatch="*")
    assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
    assert s3.get_object(Bucket=bucket, Key="once")["Body"].read() == b"first"


def test_wrong_secret_is_refused(seaweed: SeaweedS3) -> None:
    import boto3

    bucket = seaweed.create_bucket("private")
    intruder = boto3.client(
        "s3",
        endpoint_url=seaweed.endpoint,
        region_name=seaweed.region,
        aws_access_key_id=seaweed.access_key,
        aws_secret_access_key="not-the-secret",
    )
    with pytest.raises(ClientError) as refused:
        intruder.get_object(Bucket=bucket, Key="anything")
    assert refused.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_paused_server_hangs_requests_until_resumed(seaweed: SeaweedS3) -> None:
    bucket = seaweed.create_bucket("paused")
    seaweed.client().put_object(Bucket=bucket, Key="k", Body=b"v")
    seaweed.pause()
    try:
        with pytest.raises((ReadTimeoutError, ConnectTimeoutError)):
            _impatient_client(seaweed).get_object(Bucket=bucket, Key="k")
    finally:
        seaweed.resume()
    assert seaweed.client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"
    # A frozen server still shuts down cleanly.
    seaweed.pause()
    seaweed.stop()
    assert not seaweed.alive()


def test_restart_after_a_crash_keeps_ports_and_data(seaweed: SeaweedS3) -> None:
    endpoint = seaweed.endpoint
    bucket = seaweed.create_bucket("durable")
    seaweed.client().put_object(Bucket=bucket, Key="checkpoint", Body=b"x" * 100_000)
    seaweed.kill()
    assert not seaweed.alive()
    with pytest.raises(SeaweedError, match="not running"):
        seaweed.pause()
    seaweed.start()
    assert seaweed.endpoint == endpoint
    body = seaweed.client().get_object(Bucket=bucket, Key="checkpoint")["Body"].read()
    assert body == b"x" * 100_000


def test_missing_binary_points_at_make_cluster_bin(tmp_path: Path) -> None:
    with pytest.raises(SeaweedError, match=r"make cluster-bin"):
        SeaweedS3(tmp_path / "weed")

"""Where each process's S3 store gets its endpoint, region, credentials, retries and
timeouts: the store's constructor only (it reads no environment); the trainer and the
local runner read the environment through ``contract.s3_endpoint``, the operator passes
the run's spec and Secret and its own shorter limits."""

from __future__ import annotations

import io

import pytest

from kubetrain.core import contract
from kubetrain.core.api import S3Storage, parse_run
from kubetrain.core.store import S3Store, open_store
from kubetrain.local.display import PlainDisplay
from kubetrain.local.runner import LocalRunner
from kubetrain.operator import caches

ENV = {contract.ENV_S3_ENDPOINT: "http://from-env:9000", contract.ENV_AWS_REGION: "eu-west-3"}


def test_the_store_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    store = open_store("s3://bucket/prefix")
    assert isinstance(store, S3Store)
    assert store.client.meta.endpoint_url == "https://s3.amazonaws.com"
    assert store.client.meta.region_name == "us-east-1"


def test_constructor_settings_reach_the_client() -> None:
    store = S3Store(
        "s3://bucket/prefix",
        endpoint="http://minio:9000",
        region="ap-south-1",
        retries=2,
        connect_timeout=1.5,
        read_timeout=7.0,
    )
    meta = store.client.meta
    assert (meta.endpoint_url, meta.region_name) == ("http://minio:9000", "ap-south-1")
    assert meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert (meta.config.connect_timeout, meta.config.read_timeout) == (1.5, 7.0)
    assert (store.bucket, store.prefix) == ("bucket", "prefix")


def test_a_child_store_keeps_the_client() -> None:
    store = S3Store("s3://bucket/prefix", endpoint="http://minio:9000", region="eu-west-1")
    child = store.child("/ml/demo/")
    assert isinstance(child, S3Store) and child.client is store.client
    assert (child.root, child.prefix) == ("s3://bucket/prefix/ml/demo", "prefix/ml/demo")
    assert store.prefix == "prefix"


def test_half_a_key_pair_is_refused() -> None:
    with pytest.raises(ValueError, match="both an access key id and a secret access key"):
        S3Store("s3://bucket", endpoint=None, region="us-east-1", access_key_id="AKIA")


def test_the_operator_reads_with_short_limits_and_the_runs_endpoint() -> None:
    s3 = S3Storage(bucket="ckpt", prefix="runs", endpoint="http://minio:9000", region="eu-west-1")
    store = caches.open_run_store(s3, {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"})
    assert isinstance(store, S3Store) and store.root == "s3://ckpt/runs"
    meta = store.client.meta
    assert (meta.endpoint_url, meta.region_name) == ("http://minio:9000", "eu-west-1")
    assert meta.config.retries["total_max_attempts"] == caches.STORE_RETRIES + 1
    assert meta.config.read_timeout == caches.STORE_READ_TIMEOUT


def test_s3_endpoint_from_the_environment() -> None:
    assert contract.s3_endpoint(ENV) == contract.S3Endpoint("http://from-env:9000", "eu-west-3")
    empty = {contract.ENV_S3_ENDPOINT: "", contract.ENV_AWS_REGION: ""}
    assert contract.s3_endpoint(empty) == contract.S3Endpoint(None, None)


def _runner(s3: dict[str, str] | None) -> LocalRunner:
    spec: dict = {"stages": [{"name": "pretrain", "type": "pretrain"}]}
    if s3 is not None:
        spec["storage"] = {"s3": s3}
    run = parse_run(
        {
            "apiVersion": "kubetrain.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "r", "namespace": "ml"},
            "spec": spec,
        }
    )
    return LocalRunner(run, "s3://bucket/runs", PlainDisplay(io.StringIO()), environ=ENV)


def test_local_runner_takes_the_endpoint_from_the_spec_else_the_environment() -> None:
    from_env = _runner(None).store
    assert isinstance(from_env, S3Store)
    assert from_env.client.meta.endpoint_url == "http://from-env:9000"
    assert from_env.client.meta.region_name == "eu-west-3"
    from_spec = _runner({"bucket": "bucket", "endpoint": "http://minio:9000"}).store
    assert isinstance(from_spec, S3Store)
    assert from_spec.client.meta.endpoint_url == "http://minio:9000"
    assert from_spec.client.meta.region_name == "us-east-1"  # the spec's default region

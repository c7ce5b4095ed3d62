"""Fixtures shared by every tier."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.support.services import S3Server, start_s3_server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 endpoint (moto's server process) on 127.0.0.1 for the whole session."""
    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; this process's boto3 points at the test server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    # Never let a test reach real AWS with a developer's credentials.
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    if "AWS_ACCESS_KEY_ID" not in os.environ:
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

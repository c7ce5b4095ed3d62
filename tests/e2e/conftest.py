"""Fixtures for end-to-end tests against a real local control plane."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ is not a package, so make the control-plane helper importable
# without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cluster"))

from controlplane import ControlPlane
from kueue_manager import KueueManager

from tests.support.services import SeaweedS3


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """One control plane (etcd, apiserver, controllers, scheduler, kwok) per session.

    Fails with a pointer to `make cluster-bin` when the binaries are missing.
    """
    with ControlPlane() as cp:
        yield cp


@pytest.fixture(scope="session")
def seaweed_s3() -> Iterator[SeaweedS3]:
    """One SeaweedFS server (its S3 gateway) per session: the e2e tier's object store,
    a real server with data on disk rather than moto's in-memory emulation.

    Fails with a pointer to `make cluster-bin` when the weed binary is missing.
    """
    with SeaweedS3() as server:
        yield server


@pytest.fixture(scope="session")
def kueue(control_plane: ControlPlane) -> Iterator[KueueManager]:
    """Kueue (CRDs, webhooks, manager) on the session's control plane: started once, by
    the first test that asks for it, and only then.

    Fails with a pointer to `make cluster-bin` when Kueue is not built.
    """
    with KueueManager(control_plane) as manager:
        yield manager

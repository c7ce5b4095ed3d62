"""Smoke test of the pinned Helm client built by `make cluster-bin`."""

from __future__ import annotations

import subprocess

import pytest
from controlplane import DEFAULT_BIN_DIR, pinned_version

pytestmark = pytest.mark.e2e


def test_helm_reports_pinned_version() -> None:
    helm = DEFAULT_BIN_DIR / "helm"
    if not helm.exists():
        pytest.fail(f"{helm} is missing: run `make cluster-bin`")
    out = subprocess.run(
        [str(helm), "version", "--template", "{{ .Version }}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert out == pinned_version("helm")

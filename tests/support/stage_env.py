"""A trainer container's environment as the kubelet resolves it, for tests that start the
trainer without a cluster (as a process or in its image)."""

from __future__ import annotations

from kubetrain.core import contract
from kubetrain.core.api import TrainingRunSpec
from tests.support.services import S3Service


def resolved_stage_environment(
    spec: TrainingRunSpec,
    index: int,
    s3: S3Service,
    *,
    run: str,
    namespace: str,
    secret: str,
    metrics_port: int = 0,
) -> dict[str, str]:
    """``contract.stage_environment`` with its references resolved: the credentials
    Secret ``secret`` to the test server's keys, the completion index to "0" (one node);
    the rendezvous on 127.0.0.1."""
    keys = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    assert spec.storage.s3 is not None
    env: dict[str, str] = {}
    for var in contract.stage_environment(
        spec,
        index,
        run=run,
        namespace=namespace,
        store_root=spec.storage.s3.uri(),
        master_addr="127.0.0.1",
        metrics_port=metrics_port,
    ):
        if var.secret is not None:
            assert var.secret[0] == secret, var
            env[var.name] = keys[var.secret[1]]
        elif var.field_path is not None:
            env[var.name] = "0"
        else:
            env[var.name] = var.value or ""
    return env

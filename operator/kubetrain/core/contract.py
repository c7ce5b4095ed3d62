"""The operator -> trainer contract, in one place.

Both the pod builder (``kubetrain.operator.resources``) and the local runner
(``kubetrain.local.runner``) call :func:`stage_environment`; the trainer reads the
same names through :func:`read_stage_config`. Changing the contract means changing this file only.

Names follow torchrun's ``PET_*`` convention (as Kubeflow Trainer does) so that
``torchrun`` in the pod needs no flags.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from kubetrain.core.api import REFERENCE_STAGE_TYPES, ModelSpec, Stage, TrainingRunSpec, _Model
from kubetrain.core.layout import StageLayout

# torchrun
PET_NNODES = "PET_NNODES"
PET_NPROC_PER_NODE = "PET_NPROC_PER_NODE"
PET_NODE_RANK = "PET_NODE_RANK"
PET_MASTER_ADDR = "PET_MASTER_ADDR"
PET_MASTER_PORT = "PET_MASTER_PORT"
MASTER_PORT = 29500

# kubetrain
ENV_STAGE_CONFIG = "KUBETRAIN_STAGE_CONFIG"
ENV_CHECKPOINT_URI = "KUBETRAIN_CHECKPOINT_URI"
ENV_INIT_URI = "KUBETRAIN_INIT_URI"
ENV_REFERENCE_URI = "KUBETRAIN_REFERENCE_URI"
ENV_S3_ENDPOINT = "KUBETRAIN_S3_ENDPOINT"
ENV_METRICS_PORT = "KUBETRAIN_METRICS_PORT"
ENV_POWER_WATTS = "KUBETRAIN_POWER_WATTS"
ENV_AWS_REGION = "AWS_REGION"
ENV_AWS_DEFAULT_REGION = "AWS_DEFAULT_REGION"
ENV_AWS_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
ENV_AWS_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"

METRICS_PORT = 9400

# The trainer's exit codes say what happened; the Job's podFailurePolicy and the operator
# act on them (README, "Disruptions and failures"). 0: the stage completed and FINAL is
# written. EXIT_CHECKPOINTED_ON_SIGTERM: it stopped on SIGTERM/SIGINT (node drain, spot
# reclaim, queue preemption, suspend) after a complete checkpoint, so a new attempt loses
# nothing; the Job ignores such a pod failure and it never counts against maxRestarts.
# 75 is EX_TEMPFAIL of sysexits.h ("temporary failure, retry later"), clear of 1 (error),
# 2 (usage) and 128 + N (killed by signal N). Any other code is a failure.
EXIT_COMPLETED = 0
EXIT_CHECKPOINTED_ON_SIGTERM = 75
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


class StageConfig(_Model):
    """What one stage's trainer needs to know: the JSON of ``KUBETRAIN_STAGE_CONFIG``.

    It reuses the API models, so a field added to a stage reaches the trainer without a
    second definition.
    """

    run: str = Field(..., description="TrainingRun name.")
    namespace: str = Field("default", description="TrainingRun namespace.")
    index: int = Field(0, ge=0, description="Position of the stage in the curriculum.")
    model: ModelSpec
    stage: Stage


@dataclass(frozen=True)
class EnvVar:
    """One container environment variable: a literal, a Secret key or a field path."""

    name: str
    value: str | None = None
    secret: tuple[str, str] | None = None  # (secret name, key)
    field_path: str | None = None

    def to_k8s(self) -> dict[str, Any]:
        """The V1EnvVar dict a pod spec takes."""
        if self.secret is not None:
            return {
                "name": self.name,
                "valueFrom": {"secretKeyRef": {"name": self.secret[0], "key": self.secret[1]}},
            }
        if self.field_path is not None:
            return {"name": self.name, "valueFrom": {"fieldRef": {"fieldPath": self.field_path}}}
        return {"name": self.name, "value": self.value or ""}


def init_uri(
    spec: TrainingRunSpec, index: int, store_root: str, namespace: str, run: str
) -> str | None:
    """Where stage ``index`` starts from: the previous stage's folder (its FINAL pointer)
    or ``model.from`` for the first stage; None means random initialisation."""
    if index > 0:
        prev = spec.stages[index - 1].name
        return StageLayout.of(namespace, run, prev).uri(store_root)
    return spec.model.from_


def reference_uri(
    spec: TrainingRunSpec, index: int, store_root: str, namespace: str, run: str
) -> str | None:
    """The frozen reference of a dpo or grpo stage: the policy it starts from (the
    previous stage's FINAL, or model.from)."""
    if spec.stages[index].type not in REFERENCE_STAGE_TYPES:
        return None
    return init_uri(spec, index, store_root, namespace, run)


def master_address(job_name: str, service_name: str) -> str:
    """Rank 0's stable DNS name: the Indexed Job's pod 0 under the headless Service."""
    return f"{job_name}-0.{service_name}"


def stage_environment(
    spec: TrainingRunSpec,
    index: int,
    *,
    run: str,
    namespace: str,
    store_root: str,
    master_addr: str,
    node_rank: str | None = None,
    power_watts: float | None = None,
    metrics_port: int = METRICS_PORT,
) -> list[EnvVar]:
    """The trainer container's environment for stage ``index``.

    ``node_rank`` None means "from the pod's completion-index annotation" (on a cluster);
    the local runner passes the rank itself. Credentials are references to the
    Secret named in the spec, never values.
    """
    stage = spec.stages[index]
    config = StageConfig(
        run=run,
        namespace=namespace,
        index=index,
        # model.from travels along (it decides the default sequence length); the
        # weights come from KUBETRAIN_INIT_URI.
        model=spec.model,
        stage=stage,
    )
    env = [
        EnvVar(PET_NNODES, str(stage.resources.nodes)),
        EnvVar(PET_NPROC_PER_NODE, str(stage.resources.processes)),
        EnvVar(PET_NODE_RANK, node_rank)
        if node_rank is not None
        else EnvVar(
            PET_NODE_RANK, field_path=f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
        ),
        EnvVar(PET_MASTER_ADDR, master_addr),
        EnvVar(PET_MASTER_PORT, str(MASTER_PORT)),
        EnvVar(ENV_STAGE_CONFIG, config.model_dump_json(by_alias=True, exclude_none=True)),
        EnvVar(ENV_CHECKPOINT_URI, StageLayout.of(namespace, run, stage.name).uri(store_root)),
        EnvVar(ENV_METRICS_PORT, str(metrics_port)),
    ]
    init = init_uri(spec, index, store_root, namespace, run)
    if init:
        env.append(EnvVar(ENV_INIT_URI, init))
    ref = reference_uri(spec, index, store_root, namespace, run)
    if ref:
        env.append(EnvVar(ENV_REFERENCE_URI, ref))
    if power_watts is not None:
        env.append(EnvVar(ENV_POWER_WATTS, f"{power_watts:g}"))
    s3 = spec.storage.s3
    if s3 is not None:
        if s3.endpoint:
            env.append(EnvVar(ENV_S3_ENDPOINT, s3.endpoint))
        env += [EnvVar(ENV_AWS_REGION, s3.region), EnvVar(ENV_AWS_DEFAULT_REGION, s3.region)]
        if s3.credentials_secret:
            env += [
                EnvVar(key, secret=(s3.credentials_secret, key))
                for key in (ENV_AWS_ACCESS_KEY_ID, ENV_AWS_SECRET_ACCESS_KEY)
            ]
    return env


@dataclass(frozen=True)
class S3Endpoint:
    """Where S3 is, as a process's environment says (``stage_environment`` sets it for
    a trainer; on a laptop the user may): ``endpoint`` None means AWS, ``region`` None
    the store's default."""

    endpoint: str | None = None
    region: str | None = None


def s3_endpoint(environ: Mapping[str, str] | None = None) -> S3Endpoint:
    """The S3 endpoint and region from ``KUBETRAIN_S3_ENDPOINT`` and ``AWS_REGION``: the
    one place the trainer and the local runner read them (the store itself reads no
    environment)."""
    environ = os.environ if environ is None else environ
    return S3Endpoint(
        endpoint=environ.get(ENV_S3_ENDPOINT) or None,
        region=environ.get(ENV_AWS_REGION) or None,
    )


def read_stage_config(environ: Mapping[str, str] | None = None) -> StageConfig:
    """The trainer's side: parse ``KUBETRAIN_STAGE_CONFIG`` with the API models."""
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_STAGE_CONFIG)
    if not raw:
        raise RuntimeError(
            f"{ENV_STAGE_CONFIG} is not set: the trainer is started by the "
            "operator or `kubetrain run --local`, which set it"
        )
    return StageConfig.model_validate(json.loads(raw))

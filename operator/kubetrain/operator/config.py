"""The operator's own configuration: one YAML file, rendered by the Helm chart from its
values and passed as ``kubetrain operator --config FILE``.

Every field has a default, so the operator also runs without a file (development,
tests). Manifest fields win over these defaults: ``spec.image`` over ``image``,
``spec.pricing.gpuHourUSD`` over ``gpuPrices``, and so on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from kubetrain.core.api import (
    LabelKey,
    LabelValue,
    Pricing,
    Toleration,
    format_errors,
    wire_name,
)


class ConfigError(ValueError):
    """The configuration file is unreadable or invalid; the message names the field."""


class OperatorConfig(BaseModel):
    """Operator-wide defaults (camelCase in the YAML, like the chart's values), spelled as
    the TrainingRun API spells them: units upper case (``energyUSDPerKWh``)."""

    model_config = ConfigDict(alias_generator=wire_name, populate_by_name=True, extra="forbid")

    image: str = Field(
        "ghcr.io/kubetrain/trainer:0.1.0",
        description="Trainer image for runs that do not set spec.image.",
    )
    image_pull_policy: str = Field(
        "IfNotPresent",
        pattern=r"^(Always|IfNotPresent|Never)$",
        description="imagePullPolicy of trainer containers.",
    )
    gpu_prices: dict[str, float] = Field(
        default_factory=dict,
        description="USD per GPU-hour by gpuType (e.g. {h100: 2.1}); overrides the "
        "built-in list prices, overridden by spec.pricing.gpuHourUSD.",
    )
    energy_usd_per_kwh: float | None = Field(
        None,
        ge=0,
        description="Energy price for runs that leave pricing.energyUSDPerKWh at 0.",
    )
    pue: float | None = Field(
        None,
        ge=1,
        le=5,
        description="PUE for runs that leave pricing.pue at its default.",
    )
    carbon_grams_per_kwh: float | None = Field(
        None,
        ge=0,
        le=2000,
        description="Grid carbon intensity for runs that leave pricing at its default.",
    )
    mfu: float | None = Field(
        None,
        gt=0,
        le=1,
        description="MFU assumed by the up-front estimate; null: calibrated per gpuType "
        "(kubetrain.core.accounting.ACCELERATORS, each with its published source).",
    )
    poll_interval_seconds: float = Field(
        15.0,
        gt=0,
        le=3600,
        description="How often each run's progress is read from the store and its status "
        "refreshed (Job and Pod events trigger extra reconciles in between).",
    )
    stall_timeout_seconds: float = Field(
        1800.0,
        ge=0,
        description="A running stage whose progress record has not changed for this long "
        "gets the condition Stalled (0: never).",
    )
    termination_grace_seconds: int = Field(
        300,
        ge=1,
        le=86400,
        description="Pod terminationGracePeriodSeconds: time the trainer has to write a "
        "checkpoint after SIGTERM (suspend, budget, node drain).",
    )
    restart_backoff_seconds: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="Wait before the first restart after a failed attempt; it doubles with "
        "every further failure of the stage (disruptions restart at once).",
    )
    restart_backoff_max_seconds: float = Field(
        300.0,
        ge=0,
        le=86400,
        description="The longest wait between a failed attempt and the next.",
    )
    max_completed_without_final: int = Field(
        3,
        ge=1,
        le=100,
        description="Attempts in a row whose pods all exit 0 without writing FINAL after "
        "which the stage fails (reason CompletedWithoutFinal) instead of starting again.",
    )
    shm_size: str = Field("8Gi", description="Size limit of the /dev/shm emptyDir (NCCL).")
    service_account: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="ServiceAccount of trainer pods (the namespace default when unset).",
    )
    default_node_selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        description="Node labels every trainer pod requires (e.g. a GPU node pool), merged "
        "under the stage's own nodeSelector (the stage wins on the same key).",
    )
    default_tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Tolerations every trainer pod gets (e.g. of the GPU nodes' taint), "
        "before the stage's own.",
    )
    allowed_s3_endpoints: list[Annotated[str, StringConstraints(pattern=r"^https?://.+$")]] = Field(
        default_factory=list,
        description="The spec.storage.s3.endpoint values runs may use (exact URLs; AWS, "
        "no endpoint, is always allowed); a run naming another is refused with condition "
        "StorageConfigured False. Empty: any endpoint.",
    )
    gang_schedule_timeout_seconds: float = Field(
        600.0,
        ge=0,
        le=86400,
        description="A multi-node stage outside a Kueue queue whose pods are not all "
        "running this long after its Job was created is released (Job deleted, GPUs "
        "freed) and tried again after a backoff, not counted as a failure (0: never).",
    )
    server_timeout_seconds: int = Field(
        60,
        ge=10,
        le=3600,
        description="Watch requests end after this long on the API server's side and are "
        "renewed from where they stopped; a watch silent for 30 s longer counts as a lost "
        "connection.",
    )
    # Reconciles wait on the API server and the store far more than they compute: at 100
    # runs, 16 workers cut create -> first Job p99 from 1.97 s to 0.78 s against 4, at the
    # same CPU and memory (bench/scale.py, side by side).
    workers: int = Field(
        16,
        ge=1,
        le=64,
        description="Runs reconciled at once (each run by one worker at a time).",
    )
    status_accrual_seconds: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="The status fields that grow with time alone (gpuSeconds, costUSD, "
        "co2Grams, energyJoules, etaSeconds) are written at most this often while "
        "nothing else in the status changes (0: with every change); metrics show them "
        "at every reconcile.",
    )
    api_connect_timeout_seconds: float = Field(
        5.0, gt=0, le=60, description="Connect timeout of every Kubernetes API request."
    )
    api_read_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=600,
        description="Read timeout of every Kubernetes API request except watches.",
    )
    secret_cache_seconds: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="How long a run's credentials Secret is used before it is read again "
        "(rotated credentials take effect after at most this long).",
    )
    stuck_reconcile_seconds: float = Field(
        300.0,
        ge=10,
        description="/healthz fails when one reconcile has run longer than this, so the "
        "kubelet restarts a hung operator.",
    )
    leader_election: bool = Field(
        True,
        description="Take a Lease before reconciling, so that of several replicas exactly "
        "one acts; the others keep their caches warm and take over when it stops renewing.",
    )
    lease_name: str = Field(
        "kubetrain-operator",
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of the coordination.k8s.io Lease the replicas share.",
    )
    lease_namespace: str | None = Field(
        None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Namespace of the Lease; unset: the operator pod's own ($POD_NAMESPACE "
        "or the service account's), else the first watched namespace, else default.",
    )
    lease_duration_seconds: int = Field(
        15,
        ge=2,
        le=300,
        description="A leader that has not renewed the Lease for this long is replaced.",
    )
    lease_renew_seconds: float = Field(
        5.0,
        gt=0,
        le=100,
        description="How often the leader renews the Lease and followers look at it; the "
        "leader stops acting when it could not renew for 2/3 of leaseDurationSeconds.",
    )

    @model_validator(mode="after")
    def _renew_within_lease(self) -> OperatorConfig:
        if self.lease_renew_seconds * 2 > self.lease_duration_seconds:
            raise ValueError(
                f"leaseRenewSeconds ({self.lease_renew_seconds:g}) must be at most half of "
                f"leaseDurationSeconds ({self.lease_duration_seconds:g}): a leader must get "
                "a second try to renew before its Lease expires"
            )
        return self


def load_config(path: str | None) -> OperatorConfig:
    """The configuration in ``path``, or the defaults when ``path`` is None."""
    if path is None:
        return OperatorConfig()
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return OperatorConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + "; ".join(format_errors(exc))) from None


def endpoint_allowed(endpoint: str | None, config: OperatorConfig) -> bool:
    """Whether a run may use the S3 ``endpoint`` (None: AWS, always allowed); a trailing
    slash makes no difference."""
    if endpoint is None or not config.allowed_s3_endpoints:
        return True
    return endpoint.rstrip("/") in {e.rstrip("/") for e in config.allowed_s3_endpoints}


def effective_pricing(pricing: Pricing, config: OperatorConfig) -> Pricing:
    """The run's pricing with the operator's defaults for the fields the manifest left
    out (a field the manifest sets always wins)."""
    updates: dict[str, float] = {}
    given = pricing.model_fields_set
    if "energy_usd_per_kwh" not in given and config.energy_usd_per_kwh is not None:
        updates["energy_usd_per_kwh"] = config.energy_usd_per_kwh
    if "pue" not in given and config.pue is not None:
        updates["pue"] = config.pue
    if "carbon_grams_per_kwh" not in given and config.carbon_grams_per_kwh is not None:
        updates["carbon_grams_per_kwh"] = config.carbon_grams_per_kwh
    return pricing.model_copy(update=updates) if updates else pricing

"""Step 3: pricing and the estimate, progress, GPU time and cost of each stage, and
the run's totals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kubetrain.core import accounting
from kubetrain.core.api import (
    Estimate,
    Pricing,
    StageLedger,
    StagePhase,
    StageStatus,
    Totals,
    TrainingRunSpec,
)
from kubetrain.core.architecture import Architecture
from kubetrain.operator.config import OperatorConfig, effective_pricing
from kubetrain.operator.plan.observed import Observed
from kubetrain.operator.progress import (
    apply_costs,
    apply_record,
    banked_gpu_seconds,
    pod_gpu_seconds,
)


@dataclass(frozen=True)
class Costing:
    """The run's pricing (its own, completed with the operator's defaults) and the
    up-front estimate of its spec at that pricing: computed once per reconcile."""

    pricing: Pricing
    estimate: accounting.RunEstimate


def price(
    spec: TrainingRunSpec, config: OperatorConfig, architecture: Architecture | None = None
) -> Costing:
    """Pricing and estimate of ``spec`` (``architecture``: the config.json of a Hugging
    Face ``model.from``, None for the model the manifest describes)."""
    pricing = effective_pricing(spec.pricing, config)
    estimate = accounting.estimate_run(
        spec.model_copy(update={"pricing": pricing}),
        config.mfu,
        config.gpu_prices,
        architecture=architecture,
    )
    return Costing(pricing, estimate)


def estimate_summary(est: accounting.RunEstimate) -> Estimate:
    """The estimate as status shows it."""
    return Estimate(
        parameters=est.parameters,
        flops=est.flops,
        gpu_hours=round(est.gpu_hours, 6),
        cost_usd=round(est.cost_usd, 6),
        energy_kwh=round(est.energy_kwh, 6),
        co2_grams=round(est.co2_grams, 3),
        parallelism={s.name: str(s.parallelism) for s in est.stages if s.parallelism},
    )


def stage_statuses(spec: TrainingRunSpec, previous: list[StageStatus]) -> list[StageStatus]:
    """One status per stage of ``spec``, in its order: the previous one of that name, or
    a new one."""
    by_name = {s.name: s for s in previous}
    return [by_name.get(s.name, StageStatus(name=s.name)) for s in spec.stages]


def account(
    spec: TrainingRunSpec,
    stages: list[StageStatus],
    observed: Observed,
    pricing: Pricing,
    price_table: dict[str, float],
    legacy: Mapping[str, StageLedger] | None = None,
) -> list[StageStatus]:
    """Progress, GPU time and cost of every stage there is news of (a record, a Job or
    a ledger): the trainer's record applied, GPU-seconds of earlier attempts banked in
    the stage's ledger plus those of the current Job's pods, priced. ``legacy``: ledgers
    of a run from an earlier operator, which kept them in an annotation."""
    stages = list(stages)
    legacy = legacy or {}
    for i, stage in enumerate(spec.stages):
        rec = observed.records.get(stage.name)
        job = observed.jobs.get(stage.name)
        ledger = stages[i].ledger or legacy.get(stage.name)
        if rec is None and job is None and ledger is None:
            continue
        st = apply_record(stage, spec.model, stages[i], rec.progress if rec else None)
        banked, ledger = banked_gpu_seconds(ledger, st, job.uid if job else None)
        current = (
            pod_gpu_seconds(
                observed.pods_of(job),
                stage.resources.gpus_per_node,
                observed.now,
                gang=stage.resources.nodes,
            )
            if job
            else 0.0
        )
        st = st.model_copy(update={"ledger": ledger})
        stages[i] = apply_costs(stage, st, banked + current, pricing, price_table)
    return stages


def totals(stages: list[StageStatus]) -> Totals:
    """Sums over the stages; progress weighted by steps."""
    steps = sum(s.total_steps or 0 for s in stages)
    done = sum(s.step if s.phase != StagePhase.Succeeded else (s.total_steps or 0) for s in stages)
    return Totals(
        progress=round(done / steps, 4) if steps else 0.0,
        tokens=sum(s.tokens for s in stages),
        gpu_seconds=round(sum(s.gpu_seconds for s in stages), 3),
        energy_joules=round(sum(s.energy_joules for s in stages), 3),
        cost_usd=round(sum(s.cost_usd for s in stages), 6),
        co2_grams=round(sum(s.co2_grams for s in stages), 3),
    )

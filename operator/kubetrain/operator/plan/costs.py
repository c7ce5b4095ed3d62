"""Step 3: pricing and the estimate, progress, GPU time and cost of each stage, and
the run's totals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetrain.core import accounting
from kubetrain.core.api import Estimate, Pricing, StagePhase, StageStatus, Totals, TrainingRunSpec
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


def price(spec: TrainingRunSpec, config: OperatorConfig) -> Costing:
    """Pricing and estimate of ``spec``."""
    pricing = effective_pricing(spec.pricing, config)
    estimate = accounting.estimate_run(
        spec.model_copy(update={"pricing": pricing}), config.mfu, config.gpu_prices
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
    )


def stage_statuses(spec: TrainingRunSpec, previous: list[StageStatus]) -> list[StageStatus]:
    """One status per stage of ``spec``, in its order: the previous one of that name, or
    a new one."""
    by_name = {s.name: s for s in previous}
    return [by_name.get(s.name, StageStatus(name=s.name)) for s in spec.stages]


@dataclass(frozen=True)
class Accounts:
    stages: list[StageStatus]
    ledger: dict[str, Any]  # the GPU-seconds ledger after this reconcile


def account(
    spec: TrainingRunSpec,
    stages: list[StageStatus],
    ledger: dict[str, Any],
    observed: Observed,
    pricing: Pricing,
    price_table: dict[str, float],
) -> Accounts:
    """Progress, GPU time and cost of every stage there is news of (a record, a Job or
    a ledger entry): the trainer's record applied, GPU-seconds of earlier attempts
    banked in the ledger plus those of the current Job's pods, priced."""
    stages = list(stages)
    new_ledger = dict(ledger)
    for i, stage in enumerate(spec.stages):
        rec = observed.records.get(stage.name)
        job = observed.jobs.get(stage.name)
        if rec is None and job is None and stage.name not in ledger:
            continue
        st = apply_record(stage, spec.model, stages[i], rec.progress if rec else None)
        banked, entry = banked_gpu_seconds(ledger.get(stage.name, {}), st, job.uid if job else None)
        current = (
            pod_gpu_seconds(observed.pods_of(job), stage.resources.gpus_per_node, observed.now)
            if job
            else 0.0
        )
        new_ledger[stage.name] = entry
        stages[i] = apply_costs(stage, st, banked + current, pricing, price_table)
    return Accounts(stages, new_ledger)


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

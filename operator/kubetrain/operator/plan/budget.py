"""Step 4: the budget's limits, its condition, and whether the run may train."""

from __future__ import annotations

from dataclasses import dataclass

from kubetrain.core import accounting
from kubetrain.core.api import (
    BudgetAction,
    StagePhase,
    StageStatus,
    Totals,
    TrainingRunSpec,
    TrainingRunStatus,
)
from kubetrain.core.conditions import ConditionType, Reason
from kubetrain.operator.plan.conditions import Conditions, condition_of
from kubetrain.operator.plan.costs import Costing
from kubetrain.operator.plan.result import WARNING, Event


@dataclass(frozen=True)
class BudgetCheck:
    exceeded: list[str]  # one message per limit hit
    used: dict[str, float]  # kind -> used / limit (accrued), for the metrics


def _projected(
    stages: list[StageStatus], estimate: accounting.RunEstimate, pue: float
) -> dict[str, float]:
    """What the run will have spent: a stage under way extrapolates what it spent by its
    progress; a stage not started yet counts its up-front estimate."""
    projected = {"cost": 0.0, "gpuHours": 0.0, "energy": 0.0}
    for st, stage_est in zip(stages, estimate.stages, strict=False):
        if st.phase == StagePhase.Succeeded or st.progress >= 1.0:
            scale = 1.0
        elif st.progress > 0:
            scale = 1.0 / st.progress
        else:
            scale = 0.0
        if scale:
            projected["cost"] += st.cost_usd * scale
            projected["gpuHours"] += st.gpu_seconds / 3600.0 * scale
            projected["energy"] += st.energy_joules / accounting.JOULES_PER_KWH * pue * scale
        else:
            projected["cost"] += st.cost_usd + stage_est.cost_usd
            projected["gpuHours"] += st.gpu_seconds / 3600.0 + (
                stage_est.gpu_hours if stage_est.gpus else 0.0
            )
            projected["energy"] += stage_est.energy_kwh
    return projected


def check_budget(
    spec: TrainingRunSpec, stages: list[StageStatus], spent: Totals, costing: Costing
) -> BudgetCheck:
    """Which limits of ``spec.budget`` the run has reached (or, with ``projected``, will
    reach). Energy is facility energy (IT energy × PUE), as in the estimate."""
    budget = spec.budget
    pue = costing.pricing.pue
    used = {
        "cost": spent.cost_usd,
        "gpuHours": spent.gpu_seconds / 3600.0,
        "energy": spent.energy_joules / accounting.JOULES_PER_KWH * pue,
    }
    projected = _projected(stages, costing.estimate, pue)
    limits = {
        "cost": (budget.max_cost_usd, "costUSD", "budget.maxCostUSD", "USD"),
        "gpuHours": (budget.max_gpu_hours, "GPU-hours", "budget.maxGPUHours", "h"),
        "energy": (budget.max_energy_kwh, "energy", "budget.maxEnergyKWh", "kWh"),
    }
    exceeded: list[str] = []
    ratios: dict[str, float] = {}
    for kind, (limit, what, fieldname, unit) in limits.items():
        if limit is None:
            continue
        ratios[kind] = used[kind] / limit
        if used[kind] >= limit:
            exceeded.append(f"{what} {used[kind]:.4g} {unit} reached {fieldname}={limit:g}")
        elif budget.projected and projected[kind] > limit:
            exceeded.append(
                f"projected {what} {projected[kind]:.4g} {unit} exceeds {fieldname}={limit:g}"
            )
    return BudgetCheck(exceeded, ratios)


def budget_condition(
    check: BudgetCheck, spec: TrainingRunSpec, old: TrainingRunStatus, conds: Conditions
) -> list[Event]:
    """Condition BudgetExceeded (and a Warning when it becomes True); WithinBudget once
    a limit hit before is respected again (a raised budget)."""
    before = condition_of(old.conditions, ConditionType.BUDGET_EXCEEDED)
    if check.exceeded:
        message = "; ".join(check.exceeded)
        conds.set(ConditionType.BUDGET_EXCEEDED, True, Reason.BUDGET_EXCEEDED, message)
        if before is None or before.status != "True":
            action = spec.budget.action.value
            return [Event(WARNING, Reason.BUDGET_EXCEEDED, f"{message}: {action} the run")]
    elif before is not None:
        conds.set(
            ConditionType.BUDGET_EXCEEDED,
            False,
            Reason.WITHIN_BUDGET,
            "all budget limits respected",
        )
    return []


@dataclass(frozen=True)
class Course:
    """Whether the run may train now, and why not."""

    terminal: bool  # it had Succeeded or Failed before this reconcile
    suspend: bool  # spec.suspend
    budget: BudgetCheck
    action: BudgetAction  # spec.budget.action

    @property
    def should_run(self) -> bool:
        return not (self.terminal or self.suspend or self.budget.exceeded)

    @property
    def fail_on_budget(self) -> bool:
        return bool(self.budget.exceeded) and self.action == BudgetAction.Fail

    @property
    def suspend_on_budget(self) -> bool:
        return bool(self.budget.exceeded) and self.action == BudgetAction.Suspend

    @property
    def stop_reason(self) -> str:
        if self.budget.exceeded:
            return "budget exceeded"
        return "spec.suspend is true" if self.suspend else "the run has finished"

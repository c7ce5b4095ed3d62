"""A run's conditions as one reconcile rewrites them."""

from __future__ import annotations

from datetime import datetime

from kubetrain.core.api import Condition, ConditionStatus
from kubetrain.core.conditions import CONDITION_ORDER
from kubetrain.operator.progress import format_time


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[Condition]:
    """Conditions with ``type_`` set; lastTransitionTime changes only with the status."""
    previous = next((c for c in conditions if c.type == type_), None)
    when = (
        previous.last_transition_time
        if previous is not None and previous.status == status
        else format_time(now)
    )
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=when,
        observed_generation=generation,
    )
    rest = [c for c in conditions if c.type != type_]
    order = {t: i for i, t in enumerate(CONDITION_ORDER)}
    return sorted([*rest, new], key=lambda c: order.get(c.type, len(order)))


def condition_of(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


class Conditions:
    """A run's conditions as one reconcile rewrites them (see ``set_condition``)."""

    def __init__(self, current: list[Condition], now: datetime, generation: int | None):
        self.items = list(current)
        self.now = now
        self.generation = generation

    def get(self, type_: str) -> Condition | None:
        return condition_of(self.items, type_)

    def set(self, type_: str, value: bool, reason: str, message: str) -> None:
        self.items = set_condition(
            self.items,
            type_,
            "True" if value else "False",
            reason,
            message,
            self.now,
            self.generation,
        )

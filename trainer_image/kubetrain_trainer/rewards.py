"""Reward functions of a grpo stage: built-in verifiable rewards and user entry points.

Every reward function has TRL's signature, so a reward written for TRL's GRPOTrainer
works here unchanged::

    def reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]

``columns`` are the example's other data keys (``answer`` for the arithmetic task), one
list entry per completion; ``None`` means "does not apply to this completion" (it counts
as missing, not as 0, in the reward's mean and in the group baseline, as in TRL).

Built in (``grpo.rewards[].function``):
- ``exact-match``: 1 when the completion, stripped of surrounding white space, equals the
  example's ``answer``; the same test as the held-out exact match, so the reward is the
  metric the demo reports.
- ``format``: 1 when the completion is just a number (digits, an optional sign and
  decimal part): the answer format, independent of whether it is right.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kubetrain.core.api import BuiltinReward, Reward

RewardFunction = Callable[..., Sequence[float | None]]

_NUMBER = re.compile(r"^[-+]?\d+(\.\d+)?$")


class RewardError(ValueError):
    """A reward function that cannot be loaded or returned something unusable."""


def matches(completion: str, answer: str) -> bool:
    """Exact match: the held-out metric and the ``exact-match`` reward."""
    return completion.strip() == answer.strip()


def exact_match(
    prompts: Sequence[str], completions: Sequence[str], **columns: Any
) -> list[float | None]:
    answers = columns.get("answer")
    if answers is None:
        raise RewardError(
            "reward exact-match needs an `answer` for every example (accepted: data with an "
            "`answer` key, e.g. JSONL {prompt, answer}, or synthetic:arithmetic)"
        )
    return [
        None if a is None else float(matches(c, str(a)))
        for c, a in zip(completions, answers, strict=True)
    ]


def answer_format(
    prompts: Sequence[str], completions: Sequence[str], **columns: Any
) -> list[float | None]:
    return [float(bool(_NUMBER.match(c.strip()))) for c in completions]


BUILTIN: dict[str, RewardFunction] = {
    BuiltinReward.exact_match.value: exact_match,
    BuiltinReward.answer_format.value: answer_format,
}


def load(function: str, where: str) -> RewardFunction:
    """The reward function a manifest names: a built-in, or ``package.module:function``
    imported in this process (``where`` names the field in errors)."""
    if function in BUILTIN:
        return BUILTIN[function]
    module_name, _, attr = function.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(
            f"{where}={function!r}: cannot import module {module_name!r} ({exc}); accepted: "
            f"{', '.join(BUILTIN)}, or an entry point package.module:function installed in "
            "the trainer image or on its PYTHONPATH"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"{where}={function!r}: module {module_name!r} has no function {attr!r}")
    return fn


def _number(value: Any, name: str, index: int) -> float:
    try:
        x = float(value)  # numbers, bools, numpy and 0-d torch scalars
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
        raise RewardError(
            f"reward {name} returned {value!r} for completion {index} (accepted: a finite "
            "number or None)"
        )
    return x


@dataclass(frozen=True)
class RewardSet:
    """The stage's reward functions with their names and weights."""

    names: tuple[str, ...]
    functions: tuple[RewardFunction, ...]
    weights: tuple[float, ...]

    @classmethod
    def from_spec(cls, rewards: Sequence[Reward]) -> RewardSet:
        return cls(
            tuple(r.function for r in rewards),
            tuple(load(r.function, f"grpo.rewards[{i}].function") for i, r in enumerate(rewards)),
            tuple(r.weight for r in rewards),
        )

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], columns: dict[str, list[Any]]
    ) -> torch.Tensor:
        """Rewards (N, F): function f's reward of completion n, NaN where it returned
        None. ``prompts`` and every column have one entry per completion."""
        out = torch.full((len(completions), len(self.functions)), math.nan, dtype=torch.float64)
        for f, (name, fn) in enumerate(zip(self.names, self.functions, strict=True)):
            values = list(fn(list(prompts), list(completions), **columns))
            if len(values) != len(completions):
                raise RewardError(
                    f"reward {name} returned {len(values)} values for {len(completions)} "
                    "completions (accepted: one number or None per completion)"
                )
            for n, v in enumerate(values):
                if v is not None:
                    out[n, f] = _number(v, name, n)
        return out

    def total(self, per_function: torch.Tensor) -> torch.Tensor:
        """The weighted sum per completion (N,), NaN where every function returned None
        (TRL: such a completion is unscorable)."""
        weights = torch.tensor(self.weights, dtype=per_function.dtype)
        total = (per_function * weights).nansum(dim=1)
        return total.masked_fill(per_function.isnan().all(dim=1), math.nan)

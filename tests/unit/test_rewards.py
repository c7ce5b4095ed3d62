"""Reward functions: the built-in verifiable rewards and entry points from the manifest."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from kubetrain.core.api import Reward
from kubetrain_trainer.rewards import RewardError, RewardSet, answer_format, exact_match, load


def test_exact_match_compares_the_stripped_completion_with_the_answer() -> None:
    got = exact_match(["p"] * 4, ["46", " 46\n", "46 ", "4 6"], answer=["46", "46", "47", "46"])
    assert got == [1.0, 1.0, 0.0, 0.0]


def test_exact_match_needs_an_answer_column() -> None:
    with pytest.raises(RewardError, match="needs an `answer`"):
        exact_match(["p"], ["1"])


def test_format_rewards_a_bare_number_right_or_wrong() -> None:
    got = answer_format(["p"] * 5, ["46", "-3.5", "46\nQ: 1", "forty", ""])
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0]


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "team_rewards.py").write_text(
        "def shorter(prompts, completions, **columns):\n"
        "    return [1.0 / (1 + len(c)) for c in completions]\n"
        "def only_first(prompts, completions, **columns):\n"
        "    return [1.0] + [None] * (len(completions) - 1)\n"
        "def broken(prompts, completions, **columns):\n"
        "    return ['high'] * len(completions)\n"
        "not_a_function = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "team_rewards"
    sys.modules.pop("team_rewards", None)


def test_an_entry_point_is_weighted_and_summed_with_the_builtins(reward_module: str) -> None:
    rewards = RewardSet.from_spec(
        [Reward(function="exact-match"), Reward(function=f"{reward_module}:shorter", weight=2)]
    )
    per_function = rewards.score(["p", "p"], ["3", "33"], {"answer": ["3", "3"]})
    # Each function's own value; the weights apply in the total.
    assert torch.allclose(per_function, torch.tensor([[1.0, 0.5], [0.0, 1.0 / 3.0]]).double())
    assert rewards.total(per_function).tolist() == pytest.approx([2.0, 2.0 / 3.0])


def test_none_is_missing_not_zero(reward_module: str) -> None:
    rewards = RewardSet.from_spec([Reward(function=f"{reward_module}:only_first")])
    total = rewards.total(rewards.score(["p", "p"], ["a", "b"], {}))
    assert total[0] == 1.0 and math.isnan(total[1])


@pytest.mark.parametrize(
    "function,message",
    [
        ("no_such_module_here:f", "cannot import module 'no_such_module_here'"),
        ("team_rewards:missing", "module 'team_rewards' has no function 'missing'"),
        ("team_rewards:not_a_function", "has no function 'not_a_function'"),
    ],
)
def test_an_unloadable_entry_point_names_the_field(
    reward_module: str, function: str, message: str
) -> None:
    with pytest.raises(RewardError, match=r"grpo\.rewards") as err:
        load(function, "grpo.rewards[0].function")
    assert message in str(err.value)


def test_a_reward_that_is_not_a_number_is_refused(reward_module: str) -> None:
    rewards = RewardSet.from_spec([Reward(function=f"{reward_module}:broken")])
    with pytest.raises(RewardError, match="returned 'high' for completion 0"):
        rewards.score(["p"], ["x"], {})

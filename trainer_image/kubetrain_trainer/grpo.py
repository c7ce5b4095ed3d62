"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), as TRL's
GRPOTrainer computes it.

One optimizer step:
1. rollout (every ``iterations`` steps): each process takes its own ``batchSize``
   prompts per micro-batch and samples ``generations`` (G) completions of each with the
   KV cache (``kubetrain_trainer.sampling``); the rewards score them; a completion's
   advantage is its reward minus its group's mean, divided by the group's standard
   deviation (+1e-4). A group never spans processes, so sampling is sharded with no
   communication. The frozen reference's per-token log-probabilities are computed here,
   and, when ``iterations`` > 1, the sampling policy's;
2. loss, per micro-batch: with r = π(o_t)/π_old(o_t) and A the advantage, the per-token
   loss is −min(r·A, clip(r, 1−ε, 1+ε)·A) + β·KL, with TRL's estimator
   KL = π_ref/π − log(π_ref/π) − 1; log-probabilities are taken at the sampling
   temperature, as TRL does.

Loss normalisation (``grpo.lossType``, TRL's ``loss_type`` of the same name):
- ``dapo`` (the default, TRL's too): the sum over every completion token divided by the
  number of completion tokens in the step's global batch (all micro-batches, all
  processes). Each token weighs the same, so a long wrong answer is not penalised less
  per token than a short one; and the step's gradient is the same however the batch is
  split into processes and micro-batches;
- ``grpo``: each completion's mean over its tokens, then the mean over completions
  (DeepSeekMath's formula), which favours short correct and long wrong completions
  (Liu et al. 2025, "Understanding R1-Zero-like training").
Both equal TRL's loss on the same inputs within 1e-5 (tests/unit/test_grpo.py).

Metrics (TRL's names): ``reward``, ``reward_std``, ``rewards/<function>`` (each function's
mean), ``kl``, ``clip_ratio`` (share of completion tokens whose ratio was clipped),
``completion_length`` (tokens, stop token included), ``frac_reward_zero_std`` (groups in
which every completion got the same reward, so none of them teaches anything).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kubetrain.core.api import GRPO
from kubetrain_trainer import tokenizer as tok
from kubetrain_trainer.data import IGNORE, PromptBatch
from kubetrain_trainer.rewards import RewardSet
from kubetrain_trainer.sampling import sample

if TYPE_CHECKING:
    from kubetrain_trainer.hf.tokenizer import HFTokenizer

# TRL's guard against a zero group standard deviation.
STD_EPSILON = 1e-4


@dataclass(frozen=True)
class Codec:
    """Text <-> token ids for the model being trained: ``encode`` a prompt (with the
    beginning-of-sequence token the model expects), ``decode`` a completion (stop token
    excluded), the ids that end a completion, and the padding id."""

    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    stop_ids: frozenset[int]
    pad_id: int


BYTE_CODEC = Codec(
    encode=lambda text: tok.encode(text, bos=True),
    decode=lambda ids: tok.decode(ids),
    stop_ids=frozenset({tok.EOS}),
    pad_id=tok.PAD,
)


def hf_codec(tokenizer: HFTokenizer) -> Codec:
    """The codec of a Hugging Face model's tokenizer: prompts framed as the tokenizer
    frames plain text (Llama adds its BOS), completions decoded without special tokens,
    its stop ids (EOS and generation_config.json's) and padding."""
    return Codec(
        encode=lambda text: tokenizer.encode(text, add_special_tokens=True),
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        stop_ids=tokenizer.stop_ids,
        pad_id=tokenizer.pad_id,
    )


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (NaN below 2 values)."""
    if dim is None:
        x, dim = x.flatten(), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~x.isnan()).sum(dim=dim)
    var = torch.nanmean((x - mean) ** 2, dim=dim) * count / (count - 1)
    return torch.where(count > 1, var.sqrt(), torch.full_like(var, math.nan))


def group_advantages(rewards: torch.Tensor, generations: int) -> torch.Tensor:
    """Advantages (N,) of rewards (N,) ordered in groups of ``generations``: reward minus
    the group's mean, over the group's standard deviation + 1e-4 (NaN rewards, from
    completions no reward applied to, are left out of the group's statistics and get
    advantage 0)."""
    grouped = rewards.view(-1, generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(generations)
    std = nanstd(grouped, dim=1).repeat_interleave(generations)
    return torch.nan_to_num((rewards - mean) / (std + STD_EPSILON), nan=0.0)


def token_logprobs(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log π(target) at each position (B, T) under softmax(logits / temperature); 0 where
    the target is IGNORE."""
    logits = model(inputs).float() / temperature
    safe = targets.masked_fill(targets == IGNORE, 0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(targets == IGNORE, 0.0)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    epsilon: float,
    loss_type: str,
    accumulation: int = 1,
    tokens_per_process: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch, scaled for gradient accumulation as TRL scales it,
    and its metrics as sums (``tokens``: completion tokens they are sums over).

    ``logps``, ``old_logps`` (None: the sampling policy is this one, ratio 1),
    ``ref_logps`` (None: no KL term) and ``mask`` are (B, T) over the completion tokens;
    ``advantages`` is (B,). ``tokens_per_process`` (``dapo``): completion tokens of the
    step's global batch divided by the number of processes.
    """
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics: dict[str, torch.Tensor] = {}
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        metrics["kl"] = (kl.detach() * mask).sum()
    if loss_type == "grpo":
        per_completion = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        loss = per_completion.mean() / accumulation
    elif loss_type == "dapo":
        if tokens_per_process is None:
            raise ValueError("loss type dapo needs tokens_per_process")
        loss = (per_token * mask).sum() / max(tokens_per_process, 1.0)
    else:
        raise ValueError(f"loss type {loss_type!r} (accepted: dapo, grpo)")
    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + epsilon) & (adv > 0)
    metrics["clip_ratio"] = ((low | high).to(mask.dtype) * mask).sum().detach()
    metrics["tokens"] = mask.sum()
    return loss, metrics


@dataclass
class Rollout:
    """One micro-batch of scored completions, as the loss needs them: prompt +
    completion right-padded (``inputs``, and ``targets`` with IGNORE outside the
    completion tokens), advantages, and the reference's and sampling policy's log-probs
    at the target positions."""

    inputs: torch.Tensor
    targets: torch.Tensor
    advantages: torch.Tensor
    ref_logps: torch.Tensor | None = None
    old_logps: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.inputs.numel()

    @property
    def completion_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    def state(self) -> dict[str, torch.Tensor]:
        fields = {
            "inputs": self.inputs,
            "targets": self.targets,
            "advantages": self.advantages,
            "ref_logps": self.ref_logps,
            "old_logps": self.old_logps,
        }
        return {k: v.cpu() for k, v in fields.items() if v is not None}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device: torch.device) -> Rollout:
        return cls(**{k: v.to(device) for k, v in state.items()})


@dataclass
class RolloutStats:
    """Sums over completions, to be added up over micro-batches and processes."""

    rewards: list[float] = field(default_factory=list)  # one per scored completion
    per_function: dict[str, list[float]] = field(default_factory=dict)
    completion_tokens: int = 0
    completions: int = 0
    groups: int = 0
    zero_std_groups: int = 0

    def add(self, other: RolloutStats) -> None:
        self.rewards += other.rewards
        for name, values in other.per_function.items():
            self.per_function.setdefault(name, []).extend(values)
        self.completion_tokens += other.completion_tokens
        self.completions += other.completions
        self.groups += other.groups
        self.zero_std_groups += other.zero_std_groups


def to_sequences(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs (N, T) and targets (N, T) of prompt + completion rows, the
    targets IGNORE except at completion tokens. Right padding needs no attention mask:
    a causal model never looks at the padding after a row's last token."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    t = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), t), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), t), IGNORE, dtype=torch.long)
    for i, (p, row) in enumerate(zip(prompts, rows, strict=True)):
        inputs[i, : len(row) - 1] = torch.tensor(row[:-1])
        targets[i, len(p) - 1 : len(row) - 1] = torch.tensor(row[len(p) :])
    return inputs, targets


class GRPOLearner:
    """Rollouts and the loss of a grpo stage (the trainer owns the optimizer step)."""

    def __init__(
        self,
        settings: GRPO,
        *,
        beta: float,
        rewards: RewardSet,
        reference: nn.Module,
        seq_len: int,
        codec: Codec = BYTE_CODEC,
    ):
        self.settings, self.beta, self.rewards = settings, beta, rewards
        self.reference, self.seq_len, self.codec = reference, seq_len, codec

    def roll_out(
        self,
        policy: nn.Module,
        batch: PromptBatch,
        generator: torch.Generator,
        autocast: contextlib.AbstractContextManager[Any],
    ) -> tuple[Rollout, RolloutStats]:
        """Sample, score and prepare one micro-batch of prompts (``policy``: the plain
        module, not a DDP or compiled wrapper)."""
        s, g = self.settings, self.settings.generations
        device = next(policy.parameters()).device
        prompt_ids = [self.codec.encode(p) for p in batch.prompts]
        longest = max(len(p) for p in prompt_ids)
        room = self.seq_len + 1 - longest
        if room < 1:
            raise ValueError(
                f"a prompt of {longest} tokens leaves no room for a completion within "
                f"seqLen {self.seq_len} (accepted: prompts shorter than seqLen)"
            )
        with autocast:
            sampled = sample(
                policy,
                prompt_ids,
                generations=g,
                temperature=s.temperature,
                top_p=s.top_p,
                max_new_tokens=min(s.max_completion_tokens, room),
                stop_ids=self.codec.stop_ids,
                pad_id=self.codec.pad_id,
                generator=generator,
            )
        texts = [self.codec.decode(c) for c in sampled.tokens]
        prompts = [p for p in batch.prompts for _ in range(g)]
        columns = {k: [v for v in values for _ in range(g)] for k, values in batch.columns.items()}
        per_function = self.rewards.score(prompts, texts, columns)
        total = self.rewards.total(per_function)
        advantages = group_advantages(total, g)
        rows = [p for p in prompt_ids for _ in range(g)]
        inputs, targets = to_sequences(rows, sampled.tokens, self.codec.pad_id)
        rollout = Rollout(inputs.to(device), targets.to(device), advantages.float().to(device))
        with torch.no_grad(), autocast:
            rollout.ref_logps = token_logprobs(
                self.reference, rollout.inputs, rollout.targets, s.temperature
            )
            if s.iterations > 1:
                rollout.old_logps = token_logprobs(
                    policy, rollout.inputs, rollout.targets, s.temperature
                )
        grouped = total.view(-1, g)
        zero_std = torch.isclose(nanstd(grouped, dim=1), torch.zeros(grouped.shape[0]).double())
        stats = RolloutStats(
            rewards=[float(x) for x in total.tolist() if not math.isnan(x)],
            per_function={
                name: [float(x) for x in per_function[:, f].tolist() if not math.isnan(x)]
                for f, name in enumerate(self.rewards.names)
            },
            completion_tokens=sum(len(c) for c in sampled.tokens),
            completions=len(sampled.tokens),
            groups=grouped.shape[0],
            zero_std_groups=int(zero_std.sum()),
        )
        return rollout, stats

    def loss(
        self,
        model: nn.Module,
        rollout: Rollout,
        *,
        accumulation: int,
        tokens_per_process: float,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss (call under the step's autocast) and metric sums."""
        s = self.settings
        logps = token_logprobs(model, rollout.inputs, rollout.targets, s.temperature)
        return grpo_loss(
            logps,
            rollout.old_logps,
            rollout.ref_logps,
            rollout.advantages,
            rollout.targets != IGNORE,
            beta=self.beta,
            epsilon=s.epsilon,
            loss_type=s.loss_type,
            accumulation=accumulation,
            tokens_per_process=tokens_per_process,
        )


def rollout_metrics(stats: RolloutStats) -> dict[str, float]:
    """A step's reward and length metrics from its (all-process) rollout statistics."""
    out: dict[str, float] = {}
    rewards = torch.tensor(stats.rewards, dtype=torch.float64)
    if len(stats.rewards):
        out["reward"] = float(rewards.mean())
    if len(stats.rewards) > 1:
        out["reward_std"] = float(nanstd(rewards))
    for name, values in stats.per_function.items():
        if values:
            out[f"rewards/{name}"] = sum(values) / len(values)
    if stats.completions:
        out["completion_length"] = stats.completion_tokens / stats.completions
    if stats.groups:
        out["frac_reward_zero_std"] = stats.zero_std_groups / stats.groups
    return out

"""Training objectives: next-token CE (pretrain), completion-only CE (SFT), DPO.

Pretrain and SFT share one function: the data marks positions outside the loss with
``IGNORE`` (SFT masks the prompt and the padding), so the objective cannot forget to.
DPO follows Rafailov et al. (2023), sigmoid loss, with TRL's names for what it logs;
both match TRL to 1e-5 on the same model and batch (tests/unit/test_hf_parity.py).

Normalisation. The objectives return *sums* (cross-entropy summed over target tokens;
DPO losses and diagnostics summed over pairs) and :func:`loss_items` counts what they
summed over; the trainer divides by the count over all micro-batches of a step and all
ranks. A step's loss is then the mean over its target tokens (pairs) wherever they
fell, so gradient accumulation and world size do not change it (TRL's
``num_items_in_batch``, ``average_tokens_across_devices``); and a micro-batch without a
target token adds zero instead of the NaN a per-batch mean gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kubetrain_trainer.data import IGNORE, LMBatch, PackedBatch, PairBatch

SequenceBatch = LMBatch | PackedBatch


def logits_of(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """The model's logits (B, T, V); packed rows pass their document and position ids
    so that examples sharing a row never attend to each other."""
    if isinstance(batch, PackedBatch):
        return model(batch.inputs, batch.position_ids, batch.document_ids)
    return model(batch.inputs)


def loss_items(batch: SequenceBatch | PairBatch) -> int:
    """What a batch's loss sums over: target tokens, or DPO pairs."""
    if isinstance(batch, PairBatch):
        return int(batch.chosen.inputs.shape[0])
    return int((batch.targets != IGNORE).sum())


def lm_loss_sum(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Cross-entropy summed over the target positions that are not IGNORE (0 when
    there are none)."""
    logits = logits_of(model, batch)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def lm_loss(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Mean cross-entropy over the target positions that are not IGNORE."""
    return lm_loss_sum(model, batch) / max(loss_items(batch), 1)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over each sequence's non-IGNORE positions: shape (B,)."""
    mask = targets != IGNORE
    safe = targets.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def pair_logprobs(model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen and the rejected responses, one forward pass."""
    n = batch.chosen.inputs.shape[0]
    logits = model(torch.cat([batch.chosen.inputs, batch.rejected.inputs]))
    logps = sequence_logprobs(logits, torch.cat([batch.chosen.targets, batch.rejected.targets]))
    return logps[:n], logps[n:]


DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def dpo_terms(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair DPO sigmoid losses (N,) and per-pair diagnostics (detached, (N,) each).

    The implicit reward of a response is β·(log π(y|x) − log π_ref(y|x)); the loss is
    −log σ(reward_chosen − reward_rejected), so log 2 when the policy equals the
    reference. Diagnostics: rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies (1 where the chosen reward is higher).
    """
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    margins = chosen - rejected
    metrics = {
        "rewards/chosen": chosen.detach(),
        "rewards/rejected": rejected.detach(),
        "rewards/margins": margins.detach(),
        "rewards/accuracies": (margins.detach() > 0).float(),
    }
    return -F.logsigmoid(margins), metrics


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss and diagnostics of one batch as means over its pairs (TRL's)."""
    losses, metrics = dpo_terms(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta
    )
    return losses.mean(), {k: v.mean() for k, v in metrics.items()}


def dpo_step_loss(
    policy: nn.Module, reference: nn.Module, batch: PairBatch, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss and diagnostics of one micro-batch, summed over its pairs; the
    reference runs without building a graph."""
    pc, pr = pair_logprobs(policy, batch)
    with torch.no_grad():
        rc, rr = pair_logprobs(reference, batch)
    losses, metrics = dpo_terms(pc, pr, rc, rr, beta)
    return losses.sum(), {k: v.sum() for k, v in metrics.items()}

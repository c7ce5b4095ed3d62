"""Held-out evaluation: exact match by greedy decoding, answer loss, and preference
accuracy (does the model give the chosen response a higher log-probability than the
rejected one?). The same numbers after every stage make the curriculum comparable."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kubetrain_trainer import tokenizer as tok
from kubetrain_trainer.data import IGNORE, EvalSet, _pair_batch, _sequence, collate
from kubetrain_trainer.model import GPT
from kubetrain_trainer.objectives import pair_logprobs
from kubetrain_trainer.rewards import matches
from kubetrain_trainer.sampling import sample

BATCH = 64


@torch.no_grad()
def greedy_answers(
    model: GPT, prompts: list[str], max_new_tokens: int, device: torch.device
) -> list[str]:
    """Greedy continuations of ``prompts`` until EOS or ``max_new_tokens``, batched
    with the KV cache (``kubetrain_trainer.sampling``)."""
    out: list[str] = []
    for s in range(0, len(prompts), BATCH):
        encoded = [tok.encode(p, bos=True) for p in prompts[s : s + BATCH]]
        completions = sample(
            model,
            encoded,
            temperature=0.0,
            max_new_tokens=max_new_tokens,
            stop_ids={tok.EOS},
            pad_id=tok.PAD,
        )
        out += [tok.decode(ids) for ids in completions.tokens]
    return out


@torch.no_grad()
def evaluate(model: GPT, eval_set: EvalSet, seq_len: int, device: torch.device) -> dict[str, float]:
    """Metrics on the held-out set: ``accuracy`` (exact match), ``loss`` (mean CE on
    answer tokens, or on held-out text), ``preferenceAccuracy``, ``examples``."""
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    try:
        if eval_set.qa:
            prompts = [p for p, _ in eval_set.qa]
            answers = [a for _, a in eval_set.qa]
            longest = max(len(tok.encode(a)) for a in answers)
            got = greedy_answers(model, prompts, longest + 1, device)
            hits = sum(matches(g, a) for g, a in zip(got, answers, strict=True))
            metrics["accuracy"] = hits / len(answers)
            metrics["examples"] = float(len(answers))
            metrics["loss"] = _mean_loss(
                model, [_sequence(p, a, seq_len) for p, a in eval_set.qa], device
            )
        elif eval_set.text:
            metrics["loss"] = _mean_loss(model, [(w, [1] * len(w)) for w in eval_set.text], device)
            metrics["examples"] = float(len(eval_set.text))
        if eval_set.pairs:
            wins = 0
            for s in range(0, len(eval_set.pairs), BATCH):
                batch = _pair_batch(eval_set.pairs[s : s + BATCH], seq_len).to(device)
                chosen, rejected = pair_logprobs(model, batch)
                wins += int((chosen > rejected).sum())
            metrics["preferenceAccuracy"] = wins / len(eval_set.pairs)
    finally:
        model.train(was_training)
    return metrics


def _mean_loss(
    model: nn.Module, seqs: list[tuple[list[int], list[int]]], device: torch.device
) -> float:
    total, count = 0.0, 0
    for s in range(0, len(seqs), BATCH):
        batch = collate(seqs[s : s + BATCH]).to(device)
        logits = model(batch.inputs)
        total += float(
            F.cross_entropy(
                logits.flatten(0, 1).float(),
                batch.targets.flatten(),
                ignore_index=IGNORE,
                reduction="sum",
            )
        )
        count += int((batch.targets != IGNORE).sum())
    return total / count if count else math.nan

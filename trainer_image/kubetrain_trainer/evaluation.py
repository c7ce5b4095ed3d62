"""Held-out evaluation: exact match by greedy decoding, answer loss, and preference
accuracy (does the model give the chosen response a higher log-probability than the
rejected one?). The same numbers after every stage make the curriculum comparable."""

from __future__ import annotations

import torch
from torch import nn

from kubetrain_trainer import tokenizer as tok
from kubetrain_trainer.data import EvalSet, _pair_batch, _sequence, collate
from kubetrain_trainer.model import GPT
from kubetrain_trainer.objectives import lm_loss_sum, loss_items, pair_logprobs
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


# What an evaluation sums on each rank (its share of the held-out set), in the order
# the trainer all-reduces them; :func:`metrics` turns the totals into the metrics.
SUMS = ("answered", "hits", "loss_sum", "loss_tokens", "pairs", "wins", "texts")


def metrics(sums: dict[str, float]) -> dict[str, float]:
    """``accuracy`` (exact match), ``loss`` (mean CE on answer tokens, or on held-out
    text), ``preferenceAccuracy`` and ``examples`` from the summed counts."""
    out: dict[str, float] = {}
    if sums["answered"]:
        out["accuracy"] = sums["hits"] / sums["answered"]
        out["examples"] = sums["answered"]
    elif sums["texts"]:
        out["examples"] = sums["texts"]
    if sums["loss_tokens"]:
        out["loss"] = sums["loss_sum"] / sums["loss_tokens"]
    if sums["pairs"]:
        out["preferenceAccuracy"] = sums["wins"] / sums["pairs"]
    return out


@torch.no_grad()
def evaluate_sums(
    model: GPT,
    eval_set: EvalSet,
    seq_len: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> dict[str, float]:
    """The :data:`SUMS` over this rank's share of the held-out set (items ``rank``,
    ``rank + world``, ...): every rank evaluates, none waits for another."""
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(SUMS, 0.0)
    qa, text, pairs = (
        eval_set.qa[rank::world],
        eval_set.text[rank::world],
        eval_set.pairs[rank::world],
    )
    try:
        if qa:
            answers = [a for _, a in qa]
            longest = max(len(tok.encode(a)) for a in answers)
            got = greedy_answers(model, [p for p, _ in qa], longest + 1, device)
            sums["hits"] = sum(matches(g, a) for g, a in zip(got, answers, strict=True))
            sums["answered"] = len(answers)
            seqs = [_sequence(p, a, seq_len) for p, a in qa]
            sums["loss_sum"], sums["loss_tokens"] = _loss_sums(model, seqs, device)
        elif text:
            seqs = [(w, [1] * len(w)) for w in text]
            sums["loss_sum"], sums["loss_tokens"] = _loss_sums(model, seqs, device)
            sums["texts"] = len(text)
        for s in range(0, len(pairs), BATCH):
            batch = _pair_batch(pairs[s : s + BATCH], seq_len).to(device)
            chosen, rejected = pair_logprobs(model, batch)
            sums["wins"] += int((chosen > rejected).sum())
        sums["pairs"] = len(pairs)
    finally:
        model.train(was_training)
    return sums


def evaluate(model: GPT, eval_set: EvalSet, seq_len: int, device: torch.device) -> dict[str, float]:
    """Metrics on the whole held-out set in this process (see :func:`metrics`)."""
    return metrics(evaluate_sums(model, eval_set, seq_len, device))


def _loss_sums(
    model: nn.Module, seqs: list[tuple[list[int], list[int]]], device: torch.device
) -> tuple[float, int]:
    """Cross-entropy summed over the sequences' masked-in targets, and their count."""
    total, count = 0.0, 0
    for s in range(0, len(seqs), BATCH):
        batch = collate(seqs[s : s + BATCH]).to(device)
        total += float(lm_loss_sum(model, batch))
        count += loss_items(batch)
    return total, count

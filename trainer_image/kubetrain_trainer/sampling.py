"""Batched sampling with a KV cache, for the built-in model and the Hugging Face models.

Both model kinds share one calling convention (``kubetrain_trainer.hf.model.CausalLM``):
``model(input_ids, document_ids=..., cache=KVCache)``. Prompts of different lengths
share a batch by left padding; padding gets the document id ``PAD_DOCUMENT``, so real
tokens never attend to it, and positions start at each prompt's first real token, so
each row is continued exactly as it would be alone. The prompt is read in one forward
pass (prefill), then each new token costs one forward pass of one position over the
cached keys and values, instead of the whole sequence again.

Greedy decoding (``temperature=0``) is what evaluation uses; GRPO samples with a
temperature and nucleus (top-p) truncation from a seeded ``torch.Generator``, so a
resumed stage draws the same completions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kubetrain_trainer.hf.model import PAD_DOCUMENT, KVCache


@dataclass(frozen=True)
class Completions:
    """Sampled continuations, one row per (prompt, generation), prompt-major: rows
    ``i*G .. i*G+G-1`` continue prompt ``i``.

    ``tokens``: each completion's ids, its stop token included when it stopped;
    ``stopped``: whether it ended with a stop token (not cut at the length limit)."""

    tokens: list[list[int]]
    stopped: list[bool]


def context_length(model: nn.Module) -> int | None:
    """The longest sequence ``model`` accepts (None: no fixed limit, rotary positions)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "context_length"):
        return int(cfg.context_length)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "family", None) == "gpt2":
        return int(config.max_positions)
    return None


def _layers(model: nn.Module) -> int:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no `blocks` list: sampling takes the built-in GPT "
            "or a kubetrain_trainer.hf CausalLM"
        )
    return len(blocks)


def next_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token per row of ``logits`` (B, V): the argmax when ``temperature`` is 0, else
    a draw from softmax(logits / temperature) restricted to the smallest set of tokens
    whose probability reaches ``top_p``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p (the first always stays).
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    generations: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int,
    stop_ids: frozenset[int] | set[int],
    pad_id: int,
    generator: torch.Generator | None = None,
) -> Completions:
    """``generations`` continuations of each prompt (token ids), up to ``max_new_tokens``
    tokens each (fewer when the model's context ends first) or the first stop token.

    The model runs in eval mode under ``no_grad`` and is put back as it was.
    """
    if not prompts:
        return Completions([], [])
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: sampling needs at least one token")
    device = next(model.parameters()).device
    rows = [list(p) for p in prompts for _ in range(generations)]
    width = max(len(p) for p in rows)
    limit = context_length(model)
    steps = max_new_tokens if limit is None else min(max_new_tokens, limit - width)
    if steps <= 0:
        raise ValueError(
            f"a prompt of {width} tokens leaves no room to generate in a context of {limit}"
        )
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    docs = torch.full((len(rows), width), PAD_DOCUMENT, dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, width - len(p) :] = torch.tensor(p)
        docs[i, width - len(p) :] = 0
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(_layers(model))
        logits = model(ids.to(device), document_ids=docs.to(device), cache=cache)[:, -1]
        out = torch.full((len(rows), steps), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        length = torch.zeros(len(rows), dtype=torch.long, device=device)
        for t in range(steps):
            nxt = next_tokens(logits, temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[:, t] = nxt
            length += (~done).long()
            done |= torch.isin(nxt, stops)
            # One host sync per token; a finished batch stops early.
            if t == steps - 1 or bool(done.all()):
                break
            logits = model(nxt[:, None], cache=cache)[:, -1]
    finally:
        model.train(was_training)
    tokens = [row[:n] for row, n in zip(out.tolist(), length.tolist(), strict=True)]
    return Completions(tokens, done.tolist())


@torch.no_grad()
def sample_without_cache(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: frozenset[int] | set[int],
    pad_id: int,
) -> list[list[int]]:
    """Greedy continuations that run the whole sequence through the model for every new
    token (no KV cache): the reference the cached sampler is measured and tested
    against. Same padding and positions as :func:`sample`."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    docs = torch.full((len(prompts), width), PAD_DOCUMENT, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), device=device)
        docs[i, width - len(p) :] = 0
    limit = context_length(model)
    steps = max_new_tokens if limit is None else min(max_new_tokens, limit - width)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps):
        nxt = model(ids, document_ids=docs)[:, -1].argmax(dim=-1)
        for i, token in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(token)
        done |= torch.isin(nxt, stops)
        if bool(done.all()):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        docs = torch.cat([docs, docs[:, -1:]], dim=1)
    return out

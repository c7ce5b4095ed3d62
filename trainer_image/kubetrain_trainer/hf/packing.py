"""Examples into batches: packed rows for pretraining and SFT, padded pairs for DPO.

Packing puts several examples into one row of ``seq_len`` tokens, each with its own
document id; the model attends only within a document and positions restart at each
one, so a packed example gives the same logits as the example alone (tested), and no
compute goes to padding. Within an example, token ``j`` is trained to predict token
``j + 1`` where that token's loss mask is set; the last token of each example predicts
nothing (the next example is not its continuation).

Rows are planned by best-fit decreasing over the examples' lengths: deterministic for a
given list (ties keep list order), typically within a few percent of perfectly full
rows. Examples longer than ``seq_len`` are cut: pretraining documents into consecutive
pieces (:func:`split_long`), SFT examples at ``seq_len`` (:func:`truncate`), as TRL does.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from kubetrain_trainer.data import IGNORE, LMBatch, PackedBatch, PairBatch
from kubetrain_trainer.hf.examples import PreferenceExample, TokenizedExample
from kubetrain_trainer.hf.model import PAD_DOCUMENT


def truncate(example: TokenizedExample, seq_len: int) -> TokenizedExample:
    return TokenizedExample(example.ids[:seq_len], example.loss_mask[:seq_len])


def split_long(example: TokenizedExample, seq_len: int) -> list[TokenizedExample]:
    """A document in consecutive pieces of at most ``seq_len`` tokens."""
    return [
        TokenizedExample(example.ids[i : i + seq_len], example.loss_mask[i : i + seq_len])
        for i in range(0, len(example), seq_len)
    ]


def plan_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Indices of the examples in each row, best-fit decreasing.

    Each example goes to the fullest row it still fits in, longest examples first.
    """
    too_long = [i for i, n in enumerate(lengths) if n > seq_len]
    if too_long:
        raise ValueError(
            f"{len(too_long)} examples are longer than seq_len={seq_len} (first: example "
            f"{too_long[0]} with {lengths[too_long[0]]} tokens); truncate or split them first"
        )
    rows: list[list[int]] = []
    # (free space, row index), sorted: the first entry with room >= n is the best fit.
    free: list[tuple[int, int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (seq_len - n, len(rows) - 1))
            continue
        room, row = free.pop(at)
        rows[row].append(i)
        bisect.insort(free, (room - n, row))
    return rows


def pack_rows(rows: Sequence[Sequence[TokenizedExample]], seq_len: int, pad_id: int) -> PackedBatch:
    """A batch of packed rows of exactly ``seq_len`` tokens, padding at the end."""
    b = len(rows)
    inputs = torch.full((b, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((b, seq_len), IGNORE, dtype=torch.long)
    documents = torch.full((b, seq_len), PAD_DOCUMENT, dtype=torch.long)
    positions = torch.zeros((b, seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for doc, ex in enumerate(row):
            n = len(ex)
            if at + n > seq_len:
                raise ValueError(f"row {r}: {at + n} tokens do not fit in seq_len={seq_len}")
            ids = torch.tensor(ex.ids, dtype=torch.long)
            keep = torch.tensor(ex.loss_mask[1:], dtype=torch.bool)
            inputs[r, at : at + n] = ids
            targets[r, at : at + n - 1] = torch.where(keep, ids[1:], IGNORE)
            documents[r, at : at + n] = doc
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(seq_len - at)
    return PackedBatch(inputs, targets, documents, positions)


def pad_batch(examples: Sequence[TokenizedExample], seq_len: int, pad_id: int) -> LMBatch:
    """Unpacked examples, one per row, cut to ``seq_len + 1`` tokens (``seq_len`` inputs
    and their targets) and right-padded to the longest."""
    cut = [truncate(ex, seq_len + 1) for ex in examples]
    t = max(len(ex) for ex in cut) - 1
    inputs = torch.full((len(cut), t), pad_id, dtype=torch.long)
    targets = torch.full((len(cut), t), IGNORE, dtype=torch.long)
    for i, ex in enumerate(cut):
        ids = torch.tensor(ex.ids, dtype=torch.long)
        keep = torch.tensor(ex.loss_mask[1:], dtype=torch.bool)
        inputs[i, : len(ex) - 1] = ids[:-1]
        targets[i, : len(ex) - 1] = torch.where(keep, ids[1:], IGNORE)
    return LMBatch(inputs, targets)


def pair_batch(pairs: Sequence[PreferenceExample], seq_len: int, pad_id: int) -> PairBatch:
    """DPO pairs: chosen and rejected padded to one length, so one forward pass can
    take both halves."""
    both = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], seq_len, pad_id)
    n = len(pairs)
    return PairBatch(
        LMBatch(both.inputs[:n], both.targets[:n]), LMBatch(both.inputs[n:], both.targets[n:])
    )

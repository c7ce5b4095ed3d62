"""A Hugging Face model's training and held-out data, as the trainer draws batches.

Rows come from ``data.source`` (JSONL or Parquet, see :mod:`.records`) or, for
``synthetic:arithmetic``, from the same arithmetic problems the built-in model learns
(as ``{prompt, completion}`` and ``{prompt, chosen, rejected}`` rows, so they go through
the model's chat template like any user data). A seeded tenth at most
(``data.evalExamples``) is held out.

Pretraining and SFT examples are packed (:mod:`.packing`): rows are planned once over
the whole training set, best-fit decreasing, and a *sample index* (what the trainer's
cursor counts, see :mod:`kubetrain_trainer.data`) is a packed row, reshuffled each
epoch. DPO pairs are one sample each, padded per micro-batch. GRPO prompts are text,
as for the built-in model (:class:`kubetrain_trainer.data.PromptBatch`: the trainer
encodes them with the model's tokenizer, ``kubetrain_trainer.grpo.hf_codec``); their
held-out answers are scored in the same plain-text framing.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from kubetrain.core.contract import S3Endpoint
from kubetrain_trainer import data
from kubetrain_trainer.data import Dataset, PackedBatch, PairBatch, PromptBatch
from kubetrain_trainer.hf import records
from kubetrain_trainer.hf.examples import (
    HeldOut,
    PreferenceExample,
    TokenizedExample,
    plain_example,
)
from kubetrain_trainer.hf.packing import (
    pack_rows,
    pair_batch,
    plan_rows,
    split_long,
    truncate,
)
from kubetrain_trainer.hf.tokenizer import HFTokenizer

log = logging.getLogger("kubetrain_trainer.hf.datasets")

# Training problems of synthetic:arithmetic for a Hugging Face model: a seeded sample of
# the (not held-out) problems, enough for thousands of steps of a small model.
SYNTHETIC_POOL = 4096


class PackedDataset(Dataset):
    """Pretraining or SFT examples packed into rows of ``seq_len`` tokens."""

    def __init__(
        self,
        examples: list[TokenizedExample],
        *,
        seq_len: int,
        pad_id: int,
        seed: int,
        eval_set: HeldOut,
    ):
        if not examples:
            raise ValueError("the data source has no training examples")
        self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        self.rows = plan_rows([len(e) for e in examples], seq_len)
        self.order = data.Shuffled(len(self.rows), seed)
        self.eval_set = eval_set
        used = sum(len(e) for e in examples)
        log.info(
            "%d examples packed into %d rows of %d tokens (%.1f%% padding)",
            len(examples),
            len(self.rows),
            seq_len,
            100.0 * (1 - used / (len(self.rows) * seq_len)),
        )

    def batch(self, start: int, size: int) -> PackedBatch:
        rows = [[self.examples[i] for i in self.rows[self.order(start + j)]] for j in range(size)]
        return pack_rows(rows, self.seq_len, self.pad_id)


class PairDataset(Dataset):
    """DPO pairs, one sample each, in a seeded order per epoch."""

    def __init__(
        self,
        pairs: list[PreferenceExample],
        *,
        seq_len: int,
        pad_id: int,
        seed: int,
        eval_set: HeldOut,
    ):
        if not pairs:
            raise ValueError("the data source has no training examples")
        self.pairs, self.seq_len, self.pad_id = pairs, seq_len, pad_id
        self.order = data.Shuffled(len(pairs), seed)
        self.eval_set = eval_set

    def batch(self, start: int, size: int) -> PairBatch:
        chosen = [self.pairs[self.order(start + j)] for j in range(size)]
        return pair_batch(chosen, self.seq_len, self.pad_id)


class PromptDataset(Dataset):
    """GRPO prompts (and the columns the rewards see), as the built-in model's grpo data
    gives them; the held-out prompts with an ``answer`` tokenized for exact match."""

    def __init__(self, prompts: Dataset, tok: HFTokenizer, seq_len: int):
        self.prompts = prompts
        held = prompts.eval_set
        assert isinstance(held, data.EvalSet)
        examples = [truncate(plain_example(tok, p, a), seq_len) for p, a in held.qa]
        self.eval_set = HeldOut(examples, [], generate=True)

    def batch(self, start: int, size: int) -> PromptBatch:
        batch = self.prompts.batch(start, size)
        assert isinstance(batch, PromptBatch)
        return batch


def synthetic_rows(stage_type: str, seed: int, eval_examples: int) -> tuple[list[Any], list[Any]]:
    """``synthetic:arithmetic`` as (training rows, held-out rows) of the stage's format;
    the held-out problems are the built-in model's, so numbers compare across models."""
    pool = [
        (a, b)
        for a in range(data.MAX_OPERAND + 1)
        for b in range(data.MAX_OPERAND + 1)
        if not data.held_out(a, b)
    ]
    rng = random.Random(f"hf-arithmetic:{seed}")
    rng.shuffle(pool)
    train, held = pool[:SYNTHETIC_POOL], data.eval_problems(eval_examples, seed)

    def row(a: int, b: int) -> dict[str, str]:
        if stage_type == "pretrain":
            fmt = rng.choice(data.FREE_FORMATS)
            return {"text": fmt.format(a=a, b=b, c=a + b)}
        prompt, answer = data.qa_prompt(a, b), str(a + b)
        if stage_type == "sft":
            return {"prompt": prompt, "completion": answer}
        return {"prompt": prompt, "chosen": answer, "rejected": data.wrong_answer(a, b, rng)}

    return [row(a, b) for a, b in train], [row(a, b) for a, b in held]


def build_dataset(
    stage_type: str,
    source: str,
    tok: HFTokenizer,
    *,
    seed: int,
    seq_len: int,
    eval_examples: int,
    s3: S3Endpoint | None = None,
) -> Dataset:
    """The dataset of a Hugging Face model's stage."""
    if stage_type == "grpo":
        prompts = data.build_dataset(
            stage_type, source, seed=seed, seq_len=seq_len, eval_examples=eval_examples, s3=s3
        )
        return PromptDataset(prompts, tok, seq_len)
    build: Any = {
        "pretrain": records.pretrain_example,
        "sft": records.sft_example,
        "dpo": records.dpo_example,
    }[stage_type]
    if source.startswith("synthetic:"):
        if source != "synthetic:arithmetic":
            raise ValueError(
                f"data.source {source!r}: unknown synthetic task (accepted: synthetic:arithmetic)"
            )
        train_rows, held_rows = synthetic_rows(stage_type, seed, eval_examples)
        train = [build(tok, r, f"{source} row {i + 1}") for i, r in enumerate(train_rows)]
        held = [build(tok, r, f"{source} row {i + 1}") for i, r in enumerate(held_rows)]
    else:
        train, held = data.split(
            records.load(source, data.read_source(source, s3), build, tok), eval_examples, seed
        )
    if stage_type == "dpo":
        pairs: list[PreferenceExample] = train
        # pad_batch keeps seq_len + 1 ids of each sequence: seq_len inputs and targets.
        _warn_untrained([truncate(p.chosen, seq_len + 1) for p in pairs], seq_len, source)
        held_pairs: list[PreferenceExample] = held
        eval_set = HeldOut([p.chosen for p in held_pairs], held_pairs, generate=True)
        return PairDataset(pairs, seq_len=seq_len, pad_id=tok.pad_id, seed=seed, eval_set=eval_set)
    if stage_type == "pretrain":
        pieces = [piece for ex in train for piece in split_long(ex, seq_len)]
        held_pieces = [piece for ex in held for piece in split_long(ex, seq_len)]
        eval_set = HeldOut(held_pieces, [], generate=False)
        return PackedDataset(
            pieces, seq_len=seq_len, pad_id=tok.pad_id, seed=seed, eval_set=eval_set
        )
    cut = [truncate(ex, seq_len) for ex in train]
    _warn_untrained(cut, seq_len, source)
    eval_set = HeldOut([truncate(ex, seq_len) for ex in held], [], generate=True)
    return PackedDataset(cut, seq_len=seq_len, pad_id=tok.pad_id, seed=seed, eval_set=eval_set)


def _warn_untrained(examples: list[TokenizedExample], seq_len: int, source: str) -> None:
    """Say how many (truncated) examples have no trained token left (their prompt fills
    the sequence): they are kept, but teach nothing."""
    lost = sum(1 for ex in examples if not any(ex.loss_mask[1:]))
    if lost:
        log.warning(
            "data.source %s: %d of %d examples have no completion token within seqLen=%d "
            "(the prompt fills it): they teach nothing; raise hyperparameters.seqLen",
            source,
            lost,
            len(examples),
            seq_len,
        )

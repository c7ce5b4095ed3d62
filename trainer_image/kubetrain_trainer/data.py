"""Training and evaluation data: the synthetic ``arithmetic`` task and user files.

Every dataset maps a *global sample index* to one example, deterministically (from the
data seed and the index alone). The trainer keeps one integer, the cursor (samples
consumed so far by all ranks), in its checkpoints; rank ``r`` of ``w`` reads indices
``cursor + r·B … cursor + r·B + B - 1`` of each micro-batch, and the cursor advances by
``B·w``. Resuming therefore replays exactly the same order, and ranks never overlap.

The arithmetic task (addition of two numbers below 100) exists in two guises on purpose:
- pretraining text states sums in several *free* formats ("12+34=46", "the sum of 12
  and 34 is 46", ...) but never in the question/answer format;
- SFT, DPO, GRPO and evaluation use the question/answer format ``Q: 12+34\\nA: `` ->
  ``46``.
So a pretrained model has read sums but cannot answer a question; SFT teaches the
format, DPO sharpens the preference for correct answers over near misses, and GRPO
samples answers and rewards the right ones (its prompts carry the ``answer`` column that
the exact-match reward checks).
A fixed tenth of all problems (by a hash of the problem, independent of any seed) is
held out: no stage ever trains on it, so eval numbers are comparable across stages.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

import torch

from kubetrain.core import contract
from kubetrain.core import store as kstore
from kubetrain_trainer import tokenizer as tok
from kubetrain_trainer.hf.examples import HeldOut
from kubetrain_trainer.hf.model import PAD_DOCUMENT

IGNORE = -100  # cross_entropy's ignore_index: positions that do not count in the loss
MAX_OPERAND = 99

_T = TypeVar("_T")


# --------------------------------------------------------------------------- arithmetic


def held_out(a: int, b: int) -> bool:
    """Whether a problem belongs to the evaluation split (about one in ten)."""
    return zlib.crc32(f"{a}+{b}".encode()) % 10 == 0


def qa_prompt(a: int, b: int) -> str:
    return f"Q: {a}+{b}\nA: "


FREE_FORMATS = (
    "{a}+{b}={c}",
    "{a} + {b} = {c}",
    "{a} plus {b} equals {c}",
    "the sum of {a} and {b} is {c}",
    "{c} = {a} + {b}",
    "adding {a} and {b} gives {c}",
)


def _train_problem(rng: random.Random) -> tuple[int, int]:
    while True:
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        if not held_out(a, b):
            return a, b


def wrong_answer(a: int, b: int, rng: random.Random) -> str:
    """A plausible wrong sum: off by one or ten, digits swapped, or a carry dropped."""
    c = a + b
    candidates = {
        c + 1,
        c - 1,
        c + 10,
        c - 10,
        int(str(c)[::-1]),
        (a % 10 + b % 10) % 10 + 10 * ((a // 10 + b // 10) % 10),
    }
    return str(rng.choice(sorted(x for x in candidates if x >= 0 and x != c)))


def eval_problems(n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` distinct held-out problems, in a seeded order."""
    pool = [
        (a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1) if held_out(a, b)
    ]
    random.Random(f"eval:{seed}").shuffle(pool)
    return pool[:n]


# --------------------------------------------------------------------------- batches


@dataclass
class LMBatch:
    """Inputs (B, T) and next-token targets (B, T) with IGNORE where no loss applies."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device) -> LMBatch:
        return LMBatch(
            self.inputs.to(device, non_blocking=True), self.targets.to(device, non_blocking=True)
        )

    @property
    def tokens(self) -> int:
        return self.inputs.numel()


@dataclass
class PackedBatch:
    """Inputs (B, T), next-token targets with IGNORE where no loss applies, and the
    document and position ids the model needs to keep packed examples apart."""

    inputs: torch.Tensor
    targets: torch.Tensor
    document_ids: torch.Tensor
    position_ids: torch.Tensor

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.inputs, self.targets, self.document_ids, self.position_ids)
            )
        )

    @property
    def tokens(self) -> int:
        """Real (non-padding) input tokens: what the model computed on."""
        return int((self.document_ids != PAD_DOCUMENT).sum())


@dataclass
class PairBatch:
    """DPO: the same prompts with the chosen and with the rejected response."""

    chosen: LMBatch
    rejected: LMBatch

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.chosen.to(device), self.rejected.to(device))

    @property
    def tokens(self) -> int:
        return self.chosen.tokens + self.rejected.tokens


@dataclass
class PromptBatch:
    """GRPO: prompts, and per data key the values the rewards see (``answer`` ...)."""

    prompts: list[str]
    columns: dict[str, list[Any]] = field(default_factory=dict)

    def to(self, device: torch.device) -> PromptBatch:
        return self  # text: the trainer tokenizes and samples on the device itself


def _sequence(prompt: str, response: str, seq_len: int) -> tuple[list[int], list[int]]:
    """Token ids of BOS+prompt+response+EOS and its loss mask (response and EOS only),
    truncated to ``seq_len + 1`` ids (T inputs plus the last target)."""
    p = tok.encode(prompt, bos=True)
    r = tok.encode(response, eos=True)
    ids = (p + r)[: seq_len + 1]
    mask = ([0] * len(p) + [1] * len(r))[: seq_len + 1]
    return ids, mask


def collate(seqs: list[tuple[list[int], list[int]]]) -> LMBatch:
    """Right-pad to the longest sequence of the batch; targets masked outside the loss."""
    t = max(len(ids) for ids, _ in seqs) - 1
    inputs = torch.full((len(seqs), t), tok.PAD, dtype=torch.long)
    targets = torch.full((len(seqs), t), IGNORE, dtype=torch.long)
    for i, (ids, mask) in enumerate(seqs):
        n = len(ids) - 1
        inputs[i, :n] = torch.tensor(ids[:-1])
        tgt = torch.tensor(ids[1:])
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        targets[i, :n] = torch.where(keep, tgt, torch.full_like(tgt, IGNORE))
    return LMBatch(inputs, targets)


# --------------------------------------------------------------------------- eval set


@dataclass
class EvalSet:
    """Held-out data. ``qa``: (prompt, answer) for exact match and answer loss;
    ``pairs``: (prompt, chosen, rejected) for preference accuracy; ``text``: token
    windows for loss only (pretraining on a user's text file)."""

    qa: list[tuple[str, str]] = field(default_factory=list)
    pairs: list[tuple[str, str, str]] = field(default_factory=list)
    text: list[list[int]] = field(default_factory=list)


# --------------------------------------------------------------------------- datasets


class Dataset:
    """Maps a global sample index to an example; ``batch`` collates a run of them.

    ``eval_set`` is an :class:`EvalSet` of strings for the built-in model and a
    :class:`~kubetrain_trainer.hf.examples.HeldOut` of token ids for a Hugging Face
    model (:mod:`kubetrain_trainer.hf.datasets`)."""

    eval_set: EvalSet | HeldOut

    def batch(self, start: int, size: int) -> LMBatch | PackedBatch | PairBatch | PromptBatch:
        raise NotImplementedError


class _Arithmetic(Dataset):
    """The synthetic task's shared state: a seed, the row length and the held-out sums."""

    def __init__(self, seed: int, seq_len: int, eval_examples: int):
        self.seed, self.seq_len = seed, seq_len
        self.eval_set = _arithmetic_eval(eval_examples, seed)


class ArithmeticPretrain(_Arithmetic):
    """Windows of ``seq_len + 1`` tokens of free-format arithmetic statements."""

    def sample(self, index: int) -> list[int]:
        rng = random.Random(f"pretrain:{self.seed}:{index}")
        ids = [tok.BOS]
        while len(ids) < self.seq_len + 1:
            a, b = _train_problem(rng)
            line = rng.choice(FREE_FORMATS).format(a=a, b=b, c=a + b)
            ids += tok.encode(line + "\n")
        return ids[: self.seq_len + 1]

    def batch(self, start: int, size: int) -> LMBatch:
        rows = torch.tensor([self.sample(start + j) for j in range(size)])
        return LMBatch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())


class ArithmeticSFT(_Arithmetic):
    def example(self, index: int) -> tuple[str, str]:
        a, b = _train_problem(random.Random(f"sft:{self.seed}:{index}"))
        return qa_prompt(a, b), str(a + b)

    def batch(self, start: int, size: int) -> LMBatch:
        return collate([_sequence(*self.example(start + j), self.seq_len) for j in range(size)])


class ArithmeticDPO(_Arithmetic):
    def example(self, index: int) -> tuple[str, str, str]:
        rng = random.Random(f"dpo:{self.seed}:{index}")
        a, b = _train_problem(rng)
        return qa_prompt(a, b), str(a + b), wrong_answer(a, b, rng)

    def batch(self, start: int, size: int) -> PairBatch:
        return _pair_batch([self.example(start + j) for j in range(size)], self.seq_len)


class ArithmeticGRPO(_Arithmetic):
    """Question/answer prompts; the ``answer`` column is what the exact-match reward
    checks."""

    def example(self, index: int) -> tuple[str, str]:
        a, b = _train_problem(random.Random(f"grpo:{self.seed}:{index}"))
        return qa_prompt(a, b), str(a + b)

    def batch(self, start: int, size: int) -> PromptBatch:
        examples = [self.example(start + j) for j in range(size)]
        return PromptBatch([p for p, _ in examples], {"answer": [a for _, a in examples]})


def _pair_batch(examples: list[tuple[str, str, str]], seq_len: int) -> PairBatch:
    # Chosen and rejected are padded to one length so that one forward pass can take
    # both halves (policy and reference each run once per micro-batch).
    seqs = [_sequence(p, c, seq_len) for p, c, _ in examples]
    seqs += [_sequence(p, r, seq_len) for p, _, r in examples]
    both = collate(seqs)
    n = len(examples)
    return PairBatch(
        LMBatch(both.inputs[:n], both.targets[:n]), LMBatch(both.inputs[n:], both.targets[n:])
    )


@lru_cache(maxsize=8)
def _arithmetic_eval(n: int, seed: int) -> EvalSet:
    problems = eval_problems(n, seed)
    rng = random.Random(f"eval-rejected:{seed}")
    qa = [(qa_prompt(a, b), str(a + b)) for a, b in problems]
    pairs = [(qa_prompt(a, b), str(a + b), wrong_answer(a, b, rng)) for a, b in problems]
    return EvalSet(qa=qa, pairs=pairs)


class Shuffled:
    """Index -> record of a finite list, reshuffled each epoch with a seeded order."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise ValueError("the data source has no training examples")
        self.n, self.seed = n, seed

    @lru_cache(maxsize=2)  # noqa: B019 - a handful of instances per process
    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(f"epoch:{self.seed}:{epoch}").shuffle(order)
        return order

    def __call__(self, index: int) -> int:
        return self._order(index // self.n)[index % self.n]


def split(records: list[_T], eval_examples: int, seed: int) -> tuple[list[_T], list[_T]]:
    """Seeded split of user records: at most a tenth (and ``eval_examples``) held out."""
    order = list(range(len(records)))
    random.Random(f"split:{seed}").shuffle(order)
    k = min(eval_examples, len(records) // 10)
    return [records[i] for i in order[k:]], [records[i] for i in order[:k]]


def read_source(uri: str, s3: contract.S3Endpoint | None = None) -> bytes:
    """The bytes of a ``file://`` or ``s3://`` object (through kubetrain.core.store;
    ``s3``: where an ``s3://`` URI's store is, None: AWS)."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    s3 = s3 or contract.S3Endpoint()
    try:
        return kstore.open_store(parent, endpoint=s3.endpoint, region=s3.region).get_bytes(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"data.source {uri} does not exist") from None


def _jsonl(
    uri: str, keys: tuple[str, ...], s3: contract.S3Endpoint | None
) -> list[tuple[str, ...]]:
    out = []
    for n, line in enumerate(read_source(uri, s3).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            out.append(tuple(str(obj[k]) for k in keys))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
                f"data.source {uri} line {n}: expected a JSON object with keys {', '.join(keys)}"
            ) from None
    return out


class TextPretrain(Dataset):
    """A user's text file as non-overlapping windows, shuffled per epoch."""

    def __init__(
        self,
        uri: str,
        seed: int,
        seq_len: int,
        eval_examples: int,
        s3: contract.S3Endpoint | None = None,
    ):
        ids = tok.encode(read_source(uri, s3).decode("utf-8", errors="replace"))
        windows = [ids[i : i + seq_len + 1] for i in range(0, len(ids) - seq_len, seq_len)]
        train, held = split(windows, eval_examples, seed)
        self.windows, self.order = train, Shuffled(len(train), seed)
        self.eval_set = EvalSet(text=held)

    def batch(self, start: int, size: int) -> LMBatch:
        rows = torch.tensor([self.windows[self.order(start + j)] for j in range(size)])
        return LMBatch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())


class JsonlSFT(Dataset):
    def __init__(
        self,
        uri: str,
        seed: int,
        seq_len: int,
        eval_examples: int,
        s3: contract.S3Endpoint | None = None,
    ):
        records = [(p, r) for p, r in _jsonl(uri, ("prompt", "response"), s3)]
        train, held = split(records, eval_examples, seed)
        self.records, self.order, self.seq_len = train, Shuffled(len(train), seed), seq_len
        self.eval_set = EvalSet(qa=[(p, r) for p, r in held])

    def batch(self, start: int, size: int) -> LMBatch:
        return collate(
            [_sequence(*self.records[self.order(start + j)], self.seq_len) for j in range(size)]
        )


class JsonlDPO(Dataset):
    def __init__(
        self,
        uri: str,
        seed: int,
        seq_len: int,
        eval_examples: int,
        s3: contract.S3Endpoint | None = None,
    ):
        records = [(p, c, r) for p, c, r in _jsonl(uri, ("prompt", "chosen", "rejected"), s3)]
        train, held = split(records, eval_examples, seed)
        self.records, self.order, self.seq_len = train, Shuffled(len(train), seed), seq_len
        self.eval_set = EvalSet(qa=[(p, c) for p, c, _ in held], pairs=list(held))

    def batch(self, start: int, size: int) -> PairBatch:
        return _pair_batch([self.records[self.order(start + j)] for j in range(size)], self.seq_len)


class JsonlGRPO(Dataset):
    """JSONL objects with a ``prompt``; every other key is a column the rewards get
    (``answer`` for exact-match, which also makes the held-out exact match)."""

    def __init__(
        self,
        uri: str,
        seed: int,
        seq_len: int,
        eval_examples: int,
        s3: contract.S3Endpoint | None = None,
    ):
        records = _jsonl_objects(uri, "prompt", s3)
        train, held = split(records, eval_examples, seed)
        self.records, self.order = train, Shuffled(len(train), seed)
        self.eval_set = EvalSet(
            qa=[(str(r["prompt"]), str(r["answer"])) for r in held if "answer" in r]
        )

    def batch(self, start: int, size: int) -> PromptBatch:
        rows = [self.records[self.order(start + j)] for j in range(size)]
        keys = sorted({k for r in rows for k in r} - {"prompt"})
        return PromptBatch(
            [str(r["prompt"]) for r in rows], {k: [r.get(k) for r in rows] for k in keys}
        )


def _jsonl_objects(uri: str, required: str, s3: contract.S3Endpoint | None) -> list[dict[str, Any]]:
    out = []
    for n, line in enumerate(read_source(uri, s3).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get(required), str):
            raise ValueError(
                f"data.source {uri} line {n}: expected a JSON object with a string "
                f"{required!r} (other keys are passed to the rewards)"
            )
        out.append(obj)
    return out


SYNTHETIC: dict[str, Callable[..., Dataset]] = {
    "pretrain": ArithmeticPretrain,
    "sft": ArithmeticSFT,
    "dpo": ArithmeticDPO,
    "grpo": ArithmeticGRPO,
}
FROM_URI: dict[str, Callable[..., Dataset]] = {
    "pretrain": TextPretrain,
    "sft": JsonlSFT,
    "dpo": JsonlDPO,
    "grpo": JsonlGRPO,
}


def build_dataset(
    stage_type: str,
    source: str,
    *,
    seed: int,
    seq_len: int,
    eval_examples: int,
    s3: contract.S3Endpoint | None = None,
) -> Dataset:
    """The dataset of a stage from its ``data.source`` (``s3``: where an ``s3://``
    source's store is; None: AWS)."""
    if source.startswith("synthetic:"):
        task = source.removeprefix("synthetic:")
        if task != "arithmetic":
            raise ValueError(
                f"data.source {source!r}: unknown synthetic task (accepted: synthetic:arithmetic)"
            )
        return SYNTHETIC[stage_type](seed, seq_len, eval_examples)
    return FROM_URI[stage_type](source, seed, seq_len, eval_examples, s3)

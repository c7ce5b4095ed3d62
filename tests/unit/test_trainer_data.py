"""Data: deterministic, restorable order; held-out problems never trained on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kubetrain_trainer import tokenizer as tok
from kubetrain_trainer.data import (
    IGNORE,
    ArithmeticDPO,
    ArithmeticPretrain,
    ArithmeticSFT,
    build_dataset,
    eval_problems,
    held_out,
)


def test_same_seed_same_batches_and_other_seed_differs() -> None:
    a = ArithmeticPretrain(seed=1, seq_len=32, eval_examples=10)
    b = ArithmeticPretrain(seed=1, seq_len=32, eval_examples=10)
    c = ArithmeticPretrain(seed=2, seq_len=32, eval_examples=10)
    assert torch.equal(a.batch(64, 8).inputs, b.batch(64, 8).inputs)
    assert not torch.equal(a.batch(64, 8).inputs, c.batch(64, 8).inputs)


def test_batch_depends_only_on_the_cursor() -> None:
    # What makes resume exact and DDP sharding disjoint: sample i is the same whether it
    # is read in one batch of 8 or as the second half of two batches of 4.
    ds = ArithmeticSFT(seed=0, seq_len=32, eval_examples=0)
    whole = [ds.example(i) for i in range(8)]
    assert [ds.example(4 + i) for i in range(4)] == whole[4:]
    assert len(set(whole)) > 1


def test_eval_problems_are_disjoint_from_training_in_every_stage() -> None:
    problems = eval_problems(200, seed=0)
    assert len(problems) == len(set(problems)) == 200
    assert all(held_out(a, b) for a, b in problems)
    for ds in (ArithmeticSFT(0, 32, 200), ArithmeticDPO(0, 32, 200)):
        for i in range(500):
            prompt = ds.example(i)[0]
            a, b = prompt.removeprefix("Q: ").split("\nA:")[0].split("+")
            assert not held_out(int(a), int(b))
    # Whole lines of each window (its last line may be cut off mid-number).
    rows = ArithmeticPretrain(0, 64, 0).batch(0, 200).inputs.tolist()
    text = "\n".join(line for row in rows for line in tok.decode(row).split("\n")[:-1])
    stated = re.findall(r"(?<!\d)(\d+) ?(?:\+|plus|and) ?(\d+)(?= ?(?:=|is|equals|gives) )", text)
    assert len(stated) > 300
    assert not any(held_out(int(a), int(b)) for a, b in stated)


def test_pretraining_text_never_uses_the_question_answer_format() -> None:
    text = tok.decode(ArithmeticPretrain(0, 64, 0).batch(0, 100).inputs.flatten().tolist())
    assert "Q: " not in text and "\nA: " not in text
    assert "+" in text and " plus " in text


def test_dpo_rejected_answers_are_wrong_and_chosen_right() -> None:
    ds = ArithmeticDPO(seed=3, seq_len=32, eval_examples=50)
    for i in range(200):
        prompt, chosen, rejected = ds.example(i)
        a, b = prompt.removeprefix("Q: ").split("\nA:")[0].split("+")
        assert int(chosen) == int(a) + int(b) != int(rejected)
    batch = ds.batch(0, 4)
    # Same prompts on both sides; only the responses differ.
    assert torch.equal(batch.chosen.inputs[:, :5], batch.rejected.inputs[:, :5])
    assert (batch.chosen.targets != IGNORE).any() and (batch.rejected.targets != IGNORE).any()
    assert all(c != r for _, c, r in ds.eval_set.pairs)


def test_user_jsonl_and_text_sources(tmp_path: Path) -> None:
    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        "\n".join(json.dumps({"prompt": f"say {i}: ", "response": str(i)}) for i in range(50))
    )
    ds = build_dataset("sft", sft.as_uri(), seed=0, seq_len=32, eval_examples=5)
    assert len(ds.eval_set.qa) == 5
    trained = {tok.decode(t[t != IGNORE].tolist()) for t in ds.batch(0, 45).targets}
    held = {r for _, r in ds.eval_set.qa}
    assert trained.isdisjoint(held) and len(trained) == 45  # one epoch: each record once

    dpo = tmp_path / "dpo.jsonl"
    dpo.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    assert (
        build_dataset("dpo", dpo.as_uri(), seed=0, seq_len=8, eval_examples=0)
        .batch(0, 2)
        .chosen.inputs.shape[0]
        == 2
    )

    text = tmp_path / "corpus.txt"
    text.write_text("hello world " * 200)
    pre = build_dataset("pretrain", text.as_uri(), seed=0, seq_len=16, eval_examples=10)
    assert pre.batch(0, 4).inputs.shape == (4, 16) and len(pre.eval_set.text) == 10


def test_user_data_errors_name_the_source_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "response": "y"}\n{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: .*prompt, response"):
        build_dataset("sft", bad.as_uri(), seed=0, seq_len=8, eval_examples=0)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        build_dataset(
            "sft", (tmp_path / "missing.jsonl").as_uri(), seed=0, seq_len=8, eval_examples=0
        )
    with pytest.raises(ValueError, match="synthetic:arithmetic"):
        build_dataset("sft", "synthetic:chess", seed=0, seq_len=8, eval_examples=0)

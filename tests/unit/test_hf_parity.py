"""Parity with the reference implementation: TRL's DPOTrainer and SFTTrainer, given the
same tiny model and rows, tokenize them into the same ids and masks as kubetrain, and
compute the same losses and DPO diagnostics (within 1e-5).

TRL is a test dependency only; its trainers run here on the CPU for one batch (the
loss of ``compute_loss``, the diagnostics it logs), and kubetrain's native model,
loaded from the same folder, computes its side through the trainer's own functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from kubetrain_trainer.data import IGNORE
from kubetrain_trainer.hf import records
from kubetrain_trainer.hf.examples import TokenizedExample
from kubetrain_trainer.hf.packing import pack_rows, pad_batch, pair_batch, plan_rows
from kubetrain_trainer.hf.tokenizer import HFTokenizer
from kubetrain_trainer.hf.weights import load_pretrained
from kubetrain_trainer.objectives import (
    DPO_METRICS,
    dpo_step_loss,
    lm_loss_sum,
    loss_items,
)
from tests.support.hfmodels import CHATML, perturbed, tiny_llama

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

TOLERANCE = 1e-5
BETA = 0.1
MAX_LENGTH = 64

CONVERSATIONAL_PAIRS = [
    {"prompt": "Say yes.", "chosen": "Yes.", "rejected": "No."},
    {"prompt": "What is two plus two?", "chosen": "four", "rejected": "five, I think"},
    {"prompt": "Hello there", "chosen": "Hello, how are you today?", "rejected": "No."},
    {"prompt": "Q: 12+34\nA: ", "chosen": "46", "rejected": "47"},
]
PLAIN_PAIRS = [
    {"prompt": "Say yes.", "chosen": " Yes.", "rejected": " No."},
    {"prompt": "What is two plus two?", "chosen": " four", "rejected": " five, I think"},
    {"prompt": "Q: 12+34\nA:", "chosen": " 46", "rejected": " 47"},
]


def _messages(row: dict[str, str]) -> dict[str, Any]:
    """A row as conversational data (what TRL's chat path takes)."""
    return {
        key: [{"role": "user" if key == "prompt" else "assistant", "content": value}]
        for key, value in row.items()
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Reference and policy folders of a chat model and of a base model (no template)."""
    out = {}
    for kind, template in (("chat", CHATML), ("base", None)):
        ref = tmp_path_factory.mktemp(f"{kind}-ref")
        tiny_llama(ref, template=template, seed=3)
        policy = perturbed(ref, ref.parent / f"{ref.name}-policy")
        out[f"{kind}-ref"], out[f"{kind}-policy"] = ref, policy
    return out


def _args(config: type, tmp: Path, **kwargs: Any) -> Any:
    return config(
        output_dir=str(tmp / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_length=MAX_LENGTH,
        dataset_num_proc=None,
        **kwargs,
    )


def _trl_rows(batch: dict[str, torch.Tensor], key: str) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) per row of a TRL batch, padding removed."""
    out = []
    for ids, attention, mask in zip(
        batch["input_ids"], batch["attention_mask"], batch[key], strict=True
    ):
        n = int(attention.sum())
        out.append((ids[:n].tolist(), [int(m) for m in mask[:n].tolist()]))
    return out


def _ours(example: TokenizedExample) -> tuple[list[int], list[int]]:
    return example.ids, [int(m) for m in example.loss_mask]


@pytest.mark.parametrize("kind", ["chat", "base"])
def test_dpo_loss_and_rewards_equal_trl(
    folders: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    policy_dir, ref_dir = folders[f"{kind}-policy"], folders[f"{kind}-ref"]
    rows = [_messages(r) for r in CONVERSATIONAL_PAIRS] if kind == "chat" else PLAIN_PAIRS
    trainer = trl.DPOTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(policy_dir),
        ref_model=transformers.AutoModelForCausalLM.from_pretrained(ref_dir),
        args=_args(trl.DPOConfig, tmp_path, beta=BETA, per_device_train_batch_size=len(rows)),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(policy_dir),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    trl_loss = float(trainer.compute_loss(trainer.model, batch).detach())
    trl_metrics = {k: trainer._metrics["train"][k][-1] for k in DPO_METRICS}

    tok = HFTokenizer.from_folder(policy_dir)
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    pairs = records.load("rows.jsonl", data, records.dpo_example, tok)
    # The same token ids, and the loss on the same tokens: the completions.
    n = len(rows)
    theirs = _trl_rows(batch, "completion_mask")
    assert [_ours(p.chosen) for p in pairs] == theirs[:n]
    assert [_ours(p.rejected) for p in pairs] == theirs[n:]

    policy, reference = load_pretrained(policy_dir).train(), load_pretrained(ref_dir)
    ours = pair_batch(pairs, MAX_LENGTH, tok.pad_id)
    loss_sum, metric_sums = dpo_step_loss(policy, reference, ours, BETA)
    items = loss_items(ours)
    assert float(loss_sum.detach()) / items == pytest.approx(trl_loss, abs=TOLERANCE)
    for key in DPO_METRICS:
        assert float(metric_sums[key]) / items == pytest.approx(trl_metrics[key], abs=TOLERANCE)
    # Not the trivial case of a policy equal to its reference.
    assert abs(trl_metrics["rewards/margins"]) > 1e-3


SFT_ROWS = [
    {"prompt": "Say yes.", "completion": "Yes."},
    {"prompt": "What is two plus two?", "completion": "The answer is four."},
    {"prompt": "Q: 12+34\nA: ", "completion": "46"},
    {"prompt": "Hello there, how are you today?", "completion": "I am fine, thank you."},
]
PLAIN_SFT_ROWS = [{"prompt": r["prompt"], "completion": " " + r["completion"]} for r in SFT_ROWS]


@pytest.mark.parametrize("kind", ["chat", "base"])
def test_sft_loss_equals_trl_completion_only_loss(
    folders: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    model_dir = folders[f"{kind}-policy"]
    rows = (
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in SFT_ROWS
        ]
        if kind == "chat"
        else PLAIN_SFT_ROWS
    )
    trainer = trl.SFTTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(model_dir),
        args=_args(
            trl.SFTConfig,
            tmp_path,
            completion_only_loss=True,
            per_device_train_batch_size=len(rows),
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=transformers.AutoTokenizer.from_pretrained(model_dir),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    trl_loss = float(trainer.compute_loss(trainer.model, dict(batch)).detach())

    tok = HFTokenizer.from_folder(model_dir)
    examples = [records.sft_example(tok, r, f"row {i}") for i, r in enumerate(rows)]
    # TRL's labels are the ids where the loss applies, -100 elsewhere.
    trl_masks = [
        (ids.tolist()[: int(a.sum())], (labels != -100).int().tolist()[: int(a.sum())])
        for ids, labels, a in zip(
            batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
        )
    ]
    assert [_ours(ex) for ex in examples] == trl_masks

    model = load_pretrained(model_dir).train()
    padded = pad_batch(examples, MAX_LENGTH, tok.pad_id)
    assert float(lm_loss_sum(model, padded)) / loss_items(padded) == pytest.approx(
        trl_loss, abs=TOLERANCE
    )
    # Packed into one row, where every example sees only itself: the same loss.
    rows_plan = plan_rows([len(ex) for ex in examples], MAX_LENGTH)
    packed = pack_rows([[examples[i] for i in row] for row in rows_plan], MAX_LENGTH, tok.pad_id)
    assert len(rows_plan) < len(examples)
    assert float(lm_loss_sum(model, packed)) / loss_items(packed) == pytest.approx(
        trl_loss, abs=TOLERANCE
    )
    assert int((packed.targets != IGNORE).sum()) == int((padded.targets != IGNORE).sum())


def test_the_fixture_models_are_not_equal(folders: dict[str, Path]) -> None:
    """A policy equal to its reference would make every DPO diagnostic zero and the
    comparison above vacuous."""
    a = load_pretrained(folders["chat-policy"]).state_dict()
    b = load_pretrained(folders["chat-ref"]).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)

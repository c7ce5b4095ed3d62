"""A Hugging Face model's stage data as the trainer draws it: packed rows for pretrain
and SFT, padded pairs for DPO, held-out sets, synthetic arithmetic through the chat
template, and the same batches for the same cursor (resumption replays exactly)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetrain_trainer.data import IGNORE, PackedBatch, PairBatch
from kubetrain_trainer.hf.datasets import PackedDataset, PairDataset, build_dataset
from kubetrain_trainer.hf.model import PAD_DOCUMENT
from kubetrain_trainer.hf.tokenizer import HFTokenizer
from tests.support.hfmodels import write_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    return HFTokenizer.from_folder(folder)


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_synthetic_arithmetic_for_a_hugging_face_model(tok: HFTokenizer, stage: str) -> None:
    data = build_dataset(stage, "synthetic:arithmetic", tok, seed=0, seq_len=64, eval_examples=12)
    batch = data.batch(0, 3)
    if stage == "dpo":
        assert isinstance(data, PairDataset) and isinstance(batch, PairBatch)
        assert len(data.eval_set.pairs) == 12 and data.eval_set.generate
        return
    assert isinstance(data, PackedDataset) and isinstance(batch, PackedBatch)
    assert batch.inputs.shape == (3, 64)
    # Rows are full: several examples each, little padding.
    assert int((batch.document_ids != PAD_DOCUMENT).sum()) > 0.8 * batch.inputs.numel()
    assert int(batch.document_ids.max()) >= 1
    # The same cursor gives the same batch (what exact resumption relies on).
    assert torch.equal(data.batch(0, 3).inputs, batch.inputs)
    assert data.eval_set.generate == (stage == "sft")
    if stage == "sft":
        # The user turn renders through the chat template; only the answers are trained.
        trained = batch.targets[0][batch.targets[0] != IGNORE].tolist()
        assert "<|im_end|>" in tok.decode(trained, skip_special_tokens=False)
        assert "Q:" not in tok.decode(trained)


def test_a_text_file_of_documents_is_split_and_packed(tok: HFTokenizer, tmp_path: Path) -> None:
    docs = [{"text": "Hello there, how are you today? " * n} for n in range(1, 30)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    data = build_dataset("pretrain", path.as_uri(), tok, seed=0, seq_len=32, eval_examples=3)
    assert isinstance(data, PackedDataset)
    assert all(len(ex) <= 32 for ex in data.examples)
    # Every token of every training document is in exactly one piece.
    assert len(data.eval_set.examples) >= 2 and not data.eval_set.generate
    batch = data.batch(0, 4)
    assert int((batch.targets != IGNORE).sum()) > 0

"""Fine-tuning a model people have: a tiny random Llama, made here and saved by
transformers with its tokenizer and chat template, goes through SFT -> DPO with
`kubetrain run --local` on chat data in JSON Lines and Parquet; its held-out metrics
move, and every stage's model comes out as a Hugging Face folder that transformers
loads with the trainer's logits."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers

from kubetrain.core import layout
from kubetrain.core.hf_config import read_config
from kubetrain.core.records import read_metrics
from kubetrain.core.store import open_store
from kubetrain_trainer.hf.model import build_model
from tests.support.hfmodels import tiny_llama
from tests.support.localrun import progress, run_cli, stage_folder, write_manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

RUN = "ft"
# What the model learns: to answer a sum in digits (SFT), then to prefer the answer in
# words (DPO): a preference the SFT model does not have, held out or not.
WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
]


def _problems(seed: int, n: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n)]


def _write_data(folder: Path) -> tuple[Path, Path]:
    """SFT rows as conversations (JSON Lines) and DPO triples (Parquet)."""
    sft = folder / "sft.jsonl"
    with sft.open("w") as fh:
        for i, (a, b) in enumerate(_problems(1, 400)):
            user = {"role": "user", "content": f"Q: {a}+{b}"}
            answer = {"role": "assistant", "content": str(a + b)}
            row: dict[str, Any] = (
                {"messages": [user, answer]}
                if i % 2
                else {"prompt": [user], "completion": [answer]}
            )
            fh.write(json.dumps(row) + "\n")
    dpo = folder / "dpo.parquet"
    rows = [
        {"prompt": f"Q: {a}+{b}", "chosen": WORDS[a + b], "rejected": str(a + b)}
        for a, b in _problems(2, 400)
    ]
    pq.write_table(pa.Table.from_pylist(rows), dpo)
    return sft, dpo


def _manifest(model: Path, sft: Path, dpo: Path) -> dict[str, Any]:
    common = {"batchSize": 8, "logEvery": 10, "seqLen": 48, "evalEvery": 20, "warmupSteps": 5}
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": RUN},
        "spec": {
            # The architecture comes from config.json; a field given must agree with it.
            "model": {"from": model.as_uri(), "layers": 2},
            "stages": [
                {
                    "name": "sft",
                    "type": "sft",
                    "data": {"source": sft.as_uri(), "evalExamples": 40},
                    "hyperparameters": {**common, "maxSteps": 120, "learningRate": 3e-3},
                    "checkpointEvery": 60,
                },
                {
                    "name": "dpo",
                    "type": "dpo",
                    "data": {"source": dpo.as_uri(), "evalExamples": 40},
                    "hyperparameters": {
                        **common,
                        "maxSteps": 60,
                        "learningRate": 1e-3,
                        "evalEvery": 10,
                    },
                    "checkpointEvery": 40,
                },
            ],
        },
    }


def _evals(store: Path, stage: str) -> list[dict[str, float]]:
    folder = open_store(stage_folder(store, RUN, stage).as_uri())
    return [m.eval for m in read_metrics(folder, layout.METRICS) if m.eval]


def test_sft_then_dpo_of_a_hugging_face_model(tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny-llama"
    tiny_llama(model_dir, seed=0)
    sft, dpo = _write_data(tmp_path)
    manifest = write_manifest(tmp_path, _manifest(model_dir, sft, dpo))

    out = run_cli(
        "run", str(manifest), "--local", "--plain", "--metrics-port", "0", cwd=tmp_path, timeout=800
    )
    assert out.returncode == 0, out.stdout + out.stderr
    store = tmp_path / ".kubetrain" / "store"
    assert "(llama, 2 layers, 4 heads, dim 32, context 128)" in out.stdout

    # Held-out metrics move: SFT lowers the answer loss, DPO raises the preference for
    # the answer in words over the digits SFT taught.
    sft_evals, dpo_evals = _evals(store, "sft"), _evals(store, "dpo")
    assert sft_evals[-1]["loss"] < 0.7 * sft_evals[0]["loss"], sft_evals
    assert dpo_evals[-1]["preferenceAccuracy"] > dpo_evals[0]["preferenceAccuracy"], dpo_evals
    assert dpo_evals[-1]["preferenceAccuracy"] >= 0.9, dpo_evals
    for stage in ("sft", "dpo"):
        record = progress(store, RUN, stage)
        assert record.phase == "completed" and record.hf_model is not None
        assert f"{stage}: Hugging Face model {record.hf_model}" in out.stdout
    # DPO started from SFT's weights (its final checkpoint, at training precision).
    assert "/sft/checkpoints/" in (progress(store, RUN, "dpo").init_from or "")

    # The exported folder loads in transformers with the trainer's own logits.
    exported = stage_folder(store, RUN, "dpo") / layout.HF_EXPORT
    assert (exported / layout.MANIFEST).exists()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    final = (stage_folder(store, RUN, "dpo") / layout.FINAL).read_text().strip()
    state = torch.load(stage_folder(store, RUN, "dpo") / final / "model.pt", weights_only=True)
    ours = build_model(read_config(exported))
    ours.load_state_dict(state)
    ours.eval()
    x = torch.randint(0, theirs.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)).abs().max().item() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_grpo_of_a_hugging_face_model(tmp_path: Path) -> None:
    """A grpo stage straight from model.from: its prompts go through the model's
    tokenizer, completions stop at its end-of-turn token, the frozen reference is the
    model it starts from, and its final weights come out as a Hugging Face folder."""
    model_dir = tmp_path / "tiny-llama"
    tiny_llama(model_dir, seed=0)
    prompts = tmp_path / "prompts.jsonl"
    with prompts.open("w") as fh:
        for a, b in _problems(3, 60):
            fh.write(json.dumps({"prompt": f"Q: {a}+{b}\nA: ", "answer": str(a + b)}) + "\n")
    stage = {
        "name": "rl",
        "type": "grpo",
        "data": {"source": prompts.as_uri(), "evalExamples": 6},
        "hyperparameters": {"maxSteps": 4, "batchSize": 2, "seqLen": 48, "logEvery": 1},
        "grpo": {
            "generations": 4,
            "maxCompletionTokens": 4,
            "iterations": 2,
            "rewards": [{"function": "exact-match"}, {"function": "format", "weight": 0.5}],
        },
    }
    doc = {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": RUN},
        "spec": {"model": {"from": model_dir.as_uri()}, "stages": [stage]},
    }
    manifest = write_manifest(tmp_path, doc)
    out = run_cli(
        "run", str(manifest), "--local", "--plain", "--metrics-port", "0", cwd=tmp_path, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    store = tmp_path / ".kubetrain" / "store"
    record = progress(store, RUN, "rl")
    assert record.phase == "completed" and record.step == 4
    assert record.init_from == model_dir.as_uri()
    assert {"reward", "kl", "clip_ratio", "completion_length"} <= set(record.train)
    assert 1 <= record.train["completion_length"] <= 4
    # Held-out exact match of the model's greedy answers, through its tokenizer.
    assert record.eval["examples"] == 6 and 0 <= record.eval["accuracy"] <= 1
    exported = stage_folder(store, RUN, "rl") / layout.HF_EXPORT
    assert record.hf_model is not None and (exported / layout.MANIFEST).exists()
    assert transformers.AutoModelForCausalLM.from_pretrained(exported).config.model_type == "llama"

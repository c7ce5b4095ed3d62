"""A stage's Hugging Face export, without transformers in the loop: written whole or not
at all, found by the next stage, and announced where people look."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubetrain.cli.cluster import model_lines as status_model_lines
from kubetrain.core import layout
from kubetrain.core.architecture import hf_folder_key
from kubetrain.core.contract import S3Endpoint
from kubetrain.core.hf_config import from_hf_config
from kubetrain.core.records import ProgressRecord, read_manifest
from kubetrain.core.store import FileStore, ObjectStore, open_store
from kubetrain.local.display import PlainDisplay, stage_line
from kubetrain_trainer import checkpoint as ckpt
from kubetrain_trainer.hf.model import build_model
from kubetrain_trainer.hf.source import locate

torch.set_num_threads(1)

CONFIG = from_hf_config(
    {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
    }
)


def _export(store: ObjectStore) -> str:
    torch.manual_seed(0)
    model = build_model(CONFIG)
    return ckpt.export_hf(
        store, layout.HF_EXPORT, CONFIG, model.state_dict(), source=None, step=3, stage="sft"
    )


def test_an_export_is_a_manifested_model_folder_the_next_stage_finds(tmp_path: Path) -> None:
    stage = open_store((tmp_path / "sft").as_uri())
    assert hf_folder_key(stage) is None  # nothing exported yet: a built-in checkpoint
    uri = _export(stage)
    assert uri == stage.uri(layout.HF_EXPORT)
    manifest = read_manifest(stage, f"{layout.HF_EXPORT}/{layout.MANIFEST}")
    assert manifest is not None and manifest.step == 3
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(manifest.files)
    assert hf_folder_key(stage) == layout.HF_EXPORT
    # A later stage: architecture and tokenizer from hf/, weights from the checkpoint.
    found = locate(stage.uri(), S3Endpoint())
    assert found is not None and found.uri == uri and found.checkpoint_uri == stage.uri()
    # model.from naming the folder itself: everything from it.
    direct = locate(uri, S3Endpoint())
    assert direct is not None and direct.uri == uri and direct.checkpoint_uri is None


def test_an_interrupted_export_is_not_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = open_store((tmp_path / "sft").as_uri())
    real = FileStore.put_file
    calls: list[str] = []

    def failing(self: FileStore, key: str, path: Any) -> None:
        calls.append(key)
        if len(calls) == 2:
            raise OSError("connection reset")
        real(self, key, path)

    monkeypatch.setattr(FileStore, "put_file", failing)
    with pytest.raises(OSError, match="connection reset"):
        _export(stage)
    assert calls and not stage.exists(f"{layout.HF_EXPORT}/{layout.MANIFEST}")
    assert hf_folder_key(stage) is None


def test_the_export_is_announced_in_the_summary_and_kubetrain_status(tmp_path: Path) -> None:
    uri = "s3://b/runs/ml/ft/sft/hf"
    out = tmp_path / "out.txt"
    with out.open("w") as fh:
        PlainDisplay(fh).summary(
            "done",
            [
                stage_line("sft", ProgressRecord(phase="completed", step=1, hf_model=uri)),
                stage_line("dpo", ProgressRecord(phase="completed", step=1)),
            ],
        )
    assert f"sft: Hugging Face model {uri}" in out.read_text()
    assert "dpo: Hugging Face model" not in out.read_text()
    run = {
        "metadata": {"name": "ft", "namespace": "ml"},
        "status": {"stages": [{"name": "sft", "hfModel": uri}, {"name": "dpo"}]},
    }
    assert status_model_lines([run]) == [f"ml/ft sft: Hugging Face model {uri}"]

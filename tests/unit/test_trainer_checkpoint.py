"""Checkpoint protocol on file:// (the same code path as s3://)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from kubetrain.core import layout
from kubetrain.core.records import read_manifest, resolve_checkpoint
from kubetrain.core.store import open_store
from kubetrain_trainer.checkpoint import Checkpointer, CheckpointError, load_model_weights


def _payload(step: int) -> dict[str, object]:
    return {"model": {"w": torch.full((4,), float(step))}, "trainer": {"step": step}}


@pytest.fixture
def ckpt(tmp_path: Path) -> Checkpointer:
    return Checkpointer(open_store((tmp_path / "stage").as_uri()), keep=2)


def test_save_writes_files_manifest_and_latest(ckpt: Checkpointer) -> None:
    uri = ckpt.save(100, _payload(100))
    store = ckpt.store
    assert uri == store.uri("checkpoints/step-000100")
    assert store.get_text(layout.LATEST) == "checkpoints/step-000100"
    manifest = read_manifest(store, "checkpoints/step-000100/MANIFEST.json")
    assert manifest is not None and set(manifest.files) == {"model.pt", "trainer.pt"}
    for name, entry in manifest.files.items():
        assert len(store.get_bytes(f"checkpoints/step-000100/{name}")) == entry.size
    loaded = ckpt.load_latest()
    assert loaded is not None and loaded.step == 100
    assert torch.equal(loaded.state["model"]["w"], torch.full((4,), 100.0))


def test_keeps_the_newest_complete_checkpoints(ckpt: Checkpointer) -> None:
    for step in (10, 20, 30, 40):
        ckpt.save(step, _payload(step))
    assert ckpt.steps() == ([40, 30], [])


def test_a_checkpoint_without_manifest_does_not_exist(ckpt: Checkpointer) -> None:
    ckpt.save(10, _payload(10))
    # An upload interrupted before the manifest: newer files, no MANIFEST.json.
    ckpt.store.put_bytes("checkpoints/step-000020/model.pt", b"half a checkpoint")
    complete, incomplete = ckpt.steps()
    assert complete == [10] and incomplete == [20]
    loaded = ckpt.load_latest()
    assert loaded is not None and loaded.step == 10
    # The next save removes the partial leftover older than itself.
    ckpt.save(30, _payload(30))
    assert ckpt.steps() == ([30, 10], [])


def test_corrupt_checkpoint_is_skipped_for_the_previous_one(
    ckpt: Checkpointer, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt.save(10, _payload(10))
    ckpt.save(20, _payload(20))
    path = Path(ckpt.store.base) / "checkpoints/step-000020/model.pt"  # type: ignore[attr-defined]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        loaded = ckpt.load_latest()
    assert loaded is not None and loaded.step == 10
    assert "step-000020" in caplog.text and "does not match" in caplog.text
    ckpt.discard_after(10)
    assert ckpt.steps() == ([10], [])
    assert ckpt.store.get_text(layout.LATEST) == layout.checkpoint_path(10)


def test_no_checkpoint_means_none(ckpt: Checkpointer) -> None:
    assert ckpt.load_latest() is None


def test_init_weights_come_from_final_of_a_stage_or_a_checkpoint_folder(ckpt: Checkpointer) -> None:
    ckpt.save(10, _payload(10))
    ckpt.save(20, _payload(20))
    ckpt.mark_final(10)  # FINAL wins over LATEST
    assert resolve_checkpoint(ckpt.store) == "checkpoints/step-000010"
    weights, source = load_model_weights(ckpt.store.root)
    assert weights["w"][0] == 10 and source.endswith("checkpoints/step-000010")
    weights, _ = load_model_weights(ckpt.store.uri("checkpoints/step-000020"))
    assert weights["w"][0] == 20


def test_init_from_a_folder_without_checkpoint_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model_weights((tmp_path / "empty").as_uri())


def test_resave_at_the_same_step_replaces_the_old_files(ckpt: Checkpointer) -> None:
    ckpt.save(10, {"model": {"w": torch.zeros(2)}, "extra": {"x": 1}})
    ckpt.save(10, _payload(10))
    files = {k.rsplit("/", 1)[1] for k in ckpt.store.list("checkpoints/step-000010/")}
    assert files == {"model.pt", "trainer.pt", "MANIFEST.json"}
    manifest = json.loads(ckpt.store.get_bytes("checkpoints/step-000010/MANIFEST.json"))
    assert manifest["step"] == 10


def test_a_torn_manifest_means_the_checkpoint_does_not_exist(ckpt: Checkpointer) -> None:
    ckpt.save(10, _payload(10))
    ckpt.save(20, _payload(20))
    ckpt.store.put_bytes("checkpoints/step-000020/MANIFEST.json", b'{"files": {"model.pt": {"by')
    loaded = ckpt.load_latest()
    assert loaded is not None and loaded.step == 10


def test_checkpoints_written_before_versioned_records_still_load(ckpt: Checkpointer) -> None:
    ckpt.save(10, _payload(10))
    key = "checkpoints/step-000010/MANIFEST.json"
    legacy = json.loads(ckpt.store.get_text(key))
    assert legacy["format"] == "1.1" and legacy["layout"] == "torch"
    legacy["format"] = 1  # what manifests said before "MAJOR.MINOR"
    del legacy["layout"]  # and before sharded checkpoints
    ckpt.store.put_bytes(key, json.dumps(legacy).encode())
    loaded = ckpt.load_latest()
    assert loaded is not None and loaded.step == 10

"""The records of a stage folder: their wire format, versions, damage, and where they live."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetrain.core.layout import StageLayout, checkpoint_path, checkpoint_step
from kubetrain.core.records import (
    CheckpointManifest,
    FileEntry,
    MetricsLine,
    ProgressRecord,
    RecordFormatError,
    parse_metrics,
    read_manifest,
    read_metrics,
    read_progress,
    resolve_checkpoint,
    write_manifest,
    write_metrics,
    write_pointer,
    write_progress,
)
from kubetrain.core.store import ObjectStore, open_store

# A progress record as the trainer wrote it before records were versioned.
UNVERSIONED_PROGRESS = {
    "attempt": 2,
    "checkpoint": "s3://b/runs/ml/demo/sft/checkpoints/step-000020",
    "energyJoules": 1234.5,
    "energySource": "nvml",
    "eval": {"accuracy": 0.5, "examples": 64.0, "loss": 1.25},
    "learningRate": 0.0003,
    "loss": 1.75,
    "mfu": 0.31,
    "namespace": "ml",
    "phase": "running",
    "powerWatts": 690.0,
    "run": "demo",
    "stage": "sft",
    "stageType": "sft",
    "startedAt": "2026-01-01T00:00:00Z",
    "step": 20,
    "tokens": 81920,
    "tokensPerSecond": 4096.0,
    "totalSteps": 50,
    "train": {},
    "updatedAt": "2026-01-01T00:05:00Z",
    "wallSeconds": 300.0,
}
SHA = "0" * 64
MANIFEST = CheckpointManifest(
    files={"model.pt": FileEntry(size=10, sha256=SHA), "trainer.pt": FileEntry(size=2, sha256=SHA)},
    step=20,
    run="demo",
    stage="sft",
    created_at="2026-01-01T00:05:00Z",
)


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return open_store(tmp_path.as_uri())


# --------------------------------------------------------------------------- round trips


def test_progress_round_trip(store: ObjectStore) -> None:
    record = ProgressRecord.model_validate(UNVERSIONED_PROGRESS)
    write_progress(store, "progress.json", record)
    assert read_progress(store, "progress.json") == record.updated(format=ProgressRecord.FORMAT)
    assert read_progress(store, "absent.json") is None


def test_metrics_round_trip(store: ObjectStore) -> None:
    lines = [MetricsLine(step=s, loss=1.0 / s, eval={"accuracy": s / 10}) for s in (1, 2, 3)]
    write_metrics(store, "metrics.jsonl", lines)
    written = [line.updated(format=MetricsLine.FORMAT) for line in lines]
    assert read_metrics(store, "metrics.jsonl") == written
    assert read_metrics(store, "absent.jsonl") == []


def test_manifest_round_trip(store: ObjectStore) -> None:
    write_manifest(store, "MANIFEST.json", MANIFEST)
    assert read_manifest(store, "MANIFEST.json") == MANIFEST.updated(
        format=CheckpointManifest.FORMAT
    )
    assert MANIFEST.total_bytes == 12


def test_a_sharded_manifest_names_its_layout_and_a_1_0_one_reads_as_torch(
    store: ObjectStore,
) -> None:
    sharded = MANIFEST.updated(
        files={"model/.metadata": FileEntry(size=1, sha256=SHA)}, layout="dcp", world_size=4
    )
    write_manifest(store, "MANIFEST.json", sharded)
    read = read_manifest(store, "MANIFEST.json")
    assert read is not None and (read.layout, read.world_size, read.format) == ("dcp", 4, "1.1")
    old = {k: v for k, v in json.loads(MANIFEST.to_json()).items() if k != "layout"}
    legacy = CheckpointManifest.from_json(json.dumps({**old, "format": "1.0"}), "MANIFEST.json")
    assert legacy is not None and legacy.layout == "torch" and legacy.world_size is None


def test_the_wire_keeps_the_keys_the_trainer_always_wrote() -> None:
    wire = json.loads(ProgressRecord.model_validate(UNVERSIONED_PROGRESS).to_json())
    assert wire == {**UNVERSIONED_PROGRESS, "format": ProgressRecord.FORMAT}
    manifest = json.loads(MANIFEST.to_json())
    assert manifest["files"]["model.pt"] == {"bytes": 10, "sha256": SHA}
    assert {"format", "files", "step", "run", "stage", "createdAt", "layout"} == set(manifest)


def test_a_metrics_line_is_the_progress_record_at_its_step() -> None:
    record = ProgressRecord.model_validate(UNVERSIONED_PROGRESS)
    assert json.loads(MetricsLine.of(record).to_json()) == json.loads(record.to_json())


# --------------------------------------------------------------------------- versions


def test_records_without_a_version_read_as_1_0() -> None:
    record = ProgressRecord.from_json(json.dumps(UNVERSIONED_PROGRESS), "progress.json")
    assert record is not None and record.format == "1.0"
    assert (record.step, record.total_steps, record.energy_joules) == (20, 50, 1234.5)
    assert record.eval == {"accuracy": 0.5, "examples": 64.0, "loss": 1.25}
    (line,) = parse_metrics(json.dumps({"step": 3, "loss": 2.0}), "metrics.jsonl")
    assert (line.format, line.step, line.loss) == ("1.0", 3, 2.0)
    manifest = json.loads(MANIFEST.to_json())
    del manifest["format"]
    unversioned = CheckpointManifest.from_json(json.dumps(manifest), "MANIFEST.json")
    assert unversioned == MANIFEST


def test_the_manifests_legacy_integer_format_is_major_1() -> None:
    legacy = {**json.loads(MANIFEST.to_json()), "format": 1}
    manifest = CheckpointManifest.from_json(json.dumps(legacy), "MANIFEST.json")
    assert manifest is not None and manifest.format == "1.0" and manifest.files == MANIFEST.files
    with pytest.raises(RecordFormatError, match="format 2 cannot be read"):
        CheckpointManifest.from_json(json.dumps({**legacy, "format": 2}), "MANIFEST.json")


def test_a_newer_minor_with_an_extra_field_reads() -> None:
    newer = {**UNVERSIONED_PROGRESS, "format": "1.7", "gradNorm": 0.9, "eval": {"bleu": 0.2}}
    record = ProgressRecord.from_json(json.dumps(newer), "progress.json")
    assert record is not None and record.format == "1.7" and record.eval == {"bleu": 0.2}
    written = json.loads(record.to_json())
    assert "gradNorm" not in written and written["format"] == ProgressRecord.FORMAT
    manifest = {**json.loads(MANIFEST.to_json()), "format": "1.2", "compression": "zstd"}
    manifest["files"]["model.pt"]["crc32c"] = "abcd"
    assert CheckpointManifest.from_json(json.dumps(manifest), "MANIFEST.json") == MANIFEST.updated(
        format="1.2"
    )
    (line,) = parse_metrics(json.dumps({"format": "1.1", "step": 4, "new": 1}), "metrics.jsonl")
    assert line.step == 4


@pytest.mark.parametrize(
    ("model", "data", "name"),
    [
        (ProgressRecord, {**UNVERSIONED_PROGRESS, "format": "2.0"}, "progress.json"),
        (MetricsLine, {"format": "2.0", "step": 1}, "metrics.jsonl"),
        (CheckpointManifest, {**json.loads(MANIFEST.to_json()), "format": "2.0"}, "MANIFEST.json"),
    ],
)
def test_an_unknown_major_is_refused_naming_file_and_versions(
    store: ObjectStore, model: type, data: dict, name: str
) -> None:
    key = StageLayout.of("ml", "demo", "sft").key(name)
    store.put_bytes(key, (json.dumps(data) + "\n").encode())
    reader = {
        ProgressRecord: read_progress,
        MetricsLine: read_metrics,
        CheckpointManifest: read_manifest,
    }[model]
    with pytest.raises(RecordFormatError) as err:
        reader(store, key)
    message = str(err.value)
    assert store.uri(key) in message  # which file
    assert f"{name} format '2.0'" in message  # which version
    assert "reads format 1.x" in message  # which versions this kubetrain reads


def test_a_version_that_is_not_major_minor_is_refused() -> None:
    with pytest.raises(RecordFormatError, match="'one' cannot be read"):
        ProgressRecord.from_json('{"format": "one", "step": 1}', "progress.json")


# --------------------------------------------------------------------------- damage


def test_torn_records_read_as_absent(store: ObjectStore) -> None:
    whole = ProgressRecord.model_validate(UNVERSIONED_PROGRESS).to_json()
    store.put_bytes("progress.json", whole[: len(whole) // 2].encode())
    assert read_progress(store, "progress.json") is None
    store.put_bytes("MANIFEST.json", MANIFEST.to_json()[:40].encode())
    assert read_manifest(store, "MANIFEST.json") is None
    store.put_bytes("metrics.jsonl", b'{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [m.step for m in read_metrics(store, "metrics.jsonl")] == [1, 2]


def test_numbers_that_are_not_finite_mean_not_measured() -> None:
    text = '{"step": 3, "loss": NaN, "tokensPerSecond": Infinity, "eval": {"loss": NaN, "a": 1}}'
    record = ProgressRecord.from_json(text, "progress.json")
    assert record is not None
    assert (record.loss, record.tokens_per_second, record.eval) == (None, None, {"a": 1.0})
    assert "NaN" not in record.to_json()


def test_a_record_that_does_not_fit_its_model_reads_as_absent() -> None:
    assert ProgressRecord.from_json('{"step": -1}', "progress.json") is None
    assert ProgressRecord.from_json("[1, 2]", "progress.json") is None
    assert CheckpointManifest.from_json('{"format": "1.0"}', "MANIFEST.json") is None


def test_updated_refuses_a_field_it_does_not_have() -> None:
    with pytest.raises(TypeError, match="no field totalSteps"):
        ProgressRecord().updated(totalSteps=3)


# --------------------------------------------------------------------------- layout


def test_stage_layout_keys() -> None:
    folder = StageLayout.of("ml", "demo", "sft")
    assert folder.folder == "ml/demo/sft"
    assert (folder.progress, folder.metrics) == (
        "ml/demo/sft/progress.json",
        "ml/demo/sft/metrics.jsonl",
    )
    assert (folder.latest, folder.final) == ("ml/demo/sft/LATEST", "ml/demo/sft/FINAL")
    assert folder.checkpoint(100) == "ml/demo/sft/checkpoints/step-000100"
    assert folder.manifest(100) == "ml/demo/sft/checkpoints/step-000100/MANIFEST.json"
    assert folder.uri("s3://b/runs/") == "s3://b/runs/ml/demo/sft"
    # The trainer's store is rooted at the stage folder.
    assert (StageLayout().progress, StageLayout().checkpoints) == ("progress.json", "checkpoints/")
    assert checkpoint_path(7) == "checkpoints/step-000007"
    assert (checkpoint_step("step-000007"), checkpoint_step("step-x")) == (7, None)


def test_resolve_checkpoint_follows_final_then_latest(store: ObjectStore) -> None:
    assert resolve_checkpoint(store) is None
    write_pointer(store, "LATEST", 20)
    assert resolve_checkpoint(store) == "checkpoints/step-000020"
    write_pointer(store, "FINAL", 10)
    assert resolve_checkpoint(store) == "checkpoints/step-000010"
    write_manifest(store, "checkpoints/step-000010/MANIFEST.json", MANIFEST)
    assert resolve_checkpoint(store.child("checkpoints/step-000010")) == ""

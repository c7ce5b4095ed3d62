"""What the operator reads besides its informers, and how seldom: a Secret once per
TTL, one S3 client per bucket, endpoint, region and credentials, and progress records
at most once per poll interval, only for a stage with a Job, at once when that Job
completes, with FINAL asked for only then; a Hugging Face model's config.json once per
namespace and model.from, and after a failure only once the retry interval passed."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from kubetrain.core.api import S3Storage
from kubetrain.core.store import FileStore, ObjectStore, StoreError
from kubetrain.operator.caches import (
    ArchitectureReader,
    ProgressReader,
    SecretCache,
    StoreCache,
)
from kubetrain.operator.progress import StoreAnswer
from tests.unit.planworld import manifest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "secret-value"}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingStore(FileStore):
    """A file store that logs every request (kind, key), children included."""

    def __init__(self, root: str, log: list[tuple[str, str]]):
        super().__init__(root)
        self.log = log

    def get_bytes(self, key: str) -> bytes:
        self.log.append(("get", key))
        return super().get_bytes(key)

    def exists(self, key: str) -> bool:
        self.log.append(("head", key))
        return super().exists(key)

    def child(self, sub: str) -> ObjectStore:
        return CountingStore(f"{self.root.rstrip('/')}/{sub.strip('/')}", self.log)


def test_a_secret_is_read_again_only_after_its_ttl() -> None:
    reads: list[tuple[str, str]] = []
    clock = Clock()

    def read(namespace: str, name: str) -> dict[str, str]:
        reads.append((namespace, name))
        return dict(CREDENTIALS)

    cache = SecretCache(read, ttl=60, clock=clock)
    assert cache.get("ml", "s3") == CREDENTIALS
    clock.now += 59
    cache.get("ml", "s3")
    assert reads == [("ml", "s3")]
    clock.now += 1
    cache.get("ml", "s3")
    cache.get("other", "s3")
    assert reads == [("ml", "s3"), ("ml", "s3"), ("other", "s3")]
    clock.now += 61
    cache.get("third", "s3")
    assert "entries=1," in repr(cache)  # the expired ones are gone
    assert "secret-value" not in repr(cache) and "AKIA" not in repr(cache)


def test_one_client_per_bucket_endpoint_region_and_credentials(tmp_path: Path) -> None:
    made: list[tuple[str, dict[str, str] | None]] = []
    log: list[tuple[str, str]] = []

    def factory(s3: S3Storage, credentials: dict[str, str] | None) -> ObjectStore:
        made.append((s3.uri(), credentials))
        return CountingStore(str(tmp_path / s3.bucket), log)

    cache = StoreCache(factory)
    a = S3Storage(bucket="ckpt", prefix="team-a", endpoint="http://minio:9000")
    b = a.model_copy(update={"prefix": "team-b"})
    assert cache.get(a, CREDENTIALS).root.endswith("ckpt/team-a")
    assert cache.get(b, CREDENTIALS).root.endswith("ckpt/team-b")
    assert cache.get(a, dict(CREDENTIALS)) is not None  # equal values: the same client
    assert len(made) == 1 and made[0][0] == "s3://ckpt"
    rotated = {**CREDENTIALS, "AWS_SECRET_ACCESS_KEY": "rotated"}
    cache.get(a, rotated)
    cache.get(a.model_copy(update={"region": "eu-west-1"}), CREDENTIALS)
    cache.get(a, None)
    assert len(made) == 4 and len(cache) == 4


@pytest.fixture
def store_log(tmp_path: Path) -> list[tuple[str, str]]:
    return []


@pytest.fixture
def reader(tmp_path: Path, store_log: list[tuple[str, str]]) -> tuple[ProgressReader, Clock]:
    clock = Clock()
    secrets = SecretCache(lambda ns, name: dict(CREDENTIALS), ttl=60, clock=clock)
    stores = StoreCache(lambda s3, creds: CountingStore(str(tmp_path), store_log))
    return ProgressReader(secrets, stores, interval=15, clock=clock), clock


def job(stage: str, uid: str, *, complete: bool = False, owner: str = "run-uid") -> dict[str, Any]:
    status: dict[str, Any] = {"active": 0 if complete else 1}
    if complete:
        status["conditions"] = [{"type": "Complete", "status": "True"}]
    return {
        "metadata": {
            "name": f"demo-{stage}",
            "namespace": "ml",
            "uid": uid,
            "labels": {"kubetrain.dev/stage": stage},
            "ownerReferences": [{"kind": "TrainingRun", "uid": owner, "controller": True}],
        },
        "status": status,
    }


def test_records_are_read_once_per_poll_interval_and_final_only_when_complete(
    reader: tuple[ProgressReader, Clock], store_log: list[tuple[str, str]], tmp_path: Path
) -> None:
    progress, clock = reader
    run = manifest()
    folder = tmp_path / "runs" / "ml" / "demo" / "pretrain"
    folder.mkdir(parents=True)
    (folder / "progress.json").write_text('{"step": 10}')
    running = [job("pretrain", "j1")]

    records = progress.read(run, running)
    record = records["pretrain"].progress
    assert record is not None and record.step == 10 and not records["pretrain"].final
    assert store_log == [("get", "ml/demo/pretrain/progress.json")]  # one request, no FINAL
    for _ in range(5):  # pod and Job events in between: no new read
        clock.now += 2
        progress.read(run, running)
    assert len(store_log) == 1
    clock.now += 3  # 13 s: past 0.8 of the interval, a (jittered) poll reads
    progress.read(run, running)
    assert len(store_log) == 2

    # The Job completes: read at once, FINAL included.
    (folder / "FINAL").write_text("checkpoints/step-000100")
    clock.now += 1
    records = progress.read(run, [job("pretrain", "j1", complete=True)])
    assert records["pretrain"].final
    assert store_log[2:] == [
        ("get", "ml/demo/pretrain/progress.json"),
        ("head", "ml/demo/pretrain/FINAL"),
    ]


def test_no_reads_without_a_job_but_one_after_it_went_away(
    reader: tuple[ProgressReader, Clock], store_log: list[tuple[str, str]]
) -> None:
    progress, clock = reader
    run = manifest()
    assert progress.read(run, []) == {}  # Pending, no Job yet
    assert store_log == []
    progress.read(run, [job("pretrain", "j1")])
    assert len(store_log) == 1
    clock.now += 1
    progress.read(run, [])  # the Job is gone (suspended): the record its pods left
    assert len(store_log) == 2
    for _ in range(3):  # and then nothing while the run is suspended
        clock.now += 60
        progress.read(run, [])
    assert len(store_log) == 2


def test_a_run_without_a_store_or_finished_reads_nothing(
    reader: tuple[ProgressReader, Clock], store_log: list[tuple[str, str]]
) -> None:
    progress, _ = reader
    run = manifest(storage={})
    assert progress.read(run, [job("pretrain", "j1")]) == {}
    done = copy.deepcopy(manifest())
    done["status"] = {
        "stages": [
            {"name": "pretrain", "phase": "Succeeded"},
            {"name": "sft", "phase": "Succeeded"},
        ]
    }
    assert progress.read(done, [job("sft", "j2", complete=True)]) == {}
    assert store_log == []


def test_a_job_that_is_not_the_runs_is_no_reason_to_read(
    reader: tuple[ProgressReader, Clock], store_log: list[tuple[str, str]]
) -> None:
    progress, _ = reader
    theirs = job("pretrain", "j9", complete=True, owner="another-run")
    assert progress.read(manifest(), [theirs]) == {}
    assert store_log == []


class Unreachable(FileStore):
    def get_bytes(self, key: str) -> bytes:
        raise StoreError("cannot reach the S3 endpoint http://s3:9000 (check the network)")

    def exists(self, key: str) -> bool:
        raise StoreError("cannot reach the S3 endpoint http://s3:9000 (check the network)")

    def child(self, sub: str) -> ObjectStore:
        return self


def test_a_store_or_secret_that_cannot_be_read_gives_unknown_never_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The plan must not take an outage for "no FINAL": the answer is UNKNOWN, with
    the reason, and reading never raises."""
    clock = Clock()
    secrets = SecretCache(lambda ns, name: dict(CREDENTIALS), ttl=60, clock=clock)
    down = ProgressReader(
        secrets, StoreCache(lambda s3, c: Unreachable(str(tmp_path))), interval=15, clock=clock
    )
    records = down.read(manifest(), [job("pretrain", "j1", complete=True)])
    assert records["pretrain"].final == StoreAnswer.UNKNOWN
    assert "cannot reach the S3 endpoint" in (records["pretrain"].error or "")

    def forbidden(namespace: str, name: str) -> dict[str, str]:
        raise ApiException(status=403, reason="Forbidden")

    no_secret = ProgressReader(
        SecretCache(forbidden, ttl=60, clock=clock),
        StoreCache(lambda s3, c: FileStore(str(tmp_path))),
        interval=15,
        clock=clock,
    )
    records = no_secret.read(manifest(), [job("pretrain", "j1")])
    assert records["pretrain"].final == StoreAnswer.UNKNOWN
    assert records["pretrain"].error == "cannot read Secret s3-creds (HTTP 403 Forbidden)"
    assert "s3-creds" in caplog.text


QWEN = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
}


class Models:
    """An ArchitectureReader over a folder per bucket under ``root``, logging Secret
    reads and store requests; ``secret_error`` makes the Secret unreadable."""

    def __init__(self, root: Path):
        self.root = root
        self.clock = Clock()
        self.secret_reads: list[tuple[str, str]] = []
        self.requests: list[tuple[str, str]] = []
        self.secret_error: Exception | None = None
        secrets = SecretCache(self._secret, ttl=60, clock=self.clock)
        stores = StoreCache(lambda s3, creds: CountingStore(str(root / s3.bucket), self.requests))
        self.reader = ArchitectureReader(secrets, stores, retry_after=15, clock=self.clock)

    def _secret(self, namespace: str, name: str) -> dict[str, str]:
        self.secret_reads.append((namespace, name))
        if self.secret_error is not None:
            raise self.secret_error
        return dict(CREDENTIALS)

    def put(self, key: str, text: str) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def run(self, model_from: str, namespace: str = "ml", name: str = "demo") -> dict[str, Any]:
        run = manifest(model={"from": model_from})
        run["metadata"].update(namespace=namespace, name=name)
        return run


def test_a_models_config_is_read_once_per_namespace_with_the_runs_secret(
    tmp_path: Path,
) -> None:
    m = Models(tmp_path)
    m.put("models/qwen/config.json", json.dumps(QWEN))
    cfg = m.reader.read(m.run("s3://models/qwen"), [])
    assert cfg is not None and (cfg.model_type, cfg.num_layers) == ("qwen2", 24)
    assert m.secret_reads == [("ml", "s3-creds")]
    requests = len(m.requests)
    assert requests > 0
    m.put("models/qwen/config.json", json.dumps({**QWEN, "num_hidden_layers": 48}))
    for name in ("demo", "other"):  # again, and another run of the namespace
        assert m.reader.read(m.run("s3://models/qwen", name=name), []) == cfg
    assert len(m.requests) == requests
    elsewhere = m.reader.read(m.run("s3://models/qwen", namespace="team-b"), [])
    assert elsewhere is not None and elsewhere.num_layers == 48
    assert m.secret_reads[-1] == ("team-b", "s3-creds")


def test_a_kubetrain_checkpoint_or_a_file_path_is_no_hugging_face_model(tmp_path: Path) -> None:
    m = Models(tmp_path)
    m.put("models/base/FINAL", "checkpoints/step-000100")
    assert m.reader.read(m.run("s3://models/base"), []) is None
    requests = len(m.requests)
    assert m.reader.read(m.run("s3://models/base"), []) is None
    assert len(m.requests) == requests  # known: not asked again
    # A file:// path is on the trainers' volumes: the operator does not look.
    assert m.reader.read(m.run("file:///models/qwen"), []) is None
    assert m.reader.read(manifest(), []) is None  # no model.from
    assert len(m.requests) == requests


def test_a_failed_read_is_tried_again_only_after_the_retry_interval(tmp_path: Path) -> None:
    m = Models(tmp_path)
    run = m.run("s3://models/qwen")
    m.put("models/qwen/config.json", "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        m.reader.read(run, [])
    requests = len(m.requests)
    m.put("models/qwen/config.json", json.dumps(QWEN))
    m.clock.now += 14
    assert m.reader.read(run, []) is None  # waits for its retry
    assert len(m.requests) == requests
    m.clock.now += 1
    cfg = m.reader.read(run, [])
    assert cfg is not None and cfg.num_layers == 24

    m.secret_error = PermissionError("secrets is forbidden")
    other = m.run("s3://models/qwen", namespace="team-b")
    with pytest.raises(PermissionError):
        m.reader.read(other, [])
    m.secret_error = None
    assert m.reader.read(other, []) is None
    m.clock.now += 15
    assert m.reader.read(other, []) == cfg

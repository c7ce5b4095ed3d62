"""The trainer as the operator runs it: ``python -m kubetrain_trainer`` subprocesses with
the environment from ``kubetrain.core.contract.stage_environment``, against a real S3
endpoint (moto's server), tiny models on CPU."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetrain.core import contract, layout
from kubetrain.core.api import TrainingRunSpec
from kubetrain.core.layout import StageLayout
from kubetrain.core.records import MetricsLine, ProgressRecord, read_metrics, read_progress
from kubetrain.core.store import ObjectStore, open_store
from tests.support.services import S3Server
from tests.support.stage_env import resolved_stage_environment
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

RUN, NAMESPACE, SECRET = "tiny", "default", "s3-creds"
FOLDER = StageLayout()  # the trainer's store is rooted at its stage folder
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    # This process reads what the trainers wrote, from the same endpoint.
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)


def spec_for(
    bucket: str, endpoint: str, stages: list[dict[str, Any]], model: dict[str, Any] | None = None
) -> TrainingRunSpec:
    return TrainingRunSpec.model_validate(
        {
            "model": model or {"layers": 1, "heads": 2, "dim": 32, "contextLength": 32},
            "storage": {
                "s3": {
                    "bucket": bucket,
                    "prefix": "runs",
                    "endpoint": endpoint,
                    "credentialsSecret": SECRET,
                }
            },
            "stages": stages,
        }
    )


def stage_env(spec: TrainingRunSpec, index: int, s3: S3Server, **extra: str) -> dict[str, str]:
    """The container environment, resolved the way the kubelet would: secret refs to
    the test server's credentials, the completion index to "0"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBETRAIN_"))}
    env.update(
        resolved_stage_environment(spec, index, s3, run=RUN, namespace=NAMESPACE, secret=SECRET)
    )
    # One thread per process: the tests share a small machine with other work. The
    # trainer and kubetrain are this checkout's, not whichever copy is installed.
    code = os.pathsep.join(str(REPO / d) for d in ("operator", "trainer_image", "."))
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": code}, **extra)
    return env


@dataclass
class Stage:
    proc: subprocess.Popen[str]
    store: ObjectStore

    def wait(self, timeout: float = 240) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail(f"trainer did not finish in {timeout}s:\n{err[-3000:]}")
        return self.proc.returncode, err


def start(spec: TrainingRunSpec, index: int, s3: S3Server, **extra: str) -> Stage:
    env = stage_env(spec, index, s3, **extra)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetrain_trainer"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    store = open_store(env[contract.ENV_CHECKPOINT_URI], endpoint=s3.endpoint, region=s3.region)
    return Stage(proc, store)


def run_stage(spec: TrainingRunSpec, index: int, s3: S3Server) -> ObjectStore:
    st = start(spec, index, s3)
    rc, err = st.wait()
    assert rc == 0, err[-3000:]
    return st.store


def final_weights(store: ObjectStore) -> dict[str, torch.Tensor]:
    key = store.get_text(layout.FINAL)
    assert key, "no FINAL pointer"
    return torch.load(io.BytesIO(store.get_bytes(f"{key.strip()}/model.pt")), weights_only=True)


def progress_of(store: ObjectStore) -> ProgressRecord:
    record = read_progress(store, FOLDER.progress)
    assert record is not None, f"no progress record in {store.uri()}"
    return record


def history(store: ObjectStore) -> list[MetricsLine]:
    return read_metrics(store, FOLDER.metrics)


def stage_store(s3_server: S3Server, bucket: str, stage: str) -> ObjectStore:
    return open_store(
        StageLayout.of(NAMESPACE, RUN, stage).uri(f"s3://{bucket}/runs"),
        endpoint=s3_server.endpoint,
    )


# --------------------------------------------------------------------------- curriculum


def test_curriculum_pretrain_sft_dpo_on_s3(s3_server: S3Server) -> None:
    bucket = s3_server.create_bucket("curriculum")
    hp = {"batchSize": 16, "logEvery": 20}
    spec = spec_for(
        bucket,
        s3_server.endpoint,
        [
            {
                "name": "pretrain",
                "type": "pretrain",
                "checkpointEvery": 40,
                "data": {"evalExamples": 100},
                "hyperparameters": {**hp, "maxSteps": 80, "learningRate": 3e-3, "warmupSteps": 10},
            },
            {
                "name": "sft",
                "type": "sft",
                "checkpointEvery": 100,
                "data": {"evalExamples": 100},
                "hyperparameters": {**hp, "batchSize": 32, "maxSteps": 400, "learningRate": 3e-3},
            },
            {
                "name": "dpo",
                "type": "dpo",
                "checkpointEvery": 20,
                "data": {"evalExamples": 100},
                "hyperparameters": {**hp, "maxSteps": 20, "learningRate": 1e-4, "beta": 0.1},
            },
        ],
        model={"layers": 2, "heads": 2, "dim": 48, "contextLength": 48},
    )
    results = {}
    for i, stage in enumerate(spec.stages):
        store = run_stage(spec, i, s3_server)
        progress = progress_of(store)
        assert progress.phase == "completed" and progress.step == progress.total_steps
        assert store.get_text(layout.FINAL) == store.get_text(layout.LATEST)
        assert progress.checkpoint == store.uri(store.get_text(layout.FINAL).strip())
        assert progress.energy_source in ("rapl", "estimate")
        assert progress.energy_joules > 0 and progress.tokens_per_second > 0
        assert 0 < progress.mfu < 1
        records = history(store)
        assert [r.step for r in records] == sorted({r.step for r in records})
        if i > 0:
            prev = spec.stages[i - 1].name
            assert f"/{prev}/checkpoints/" in progress.init_from
        results[stage.name] = progress.eval
    pre, sft, dpo = results["pretrain"], results["sft"], results["dpo"]
    # Pretraining never shows the question/answer format; SFT teaches it.
    assert sft["accuracy"] > pre["accuracy"], results
    assert sft["loss"] < pre["loss"] / 2, results
    assert dpo["preferenceAccuracy"] >= sft["preferenceAccuracy"] - 0.05, results
    # The progress record carries DPO's own diagnostics.
    dpo_progress = progress_of(stage_store(s3_server, bucket, "dpo"))
    assert set(dpo_progress.train) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
    }


# --------------------------------------------------------------------------- resume

RESUME_STAGE = {
    "name": "pre",
    "type": "pretrain",
    "checkpointEvery": 10,
    "keepCheckpoints": 3,
    "hyperparameters": {
        "maxSteps": 300,
        "batchSize": 8,
        "logEvery": 10,
        "learningRate": 3e-3,
        "warmupSteps": 5,
    },
}


@pytest.fixture(scope="module")
def uninterrupted(s3_server: S3Server) -> tuple[dict[str, torch.Tensor], ProgressRecord]:
    """The reference: the resume stage trained in one go."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        bucket = s3_server.create_bucket("uninterrupted")
        store = run_stage(spec_for(bucket, s3_server.endpoint, [RESUME_STAGE]), 0, s3_server)
        return final_weights(store), progress_of(store)


def _assert_same_result(
    store: ObjectStore, reference: tuple[dict[str, torch.Tensor], ProgressRecord]
) -> None:
    weights, progress = reference
    mine = final_weights(store)
    assert mine.keys() == weights.keys()
    for name in weights:
        assert torch.equal(mine[name], weights[name]), f"{name} differs after resume"
    got = progress_of(store)
    assert got.loss == progress.loss and got.tokens == progress.tokens
    assert got.phase == "completed" and got.attempt == 2


def test_sigterm_checkpoints_exits_with_the_checkpoint_code_and_resume_is_exact(
    s3_server: S3Server, uninterrupted: tuple[dict[str, torch.Tensor], ProgressRecord]
) -> None:
    bucket = s3_server.create_bucket("sigterm")
    spec = spec_for(bucket, s3_server.endpoint, [RESUME_STAGE])
    st = start(spec, 0, s3_server)
    wait_for(
        lambda: st.store.exists(layout.LATEST) or st.proc.poll() is not None,
        timeout=120,
        what="a first checkpoint",
    )
    assert st.proc.poll() is None, "the stage ended before it could be interrupted"
    signalled = time.monotonic()
    st.proc.send_signal(signal.SIGTERM)
    rc, err = st.wait(timeout=30)
    elapsed = time.monotonic() - signalled
    assert rc == contract.EXIT_CHECKPOINTED_ON_SIGTERM, err[-3000:]
    assert elapsed < 10, f"took {elapsed:.1f}s to stop after SIGTERM"
    progress = progress_of(st.store)
    assert progress.phase == "interrupted" and 0 < progress.step < 300
    latest = st.store.get_text(layout.LATEST)
    assert latest == f"checkpoints/step-{progress.step:06d}"
    assert progress.checkpoint == st.store.uri(latest)
    assert not st.store.exists(layout.FINAL)
    energy_before = progress.energy_joules

    rc, err = start(spec, 0, s3_server).wait()
    assert rc == 0, err[-3000:]
    assert f"resumed from {st.store.uri(latest)}" in err
    _assert_same_result(st.store, uninterrupted)
    final = progress_of(st.store)
    assert final.energy_joules > energy_before
    # metrics.jsonl: one record per step, no duplicates from the replayed steps.
    steps = [r.step for r in history(st.store)]
    assert steps == sorted(set(steps)) and steps[-1] == 300


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has installed a SIGTERM handler (SigCgt in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_sigterm_while_starting_still_ends_in_a_checkpoint(s3_server: S3Server) -> None:
    """Preemption can come while torch is still being imported: the stage must still stop
    with a checkpoint and the checkpoint exit code, not die from the default handler."""
    bucket = s3_server.create_bucket("early-sigterm")
    spec = spec_for(bucket, s3_server.endpoint, [RESUME_STAGE])
    st = start(spec, 0, s3_server)

    def catching_before_torch() -> bool:
        assert st.proc.poll() is None, "the trainer exited before it was signalled"
        loaded = "libtorch" in Path(f"/proc/{st.proc.pid}/maps").read_text()
        assert not loaded, "torch was loaded before a SIGTERM handler was installed"
        return _catches_sigterm(st.proc.pid)

    wait_for(
        catching_before_torch, timeout=30, what="a SIGTERM handler installed before torch is loaded"
    )
    st.proc.send_signal(signal.SIGTERM)
    rc, err = st.wait(timeout=120)
    assert rc == contract.EXIT_CHECKPOINTED_ON_SIGTERM, err[-3000:]
    progress = progress_of(st.store)
    assert progress.phase == "interrupted", progress
    assert st.store.get_text(layout.LATEST) == f"checkpoints/step-{progress.step:06d}"
    assert progress.step < 300


def test_corrupt_newest_checkpoint_is_skipped_and_partial_never_loaded(
    s3_server: S3Server, uninterrupted: tuple[dict[str, torch.Tensor], ProgressRecord]
) -> None:
    bucket = s3_server.create_bucket("corrupt")
    spec = spec_for(bucket, s3_server.endpoint, [RESUME_STAGE])
    st = start(spec, 0, s3_server)

    def two_checkpoints() -> bool:
        assert st.proc.poll() is None, "the stage ended before it could be killed"
        return len([k for k in st.store.list("checkpoints/") if k.endswith("MANIFEST.json")]) >= 2

    wait_for(two_checkpoints, timeout=120, what="two complete checkpoints")
    st.proc.kill()  # SIGKILL: no chance to save anything more
    st.proc.communicate()
    complete = sorted(
        k.split("/")[1] for k in st.store.list("checkpoints/") if k.endswith("MANIFEST.json")
    )
    newest, previous = complete[-1], complete[-2]
    key = f"checkpoints/{newest}/model.pt"
    data = bytearray(st.store.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    st.store.put_bytes(key, bytes(data))
    # A newer save that died before its manifest: files, but never to be loaded.
    st.store.put_bytes("checkpoints/step-000290/model.pt", b"not a checkpoint")

    rc, err = start(spec, 0, s3_server).wait()
    assert rc == 0, err[-3000:]
    assert f"skipping checkpoint {st.store.uri('checkpoints/' + newest)}" in err
    assert f"resumed from {st.store.uri('checkpoints/' + previous)}" in err
    assert "step-000290" not in err
    _assert_same_result(st.store, uninterrupted)


# --------------------------------------------------------------------------- errors, DDP


def test_missing_init_checkpoint_fails_with_one_line(s3_server: S3Server) -> None:
    bucket = s3_server.create_bucket("noinit")
    spec = spec_for(
        bucket,
        s3_server.endpoint,
        [
            {"name": "a", "type": "pretrain", "hyperparameters": {"maxSteps": 2}},
            {"name": "b", "type": "sft", "hyperparameters": {"maxSteps": 2}},
        ],
    )
    rc, err = start(spec, 1, s3_server).wait()  # stage a never ran
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("kubetrain-trainer: error: ") and "/a" in last
    assert "no complete checkpoint" in last
    progress = progress_of(stage_store(s3_server, bucket, "b"))
    assert progress.phase == "failed" and "no complete checkpoint" in progress.message


def test_two_process_torchrun_gloo(s3_server: S3Server) -> None:
    bucket = s3_server.create_bucket("ddp")
    stage = {
        "name": "ddp",
        "type": "pretrain",
        "checkpointEvery": 3,
        "resources": {"processesPerNode": 2},
        "hyperparameters": {"maxSteps": 6, "batchSize": 4, "logEvery": 2},
    }
    spec = spec_for(bucket, s3_server.endpoint, [stage])
    from tests.support.services import free_port

    st = start(spec, 0, s3_server, PET_MASTER_PORT=str(free_port()))
    rc, err = st.wait()
    assert rc == 0, err[-3000:]
    assert "world 2" in err
    progress = progress_of(st.store)
    assert progress.phase == "completed" and progress.step == 6
    # Both ranks' batches count: 6 steps × 2 processes × 4 sequences × 32 tokens.
    assert progress.tokens == 6 * 2 * 4 * 32
    assert st.store.get_text(layout.FINAL) == "checkpoints/step-000006"


def test_sigterm_under_torchrun_gives_the_checkpoint_code_and_a_complete_checkpoint(
    s3_server: S3Server,
) -> None:
    """Two processes under torchrun: SIGTERM goes to the pod's main process (as the
    kubelet sends it); torchrun alone would exit 1 or 143, the pod must exit with the
    checkpoint code once both workers stopped after a complete checkpoint."""
    from tests.support.services import free_port

    bucket = s3_server.create_bucket("ddp-sigterm")
    stage = {
        "name": "ddp",
        "type": "pretrain",
        "checkpointEvery": 5,
        "resources": {"processesPerNode": 2},
        "hyperparameters": {"maxSteps": 2000, "batchSize": 4, "logEvery": 5},
    }
    spec = spec_for(bucket, s3_server.endpoint, [stage])
    st = start(spec, 0, s3_server, PET_MASTER_PORT=str(free_port()))
    wait_for(
        lambda: st.store.exists(layout.LATEST) or st.proc.poll() is not None,
        timeout=180,
        what="a first checkpoint under torchrun",
    )
    assert st.proc.poll() is None, "the stage ended before it could be interrupted"
    st.proc.send_signal(signal.SIGTERM)
    rc, err = st.wait(timeout=120)
    assert rc == contract.EXIT_CHECKPOINTED_ON_SIGTERM, err[-3000:]
    assert "world 2" in err
    progress = progress_of(st.store)
    assert progress.phase == "interrupted" and 0 < progress.step < 2000, progress
    latest = st.store.get_text(layout.LATEST)
    assert latest == f"checkpoints/step-{progress.step:06d}"
    assert st.store.exists(f"{latest}/{layout.MANIFEST}")
    assert not st.store.exists(layout.FINAL)


# --------------------------------------------------------------------------- hf model


def _upload_folder(store: ObjectStore, folder: Path) -> None:
    for path in folder.iterdir():
        store.put_file(path.name, path)


def test_a_hugging_face_model_from_s3_trains_alike_in_one_and_two_processes(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """model.from on S3, chat data on S3: two processes with batch 4 see the same
    examples per step as one process with 2 micro-batches of 4, and the loss (a mean
    over the step's target tokens) and the weights come out the same."""
    from tests.support.hfmodels import tiny_llama
    from tests.support.services import free_port

    bucket = s3_server.create_bucket("hf-ddp")
    root = open_store(f"s3://{bucket}", endpoint=s3_server.endpoint)
    tiny_llama(tmp_path / "tiny", seed=0)
    _upload_folder(root.child("models/tiny"), tmp_path / "tiny")
    rows = [
        {"prompt": f"Q: {a}+{b}", "completion": str(a + b)} for a in range(10) for b in range(7)
    ]
    root.put_bytes("data/sft.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    hp = {"maxSteps": 4, "seqLen": 64, "logEvery": 1, "learningRate": 1e-3}
    data = {"source": f"s3://{bucket}/data/sft.jsonl", "evalExamples": 7}
    runs = {
        "two": {"resources": {"processesPerNode": 2}, "hyperparameters": {**hp, "batchSize": 1}},
        "one": {"hyperparameters": {**hp, "batchSize": 1, "gradientAccumulation": 2}},
    }
    results = {}
    for name, stage in runs.items():
        spec = spec_for(
            bucket,
            s3_server.endpoint,
            [{"name": name, "type": "sft", "data": data, "checkpointEvery": 4, **stage}],
            model={"from": f"s3://{bucket}/models/tiny"},
        )
        st = start(spec, 0, s3_server, PET_MASTER_PORT=str(free_port()))
        rc, err = st.wait()
        assert rc == 0, err[-3000:]
        record = progress_of(st.store)
        assert record.phase == "completed" and record.hf_model == st.store.uri(layout.HF_EXPORT)
        assert st.store.exists(f"{layout.HF_EXPORT}/{layout.MANIFEST}")
        assert st.store.exists(f"{layout.HF_EXPORT}/model.safetensors")
        assert record.init_from == f"s3://{bucket}/models/tiny"
        results[name] = (history(st.store), final_weights(st.store))
    (two, two_weights), (one, one_weights) = results["two"], results["one"]
    assert [r.step for r in two] == [r.step for r in one]
    for a, b in zip(two, one, strict=True):
        assert a.tokens == b.tokens and (a.loss is None) == (b.loss is None)
        if a.loss is not None:
            assert a.loss == pytest.approx(b.loss, rel=1e-4)
    for key, value in one_weights.items():
        assert torch.allclose(two_weights[key], value, rtol=1e-4, atol=1e-6), key


def test_two_process_grpo_samples_its_own_prompts_on_each_rank(s3_server: S3Server) -> None:
    bucket = s3_server.create_bucket("ddp-grpo")
    sft = {"name": "sft", "type": "sft", "hyperparameters": {"maxSteps": 2, "batchSize": 4}}
    grpo = {
        "name": "grpo",
        "type": "grpo",
        "checkpointEvery": 2,
        "resources": {"processesPerNode": 2},
        "data": {"evalExamples": 8},
        "hyperparameters": {"maxSteps": 4, "batchSize": 2, "logEvery": 1},
        "grpo": {"generations": 4, "maxCompletionTokens": 3, "iterations": 2},
    }
    spec = spec_for(bucket, s3_server.endpoint, [sft, grpo])
    run_stage(spec, 0, s3_server)
    from tests.support.services import free_port

    st = start(spec, 1, s3_server, PET_MASTER_PORT=str(free_port()))
    rc, err = st.wait()
    assert rc == 0, err[-3000:]
    assert "world 2" in err
    progress = progress_of(st.store)
    assert progress.phase == "completed" and progress.step == 4
    assert {"reward", "kl", "clip_ratio", "completion_length"} <= set(progress.train)
    assert 1 <= progress.train["completion_length"] <= 3
    saved = torch.load(
        io.BytesIO(st.store.get_bytes("checkpoints/step-000004/trainer.pt")), weights_only=True
    )
    # Two rollouts (at steps 0 and 2, iterations 2), each rank sampling its own 2
    # prompts: the data cursor moved past 2 x 2 x 2 prompts, none read twice.
    assert saved["cursor"] == 2 * 2 * 2

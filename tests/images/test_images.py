"""The images `make images` builds, run with podman or docker: what is (and is not) inside
them, and one tiny stage trained by the trainer image against the test S3 server.

Skipped, with the command that builds them, when the images are not built (see
tests/support/images.py). The operator image against a control plane, and a curriculum
of trainer containers, are in tests/e2e/test_images_e2e.py.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from kubetrain.core import contract, layout
from kubetrain.core.api import TrainingRunSpec
from kubetrain.core.records import read_progress
from kubetrain.core.store import ObjectStore, open_store
from kubetrain.operator.resources import NONROOT_UID
from tests.support import images
from tests.support.services import S3Server, free_port, stop_process
from tests.support.stage_env import resolved_stage_environment
from tests.support.wait import wait_for

pytestmark = pytest.mark.images

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

# Run inside the trainer image: what a user of the image can import and run.
TRAINER_PROBE = """
import importlib, importlib.util, json, os, pkgutil, shutil, sys
import torch
import kubetrain_trainer as package
from kubetrain_trainer import toolchain
# Every module of the trainer, each imported on its own: one whose dependency the image
# lacks (a package missing from the trainer extra) fails here, not in a user's stage.
trainer_modules = {}
for info in pkgutil.walk_packages(package.__path__, "kubetrain_trainer."):
    try:
        importlib.import_module(info.name)
        trainer_modules[info.name] = None
    except Exception as exc:
        trainer_modules[info.name] = repr(exc)
def has(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "python": sys.version.split()[0],
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(),
    "modules": {m: has(m) for m in (
        "kubetrain.operator", "kubetrain.local", "kubetrain.cli", "kubetrain.docgen",
        "kopf", "kubernetes", "rich", "matplotlib", "pip")},
    "compilers": [c for c in ("cc", "gcc", "g++", "clang", "nvcc") if shutil.which(c)],
    "trainer_modules": trainer_modules,
    "compile_missing": {d: toolchain.missing(d) for d in ("cpu", "cuda")},
    "ca_secret": os.path.exists("/run/secrets/pip-ca"),
    "pip_cache": os.path.exists("/root/.cache/pip"),
}))
"""


@pytest.fixture(scope="module")
def trainer() -> str:
    return images.require(images.names().trainer)


@pytest.fixture(scope="module")
def operator_image() -> str:
    return images.require(images.names().operator)


def test_trainer_image_holds_the_trainer_and_nothing_of_the_operator(trainer: str) -> None:
    """`python -m kubetrain_trainer`'s code and PyTorch with CUDA; not the operator, local
    runner, CLI or their packages, no compiler, no pip, no build secret or cache; runs as
    the uid the operator's pods ask for."""
    probe = json.loads(images.run_in(trainer, "python", "-c", TRAINER_PROBE).splitlines()[-1])
    assert probe["uid"] == probe["gid"] == NONROOT_UID, probe
    assert probe["python"].startswith("3.11."), probe
    assert probe["torch"].startswith("2.13.0"), probe
    assert probe["cuda"], f"torch without CUDA in the trainer image: {probe}"
    assert probe["cudnn"], probe
    assert not any(probe["modules"].values()), probe["modules"]
    assert probe["compilers"] == [], probe
    modules = probe["trainer_modules"]
    assert {"kubetrain_trainer.train", "kubetrain_trainer.hf.model"} <= set(modules), modules
    assert {m: e for m, e in modules.items() if e} == {}, modules
    # compile: true trains eagerly here, with a warning saying why (toolchain.py).
    for device, missing in probe["compile_missing"].items():
        assert missing and "compiler" in missing and "Python's headers" in missing, device
    assert not probe["ca_secret"] and not probe["pip_cache"], probe

    config = images.inspect(trainer)["Config"]
    assert config["Entrypoint"] == ["python", "-m", "kubetrain_trainer"]
    assert config["User"] == f"{NONROOT_UID}:{NONROOT_UID}"


def test_operator_image_runs_kubetrain_as_its_non_root_user(operator_image: str) -> None:
    """The `kubetrain` command of the installed distribution, as uid 10001 (the chart's
    runAsUser); neither PyTorch (the operator never trains) nor pip inside."""
    out = images.run_in(operator_image, "operator", "--help", entrypoint="kubetrain")
    assert "--kubeconfig" in out, out
    config = images.inspect(operator_image)["Config"]
    assert config["Entrypoint"][:2] == ["kubetrain", "operator"]
    assert config["User"] == "10001:10001"
    probe = images.run_in(
        operator_image,
        "-c",
        "import importlib.metadata as md, importlib.util as u, os; "
        "print(os.getuid(), md.version('kubetrain'), "
        "[m for m in ('torch', 'pip') if u.find_spec(m)])",
        entrypoint="python",
    )
    assert probe.split() == ["10001", VERSION, "[]"], probe


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_images_carry_oci_labels(target: str) -> None:
    image = images.require(getattr(images.names(), target))
    labels = images.inspect(image)["Config"]["Labels"]
    assert labels["org.opencontainers.image.title"] == f"kubetrain-{target}"
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.base.name"], labels
    assert len(labels["org.opencontainers.image.revision"].removesuffix("-dirty")) == 40, labels
    assert labels["org.opencontainers.image.created"].endswith("Z"), labels


def _stage_spec(s3: S3Server, bucket: str, stage: dict[str, Any]) -> TrainingRunSpec:
    return TrainingRunSpec.model_validate(
        {
            "model": {"layers": 1, "heads": 2, "dim": 32, "contextLength": 32},
            "storage": {
                "s3": {
                    "bucket": bucket,
                    "prefix": "runs",
                    "endpoint": s3.endpoint,
                    "credentialsSecret": "s3",
                }
            },
            "stages": [stage],
        }
    )


def _stage_container(
    trainer: str, spec: TrainingRunSpec, s3: S3Server, name: str
) -> tuple[list[str], ObjectStore]:
    """``run`` arguments of the trainer image with the operator's environment for the
    stage's pod (the kubelet's resolution of it, done here), on the host's network to
    reach the test S3 server; and the stage's folder."""
    env = resolved_stage_environment(
        spec, 0, s3, run="tiny", namespace="default", secret="s3", metrics_port=free_port()
    )
    # The host's network: a port of its own for this pod's torchrun rendezvous.
    env.update({contract.PET_MASTER_PORT: str(free_port()), "OMP_NUM_THREADS": "1"})
    argv = ["run", "--rm", "--pull=never", f"--name={name}", "--network=host", "--shm-size=256m"]
    for key, value in env.items():
        argv += ["--env", f"{key}={value}"]
    store = open_store(
        env[contract.ENV_CHECKPOINT_URI],
        endpoint=s3.endpoint,
        region=s3.region,
        access_key_id=s3.access_key,
        secret_access_key=s3.secret_key,
    )
    return [*argv, trainer], store


def test_trainer_image_trains_a_stage_against_s3(trainer: str, s3_server: S3Server) -> None:
    """The image's entrypoint with a pod's environment: the stage trains, writes its
    checkpoints, FINAL and progress, and exits 0."""
    stage = {
        "name": "pretrain",
        "type": "pretrain",
        "checkpointEvery": 10,
        "data": {"evalExamples": 8},
        "hyperparameters": {"maxSteps": 20, "batchSize": 8, "logEvery": 5},
    }
    spec = _stage_spec(s3_server, s3_server.create_bucket("image-stage"), stage)
    argv, store = _stage_container(trainer, spec, s3_server, images.container_name("stage"))
    try:
        out = images.engine(*argv, timeout=600)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the trainer container did not finish in 600 s: {exc.stderr!r}")
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-4000:]

    assert store.get_text(layout.FINAL) == "checkpoints/step-000020", logs[-4000:]
    for step in (10, 20):
        assert store.exists(f"checkpoints/step-{step:06d}/{layout.MANIFEST}"), step
    progress = read_progress(store, layout.PROGRESS)
    assert progress is not None, logs[-4000:]
    assert progress.phase == "completed" and progress.step == 20, progress
    assert progress.loss and progress.loss > 0 and progress.energy_joules > 0, progress
    assert "completed 20 steps" in logs, logs[-4000:]


def test_sigterm_to_the_trainer_container_under_torchrun_exits_with_the_checkpoint_code(
    trainer: str, s3_server: S3Server, tmp_path: Path
) -> None:
    """Two processes per pod: the entrypoint runs torchrun as its child. The engine's
    SIGTERM (the kubelet's) reaches the container's process 1, the workers checkpoint, and
    the container exits 75, the code the Job's podFailurePolicy ignores: a drained node
    never counts against maxRestarts."""
    stage = {
        "name": "ddp",
        "type": "pretrain",
        "checkpointEvery": 5,
        "resources": {"processesPerNode": 2},
        "hyperparameters": {"maxSteps": 2000, "batchSize": 4, "logEvery": 5},
    }
    spec = _stage_spec(s3_server, s3_server.create_bucket("image-sigterm"), stage)
    name = images.container_name("sigterm")
    argv, store = _stage_container(trainer, spec, s3_server, name)
    log = tmp_path / "trainer.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*images.ENGINE, *argv], stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: store.exists(layout.LATEST) or proc.poll() is not None,
            timeout=300,
            what="a first checkpoint of the trainer container under torchrun",
        )
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
        images.engine("kill", "--signal=TERM", name)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            images.engine("rm", "--force", name)
            stop_process(proc)
    logs = log.read_text(errors="replace")
    assert proc.returncode == contract.EXIT_CHECKPOINTED_ON_SIGTERM, logs[-4000:]
    assert "world 2" in logs, logs[-4000:]
    progress = read_progress(store, layout.PROGRESS)
    assert progress is not None and progress.phase == "interrupted", progress
    latest = store.get_text(layout.LATEST)
    assert latest == f"checkpoints/step-{progress.step:06d}"
    assert store.exists(f"{latest}/{layout.MANIFEST}")
    assert not store.exists(layout.FINAL)

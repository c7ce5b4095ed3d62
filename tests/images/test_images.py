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

import pytest

from kubetrain.core import contract
from kubetrain.core.api import TrainingRunSpec
from kubetrain.core.store import open_store
from kubetrain.operator.resources import NONROOT_UID
from tests.support import images
from tests.support.services import S3Server, free_port
from tests.support.stage_env import resolved_stage_environment

pytestmark = pytest.mark.images

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

# Run inside the trainer image: what a user of the image can import and run.
TRAINER_PROBE = """
import importlib.util, json, os, shutil, sys
import torch
import kubetrain_trainer.train, kubetrain.core.contract
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


def test_trainer_image_trains_a_stage_against_s3(
    trainer: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's entrypoint with the operator's environment for a pod (the kubelet's
    resolution of it, done here), on the host's network to reach the test S3 server:
    the stage trains, writes its checkpoints, FINAL and progress, and exits 0."""
    for key, value in s3_server.env().items():  # this process reads what it wrote
        monkeypatch.setenv(key, value)
    bucket = s3_server.create_bucket("image-stage")
    spec = TrainingRunSpec.model_validate(
        {
            "model": {"layers": 1, "heads": 2, "dim": 32, "contextLength": 32},
            "storage": {
                "s3": {
                    "bucket": bucket,
                    "prefix": "runs",
                    "endpoint": s3_server.endpoint,
                    "credentialsSecret": "s3",
                }
            },
            "stages": [
                {
                    "name": "pretrain",
                    "type": "pretrain",
                    "checkpointEvery": 10,
                    "data": {"evalExamples": 8},
                    "hyperparameters": {"maxSteps": 20, "batchSize": 8, "logEvery": 5},
                }
            ],
        }
    )
    env = resolved_stage_environment(
        spec, 0, s3_server, run="tiny", namespace="default", secret="s3", metrics_port=free_port()
    )
    argv = ["run", "--rm", "--pull=never", "--network=host", "--shm-size=256m"]
    for key, value in {**env, "OMP_NUM_THREADS": "1"}.items():
        argv += ["--env", f"{key}={value}"]
    try:
        out = images.engine(*argv, trainer, timeout=600)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the trainer container did not finish in 600 s: {exc.stderr!r}")
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-4000:]

    store = open_store(env[contract.ENV_CHECKPOINT_URI])
    assert store.get_text(contract.FINAL) == "checkpoints/step-000020", logs[-4000:]
    for step in (10, 20):
        assert store.exists(f"checkpoints/step-{step:06d}/MANIFEST.json"), step
    progress = store.get_json(contract.PROGRESS)
    assert progress["phase"] == "completed" and progress["step"] == 20, progress
    assert progress["loss"] > 0 and progress["energyJoules"] > 0, progress
    assert "completed 20 steps" in logs, logs[-4000:]

"""The images' recipe without building it: the Dockerfile's stages agree with the pods
that run them, its base is pinned, the trainer gets only the trainer's code, `make
images` names what the chart deploys, and images/engine.sh gives podman the options this
project's hosts need. (tests/images runs the built images.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from kubetrain.operator import resources
from kubetrain.operator.config import OperatorConfig
from tests.support.dockerfile import instruction, stages

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CHART = REPO / "charts" / "kubetrain"


def test_the_dockerfile_has_an_operator_and_a_trainer_target_on_one_base() -> None:
    st = stages()
    assert {"runtime", "builder", "operator", "trainer"} <= set(st)
    assert instruction("operator", "FROM") == ["runtime AS operator"]
    assert instruction("trainer", "FROM") == ["runtime AS trainer"]
    # The only external image is the pinned base: a dated Debian tag or a digest.
    (base,) = [a for kw, a in st[""] if kw == "ARG" and a.startswith("BASE=")]
    assert re.fullmatch(r"BASE=\S+:bookworm-\d{8}-slim|BASE=\S+@sha256:[0-9a-f]{64}", base)
    external = [a for args in (instruction(s, "FROM") for s in st) for a in args]
    assert {a.split()[0] for a in external} - set(st) == {"${BASE}"}


def test_the_trainer_target_is_what_the_operators_pods_run() -> None:
    (entrypoint,) = instruction("trainer", "ENTRYPOINT")
    assert json.loads(entrypoint) == resources.TRAINER_COMMAND
    uid = resources.NONROOT_UID
    assert instruction("trainer", "USER") == [f"{uid}:{uid}"]
    assert any(f"--uid {uid}" in run for run in instruction("trainer", "RUN"))


def test_the_trainer_gets_only_core_and_the_trainer_package() -> None:
    copied = instruction("trainer-code", "COPY")
    sources = {s for c in copied for s in c.split()[:-1]}
    assert sources == {
        "operator/kubetrain/__init__.py",
        "operator/kubetrain/py.typed",
        "operator/kubetrain/core/",
        "trainer_image/kubetrain_trainer/",
        "LICENSE",
    }
    (install,) = [r for r in instruction("trainer-build", "RUN") if "pip-install.sh" in r]
    assert "images/pip-install.sh trainer " in install


@pytest.mark.parametrize(
    ("stage", "extra"), [("trainer-build", "trainer"), ("operator-build", "operator")]
)
def test_installs_are_pinned_and_from_cached_wheels(stage: str, extra: str) -> None:
    (install,) = [r for r in instruction(stage, "RUN") if "pip-install.sh" in r]
    assert f"images/pip-install.sh {extra}" in install
    assert "--mount=type=cache,target=/var/cache/kubetrain-wheels" in install
    assert "--mount=type=secret,id=pip-ca" in install
    script = (REPO / "images" / "pip-install.sh").read_text()
    assert "-c requirements/constraints.txt" in script
    assert script.count("--only-binary=:all:") == 1  # in the arguments of both pip calls
    assert "install --no-index --find-links" in script


@pytest.mark.parametrize("stage", ["trainer-build", "operator-build"])
def test_the_package_installs_depend_only_on_their_requirements(stage: str) -> None:
    """What is copied before the ~4 GB install is its cache key: the extra's requirement
    list, the pins and the install script, never the README or the code."""
    before: list[str] = []
    for st in ("builder", stage):
        for keyword, args in stages()[st]:
            if keyword == "RUN" and "pip-install.sh" in args:
                break
            if keyword == "COPY":
                before.append(args)
    extra = stage.removesuffix("-build")
    assert before == [
        "requirements/ requirements/",
        "images/pip-install.sh images/",
        f"--from=requirements /extras/{extra}.txt extras/",
    ]


def test_labels_that_change_per_build_are_not_cached() -> None:
    """A LABEL of an ARG is reused from the build cache with its old value (podman), so
    the version, revision and time come from `make images` as --label."""
    for target in ("operator", "trainer"):
        (label,) = instruction(target, "LABEL")
        assert "${" not in label and f'title="kubetrain-{target}"' in label
    script = (REPO / "images" / "build.sh").read_text()
    for key in ("version", "revision", "created", "base.name"):
        assert f'--label "org.opencontainers.image.{key}=' in script, key


def test_make_images_names_the_charts_defaults() -> None:
    out = subprocess.run(
        ["bash", "images/build.sh", "--names"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k not in ("REGISTRY", "TAG")},
    )
    operator, trainer = out.stdout.split()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    version = PYPROJECT["project"]["version"]
    assert chart["appVersion"] == version
    assert operator == f"{values['image']['repository']}:{version}"
    assert values["image"]["tag"] == ""  # the chart's appVersion
    assert trainer == values["config"]["image"] == OperatorConfig().image


def test_make_images_takes_a_registry_and_tag() -> None:
    out = subprocess.run(
        ["bash", "images/build.sh", "--names"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "REGISTRY": "registry.example.com/ml", "TAG": "rc1"},
    )
    assert out.stdout.split() == [
        "registry.example.com/ml/operator:rc1",
        "registry.example.com/ml/trainer:rc1",
    ]


def test_image_requirements_are_the_extras_of_pyproject() -> None:
    def reqs(*extras: str) -> list[str]:
        out = subprocess.run(
            ["python3", "images/requirements.py", "pyproject.toml", *extras],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.split()

    project = PYPROJECT["project"]
    base = project["dependencies"]
    assert reqs("trainer") == base + project["optional-dependencies"]["trainer"]
    # A self-reference expands into the named extras, once each.
    dev = reqs("dev")
    assert not [r for r in dev if r.startswith("kubetrain")]
    assert len(dev) == len(set(dev))
    bad = subprocess.run(
        ["python3", "images/requirements.py", "pyproject.toml", "gpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0
    assert "no extra 'gpu'" in bad.stderr and "trainer" in bad.stderr


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    ignore = (REPO / ".dockerignore").read_text().split()
    allowed = [p.removeprefix("!") for p in ignore if p.startswith("!")]
    assert "*" in ignore  # everything else (.venv, .cache, .git, tests) stays out
    copied = {
        src
        for st in stages()
        for args in instruction(st, "COPY")
        if not args.startswith("--from")
        for src in args.split()[:-1]
    }
    for src in copied:
        assert any(src == a or src.startswith(a) for a in allowed), src


def _engine_argv(tmp_path: Path, *args: str, cgroup_v1: bool = True) -> list[str]:
    """The podman command line images/engine.sh runs, from a stub podman that prints it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (
        ("podman", 'printf "%s\\n" "$@"'),
        ("runc", "true"),
        ("stat", "echo " + ("tmpfs" if cgroup_v1 else "cgroup2fs")),
    ):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "CONTAINER_ENGINE": ""}
    out = subprocess.run(
        ["bash", str(REPO / "images" / "engine.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


def test_engine_gives_podman_runc_and_limits_the_host_allows(tmp_path: Path) -> None:
    argv = _engine_argv(tmp_path, "run", "--rm", "img")
    assert argv[:2] == ["--runtime", str(tmp_path / "bin" / "runc")]
    assert argv[2] == "run" and argv[-2:] == ["--rm", "img"]
    ulimits = [argv[i + 1] for i, a in enumerate(argv) if a == "--ulimit"]
    nofile = next(u for u in ulimits if u.startswith("nofile="))
    soft, hard = nofile.removeprefix("nofile=").split(":")
    assert soft == hard and 0 < int(hard) <= 1048576
    nproc = next(u for u in ulimits if u.startswith("nproc="))
    assert int(nproc.removeprefix("nproc=").split(":")[1]) <= 32768
    # Commands that start no container get no limits; a cgroup v2 host keeps its runtime.
    assert _engine_argv(tmp_path, "image", "ls") == [*argv[:2], "image", "ls"]
    assert _engine_argv(tmp_path, "ps", cgroup_v1=False) == ["ps"]


def test_every_package_of_the_source_tree_is_in_the_distribution() -> None:
    """The operator image installs kubetrain's wheel, not the source tree: a subpackage
    that pyproject.toml does not list is missing there (and from `pip install .`) while
    every test that imports the checkout passes."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    roots = PYPROJECT["tool"]["setuptools"]["package-dir"]
    found = {
        ".".join((top, *init.parent.relative_to(REPO / folder).parts))
        for top, folder in roots.items()
        for init in (REPO / folder).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found - listed == set(), "add them to [tool.setuptools] packages in pyproject.toml"

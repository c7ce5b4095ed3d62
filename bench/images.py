"""The images of `make images`: their sizes, the torch and CUDA inside the trainer, build
times, and the time from `run` of a trainer container to its first training step.

    python bench/images.py [--reps 3] [--rebuild] [--cold]

- sizes, versions and start-up need the images built (`make images`); without them the
  script says so and writes nothing.
- start-up: a one-stage run of a tiny model with a progress line every step and a
  ``file://`` store in a mounted folder, timed from the engine's ``run`` to the first
  ``step 1/`` line; the same stage as a host process (the venv's Python, no container)
  for comparison. Medians of ``--reps`` interleaved repetitions.
- ``--rebuild``: a warm `make images` (nothing changed), and one after a change to the
  trainer's code (a copy of the sources with one more comment line, built with TAG
  bench-change and removed afterwards).
- ``--cold``: first removes both images, the build stages, the base image built here
  and the wheel cache, then times `make images` from scratch (downloads torch and the
  CUDA libraries again: ~3 GB, many minutes).

Results go to ``bench/results/images.json``; numbers, not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ENGINE = ["bash", str(REPO / "images" / "engine.sh")]
LOCAL_BASE = "localhost/kubetrain/debian:bookworm-slim"
WHEEL_CACHE_ID = "/var/cache/kubetrain-wheels"

sys.path.insert(0, str(REPO))
from kubetrain.core import contract  # noqa: E402
from kubetrain.core.api import TrainingRunSpec  # noqa: E402

VERSIONS = (
    "import json, sys, torch; print(json.dumps({'python': sys.version.split()[0], "
    "'torch': torch.__version__, 'cuda': torch.version.cuda, "
    "'cudnn': torch.backends.cudnn.version(), "
    "'nccl': '.'.join(map(str, torch.cuda.nccl.version()))}))"
)


def engine(*args: str, check: bool = True, timeout: float = 3600) -> str:
    out = subprocess.run([*ENGINE, *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed: {out.stderr[-2000:]}")
    return out.stdout


def names(env: dict[str, str] | None = None) -> list[str]:
    out = subprocess.run(
        ["bash", str(REPO / "images" / "build.sh"), "--names"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return out.stdout.split()


def built(image: str) -> bool:
    return subprocess.run([*ENGINE, "image", "inspect", image], capture_output=True).returncode == 0


def timed_build(cwd: Path = REPO, env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    subprocess.run(
        ["bash", "images/build.sh"], cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL
    )
    return round(time.monotonic() - start, 1)


# --------------------------------------------------------------------------- sizes


_UNITS = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def layer_bytes(size: str) -> int:
    """``history``'s size of a layer: bytes, or what podman prints even when asked for
    bytes (``5.03 GB``, decimal units)."""
    number, _, unit = size.strip().partition(" ")
    if not unit:
        return int(number) if number.isdigit() else 0
    return round(float(number) * _UNITS[unit])


def sizes(images: list[str]) -> dict[str, Any]:
    """Size of each image and its three largest layers (what they are, MiB)."""
    out: dict[str, Any] = {}
    for image in images:
        info = json.loads(engine("image", "inspect", image))[0]
        history = engine(
            "history", "--human=false", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", image
        )
        layers = []
        for line in history.splitlines():
            size, _, created_by = line.partition("\t")
            if layer_bytes(size) > 0:
                layers.append((layer_bytes(size), " ".join(created_by.split())[:100]))
        out[image] = {
            "bytes": int(info["Size"]),
            "MiB": round(int(info["Size"]) / 2**20),
            "largestLayers": [
                {"MiB": round(size / 2**20, 2), "createdBy": what}
                for size, what in sorted(layers, reverse=True)[:3]
            ],
        }
    return out


# --------------------------------------------------------------------------- start-up


def stage_env(store: str) -> dict[str, str]:
    spec = TrainingRunSpec.model_validate(
        {
            "model": {"layers": 1, "heads": 2, "dim": 32, "contextLength": 32},
            "stages": [
                {
                    "name": "pretrain",
                    "type": "pretrain",
                    "checkpointEvery": 1000,
                    "data": {"evalExamples": 8},
                    "hyperparameters": {"maxSteps": 3, "batchSize": 8, "logEvery": 1},
                }
            ],
        }
    )
    env = {}
    for var in contract.stage_environment(
        spec,
        0,
        run="bench",
        namespace="default",
        store_root=store,
        master_addr="127.0.0.1",
        node_rank="0",
        metrics_port=0,
    ):
        env[var.name] = var.value or ""
    env["OMP_NUM_THREADS"] = "1"
    return env


def time_to_first_step(argv: list[str], env: dict[str, str] | None) -> dict[str, float]:
    """Seconds from starting ``argv`` to its first log line and to ``step 1/``."""
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    first_line = first_step = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        now = time.monotonic() - start
        if first_line is None and "kubetrain" in line:
            first_line = now
        if first_step is None and "step 1/" in line:
            first_step = now
    if proc.wait() != 0 or first_step is None:
        raise SystemExit(f"{argv[:3]} exited {proc.returncode}:\n{''.join(lines)[-3000:]}")
    return {"firstLogLine": round(first_line or first_step, 2), "firstStep": round(first_step, 2)}


def startup(trainer: str, reps: int) -> dict[str, Any]:
    container, host = [], []
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as tmp:
            os.chmod(tmp, 0o777)  # the image's non-root user writes there
            env = stage_env("file:///store")
            argv = [*ENGINE, "run", "--rm", "--pull=never", "--network=host", "-v", f"{tmp}:/store"]
            for key, value in env.items():
                argv += ["--env", f"{key}={value}"]
            container.append(time_to_first_step([*argv, trainer], None))
        with tempfile.TemporaryDirectory() as tmp:
            env = {
                **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")},
                **stage_env(f"file://{tmp}"),
                "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'trainer_image'}",
            }
            host.append(time_to_first_step([sys.executable, "-m", "kubetrain_trainer"], env))

    def median(runs: list[dict[str, float]], key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 2)

    return {
        "reps": reps,
        "containerToFirstStepSeconds": median(container, "firstStep"),
        "containerToFirstLogLineSeconds": median(container, "firstLogLine"),
        "hostProcessToFirstStepSeconds": median(host, "firstStep"),
        "container": container,
        "hostProcess": host,
    }


# --------------------------------------------------------------------------- builds


def code_change_build() -> float:
    """A build after a one-line change of the trainer's code, from a copy of the sources."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "src"
        shutil.copytree(
            REPO,
            copy,
            ignore=shutil.ignore_patterns(".venv", ".cache", "bench", "__pycache__", ".kubetrain"),
            symlinks=True,
        )
        init = copy / "trainer_image" / "kubetrain_trainer" / "__init__.py"
        init.write_text(init.read_text() + "# a change\n")
        env = {**os.environ, "TAG": "bench-change"}
        try:
            return timed_build(copy, env)
        finally:
            for image in names(env):
                engine("rmi", image, check=False)


def clear_for_cold_build(images: list[str]) -> None:
    for image in [*images, LOCAL_BASE]:
        engine("rmi", "--force", image, check=False)
    engine("image", "prune", "--force", check=False)  # the build stages, now dangling
    if engine("--name").strip() == "podman":
        # buildah keeps cache mounts here, by target path.
        shutil.rmtree(Path("/var/tmp/buildah-cache") / WHEEL_CACHE_ID.lstrip("/"), True)
    else:
        engine("builder", "prune", "--all", "--force", check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--cold", action="store_true")
    args = parser.parse_args()

    images = names()
    result: dict[str, Any] = {
        "engine": engine("--name").strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }
    if args.cold:
        clear_for_cold_build(images)
        result["coldBuildSeconds"] = timed_build()
    missing = [i for i in images if not built(i)]
    if missing:
        print(f"bench/images.py: {', '.join(missing)} not built: run `make images` first")
        return
    if args.rebuild:
        result["warmBuildSeconds"] = timed_build()
        result["codeChangeBuildSeconds"] = code_change_build()
    trainer = images[1]
    result["sizes"] = sizes(images)
    result["trainerVersions"] = json.loads(
        engine("run", "--rm", "--pull=never", "--entrypoint=python", trainer, "-c", VERSIONS)
    )
    result["startup"] = startup(trainer, args.reps)

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "images.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    # Build times are measured only on request: keep the last ones measured.
    for key in ("coldBuildSeconds", "warmBuildSeconds", "codeChangeBuildSeconds"):
        if key not in result and key in previous:
            result[key] = previous[key]
    path.write_text(json.dumps(result, indent=1) + "\n")
    summary = {k: v for k, v in result.items() if k not in ("startup", "sizes")}
    summary["MiB"] = {k: v["MiB"] for k, v in result["sizes"].items()}
    summary["toFirstStep"] = {
        "container": result["startup"]["containerToFirstStepSeconds"],
        "hostProcess": result["startup"]["hostProcessToFirstStepSeconds"],
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

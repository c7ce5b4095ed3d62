"""Helpers for tests that drive `kubetrain run --local` as a user would: a subprocess of
the real CLI, the real trainer, a real store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kubetrain.core import layout
from kubetrain.core.layout import StageLayout
from kubetrain.core.records import ProgressRecord

# Seconds, not minutes: a model this small trains a step in milliseconds on one core.
TINY_MODEL = {"layers": 1, "heads": 2, "dim": 32, "contextLength": 32}


def tiny_manifest(
    name: str = "tiny-test",
    *,
    steps: tuple[int, int, int] = (16, 12, 8),
    data: Mapping[str, str] | None = None,
    checkpoint_every: int = 4,
) -> dict[str, Any]:
    """pretrain -> sft -> dpo of a ~20k-parameter model; ``data`` overrides a stage's
    data source by stage name."""
    data = data or {}
    stages = []
    for stage, steps_ in zip(("pretrain", "sft", "dpo"), steps, strict=True):
        stages.append(
            {
                "name": stage,
                "type": stage,
                "data": {"source": data.get(stage, "synthetic:arithmetic"), "evalExamples": 16},
                "hyperparameters": {
                    "maxSteps": steps_,
                    "batchSize": 4,
                    "logEvery": 2,
                    "learningRate": 0.003 if stage != "dpo" else 0.0005,
                },
                "checkpointEvery": checkpoint_every,
            }
        )
    return {
        "apiVersion": "kubetrain.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "model": TINY_MODEL,
            "stages": stages,
            "pricing": {"gpuHourUSD": 2.5, "energyUSDPerKWh": 0.12},
        },
    }


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> Path:
    path = folder / f"{manifest['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(dict(manifest), sort_keys=False))
    return path


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment, plus ``extra``; no color codes in captured output."""
    env = dict(os.environ)
    env.pop("FORCE_COLOR", None)
    env["NO_COLOR"] = "1"
    env.update(extra or {})
    return env


def kubetrain_cmd(*args: str) -> list[str]:
    """The `kubetrain` console script of the Python running the tests."""
    script = Path(sys.executable).with_name("kubetrain")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "kubetrain.cli.main", *args]


def run_cli(
    *args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        kubetrain_cmd(*args),
        cwd=cwd,
        env=cli_env(env),
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def parse_summary(stdout: str) -> dict[str, dict[str, str]]:
    """The plain summary table as {stage: {column: cell}}; the ruler under the header
    gives each column's span (cells may be empty, e.g. the total row's loss)."""
    lines = stdout.splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.startswith("stage ") and "checkpoint" in line
    )
    spans = [[m.start(), m.end()] for m in re.finditer(r"-+", lines[start + 1])]
    spans[-1][1] = 10**6  # the last column is not padded
    header = [lines[start][a:b].strip() for a, b in spans]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 2 :]:
        if set(line.strip()) <= set("- "):
            continue
        cells = [line[a:b].strip() for a, b in spans]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
        if cells[0] == "total":
            break
    return rows


def stage_folder(store: Path, run: str, stage: str, namespace: str = "default") -> Path:
    return store / StageLayout.of(namespace, run, stage).folder


def progress(store: Path, run: str, stage: str) -> ProgressRecord:
    path = stage_folder(store, run, stage) / layout.PROGRESS
    record = ProgressRecord.from_json(path.read_text(), str(path))
    assert record is not None, f"{path} is not a progress record"
    return record

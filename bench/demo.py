"""The demo as `make demo` runs it (`kubetrain run examples/tiny-run.yaml --local`), from
a fresh store: wall time of the whole command and, per stage, held-out exact match,
the trainer's wall seconds and the stage's own metrics, with the machine's load
average before and after (a shared machine makes every wall time pessimistic) and the
CPU seconds the run used. Written to ``bench/results/demo.json``; what the run printed
to ``demo.txt`` and its report's curves to ``demo-curves.png`` beside it.

    python bench/demo.py [--manifest examples/tiny-run.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from kubetrain.core.layout import StageLayout
from kubetrain.core.records import read_progress
from kubetrain.core.store import open_store

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default=str(REPO / "examples" / "tiny-run.yaml"))
    args = parser.parse_args()
    manifest = Path(args.manifest).resolve()
    doc = yaml.safe_load(manifest.read_text())
    run, stages = doc["metadata"]["name"], [s["name"] for s in doc["spec"]["stages"]]
    with tempfile.TemporaryDirectory(prefix="kubetrain-demo-") as tmp:
        load_before = os.getloadavg()
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "kubetrain.cli.main", "run", str(manifest), "--local"],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if out.returncode != 0:
            sys.exit(f"the demo failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "demo.txt").write_text(out.stdout)
        curves = Path(tmp) / ".kubetrain" / "reports" / run / "curves.png"
        if curves.exists():
            shutil.copyfile(curves, RESULTS / "demo-curves.png")
        store = open_store((Path(tmp) / ".kubetrain" / "store").as_uri())
        per_stage = {}
        for name in stages:
            record = read_progress(store, StageLayout.of("default", run, name).progress)
            assert record is not None, f"no progress record for stage {name}"
            per_stage[name] = {
                "type": record.stage_type,
                "steps": record.step,
                "exactMatch": record.eval.get("accuracy"),
                "preferenceAccuracy": record.eval.get("preferenceAccuracy"),
                "evalAnswerLoss": record.eval.get("loss"),
                "trainerWallSeconds": record.wall_seconds,
                "train": record.train,
            }
    result = {
        "bench": "demo",
        "manifest": str(manifest.relative_to(REPO))
        if manifest.is_relative_to(REPO)
        else str(manifest),
        "wallSeconds": wall,
        "cpuSeconds": usage.ru_utime + usage.ru_stime,
        "loadAverageBefore": load_before,
        "loadAverageAfter": load_after,
        "stages": per_stage,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    (RESULTS / "demo.json").write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            {
                "wallSeconds": round(wall, 1),
                "exactMatch": {n: s["exactMatch"] for n, s in per_stage.items()},
            }
        )
    )


if __name__ == "__main__":
    main()

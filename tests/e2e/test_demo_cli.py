"""A new user's first session: `kubetrain run FILE --local --plain`, then
`kubetrain report RUN`, as subprocesses of the installed CLI with the real trainer.

The manifest is examples/tiny-run.yaml itself (model, data, objectives, pricing as a
user gets them) with fewer steps, so that the demo's path is what is tested."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import yaml

from tests.support.localrun import parse_summary, progress, run_cli, write_manifest
from tests.support.services import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-run.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _short_demo(folder: Path) -> tuple[Path, str, list[str]]:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"]["name"] = "demo-e2e"
    for stage in manifest["spec"]["stages"]:
        hp = stage.setdefault("hyperparameters", {})
        hp["maxSteps"] = 12 if stage["type"] != "dpo" else 6
        hp["logEvery"] = 2
        stage["checkpointEvery"] = 6
        stage.setdefault("data", {})["evalExamples"] = 16
    return (
        write_manifest(folder, manifest),
        "demo-e2e",
        [s["name"] for s in manifest["spec"]["stages"]],
    )


def test_run_then_report_as_a_new_user(tmp_path: Path) -> None:
    manifest, run, stages = _short_demo(tmp_path)

    # A free metrics port rather than the default 9400, which other tests may hold.
    out = run_cli(
        "run",
        str(manifest),
        "--local",
        "--plain",
        "--metrics-port",
        str(free_port()),
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # Where checkpoints go is said up front; the example names S3 but a laptop has none.
    assert (
        f"checkpoints: {(tmp_path / '.kubetrain' / 'store').as_uri()}/default/{run}/" in out.stdout
    )
    assert "--store s3://" in out.stdout
    table = parse_summary(out.stdout)
    assert list(table) == [*stages, "total"], out.stdout
    store = tmp_path / ".kubetrain" / "store"
    for stage in stages:
        record = progress(store, run, stage)
        assert table[stage]["steps"] == f"{record.total_steps}/{record.total_steps}"
        assert re.fullmatch(r"<?\$[\d.,]+", table[stage]["cost"])
        assert re.fullmatch(r"[\d.]+ (J|kJ|kWh) \(\w+\)", table[stage]["energy"])
    report_line = next(line for line in out.stdout.splitlines() if line.startswith("report: "))
    assert f".kubetrain/reports/{run}/report.html" in report_line

    # The report command on its own, by run name, into a folder of the user's choosing.
    rep = run_cli("report", run, "-o", "my-report", cwd=tmp_path, timeout=120)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    folder = tmp_path / "my-report"
    html = (folder / "report.html").read_text()
    for name in ("loss.png", "curves.png"):
        data = (folder / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        # Self-contained: the same image is embedded, not linked.
        assert base64.b64encode(data).decode()[:200] in html
    for stage in stages:
        assert f"<td>{stage}</td>" in html

    # A run that does not exist is one line naming what to do.
    missing = run_cli("report", "no-such-run", cwd=tmp_path, timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "kubetrain run" in missing.stderr

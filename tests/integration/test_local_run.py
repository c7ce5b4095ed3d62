"""`kubetrain run FILE --local` with the real trainer on the CPU: a whole tiny
curriculum on file:// and on S3 (moto's server), Ctrl-C and continuing, a failing
stage, a busy metrics port."""

from __future__ import annotations

import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from kubetrain.core import layout
from kubetrain.core.layout import StageLayout
from kubetrain.core.records import parse_metrics
from tests.support.localrun import (
    cli_env,
    kubetrain_cmd,
    parse_summary,
    progress,
    run_cli,
    stage_folder,
    tiny_manifest,
    write_manifest,
)
from tests.support.services import S3Server, free_port
from tests.support.wait import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

STAGES = ("pretrain", "sft", "dpo")


def _assert_summary_matches_store(stdout: str, store: Path, run: str) -> None:
    """Every number in the summary is the stored progress record's, to printed precision."""
    table = parse_summary(stdout)
    assert list(table) == [*STAGES, "total"], stdout
    for stage in STAGES:
        record, row = progress(store, run, stage), table[stage]
        assert record.phase == "completed"
        assert row["steps"] == f"{record.step}/{record.total_steps}"
        assert record.step == record.total_steps
        assert abs(float(row["loss"]) - record.loss) <= 5e-5
        assert abs(float(row["eval acc"]) - record.eval["accuracy"]) <= 5e-4
        assert int(row["tokens"].replace(",", "")) == record.tokens
        assert row["energy"].endswith(f"({record.energy_source})")
        assert row["checkpoint"] == record.checkpoint
    assert int(table["total"]["tokens"].replace(",", "")) == sum(
        progress(store, run, s).tokens for s in STAGES
    )


def test_tiny_curriculum_completes_on_file_store(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, tiny_manifest("tiny-file"))
    out = run_cli(
        "run", str(manifest), "--local", "--plain", "--metrics-port", str(free_port()), cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout + out.stderr
    store = tmp_path / ".kubetrain" / "store"
    for stage in STAGES:
        assert (stage_folder(store, "tiny-file", stage) / "FINAL").exists()
    _assert_summary_matches_store(out.stdout, store, "tiny-file")
    assert "all 3 stages complete" in out.stdout
    report = tmp_path / ".kubetrain" / "reports" / "tiny-file" / "report.html"
    assert f"report: {report.relative_to(tmp_path)}" in out.stdout
    assert report.exists() and (report.parent / "loss.png").stat().st_size > 10_000

    # Running it again skips what is complete and prints the same numbers.
    again = run_cli("run", str(manifest), "--local", "--plain", "--metrics-port", "0", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("] already complete: ") == 3
    assert "nothing to train" in again.stdout
    assert parse_summary(again.stdout) == parse_summary(out.stdout)


def test_tiny_curriculum_on_s3(tmp_path: Path, s3_server: S3Server) -> None:
    bucket = s3_server.create_bucket("local-run")
    manifest = write_manifest(tmp_path, tiny_manifest("tiny-s3", steps=(8, 6, 4)))
    out = run_cli(
        "run",
        str(manifest),
        "--local",
        "--plain",
        "--metrics-port",
        "0",
        "--store",
        f"s3://{bucket}/team",
        cwd=tmp_path,
        env=s3_server.env(),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    keys = {
        o["Key"]
        for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix="team/default/tiny-s3/")[
            "Contents"
        ]
    }
    for stage in STAGES:
        folder = StageLayout.of("default", "tiny-s3", stage)
        assert f"team/{folder.final}" in keys
        assert f"team/{folder.metrics}" in keys
    assert f"checkpoints: s3://{bucket}/team/default/tiny-s3/" in out.stdout
    table = parse_summary(out.stdout)
    assert table["dpo"]["checkpoint"].startswith(f"s3://{bucket}/team/default/tiny-s3/dpo/")
    assert not (tmp_path / ".kubetrain" / "store").exists()
    assert (tmp_path / ".kubetrain" / "reports" / "tiny-s3" / "loss.png").exists()


def test_unreachable_s3_is_one_line(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, tiny_manifest("tiny-nos3"))
    out = run_cli(
        "run",
        str(manifest),
        "--local",
        "--plain",
        "--metrics-port",
        "0",
        "--store",
        "s3://nowhere/x",
        cwd=tmp_path,
        timeout=120,
        env={
            "KUBETRAIN_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}",
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "y",
        },
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1, out.stderr
    assert "cannot reach the S3 endpoint" in out.stderr


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        return resp.read().decode()


def _pretrain_step_metric(port: int) -> float:
    for line in _scrape(port).splitlines():
        if line.startswith("kubetrain_local_stage_step{") and 'stage="pretrain"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_ctrl_c_checkpoints_and_the_same_command_continues(tmp_path: Path) -> None:
    # Enough steps that the run is still in pretrain when the first checkpoint lands.
    manifest = write_manifest(
        tmp_path, tiny_manifest("tiny-int", steps=(400, 8, 4), checkpoint_every=10)
    )
    store = tmp_path / ".kubetrain" / "store"
    port = free_port()
    proc = subprocess.Popen(
        kubetrain_cmd("run", str(manifest), "--local", "--plain", "--metrics-port", str(port)),
        cwd=tmp_path,
        env=cli_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        latest = stage_folder(store, "tiny-int", "pretrain") / "LATEST"
        wait_for(
            latest.exists,
            timeout=120,
            what="pretrain's first checkpoint",
            detail=lambda: str(proc.poll()),
        )
        # The runner's own Prometheus endpoint mirrors the trainer's progress.
        wait_for(
            lambda: _pretrain_step_metric(port) > 0,
            timeout=30,
            what="kubetrain_local_stage_step for pretrain on the runner's endpoint",
        )
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert f"continue with: kubetrain run {manifest} --local" in stderr
    record = progress(store, "tiny-int", "pretrain")
    assert record.phase == "interrupted"
    assert 0 < record.step < 400
    assert not (stage_folder(store, "tiny-int", "pretrain") / "FINAL").exists()
    assert not stage_folder(store, "tiny-int", "sft").exists()

    out = run_cli("run", str(manifest), "--local", "--plain", "--metrics-port", "0", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    resumed = [line for line in out.stdout.splitlines() if line.startswith("[pretrain] started")]
    assert resumed and "resuming at step" in resumed[0], out.stdout
    # The history has each step once: the continuation picked up, it did not start over.
    history = (stage_folder(store, "tiny-int", "pretrain") / layout.METRICS).read_text()
    steps = [line.step for line in parse_metrics(history, layout.METRICS)]
    assert steps == sorted(set(steps)) and steps[-1] == 400
    assert progress(store, "tiny-int", "pretrain").attempt >= 2
    _assert_summary_matches_store(out.stdout, store, "tiny-int")


def test_failing_stage_stops_the_curriculum_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-data.jsonl"
    manifest = write_manifest(
        tmp_path, tiny_manifest("tiny-fail", steps=(4, 4, 4), data={"sft": missing.as_uri()})
    )
    out = run_cli("run", str(manifest), "--local", "--plain", "--metrics-port", "0", cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    first = out.stderr.splitlines()[0]
    assert first.startswith("kubetrain: stage 'sft' failed: "), out.stderr
    assert "no-such-data.jsonl" in first
    store = tmp_path / ".kubetrain" / "store"
    assert (stage_folder(store, "tiny-fail", "pretrain") / "FINAL").exists()
    assert not stage_folder(store, "tiny-fail", "dpo").exists()
    assert "all 3 stages complete" not in out.stdout


def test_metrics_port_in_use_is_one_line(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, tiny_manifest("tiny-port"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run_cli(
            "run",
            str(manifest),
            "--local",
            "--plain",
            "--metrics-port",
            str(port),
            cwd=tmp_path,
            timeout=60,
        )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1, out.stderr
    assert f"port {port} is already in use" in out.stderr
    assert "--metrics-port" in out.stderr
    assert not (tmp_path / ".kubetrain" / "store").exists()


def test_two_node_stage_runs_here_as_one_node_with_two_processes(tmp_path: Path) -> None:
    manifest = tiny_manifest("tiny-ddp", steps=(6, 4, 2))
    manifest["spec"]["stages"] = manifest["spec"]["stages"][:1]
    manifest["spec"]["stages"][0]["resources"] = {"nodes": 2}
    path = write_manifest(tmp_path, manifest)
    out = run_cli("run", str(path), "--local", "--plain", "--metrics-port", "0", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    store = tmp_path / ".kubetrain" / "store"
    record = progress(store, "tiny-ddp", "pretrain")
    assert record.phase == "completed"
    # The global batch is the manifest's (2 processes × batchSize 4 × 32 tokens a step),
    # which only holds when both processes trained together.
    assert record.tokens == 6 * 2 * 4 * 32

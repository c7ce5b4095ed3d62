"""The local runner's pure parts: the environment a local trainer gets, the command
that starts it, the failure line, the numbers' formatting and the report's history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetrain.core import contract
from kubetrain.core.api import parse_run
from kubetrain.core.errors import UserError
from kubetrain.core.records import ProgressRecord, parse_metrics
from kubetrain.local.display import fmt_cost, fmt_duration, fmt_energy, plain_table, stage_line
from kubetrain.local.report import one_per_step
from kubetrain.local.runner import (
    failure_reason,
    local_environment,
    resolve_store_root,
    trainer_command,
)


def _run(resources: dict | None = None, s3: dict | None = None):
    spec: dict = {
        "stages": [
            {"name": "pretrain", "type": "pretrain", "resources": resources or {}},
            {"name": "sft", "type": "sft"},
        ]
    }
    if s3 is not None:
        spec["storage"] = {"s3": s3}
    return parse_run(
        {
            "apiVersion": "kubetrain.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "r", "namespace": "ml"},
            "spec": spec,
        }
    )


def test_environment_is_the_contract_resolved_for_this_machine() -> None:
    run = _run(s3={"bucket": "team-bucket", "credentialsSecret": "s3-creds", "region": "eu-west-1"})
    env = local_environment(
        run,
        1,
        store_root="file:///data/store",
        metrics_port=9401,
        master_port=30001,
        base={"PATH": "/bin", "AWS_ACCESS_KEY_ID": "mine"},
    )
    assert env["PATH"] == "/bin"
    assert env[contract.PET_NODE_RANK] == "0"
    assert env[contract.PET_MASTER_ADDR] == "127.0.0.1"
    assert env[contract.PET_MASTER_PORT] == "30001"
    assert env[contract.ENV_CHECKPOINT_URI] == "file:///data/store/ml/r/sft"
    assert env[contract.ENV_INIT_URI] == "file:///data/store/ml/r/pretrain"
    assert env[contract.ENV_METRICS_PORT] == "9401"
    assert env[contract.ENV_AWS_REGION] == "eu-west-1"
    assert json.loads(env[contract.ENV_STAGE_CONFIG])["stage"]["name"] == "sft"
    # The Secret's keys come from the user's shell, and only those the shell has.
    assert env["AWS_ACCESS_KEY_ID"] == "mine"
    assert "AWS_SECRET_ACCESS_KEY" not in env


def test_several_nodes_run_as_one_node_with_the_same_world_size() -> None:
    run = _run(resources={"nodes": 2, "processesPerNode": 3})
    env = local_environment(
        run, 0, store_root="file:///s", metrics_port=0, master_port=30002, base={}
    )
    assert env[contract.PET_NNODES] == "1"
    assert env[contract.PET_NPROC_PER_NODE] == "6"
    cmd = trainer_command(run.spec.stages[0], 30002, python="py")
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "6"
    assert cmd[cmd.index("--nnodes") + 1] == "1"
    assert cmd[cmd.index("--master-port") + 1] == "30002"
    assert cmd[-2:] == ["-m", "kubetrain_trainer"]


def test_one_process_runs_the_trainer_module_directly() -> None:
    run = _run()
    assert trainer_command(run.spec.stages[0], 1, python="py") == ["py", "-m", "kubetrain_trainer"]


@pytest.mark.parametrize(
    ("stderr", "expected"),
    [
        (
            ["INFO step 3", "kubetrain-trainer: error: data source file:///x does not exist"],
            "data source file:///x does not exist",
        ),
        (
            ["Traceback ...", "ModuleNotFoundError: No module named 'torch'"],
            "pip install 'kubetrain[trainer]'",
        ),
        (["worker failed: boom", "", "=" * 40, "-" * 10], "worker failed: boom"),
        ([], "the trainer exited without a message"),
    ],
)
def test_failure_reason_is_the_line_that_explains(stderr: list[str], expected: str) -> None:
    assert expected in failure_reason(stderr)


def test_store_root_defaults_to_a_folder_here_and_accepts_s3(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_store_root(None) == (tmp_path / ".kubetrain" / "store").as_uri()
    assert resolve_store_root("s3://b/p/") == "s3://b/p"
    assert resolve_store_root("somewhere") == (tmp_path / "somewhere").as_uri()
    with pytest.raises(UserError, match="unsupported scheme"):
        resolve_store_root("gs://b")


def test_numbers_read_at_a_glance() -> None:
    assert fmt_duration(83) == "1m23s"
    assert fmt_duration(4000) == "1h06m40s"
    assert fmt_energy(3900, "rapl") == "3.9 kJ (rapl)"
    assert fmt_energy(7.2e6) == "2 kWh"
    assert fmt_cost(0.000017) == "$0.000017"
    assert fmt_cost(12.345) == "$12.35"


def test_stage_line_takes_its_numbers_from_the_record() -> None:
    line = stage_line(
        "sft",
        ProgressRecord(
            step=5,
            total_steps=10,
            loss=1.5,
            tokens=640,
            eval={"accuracy": 0.25},
            energy_joules=12.0,
            energy_source="estimate",
            checkpoint="file:///c",
            phase="running",
        ),
        cost_usd=0.5,
    )
    assert (line.step, line.total_steps, line.loss, line.accuracy) == (5, 10, 1.5, 0.25)
    assert (line.tokens, line.energy_joules, line.cost_usd) == (640, 12.0, 0.5)
    assert stage_line("dpo", None).phase == "pending"


def test_plain_table_aligns_columns() -> None:
    text = plain_table(["a", "bb"], [["xyz", "1"], ["total", "22"]])
    lines = text.splitlines()
    assert lines[0] == "a      bb"
    assert lines[2] == "xyz    1"
    assert lines[-1] == "total  22"


def test_history_keeps_the_last_record_of_each_step_and_skips_torn_lines() -> None:
    text = "\n".join(
        [
            json.dumps({"step": 2, "loss": 3.0}),
            json.dumps({"step": 4, "loss": 2.9}),
            json.dumps({"step": 4, "loss": 2.5}),  # the resumed attempt redid step 4
            json.dumps({"step": 6, "loss": 2.0}),
            '{"step": 8, "lo',
        ]
    )
    history = one_per_step(parse_metrics(text, "metrics.jsonl"))
    assert [(m.step, m.loss) for m in history] == [(2, 3.0), (4, 2.5), (6, 2.0)]


def test_missing_torch_is_one_line_saying_what_to_install(monkeypatch) -> None:
    import importlib.util

    from kubetrain.local import command as local

    real = importlib.util.find_spec
    monkeypatch.setattr(
        local.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torch" else real(name, *a),
    )
    with pytest.raises(UserError, match=r"pip install 'kubetrain\[trainer\]'"):
        local.check_trainer_installed()

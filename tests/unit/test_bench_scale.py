"""The arithmetic of the scale benchmark (bench/scale.py): what it reports from the
events it saw and the counters it scraped. The measurement itself needs a control plane
and runs as `make bench-scale`."""

from __future__ import annotations

from collections import Counter

import pytest

from bench import scale


def _timeline() -> scale.Timeline:
    """Two runs; run-b has not finished its last stage."""
    tl = scale.Timeline()
    events = {
        "run-a": {
            ("created", ""): 0.0,
            ("job", "pretrain"): 1.0,
            ("finished", "pretrain"): 10.0,
            ("complete", "pretrain"): 12.0,
            ("job", "sft"): 13.0,
            ("finished", "sft"): 20.0,
            ("complete", "sft"): 21.0,
            ("job", "dpo"): 25.0,
            ("finished", "dpo"): 30.0,
            ("succeeded", ""): 33.0,
        },
        "run-b": {
            ("created", ""): 0.5,
            ("job", "pretrain"): 3.5,
            ("finished", "pretrain"): 11.0,
            ("complete", "pretrain"): 11.5,
            ("job", "sft"): 12.0,
        },
    }
    for run, marks in events.items():
        for (kind, stage), t in marks.items():
            tl.mark(kind, run, stage, t)
    return tl


def test_latencies_split_each_transition_between_job_controller_and_operator() -> None:
    lat = scale.latencies(_timeline(), ["run-a", "run-b"])
    assert lat["create_to_first_job_s"] == {"n": 2, "p50": 1.0, "p99": 3.0, "max": 3.0}
    # run-a: pretrain->sft 3 s, sft->dpo 5 s; run-b: pretrain->sft 1 s.
    assert lat["transition_s"] == {"n": 3, "p50": 3.0, "p99": 5.0, "max": 5.0}
    assert lat["transition_job_controller_share_s"]["n"] == 3
    assert lat["transition_job_controller_share_s"]["max"] == 2.0
    assert lat["transition_operator_share_s"] == {"n": 3, "p50": 1.0, "p99": 4.0, "max": 4.0}
    assert lat["last_pod_finished_to_run_succeeded_s"] == {
        "n": 1,
        "p50": 3.0,
        "p99": 3.0,
        "max": 3.0,
    }


def test_first_event_wins() -> None:
    tl = scale.Timeline()
    tl.mark("job", "r", "pretrain", 5.0)
    tl.mark("job", "r", "pretrain", 9.0)
    assert tl.get("job", "r", "pretrain") == 5.0


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 201)]
    assert scale.percentiles(values) == {"n": 200, "p50": 100.0, "p99": 198.0, "max": 200.0}
    assert scale.percentiles([]) == {"n": 0}


def test_rates_leave_out_the_stand_ins_s3_writes() -> None:
    a = scale.Snapshot(100.0, Counter({"GET pods": 10, "LIST jobs": 5}), 50, 1000, 40, 3.0)
    b = scale.Snapshot(
        160.0, Counter({"GET pods": 70, "LIST jobs": 5, "PATCH pods": 6}), 170, 1400, 100, 9.0
    )
    r = scale.rates(a, b, runs=20, poll_seconds=15)
    assert r["seconds"] == 60.0
    assert r["operator_api_per_s"] == 2.0
    assert r["all_clients_api_per_s_by_verb_resource"] == {"GET pods": 1.0, "PATCH pods": 0.1}
    assert r["all_clients_api_per_s"] == 1.1
    # 400 requests at the server, 60 of them the stand-in's: 340 in 60 s.
    assert r["operator_s3_per_s"] == pytest.approx(5.667, abs=1e-3)
    assert r["operator_s3_per_run_per_poll_interval"] == pytest.approx(4.25, abs=1e-3)
    assert r["operator_cpu_cores"] == 0.1


def test_more_runs_than_gpus_is_refused_with_the_numbers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        scale.parse_args(["--runs", "100", "--nodes", "2"])
    assert "--runs 100 needs 100 GPUs at once; --nodes 2 offers 16" in capsys.readouterr().err

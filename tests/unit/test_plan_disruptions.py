"""``kubetrain.operator.plan`` under faults: disruptions are not failures, the store has
three answers, children are checked to be the run's, and what only the operator may
write lives in status. Each test plays the cluster's part in a ``World`` and states
what a user would notice."""

from __future__ import annotations

import copy
import json
from typing import Any

from kubetrain.core.conditions import ConditionType, Reason
from kubetrain.operator import plan as planner
from kubetrain.operator import resources
from tests.unit.planworld import World, manifest


def running(**spec: Any) -> World:
    """pretrain (2 nodes, maxRestarts 2) trains, at step 40 of 100."""
    w = World(manifest(**spec))
    w.reconcile()
    w.pods_running("pretrain")
    w.tick(60)
    w.progress("pretrain", step=40, total=100)
    w.reconcile()
    return w


def reasons(p: planner.Plan) -> list[str]:
    return [e.reason for e in p.events]


def condition(w: World, type_: str) -> tuple[str, str, str]:
    cond = w.condition(type_)
    assert cond is not None, f"no condition {type_}: {w.status.get('conditions')}"
    return cond["status"], cond["reason"], cond["message"]


def counts(w: World) -> tuple[int, int]:
    st = w.stage_status("pretrain")
    return st.get("restarts", 0), st.get("preemptions", 0)


def finish(w: World) -> planner.Plan:
    """The (current) pretrain Job completes with FINAL."""
    w.progress("pretrain", step=100, total=100, final=True)
    w.job_finished("pretrain", ok=True)
    return w.reconcile()


# --------------------------------------------------------------------------- disruptions


def test_evicted_pod_is_a_preemption_the_job_controller_replaces() -> None:
    w = running()
    w.pod_evicted("pretrain", 0)
    p = w.reconcile()
    assert counts(w) == (0, 1)
    assert reasons(p) == [Reason.STAGE_PREEMPTED]
    assert "DisruptionTarget: Eviction API: evicting" in p.events[0].message
    assert p.delete == [] and p.create == []  # the Job controller replaces the pod
    status, reason, message = condition(w, ConditionType.RESTARTING)
    assert (status, reason) == ("True", Reason.PREEMPTED)
    assert "preemption 1" in message and "last checkpoint" in message
    assert w.status["phase"] == "Pending"  # a gang with a rank on its way out
    w.reconcile()
    assert condition(w, ConditionType.RESTARTING)[0] == "True"

    # The gang stops at the same step: both ranks exit with the checkpoint code. One
    # disruption, one preemption.
    w.pod_checkpointed("pretrain", 0)
    w.pod_checkpointed("pretrain", 0)  # and the other rank: the gang stops together
    w.reconcile()
    assert counts(w) == (0, 1)

    # The replacements run.
    w.tick(30)
    w.pods_running("pretrain")
    w.progress("pretrain", step=45, total=100)
    w.reconcile()
    assert w.stage_status("pretrain")["ledger"].get("disruptedJob") is None
    assert condition(w, ConditionType.RESTARTING)[:2] == ("False", Reason.RESTARTED)
    assert w.status["phase"] == "Running"
    finish(w)
    assert w.stage_status("pretrain")["phase"] == "Succeeded" and counts(w) == (0, 1)


def test_checkpoint_exit_code_alone_is_a_preemption() -> None:
    """Queue preemption or a SIGTERM from anyone: no DisruptionTarget, but the trainer
    says it stopped after a complete checkpoint."""
    w = running()
    w.pod_checkpointed("pretrain", 1)
    p = w.reconcile()
    assert counts(w) == (0, 1) and reasons(p) == [Reason.STAGE_PREEMPTED]
    assert "exit code 75" in p.events[0].message


def test_a_drained_gang_whose_other_rank_failed_is_a_preemption() -> None:
    """One node drained, the other rank fails with an ordinary code, the Job fails:
    the attempt is a preemption, restarted at once, never a failure."""
    w = running()
    w.pod_evicted("pretrain", 0)
    w.pod_exited("pretrain", 1, 1)
    w.job_finished("pretrain", ok=False, message="Pod demo-pretrain-1 failed")
    p = w.reconcile()
    assert counts(w) == (0, 1)
    assert [f"{d.kind}/{d.name}" for d in p.delete] == ["Job/demo-pretrain"]
    assert reasons(p) == [Reason.STAGE_PREEMPTED]
    assert w.stage_status("pretrain").get("nextAttemptTime") is None
    assert condition(w, ConditionType.RESTARTING)[1] == Reason.PREEMPTED
    w.job_gone("pretrain")
    p = w.reconcile()  # no backoff after a preemption
    assert [o["kind"] for o in p.create] == ["Service", "Job"]
    assert p.create[1]["metadata"]["annotations"][resources.ANNOTATION_ATTEMPT] == "0"


def test_a_disruption_seen_earlier_explains_the_gangs_failure_later() -> None:
    """The evicted pod is gone by the time the other rank's failure fails the Job: the
    disruption recorded while it was visible still makes it a preemption, counted once."""
    w = running()
    evicted = w.pod_evicted("pretrain", 0)
    w.reconcile()
    w.pods.remove(evicted)
    w.pod_exited("pretrain", 0, 1)
    w.job_finished("pretrain", ok=False, message="Pod demo-pretrain-1 failed")
    w.reconcile()
    assert counts(w) == (0, 1)
    w.reconcile()  # the same failed Job observed again: nothing counted twice
    assert counts(w) == (0, 1)


def test_every_drain_of_a_long_running_job_counts_once() -> None:
    """The Job controller keeps the replaced pods (terminated) as long as the Job lives:
    many disruptions later, each one has still been counted exactly once."""
    w = running()
    for n in range(1, 41):
        w.pod_evicted("pretrain", 0)
        w.reconcile()
        w.pod_checkpointed("pretrain", 0)  # the gang stops together
        w.pod_checkpointed("pretrain", 0)
        w.reconcile()
        w.tick(30)
        w.pods_running("pretrain", keep_old=True)
        w.reconcile()
        w.tick(300)
        w.reconcile()
        assert counts(w) == (0, n)
    assert len(w.pods_of("pretrain")) == 2 * 41
    assert condition(w, ConditionType.RESTARTING)[:2] == ("False", Reason.RESTARTED)


def test_a_failure_after_the_gang_recovered_is_a_failure() -> None:
    """Once a new gang runs in place of the disrupted one, a later failure is the
    stage's own, not the disruption's aftermath."""
    w = running()
    w.pod_evicted("pretrain", 0)
    w.pod_checkpointed("pretrain", 0)
    w.pod_checkpointed("pretrain", 0)  # and the other rank: the gang stops together
    w.reconcile()
    w.tick(30)
    w.pods_running("pretrain")  # the replacements, created after the eviction
    w.reconcile()
    w.tick(600)
    w.pod_exited("pretrain", 1, 1)
    w.job_finished("pretrain", ok=False, message="Pod demo-pretrain-1 exit code 1")
    w.reconcile()
    assert counts(w) == (1, 1)
    assert condition(w, ConditionType.RESTARTING)[1] == Reason.FAILURE_BACKOFF


def test_preemptions_never_use_up_max_restarts() -> None:
    w = running()  # maxRestarts: 2
    for n in range(1, 6):
        w.pod_evicted("pretrain", 0)
        w.pod_exited("pretrain", 1, 1)
        w.job_finished("pretrain", ok=False, message="rank 1 lost its peer")
        w.reconcile()
        w.job_gone("pretrain")
        w.reconcile()
        w.pods_running("pretrain")
        w.tick(60)
        w.progress("pretrain", step=40 + n, total=100)
        w.reconcile()
    assert counts(w) == (0, 5) and w.status["phase"] == "Running"
    assert w.condition(ConditionType.FAILED) is None


def test_stopping_the_run_is_not_a_preemption() -> None:
    """Suspend deletes the Job; its pods checkpoint and exit 75: not counted."""
    w = running()
    w.run["spec"]["suspend"] = True
    w.reconcile()
    w.pod_checkpointed("pretrain", 0)
    w.pod_checkpointed("pretrain", 0)  # and the other rank: the gang stops together
    w.reconcile()
    assert counts(w) == (0, 0) and w.status["phase"] == "Suspended"


# --------------------------------------------------------------------------- failures


def test_real_failure_restarts_after_an_exponential_backoff() -> None:
    w = running()
    w.job_finished("pretrain", ok=False, message="Pod demo-pretrain-0 exit code 1")
    p = w.reconcile()
    assert counts(w) == (1, 0) and p.requeue_after == 10
    status, reason, message = condition(w, ConditionType.RESTARTING)
    assert (status, reason) == ("True", Reason.FAILURE_BACKOFF)
    assert "attempt 2" in message and "in 10s" in message and "exit code 1" in message
    w.reconcile()  # the failed Job is being deleted: still restarting, counted once
    assert condition(w, ConditionType.RESTARTING)[0] == "True" and counts(w) == (1, 0)
    w.job_gone("pretrain")
    w.tick(4)
    p = w.reconcile()
    assert p.create == [] and p.requeue_after == 6
    assert "in 6s" in condition(w, ConditionType.RESTARTING)[2]
    assert condition(w, ConditionType.RUNNING)[1] == Reason.FAILURE_BACKOFF
    w.tick(6)
    p = w.reconcile()
    assert [o["kind"] for o in p.create] == ["Service", "Job"] and p.requeue_after is None
    assert condition(w, ConditionType.RESTARTING)[0] == "True"  # pods not running yet
    w.pods_running("pretrain")
    w.reconcile()
    assert condition(w, ConditionType.RESTARTING)[:2] == ("False", Reason.RESTARTED)

    # The second failure waits twice as long.
    w.job_finished("pretrain", ok=False, message="OOMKilled")
    p = w.reconcile()
    assert counts(w) == (2, 0) and p.requeue_after == 20


def test_backoff_is_capped() -> None:
    w = running()
    w.config = w.config.model_copy(
        update={"restart_backoff_seconds": 100, "restart_backoff_max_seconds": 150}
    )
    w.run["spec"]["stages"][0]["maxRestarts"] = 5
    delays = []
    for _ in range(3):
        w.job_finished("pretrain", ok=False, message="OOMKilled")
        delays.append(w.reconcile().requeue_after)
        w.job_gone("pretrain")
        w.tick(150)
        w.reconcile()
        w.pods_running("pretrain")
    assert delays == [100, 150, 150]


# --------------------------------------------------------------------------- the store


def test_unknown_store_never_tears_down_a_completed_job() -> None:
    w = running()
    w.job_finished("pretrain", ok=True)  # FINAL written, but the store cannot say so
    w.store_down("pretrain", "cannot reach the S3 endpoint http://s3.local:9000")
    p = w.reconcile()
    assert p.delete == [] and p.create == []
    assert counts(w) == (0, 0)
    assert w.stage_status("pretrain").get("completedWithoutFinal", 0) == 0
    status, reason, message = condition(w, ConditionType.STORAGE_REACHABLE)
    assert (status, reason) == ("False", Reason.STORE_UNREACHABLE)
    assert "cannot reach the S3 endpoint http://s3.local:9000" in message
    assert "s3-creds" not in message
    assert reasons(p) == [Reason.STORE_UNREACHABLE]
    assert "waiting for the store to confirm FINAL" in w.stage_status("pretrain")["message"]
    w.tick(600)
    p = w.reconcile()  # still down: no new warning, still nothing done
    assert p.delete == [] and p.events == []

    # The store answers again, FINAL is there: the stage succeeds, nothing ran twice.
    w.progress("pretrain", step=100, total=100, final=True)
    p = w.reconcile()
    assert w.stage_status("pretrain")["phase"] == "Succeeded"
    assert condition(w, ConditionType.STORAGE_REACHABLE)[:2] == ("True", Reason.STORE_REACHABLE)
    assert [o["metadata"]["name"] for o in p.create] == ["demo-sft", "demo-sft"]


def test_unknown_store_leaves_a_running_stage_alone() -> None:
    w = running()
    w.store_down("pretrain")
    w.tick(w.config.stall_timeout_seconds + 60)
    p = w.reconcile()
    assert p.delete == [] and w.status["phase"] == "Running"
    assert w.condition(ConditionType.STALLED) is None  # no record is not "no progress"
    assert w.stage_status("pretrain")["step"] == 40


def test_completed_without_final_is_counted_and_capped() -> None:
    w = running()
    cap = w.config.max_completed_without_final
    for n in range(1, cap):
        w.job_finished("pretrain", ok=True)  # store: FINAL absent
        p = w.reconcile()
        assert w.stage_status("pretrain")["completedWithoutFinal"] == n
        assert reasons(p) == [Reason.STAGE_INTERRUPTED]
        assert [f"{d.kind}/{d.name}" for d in p.delete] == ["Job/demo-pretrain"]
        assert condition(w, ConditionType.RESTARTING)[1] == Reason.COMPLETED_WITHOUT_FINAL
        w.job_gone("pretrain")
        w.reconcile()
        w.pods_running("pretrain")
    w.job_finished("pretrain", ok=True)
    w.reconcile()
    assert w.status["phase"] == "Failed"
    status, reason, message = condition(w, ConditionType.FAILED)
    assert (status, reason) == ("True", Reason.COMPLETED_WITHOUT_FINAL)
    assert f"{cap} in a row" in message
    assert counts(w) == (0, 0)


def test_completed_without_final_counts_once_per_job() -> None:
    w = running()
    w.job_finished("pretrain", ok=True)
    w.reconcile()
    w.jobs["demo-pretrain"]["metadata"].pop("deletionTimestamp")  # the delete got lost
    w.reconcile()
    assert w.stage_status("pretrain")["completedWithoutFinal"] == 1


# --------------------------------------------------------------------------- children


def test_job_deleted_by_hand_is_recreated_only_after_its_pods_are_gone() -> None:
    w = running()
    job = w.job("pretrain")
    del w.jobs[job["metadata"]["name"]]  # kubectl delete job: pods terminate on their own
    for pod in w.pods:
        pod["metadata"]["deletionTimestamp"] = "2025-01-01T12:01:00Z"
    p = w.reconcile()
    assert p.create == []
    message = w.stage_status("pretrain")["message"]
    assert message.startswith("waiting for pods of an earlier Job to stop")
    assert "terminating" in message
    w.pods = []
    p = w.reconcile()
    assert [o["kind"] for o in p.create] == ["Service", "Job"]


def test_orphaned_pods_block_the_new_job_and_say_how_to_fix_it() -> None:
    w = running()
    del w.jobs["demo-pretrain"]  # kubectl delete job --cascade=orphan
    p = w.reconcile()
    assert p.create == []
    assert "--cascade=orphan" in w.stage_status("pretrain")["message"]


def _foreign_job(w: World) -> dict[str, Any]:
    """A Job named like pretrain's, labelled like the run's children, but controlled by
    another TrainingRun (say, a deleted run of the same name)."""
    theirs = copy.deepcopy(w.created[1])
    assert theirs["kind"] == "Job"
    theirs["metadata"]["uid"] = "someone-elses-job"
    theirs["metadata"]["ownerReferences"][0]["uid"] = "old-run-uid"
    theirs["status"] = {"active": 1}
    return theirs


def test_foreign_job_with_our_name_is_reported_never_adopted() -> None:
    w = World(manifest())
    w.reconcile()
    theirs = _foreign_job(w)
    w.jobs = {"demo-pretrain": theirs}
    w.run["metadata"]["uid"] = "new-run-uid"  # the run was deleted and created again
    for svc in w.services.values():
        svc["metadata"]["ownerReferences"][0]["uid"] = "new-run-uid"
    p = w.reconcile()
    assert p.create == [] and p.delete == []
    status, reason, message = condition(w, ConditionType.CHILD_CONFLICT)
    assert (status, reason) == ("True", Reason.NOT_OWNED)
    assert "Job ml/demo-pretrain" in message and "old-run-uid" in message
    assert [(e.type, e.reason) for e in p.events] == [("Warning", Reason.NOT_OWNED)]
    assert "Job ml/demo-pretrain" in p.events[0].message
    assert w.reconcile().events == []  # warned once

    # Not stopped either: suspending the run leaves the foreign Job alone.
    w.run["spec"]["suspend"] = True
    assert all(d.name != "demo-pretrain" or d.kind != "Job" for d in w.reconcile().delete)
    w.run["spec"]["suspend"] = False

    del w.jobs["demo-pretrain"]  # its owner's garbage collection
    p = w.reconcile()
    assert [o["kind"] for o in p.create] == ["Service", "Job"]
    assert p.create[1]["metadata"]["ownerReferences"][0]["uid"] == "new-run-uid"
    assert condition(w, ConditionType.CHILD_CONFLICT)[:2] == ("False", Reason.CHILDREN_OWNED)


def test_foreign_service_is_not_deleted_when_children_expire() -> None:
    w = World(
        manifest(
            ttlSecondsAfterFinished=60,
            stages=[{"name": "sft", "type": "sft", "hyperparameters": {"maxSteps": 10}}],
        )
    )
    w.reconcile()
    w.pods_running("sft")
    w.progress("sft", step=10, total=10, final=True)
    w.job_finished("sft", ok=True)
    w.reconcile()
    w.services["demo-sft"]["metadata"]["ownerReferences"] = []  # someone took it over
    w.tick(61)
    p = w.reconcile()
    assert [f"{d.kind}/{d.name}" for d in p.delete] == ["Job/demo-sft"]


# --------------------------------------------------------------------------- status


def test_tampered_annotation_cannot_unfreeze_a_started_stage() -> None:
    w = running()
    assert planner.ANNOTATION_APPLIED_SPEC not in w.run["metadata"]["annotations"]
    edited = json.loads(w.status["appliedSpec"])
    edited["stages"][0]["hyperparameters"]["maxSteps"] = 500
    w.run["metadata"]["annotations"][planner.ANNOTATION_APPLIED_SPEC] = json.dumps(edited)
    w.run["spec"]["stages"][0]["hyperparameters"]["maxSteps"] = 500
    w.run["metadata"]["generation"] = 2
    p = w.reconcile()
    assert condition(w, ConditionType.SPEC_CHANGE_REFUSED)[0] == "True"
    assert json.loads(w.status["appliedSpec"])["stages"][0]["hyperparameters"]["maxSteps"] == 100
    assert p.annotations == {planner.ANNOTATION_APPLIED_SPEC: None}  # removed, not obeyed
    assert planner.ANNOTATION_APPLIED_SPEC not in w.run["metadata"]["annotations"]


def test_run_from_an_earlier_operator_is_migrated_to_status() -> None:
    """Annotations only (applied spec and GPU-seconds ledger): the first reconcile
    takes both into status, the next removes the annotations."""
    w = running()
    status = w.run["status"]
    applied = status.pop("appliedSpec")
    ledger = status["stages"][0].pop("ledger")
    for st in status["stages"]:
        for key in ("preemptions", "completedWithoutFinal"):
            st.pop(key, None)
    old = json.loads(applied)
    old["stages"][0]["hyperparameters"]["maxSteps"] = 100
    w.run["metadata"]["annotations"] = {
        planner.ANNOTATION_APPLIED_SPEC: json.dumps(old),
        planner.ANNOTATION_LEDGER: json.dumps({"pretrain": {"job": "gone-job", "banked": 5000}}),
    }
    w.run["spec"]["stages"][0]["hyperparameters"]["maxSteps"] = 300  # refused: started
    p = w.reconcile()
    assert json.loads(w.status["appliedSpec"]) == old
    # The annotation's bank (an earlier attempt's GPU-seconds) is kept.
    assert w.stage_status("pretrain")["ledger"]["banked"] == 5000
    assert w.stage_status("pretrain")["gpuSeconds"] > 5000
    assert p.annotations == {}
    assert ledger["job"] == w.stage_status("pretrain")["ledger"]["job"]
    p = w.reconcile()
    assert p.annotations == {
        planner.ANNOTATION_APPLIED_SPEC: None,
        planner.ANNOTATION_LEDGER: None,
    }
    assert w.run["metadata"]["annotations"] == {}
    assert json.loads(w.status["appliedSpec"]) == old

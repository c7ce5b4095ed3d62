"""``kubetrain status`` and ``kubetrain logs``: a user's view of runs on the cluster,
through their own kubeconfig."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kubetrain.core.conditions import ConditionType
from kubetrain.core.errors import UserError


def _namespace(args: argparse.Namespace) -> str | None:
    if getattr(args, "all_namespaces", False):
        return None
    if args.namespace:
        return args.namespace
    from kubernetes import config

    try:
        _, active = config.list_kube_config_contexts()
        return (active.get("context") or {}).get("namespace") or "default"
    except Exception:  # in-cluster or no contexts: the conventional default
        return "default"


def _connect() -> Any:
    from kubetrain.operator import kube

    try:
        kube.load_client_config()
    except kube.NoClusterError as exc:
        raise UserError(str(exc)) from None
    return kube.KubeApi()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 60}m{s % 60}s"


def status_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    """One row per run: namespace, name, phase, stage, progress, ETA, cost, energy."""
    rows = []
    for run in sorted(
        runs, key=lambda r: (r["metadata"].get("namespace", ""), r["metadata"]["name"])
    ):
        st = run.get("status") or {}
        totals = st.get("totals") or {}
        stage = st.get("currentStage") or "-"
        eta = next(
            (
                s.get("etaSeconds")
                for s in st.get("stages") or []
                if s.get("name") == stage and s.get("phase") == "Running"
            ),
            None,
        )
        rows.append(
            [
                run["metadata"].get("namespace", ""),
                run["metadata"]["name"],
                st.get("phase") or "Pending",
                stage,
                st.get("progress") or "-",
                _duration(eta),
                f"${float(totals.get('costUSD') or 0):.2f}",
                f"{float(totals.get('energyJoules') or 0) / 3.6e6:.3g} kWh",
            ]
        )
    return rows


# Conditions in the state that asks for a user's action, listed under the table
# (Suspended is left out: either the user asked for it, or BudgetExceeded says why).
ATTENTION = {
    ConditionType.FAILED: "True",
    ConditionType.SPEC_CHANGE_REFUSED: "True",
    ConditionType.BUDGET_EXCEEDED: "True",
    ConditionType.STALLED: "True",
    ConditionType.STORAGE_CONFIGURED: "False",
    ConditionType.STORAGE_REACHABLE: "False",
    ConditionType.CHILD_CONFLICT: "True",
}


def attention_lines(runs: list[dict[str, Any]]) -> list[str]:
    """One line per condition that needs a user's attention:
    ``namespace/name: Type (Reason): message``."""
    lines = []
    for run in sorted(
        runs, key=lambda r: (r["metadata"].get("namespace", ""), r["metadata"]["name"])
    ):
        meta = run["metadata"]
        for cond in (run.get("status") or {}).get("conditions") or []:
            if ATTENTION.get(cond.get("type")) == cond.get("status"):
                lines.append(
                    f"{meta.get('namespace', '')}/{meta['name']}: {cond['type']} "
                    f"({cond.get('reason', '')}): {cond.get('message', '')}"
                )
    return lines


def model_lines(runs: list[dict[str, Any]]) -> list[str]:
    """One line per stage that exported a Hugging Face model (``status.stages[].hfModel``):
    ``namespace/name stage: URI``, what a person loads or serves next."""
    lines = []
    for run in sorted(
        runs, key=lambda r: (r["metadata"].get("namespace", ""), r["metadata"]["name"])
    ):
        meta = run["metadata"]
        for stage in (run.get("status") or {}).get("stages") or []:
            if stage.get("hfModel"):
                lines.append(
                    f"{meta.get('namespace', '')}/{meta['name']} {stage.get('name')}: "
                    f"Hugging Face model {stage['hfModel']}"
                )
    return lines


def render_table(rows: list[list[str]]) -> str:
    header = ["NAMESPACE", "NAME", "PHASE", "STAGE", "PROGRESS", "ETA", "COST", "ENERGY"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    )


def cli_status(args: argparse.Namespace) -> int:
    """Print a table of runs (or one run)."""
    from kubernetes.client.exceptions import ApiException

    kube = _connect()
    ns = _namespace(args)
    try:
        if args.run:
            run = kube.get_run(ns or "default", args.run)
            if run is None:
                raise UserError(
                    f"TrainingRun {args.run!r} not found in namespace {ns or 'default'!r}"
                )
            runs = [run]
        else:
            runs = kube.list_runs(ns)
    except ApiException as exc:
        raise UserError(f"the cluster refused the request: {exc.status} {exc.reason}") from None
    except OSError as exc:
        raise UserError(f"cannot reach the cluster: {exc}") from None
    if not runs:
        print("No TrainingRuns found" + (f" in namespace {ns!r}" if ns else ""))
        return 0
    print(render_table(status_rows(runs)))
    models = model_lines(runs)
    if models:
        print("\n" + "\n".join(models))
    notes = attention_lines(runs)
    if notes:
        print("\n" + "\n".join(notes))
    return 0


def cli_logs(args: argparse.Namespace) -> int:
    """Follow the log of rank 0 of the run's active (or named) stage."""
    from kubernetes.client.exceptions import ApiException

    from kubetrain.operator.resources import LABEL_RUN, LABEL_STAGE

    kube = _connect()
    ns = _namespace(args) or "default"
    run = kube.get_run(ns, args.run)
    if run is None:
        raise UserError(f"TrainingRun {args.run!r} not found in namespace {ns!r}")
    stage = args.stage or (run.get("status") or {}).get("currentStage")
    if not stage:
        raise UserError(f"TrainingRun {args.run!r} has not started a stage yet")
    selector = f"{LABEL_RUN}={args.run},{LABEL_STAGE}={stage}"
    pods = kube.core.list_namespaced_pod(ns, label_selector=selector).items
    if not pods:
        raise UserError(
            f"no pods for stage {stage!r} of {args.run!r} (finished and cleaned "
            "up, or not scheduled yet)"
        )

    def rank(pod: Any) -> tuple[int, str]:
        index = (pod.metadata.annotations or {}).get(
            "batch.kubernetes.io/job-completion-index", "0"
        )
        alive = 0 if pod.status.phase in ("Running", "Pending") else 1
        return (alive, f"{int(index) if index.isdigit() else 0:06d}{pod.metadata.name}")

    pod = sorted(pods, key=rank)[0]
    try:
        stream = kube.core.read_namespaced_pod_log(
            pod.metadata.name, ns, container="trainer", follow=args.follow, _preload_content=False
        )
        for chunk in stream.stream():
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
    except ApiException as exc:
        raise UserError(f"cannot read the log of {pod.metadata.name}: {exc.reason}") from None
    return 0

"""`kubetrain run FILE --local` as a command: checks, the runner, the closing summary
and report. The runner itself is :mod:`kubetrain.local.runner`."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from kubetrain.core import accounting, contract, layout
from kubetrain.core.api import TrainingRun
from kubetrain.core.architecture import Architecture, ArchitectureMismatch, describe, of_run
from kubetrain.core.errors import UserError
from kubetrain.core.manifest import load_manifest
from kubetrain.core.store import ObjectStore, StoreError
from kubetrain.local.collector import serve_metrics
from kubetrain.local.display import Display, make_display
from kubetrain.local.runner import (
    INSTALL_TRAINER,
    STATE_DIR,
    TRAINER_MODULE,
    LocalRunner,
    StageOutcome,
    free_port,
    port_free,
    resolve_store_root,
)

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def check_trainer_installed() -> None:
    """Fail in one line, before anything starts, when this Python cannot train."""
    if importlib.util.find_spec("torch") is None:
        raise UserError(
            f"PyTorch is not installed for {sys.executable}, and local runs "
            f"train with it: {INSTALL_TRAINER}"
        )
    if importlib.util.find_spec(TRAINER_MODULE) is None:
        raise UserError(f"the trainer package is not installed: {INSTALL_TRAINER}")


def check_store(store: ObjectStore, uri: str) -> None:
    """Touch the store once up front so an unreachable S3 is one line, not a traceback."""
    try:
        store.exists(layout.PROGRESS)
    except StoreError as exc:
        raise UserError(f"store {uri}: {exc}") from None
    except Exception as exc:
        # botocore's credential and connection errors are not StoreErrors.
        name = type(exc).__name__
        if name == "NoCredentialsError":
            raise UserError(
                f"store {uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (and KUBETRAIN_S3_ENDPOINT for a "
                "non-AWS store), or drop --store to use a local folder"
            ) from None
        raise UserError(f"store {uri}: {name}: {exc}") from None


def cli_run(args: argparse.Namespace) -> int:
    """``kubetrain run FILE --local``; returns the exit code."""
    run = load_manifest(args.file)
    check_trainer_installed()
    store_root = resolve_store_root(args.store)
    out = sys.stdout
    name = run.metadata.name
    display = make_display(args.plain)
    try:
        runner = LocalRunner(run, store_root, display, log_dir=Path(STATE_DIR) / "logs" / name)
    except (StoreError, ValueError) as exc:
        display.close()
        raise UserError(f"--store {store_root}: {exc}") from None
    try:
        check_store(runner.store, store_root)
    except UserError:
        display.close()
        raise
    stop_metrics: Callable[[], None] | None = None
    if args.metrics_port:
        try:
            stop_metrics = serve_metrics(runner.collector, args.metrics_port)
        except UserError:
            display.close()
            raise
        trainer_port = args.metrics_port + 1
        runner.trainer_metrics_port = trainer_port if port_free(trainer_port) else free_port()
    try:
        try:
            _intro(runner, display, args)
        except UserError:
            display.close()
            raise
        outcomes = runner.execute()
        return _conclude(runner, display, outcomes, args, out)
    finally:
        display.close()
        if stop_metrics is not None:
            stop_metrics()


def run_architecture(run: TrainingRun) -> Architecture:
    """What the run trains (a Hugging Face ``model.from`` is read for its config.json),
    so a wrong folder or a contradicting model field stops the run before it starts."""
    s3 = contract.s3_endpoint()
    try:
        return of_run(run.spec, endpoint=s3.endpoint, region=s3.region)
    except ArchitectureMismatch as exc:
        raise UserError(str(exc)) from None
    except (StoreError, OSError, ValueError) as exc:
        raise UserError(f"model.from {run.spec.model.from_}: {exc}") from None


def _intro(runner: LocalRunner, display: Display, args: argparse.Namespace) -> None:
    run = runner.run
    stages = " -> ".join(s.name for s in run.spec.stages)
    arch = run_architecture(run)
    params = accounting.parameter_count(arch)
    folder = runner.store.uri(layout.run_folder(run.metadata.namespace, run.metadata.name)) + "/"
    display.message(
        f"kubetrain: run {run.metadata.name!r}, {params / 1e6:.2f}M parameters "
        f"({describe(arch)}), stages {stages}"
    )
    display.message(f"  checkpoints: {folder}")
    s3 = run.spec.storage.s3
    if s3 is not None and not args.store:
        display.message(
            f"  (the manifest's {s3.uri()} is used on a cluster; pass --store "
            f"{s3.uri()} to use it here)"
        )
    if args.metrics_port:
        display.message(
            f"  metrics:     http://127.0.0.1:{args.metrics_port}/metrics "
            f"(trainer: http://127.0.0.1:{runner.trainer_metrics_port}/metrics)"
        )
    display.message(f"  logs:        {runner.log_dir}/")


def _conclude(
    runner: LocalRunner,
    display: Display,
    outcomes: list[StageOutcome],
    args: argparse.Namespace,
    out: TextIO,
) -> int:
    run = runner.run
    again = f"kubetrain run {args.file} --local" + (f" --store {args.store}" if args.store else "")
    last = outcomes[-1] if outcomes else None
    if last is not None and last.result == "interrupted":
        where = ""
        if last.record is not None and last.record.checkpoint:
            where = f"; last checkpoint {last.record.checkpoint}"
        display.close()
        print(
            f"kubetrain: interrupted in stage {last.name!r}{where}; continue with: {again}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if last is not None and last.result == "failed":
        display.close()
        print(f"kubetrain: stage {last.name!r} failed: {last.reason}", file=sys.stderr)
        print(f"kubetrain: fix it, then continue with: {again}", file=sys.stderr)
        return EXIT_FAILED

    display.summary(
        f"TrainingRun {run.metadata.name!r}: all {len(run.spec.stages)} stages complete",
        runner.summary_lines(),
    )
    display.close()
    if outcomes and all(o.result == "skipped" for o in outcomes):
        folder = runner.store.uri(layout.run_folder(run.metadata.namespace, run.metadata.name))
        if folder.startswith("file://"):
            folder = os.path.relpath(folder.removeprefix("file://"))
        print(
            f"(nothing to train: every stage was already complete; to train again from "
            f"scratch, delete {folder})",
            file=out,
        )
    try:
        from kubetrain.local.report import write_report

        path = write_report(
            runner.store,
            run.metadata.namespace,
            run.metadata.name,
            Path(STATE_DIR) / "reports" / run.metadata.name,
            spec=run.spec,
        )
        print(f"report: {path}  (loss curves: {path.parent / 'loss.png'})", file=out)
    except ImportError:
        print(
            "report: skipped, matplotlib is not installed: pip install 'kubetrain[local]'", file=out
        )
    return 0

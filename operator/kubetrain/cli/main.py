"""`kubetrain`: one command for everything a user does.

Each subcommand's work lives in the module that owns it; this file only parses
arguments and turns expected failures into one clear line and a non-zero exit code.
Heavy imports (torch, kubernetes, boto3) happen inside the subcommands so that
`kubetrain validate` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kubetrain.core import contract
from kubetrain.core.accounting import MeasuredMFU
from kubetrain.core.errors import UserError
from kubetrain.core.manifest import load_manifest
from kubetrain.core.store import StoreError, open_store


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """``module:function``, imported only when the subcommand runs."""

    def call(args: argparse.Namespace) -> int:
        module, func = target.split(":")
        return int(getattr(importlib.import_module(module), func)(args) or 0)

    return call


def cmd_validate(args: argparse.Namespace) -> int:
    for path in args.files:
        run = load_manifest(path)
        print(
            f"{path}: TrainingRun {run.metadata.name!r} is valid "
            f"({len(run.spec.stages)} stages: "
            f"{' -> '.join(f'{s.name} ({s.type.value})' for s in run.spec.stages)})"
        )
    return 0


def cmd_crd(args: argparse.Namespace) -> int:
    from kubetrain.core.crd import render_crd

    text = render_crd()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    from kubetrain.docgen.fields import field_reference

    sys.stdout.write(field_reference())
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from kubetrain.cli import estimate

    if args.file:
        if args.params or args.tokens:
            raise UserError("give either a manifest FILE or --params/--tokens, not both")
        run = load_manifest(args.file)
        print(estimate.render_run(run, mfu=args.mfu, measured=_measured_mfu(args)))
        return 0
    if not (args.params and args.tokens):
        raise UserError(
            "give a manifest FILE, or both --params and --tokens "
            "(e.g. --params 70e9 --tokens 15e12 --gpu h100)"
        )
    print(
        estimate.render_params_tokens(
            args.params,
            args.tokens,
            gpu=args.gpu,
            mfu=args.mfu,
            gpus=args.gpus,
            measured=_measured_mfu(args),
        )
    )
    return 0


def _measured_mfu(args: argparse.Namespace) -> dict[str, MeasuredMFU] | None:
    """MFU measured by earlier runs in ``--store`` (default: the local runs' store, when
    there is one); None when the user fixed the MFU."""
    from kubetrain.cli import estimate
    from kubetrain.local.runner import STATE_DIR, default_store_uri, resolve_store_root

    if args.mfu is not None:
        return None
    if args.store is None and not (Path(STATE_DIR) / "store").is_dir():
        return None
    uri = resolve_store_root(args.store) if args.store else default_store_uri()
    s3 = contract.s3_endpoint()
    try:
        store = open_store(uri, endpoint=s3.endpoint, region=s3.region)
        return estimate.measured_mfu(store)
    except (StoreError, OSError, ValueError) as exc:
        raise UserError(f"--store {uri}: cannot read earlier runs' progress: {exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    if not args.local:
        raise UserError(
            f"to run {args.file} on this machine add --local; to run it on a "
            f"cluster with the operator installed: kubectl apply -f {args.file}"
        )
    return _lazy("kubetrain.local.command:cli_run")(args)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 7e9)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetrain",
        description="Run LLM training curricula (pretrain -> sft -> dpo -> grpo) on Kubernetes or "
        "locally, and see progress, energy, cost and CO2 as they happen.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check manifests without a cluster")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("estimate", help="size, FLOPs, GPU-hours, cost, energy, CO2 up front")
    p.add_argument("file", nargs="?", metavar="FILE", help="a TrainingRun manifest")
    p.add_argument("--params", type=_positive_float, help="parameters, e.g. 70e9")
    p.add_argument("--tokens", type=_positive_float, help="training tokens, e.g. 15e12")
    p.add_argument("--gpu", default="h100", help="accelerator type (default h100)")
    p.add_argument(
        "--gpus", type=int, default=1, help="accelerators in parallel, for wall time (default 1)"
    )
    p.add_argument(
        "--mfu",
        type=float,
        default=None,
        help="model FLOPs utilisation to assume (default: what earlier runs in --store "
        "measured on that gpu type, else a default calibrated against published runs)",
    )
    p.add_argument(
        "--store",
        help="where earlier runs' progress records are, for their measured MFU: "
        "s3://BUCKET/PREFIX or a folder (default .kubetrain/store, when it exists)",
    )
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("crd", help="print the CustomResourceDefinition")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("docs", help="print the manifest field reference (Markdown)")
    p.set_defaults(func=cmd_docs)

    p = sub.add_parser("run", help="run a manifest's stages (--local: on this machine)")
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--local",
        action="store_true",
        help="run on this machine (on a cluster: kubectl apply -f FILE)",
    )
    p.add_argument(
        "--store",
        help="checkpoint store: s3://BUCKET/PREFIX or a folder "
        "(default file://.kubetrain/store; the manifest's S3 is for clusters)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9400,
        help="Prometheus endpoint on localhost (0: off; default 9400)",
    )
    p.add_argument("--plain", action="store_true", help="plain lines instead of live display")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="HTML report with curves of a run")
    p.add_argument("run", metavar="RUN", help="run name (or a manifest file)")
    p.add_argument("--store", help="store URI (default file://.kubetrain/store)")
    p.add_argument("--namespace", default="default")
    p.add_argument("-o", "--output", help="output folder (default .kubetrain/reports/RUN)")
    p.set_defaults(func=_lazy("kubetrain.local.report:cli_report"))

    p = sub.add_parser("status", help="runs on the cluster: phase, stage, progress, cost")
    p.add_argument("run", nargs="?", metavar="RUN")
    p.add_argument("-n", "--namespace", default=None)
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.set_defaults(func=_lazy("kubetrain.cli.cluster:cli_status"))

    p = sub.add_parser("logs", help="follow the active trainer pod of a run")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--stage", help="stage name (default: the active one)")
    p.add_argument("-n", "--namespace", default=None)
    p.add_argument("-f", "--follow", action="store_true", default=True)
    p.set_defaults(func=_lazy("kubetrain.cli.cluster:cli_logs"))

    p = sub.add_parser("operator", help="run the operator (what the Helm chart runs)")
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable); default: all namespaces",
    )
    p.add_argument("--config", help="operator configuration YAML (chart values)")
    p.add_argument("--metrics-port", type=int, default=8080)
    p.add_argument("--liveness-port", type=int, default=8081)
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube)")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_lazy("kubetrain.operator.main:cli_operator"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args: Any = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"kubetrain: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kubetrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

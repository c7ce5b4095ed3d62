"""`kubetrain report RUN`: the curves of a run as one self-contained HTML file.

Everything comes from the trainer's ``metrics.jsonl`` history in the store (the same
records the live display showed), so a report can be made for a run that finished
long ago, on another machine, or on a cluster (``--store s3://...``). The PNGs are
embedded in the HTML as base64 (the file can be mailed or attached to an issue) and
also written beside it; ``loss.png`` is the picture the README shows.

The x axis is the curriculum step (steps of earlier stages added), so the stages read
left to right as they ran, each in its own colour with its boundary marked.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from kubetrain.core import contract, layout
from kubetrain.core.api import TrainingRunSpec
from kubetrain.core.layout import StageLayout
from kubetrain.core.records import MetricsLine, read_metrics, read_progress
from kubetrain.core.store import ObjectStore, StoreError, open_store
from kubetrain.local.display import SUMMARY_COLUMNS, stage_line, summary_rows
from kubetrain.local.runner import record_cost

# (title, y label, the value of a history line or None)
Panel = tuple[str, str, Callable[[MetricsLine], float | None]]
PANELS: list[Panel] = [
    ("loss", "training loss", lambda m: m.loss),
    ("eval", "evaluation accuracy", lambda m: m.eval.get("accuracy")),
    ("reward", "grpo reward (mean)", lambda m: m.train.get("reward")),
    ("throughput", "tokens / second", lambda m: m.tokens_per_second),
    ("energy", "energy (kJ, cumulative per stage)", lambda m: m.energy_joules / 1000.0),
]


def one_per_step(lines: Sequence[MetricsLine]) -> list[MetricsLine]:
    """The lines of one history, one per step, sorted by step.

    A resumed stage repeats the steps after its last checkpoint; the later line of a
    step wins, because that is the attempt whose weights the stage kept.
    """
    by_step = {line.step: line for line in lines}
    return [by_step[s] for s in sorted(by_step)]


def discover_stages(store: ObjectStore, namespace: str, run: str) -> list[str]:
    """Stage folders of a run that have a history, in the order they started."""
    prefix = layout.run_folder(namespace, run) + "/"
    names = set()
    for key in store.list(prefix):
        parts = key[len(prefix) :].split("/")
        if len(parts) == 2 and parts[1] == layout.METRICS:
            names.add(parts[0])

    def started(name: str) -> str:
        record = read_progress(store, StageLayout.of(namespace, run, name).progress)
        return (record.started_at if record is not None else None) or ""

    return sorted(names, key=lambda n: (started(n), n))


def load_histories(
    store: ObjectStore, namespace: str, run: str, stages: Sequence[str]
) -> dict[str, list[MetricsLine]]:
    out = {}
    for name in stages:
        lines = read_metrics(store, StageLayout.of(namespace, run, name).metrics)
        if lines:
            out[name] = one_per_step(lines)
    return out


def _figure(
    histories: Mapping[str, list[MetricsLine]],
    panels: Sequence[Panel],
    title: str,
) -> bytes:
    """One PNG: a panel per metric, the stages side by side on the curriculum step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(panels), 1, figsize=(9, 2.8 * len(panels) + 0.6), sharex=True, squeeze=False
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    offsets, offset = {}, 0
    for name, records in histories.items():
        offsets[name] = offset
        offset += max((r.step for r in records), default=0)
    for ax, (key, label, value) in zip(axes[:, 0], panels, strict=True):
        stage_ends = []
        for i, (name, records) in enumerate(histories.items()):
            points = [(offsets[name] + r.step, v) for r in records if (v := value(r)) is not None]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            sparse = len(points) < 8  # evaluations are few: show them as points
            ax.plot(
                xs, ys, marker="o" if sparse else None, color=colours[i % len(colours)], label=name
            )
            stage_ends.append(points[-1])
            if offsets[name]:
                ax.axvline(offsets[name], color="grey", linewidth=0.8, linestyle=":")
        if key == "eval":
            # Accuracy is a ratio: a fixed 0..1 axis, and a line through each stage's last
            # evaluation so the gain from stage to stage is the picture.
            ax.set_ylim(-0.02, 1.02)
            if len(stage_ends) > 1:
                xs, ys = zip(*stage_ends, strict=True)
                ax.plot(xs, ys, color="grey", linestyle="--", linewidth=1, zorder=0)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(loc="best", fontsize="small")
    axes[-1, 0].set_xlabel("step (over the whole curriculum)")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _summary_html(
    spec: TrainingRunSpec | None,
    store: ObjectStore,
    namespace: str,
    run: str,
    stages: Sequence[str],
) -> str:
    """The same table the runner prints, from the stored progress records."""
    lines = []
    for name in stages:
        record = read_progress(store, StageLayout.of(namespace, run, name).progress)
        cost = co2 = 0.0
        if spec is not None and name in {s.name for s in spec.stages}:
            cost, co2 = record_cost(spec, spec.stage(name), record)
        lines.append(stage_line(name, record, cost_usd=cost, co2_grams=co2))
    columns = [c for c in SUMMARY_COLUMNS if spec is not None or c not in ("cost", "CO2")]
    rows = [
        [cell for col, cell in zip(SUMMARY_COLUMNS, row, strict=True) if col in columns]
        for row in summary_rows(lines)
    ]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(
    store: ObjectStore, namespace: str, run: str, out_dir: Path, spec: TrainingRunSpec | None = None
) -> Path:
    """Write ``report.html``, ``loss.png`` and ``curves.png`` to ``out_dir``; returns the
    HTML's path. Raises FileNotFoundError when the run has no history in the store."""
    stages = (
        [s.name for s in spec.stages]
        if spec is not None
        else discover_stages(store, namespace, run)
    )
    histories = load_histories(store, namespace, run, stages)
    if not histories:
        raise FileNotFoundError(
            f"no metrics for run {run!r} in namespace {namespace!r} under {store.uri()}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    # The reward panel only for runs with a grpo stage.
    panels = [
        p
        for p in PANELS
        if p[0] != "reward" or any(p[2](m) is not None for h in histories.values() for m in h)
    ]
    images = {
        "loss.png": _figure(histories, PANELS[:1], f"{run}: training loss per stage"),
        "curves.png": _figure(
            histories,
            panels,
            f"{run}: {', '.join(key for key, _, _ in panels[:-1])} and {panels[-1][0]}",
        ),
    }
    for name, data in images.items():
        (out_dir / name).write_bytes(data)
    imgs = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"><figcaption>{name}</figcaption></figure>'
        for name, data in images.items()
    )
    table = _summary_html(spec, store, namespace, run, list(histories))
    title = html.escape(f"kubetrain report: {namespace}/{run}")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 64em; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th:first-child, td:first-child, td:last-child {{ text-align: left; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{title}</h1>
<p>Store: <code>{html.escape(store.uri())}</code>. Numbers are the trainer's stored
progress records; curves are its metrics history.</p>
{table}
{imgs}
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def cli_report(args: argparse.Namespace) -> int:
    """``kubetrain report RUN``; RUN is a run name or the manifest file."""
    from kubetrain.core.errors import UserError
    from kubetrain.core.manifest import load_manifest
    from kubetrain.local.runner import resolve_store_root

    spec = None
    name, namespace = args.run, args.namespace
    if args.run.endswith((".yaml", ".yml")) or Path(args.run).is_file():
        manifest = load_manifest(args.run)
        spec, name, namespace = (manifest.spec, manifest.metadata.name, manifest.metadata.namespace)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("reports need matplotlib: pip install 'kubetrain[local]'") from None
    root = resolve_store_root(args.store)
    out_dir = Path(args.output) if args.output else Path(".kubetrain") / "reports" / name
    try:
        s3 = contract.s3_endpoint()
        store = open_store(root, endpoint=s3.endpoint, region=s3.region)
        path = write_report(store, namespace, name, out_dir, spec=spec)
    except FileNotFoundError as exc:
        raise UserError(
            f"{exc} (run it first: kubetrain run FILE --local, or pass --store and --namespace)"
        ) from None
    except (StoreError, ValueError) as exc:
        raise UserError(f"--store {root}: {exc}") from None
    print(f"report: {path}")
    print(f"loss curves: {out_dir / 'loss.png'}")
    return 0

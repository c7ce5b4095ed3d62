"""`kubetrain estimate`: the first questions anyone asks of a training run — how big,
how long, how much — answered as a table before anything runs."""

from __future__ import annotations

import statistics

from kubetrain.core import contract, layout
from kubetrain.core.accounting import (
    MeasuredMFU,
    RunEstimate,
    StageEstimate,
    estimate_params_tokens,
    estimate_run,
    human,
)
from kubetrain.core.api import TrainingRun
from kubetrain.core.architecture import (
    Architecture,
    ArchitectureMismatch,
    builtin,
    describe,
    of_run,
)
from kubetrain.core.errors import UserError
from kubetrain.core.hf_config import ModelConfig
from kubetrain.core.records import RecordFormatError, read_progress
from kubetrain.core.store import ObjectStore, StoreError


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table, right-aligned numbers, readable in any terminal or log."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.1f} s"
    if h < 1:
        return f"{h * 60:.1f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:,.1f} d"


def _row(s: StageEstimate) -> list[str]:
    device = f"{s.gpus}x {s.accelerator}" if s.gpus else "cpu"
    return [
        s.name,
        device,
        f"{s.steps:,}" if s.steps else "-",
        human(s.tokens),
        human(s.flops),
        human(s.gpu_hours),
        _hours(s.wall_hours),
        human(s.energy_kwh),
        f"${s.cost_usd:,.2f}",
        human(s.co2_grams / 1000),
    ]


HEADERS = [
    "stage",
    "device",
    "steps",
    "tokens",
    "FLOPs",
    "GPU-hours",
    "wall time",
    "energy kWh",
    "cost USD",
    "CO2 kg",
]


def _mfu_notes(est: RunEstimate) -> list[str]:
    """One line per accelerator class: the MFU assumed and where it comes from."""
    seen: dict[str, str] = {}
    for s in est.stages:
        seen.setdefault(s.accelerator, f"MFU {s.mfu:.0%} on {s.accelerator} ({s.mfu_source})")
    return list(seen.values())


def render(est: RunEstimate, title: str, flops_rule: str) -> str:
    rows = [_row(s) for s in est.stages]
    if len(est.stages) > 1:
        rows.append(
            [
                "total",
                "",
                "",
                human(est.tokens),
                human(est.flops),
                human(est.gpu_hours),
                _hours(sum(s.wall_hours for s in est.stages)),
                human(est.energy_kwh),
                f"${est.cost_usd:,.2f}",
                human(est.co2_grams / 1000),
            ]
        )
    notes = [
        *_mfu_notes(est),
        *(f"parallelism of {s.name}: {s.parallelism}" for s in est.stages if s.parallelism),
        f"FLOPs = {flops_rule}; GPU-hours at that MFU of peak dense bf16 FLOP/s; "
        "energy includes PUE.",
    ]
    return f"{title}\n\n{table(HEADERS, rows)}\n\n" + "\n".join(notes)


def measured_mfu(store: ObjectStore) -> dict[str, MeasuredMFU]:
    """MFU by accelerator class that completed stages in ``store`` measured (their
    progress records at ``<namespace>/<run>/<stage>/progress.json``): the median."""
    found: dict[str, list[float]] = {}
    for key in store.list():
        if key.count("/") != 3 or not key.endswith("/" + layout.PROGRESS):
            continue
        try:
            record = read_progress(store, key)
        except RecordFormatError:
            continue  # a newer kubetrain's record: not ours to interpret
        if record is None or record.phase != "completed" or not record.mfu:
            continue
        if record.accelerator:
            found.setdefault(record.accelerator, []).append(record.mfu)
    where = store.uri()
    return {acc: MeasuredMFU(statistics.median(v), len(v), where) for acc, v in found.items()}


def model_title(run: TrainingRun, est: RunEstimate, arch: Architecture) -> str:
    origin = f", from {run.spec.model.from_}" if isinstance(arch, ModelConfig) else ""
    return (
        f"TrainingRun {run.metadata.name}: {human(est.parameters)} parameters "
        f"({describe(arch)}{origin})"
    )


def run_architecture(run: TrainingRun) -> tuple[Architecture, str | None]:
    """What the manifest trains, and a note when that is not certain: a Hugging Face
    ``model.from`` is read for its config (with this shell's S3 settings); when it
    cannot be read, a manifest that describes the model itself (layers, heads, dim) is
    estimated as it says, with a note, and one that does not is an error."""
    s3 = contract.s3_endpoint()
    try:
        return of_run(run.spec, endpoint=s3.endpoint, region=s3.region), None
    except ArchitectureMismatch as exc:
        raise UserError(str(exc)) from None
    except (StoreError, OSError, ValueError) as exc:
        reason = str(exc)
    model = run.spec.model
    if model.layers and model.heads and model.dim:
        note = (
            f"model.from {model.from_} could not be read ({reason}): the model is "
            "estimated as the manifest's model fields describe it"
        )
        return builtin(model), note
    raise UserError(
        f"model.from {model.from_}: cannot read its config.json, which gives the model's "
        f"size: {reason} (for s3:// set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, for "
        "a store other than AWS, KUBETRAIN_S3_ENDPOINT; or give model.layers, heads and dim)"
    )


def render_run(
    run: TrainingRun,
    mfu: float | None = None,
    measured: dict[str, MeasuredMFU] | None = None,
) -> str:
    """The estimate table of a manifest."""
    arch, note = run_architecture(run)
    est = estimate_run(run.spec, mfu=mfu, architecture=arch, measured=measured)
    rule = (
        "6·N per token plus the attention term (12·layers·width·seqLen); DPO counts the "
        "chosen and the rejected sequence and the reference model's forward pass"
    )
    text = render(est, model_title(run, est, arch), rule)
    return f"{text}\nNote: {note}." if note else text


def render_params_tokens(
    params: float,
    tokens: float,
    gpu: str = "h100",
    mfu: float | None = None,
    gpus: int = 1,
    measured: dict[str, MeasuredMFU] | None = None,
) -> str:
    """The estimate table for N parameters trained on D tokens."""
    try:
        est = estimate_params_tokens(params, tokens, gpu=gpu, mfu=mfu, gpus=gpus, measured=measured)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return render(
        est,
        f"Pre-training {human(params)} parameters on {human(tokens)} tokens "
        f"({human(tokens / params)} tokens per parameter)",
        "6·N·D (no attention term: it needs the model's shape; give a manifest for it)",
    )

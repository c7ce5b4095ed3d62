"""`kubetrain estimate`: the first questions anyone asks of a training run — how big,
how long, how much — answered as a table before anything runs."""

from __future__ import annotations

from kubetrain.core.accounting import (
    RunEstimate,
    StageEstimate,
    estimate_params_tokens,
    estimate_run,
    human,
)
from kubetrain.core.api import TrainingRun


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


def render(est: RunEstimate, title: str) -> str:
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
    notes = (
        f"Assumes MFU {est.mfu:.0%} of peak dense bf16 FLOP/s; FLOPs = 6·N per token "
        "plus the attention term; energy includes PUE."
    )
    return f"{title}\n\n{table(HEADERS, rows)}\n\n{notes}"


def render_run(run: TrainingRun, mfu: float = 0.4) -> str:
    """The estimate table of a manifest."""
    est = estimate_run(run.spec, mfu=mfu)
    m = run.spec.model
    title = (
        f"TrainingRun {run.metadata.name}: {human(est.parameters)} parameters "
        f"({m.layers} layers, {m.heads} heads, dim {m.dim}, context {m.context_length})"
    )
    return render(est, title)


def render_params_tokens(
    params: float, tokens: float, gpu: str = "h100", mfu: float = 0.4, gpus: int = 1
) -> str:
    """The estimate table for N parameters trained on D tokens."""
    try:
        est = estimate_params_tokens(params, tokens, gpu=gpu, mfu=mfu, gpus=gpus)
    except ValueError as exc:
        from kubetrain.core.errors import UserError

        raise UserError(str(exc)) from None
    return render(
        est,
        f"Pre-training {human(params)} parameters on {human(tokens)} tokens "
        f"({human(tokens / params)} tokens per parameter)",
    )

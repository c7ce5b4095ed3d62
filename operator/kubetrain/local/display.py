"""What a person sees while a local run trains, and the summary at its end.

Two renderings of the same numbers: a live rich display on a terminal, and plain
lines (one per update, rate-limited) when stdout is a pipe, a file or CI, or when
``--plain`` is given. Every number comes from a :class:`StageLine`, built from the
trainer's stored progress record, so the live view, the summary and the report agree.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from kubetrain.core.accounting import JOULES_PER_KWH
from kubetrain.core.records import ProgressRecord


@dataclass(frozen=True)
class StageLine:
    """One stage's numbers at one moment, as shown to the user."""

    name: str
    phase: str  # pending | running | completed | interrupted | failed | skipped
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    reward: float | None = None  # grpo: mean reward of the last step's completions
    tokens: int = 0
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    wall_seconds: float = 0.0
    energy_joules: float = 0.0
    energy_source: str | None = None
    cost_usd: float = 0.0
    co2_grams: float = 0.0
    checkpoint: str | None = None
    hf_model: str | None = None


def stage_line(
    name: str,
    record: ProgressRecord | None,
    *,
    phase: str | None = None,
    cost_usd: float = 0.0,
    co2_grams: float = 0.0,
    eta_seconds: float | None = None,
) -> StageLine:
    """A :class:`StageLine` from a trainer progress record (``progress.json``)."""
    if record is None:
        return StageLine(name, phase or "pending")
    return StageLine(
        name=name,
        phase=phase or record.phase or "running",
        step=record.step,
        total_steps=record.total_steps,
        loss=record.loss,
        accuracy=record.eval.get("accuracy"),
        reward=record.train.get("reward"),
        tokens=record.tokens,
        tokens_per_second=record.tokens_per_second,
        eta_seconds=eta_seconds,
        wall_seconds=record.wall_seconds,
        energy_joules=record.energy_joules,
        energy_source=record.energy_source,
        cost_usd=cost_usd,
        co2_grams=co2_grams,
        checkpoint=record.checkpoint,
        hf_model=record.hf_model,
    )


# --------------------------------------------------------------------------- formatting


def fmt_duration(seconds: float | None) -> str:
    """83 -> '1m23s', 4000 -> '1h06m40s', None -> '-'."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"


def fmt_energy(joules: float, source: str | None = None) -> str:
    """Joules in the unit a person reads at a glance (J, kJ, kWh), with its source."""
    if joules >= 0.1 * JOULES_PER_KWH:
        text = f"{joules / JOULES_PER_KWH:.3g} kWh"
    elif joules >= 1000:
        text = f"{joules / 1000:.3g} kJ"
    else:
        text = f"{joules:.3g} J"
    return f"{text} ({source})" if source else text


def fmt_cost(usd: float) -> str:
    """Enough digits that a cent-fraction CPU run does not read as $0.00."""
    if usd == 0:
        return "$0"
    if usd < 1e-6:
        return "<$0.000001"
    if usd < 0.01:
        # Two significant digits in decimal notation: $0.000017, not $1.7e-05.
        return f"${usd:.{1 - math.floor(math.log10(usd))}f}"
    return f"${usd:,.2f}"


def fmt_rate(tokens_per_second: float | None) -> str:
    if tokens_per_second is None:
        return "-"
    if tokens_per_second >= 1e6:
        return f"{tokens_per_second / 1e6:.3g}M tok/s"
    if tokens_per_second >= 1e3:
        return f"{tokens_per_second / 1e3:.3g}k tok/s"
    return f"{tokens_per_second:.3g} tok/s"


def fmt_loss(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4f}"


def fmt_accuracy(accuracy: float | None) -> str:
    return "-" if accuracy is None else f"{accuracy:.3f}"


def fmt_steps(line: StageLine) -> str:
    return f"{line.step}/{line.total_steps}" if line.total_steps else str(line.step)


def live_text(line: StageLine) -> str:
    """The one-line status of a running stage (both renderings use it)."""
    parts = [f"loss {fmt_loss(line.loss)}"]
    if line.reward is not None:
        parts.append(f"reward {line.reward:.3f}")
    if line.accuracy is not None:
        parts.append(f"eval acc {fmt_accuracy(line.accuracy)}")
    parts += [
        fmt_rate(line.tokens_per_second),
        f"ETA {fmt_duration(line.eta_seconds)}",
        fmt_energy(line.energy_joules, line.energy_source),
        fmt_cost(line.cost_usd),
    ]
    return " · ".join(parts)


SUMMARY_COLUMNS = [
    "stage",
    "steps",
    "loss",
    "eval acc",
    "tokens",
    "wall",
    "energy",
    "cost",
    "CO2",
    "checkpoint",
]


def summary_rows(lines: Sequence[StageLine]) -> list[list[str]]:
    """The summary table's cells, one row per stage plus a total row."""
    rows = [
        [
            line.name,
            fmt_steps(line),
            fmt_loss(line.loss),
            fmt_accuracy(line.accuracy),
            f"{line.tokens:,}",
            fmt_duration(line.wall_seconds),
            fmt_energy(line.energy_joules, line.energy_source),
            fmt_cost(line.cost_usd),
            f"{line.co2_grams:.3g} g",
            line.checkpoint or "-",
        ]
        for line in lines
    ]
    rows.append(
        [
            "total",
            str(sum(line.step for line in lines)),
            "",
            "",
            f"{sum(line.tokens for line in lines):,}",
            fmt_duration(sum(line.wall_seconds for line in lines)),
            fmt_energy(sum(line.energy_joules for line in lines)),
            fmt_cost(sum(line.cost_usd for line in lines)),
            f"{sum(line.co2_grams for line in lines):.3g} g",
            "",
        ]
    )
    return rows


def model_lines(lines: Sequence[StageLine]) -> list[str]:
    """Where each stage's model is as a Hugging Face folder (stages of a Hugging Face
    model write one when they complete): what a person loads or serves next."""
    return [f"{line.name}: Hugging Face model {line.hf_model}" for line in lines if line.hf_model]


def plain_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded with two spaces between them: greppable and diff-friendly."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows[:-1]), rule, fmt(rows[-1])])


# --------------------------------------------------------------------------- displays


class Display(Protocol):
    """What the local runner tells the person watching."""

    def message(self, text: str) -> None: ...

    def stage_started(self, line: StageLine) -> None: ...

    def update(self, line: StageLine) -> None: ...

    def stage_ended(self, line: StageLine, note: str = "") -> None: ...

    def summary(self, title: str, lines: Sequence[StageLine]) -> None: ...

    def close(self) -> None: ...


class PlainDisplay:
    """Plain lines for logs and pipes: at most one progress line per ``interval``."""

    def __init__(self, out: TextIO | None = None, interval: float = 2.0):
        self.out = out or sys.stdout
        self.interval = interval
        self._last_print: dict[str, float] = {}
        self._last_step: dict[str, int] = {}

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def message(self, text: str) -> None:
        self._print(text)

    def stage_started(self, line: StageLine) -> None:
        resume = f", resuming at step {line.step}" if line.step else ""
        total = f" ({line.total_steps} steps{resume})" if line.total_steps else ""
        self._print(f"[{line.name}] started{total}")
        self._last_step[line.name] = line.step

    def update(self, line: StageLine) -> None:
        now = time.monotonic()
        if line.step == self._last_step.get(line.name):
            return
        if now - self._last_print.get(line.name, 0.0) < self.interval:
            return
        self._last_print[line.name] = now
        self._last_step[line.name] = line.step
        self._print(f"[{line.name}] step {fmt_steps(line)}  {live_text(line)}")

    def stage_ended(self, line: StageLine, note: str = "") -> None:
        self._print(
            f"[{line.name}] {note or line.phase}: step {fmt_steps(line)}  "
            f"loss {fmt_loss(line.loss)}  eval acc {fmt_accuracy(line.accuracy)}"
        )

    def summary(self, title: str, lines: Sequence[StageLine]) -> None:
        self._print("")
        self._print(title)
        self._print(plain_table(SUMMARY_COLUMNS, summary_rows(lines)))
        for text in model_lines(lines):
            self._print(text)

    def close(self) -> None:
        pass


class RichDisplay:
    """A live progress bar per stage with its numbers beside it (terminal only)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console()
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("[bold]{task.description:<10}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            refresh_per_second=4,
        )
        self.tasks: dict[str, Any] = {}
        self.progress.start()

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False, markup=False)

    def stage_started(self, line: StageLine) -> None:
        self.tasks[line.name] = self.progress.add_task(
            line.name,
            total=line.total_steps,
            completed=line.step,
            info="resuming from the last checkpoint" if line.step else "starting",
        )

    def update(self, line: StageLine) -> None:
        task = self.tasks.get(line.name)
        if task is not None:
            self.progress.update(
                task, completed=line.step, total=line.total_steps, info=live_text(line)
            )

    def stage_ended(self, line: StageLine, note: str = "") -> None:
        task = self.tasks.get(line.name)
        if task is None:
            task = self.tasks[line.name] = self.progress.add_task(
                line.name, total=line.total_steps or 1
            )
        info = (
            f"{note or line.phase} · loss {fmt_loss(line.loss)} · "
            f"eval acc {fmt_accuracy(line.accuracy)}"
        )
        self.progress.update(
            task,
            completed=line.step if line.total_steps else 1,
            total=line.total_steps or 1,
            info=info,
        )
        self.progress.stop_task(task)

    def summary(self, title: str, lines: Sequence[StageLine]) -> None:
        from rich.table import Table

        self.progress.stop()
        table = Table(title=title, title_justify="left")
        for col in SUMMARY_COLUMNS:
            table.add_column(
                col,
                justify="left" if col in ("stage", "checkpoint", "energy") else "right",
                overflow="fold",
            )
        rows = summary_rows(lines)
        for row in rows[:-1]:
            # On a terminal, a local checkpoint as a path from here fits on one line.
            if row[-1].startswith("file://"):
                row[-1] = os.path.relpath(row[-1].removeprefix("file://"))
            table.add_row(*row)
        table.add_section()
        table.add_row(*rows[-1], style="bold")
        self.console.print(table)
        for text in model_lines(lines):
            self.console.print(text, highlight=False, markup=False)

    def close(self) -> None:
        self.progress.stop()


def make_display(plain: bool) -> Display:
    """Rich on a terminal (when rich is installed), plain lines otherwise."""
    if not plain and sys.stdout.isatty():
        try:
            return RichDisplay()
        except ImportError:
            pass
    return PlainDisplay()

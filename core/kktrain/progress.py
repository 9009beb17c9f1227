"""Progress display: a rich bar on a terminal, plain lines otherwise, a summary table at the end."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

if TYPE_CHECKING:
    from kktrain.trainer import Trainer

_REFRESH_S = 0.1


class Progress:
    """Shows steps/s, loss and ETA; cheap to call every step (updates at most every 0.1 s)."""

    def __init__(self, trainer: Trainer, total: int, start: int) -> None:
        self.tr = trainer
        self.total = total
        self.console = trainer.console
        self.enabled = trainer.is_main and not trainer.quiet
        self.rich = self.enabled and self.console.is_terminal
        self._last = 0.0
        self._bar: RichProgress | None = None
        self._task: Any = None
        self._start = start
        self._loss = float("nan")
        self._rate = 0.0

    def __enter__(self) -> Progress:
        if self.rich:
            self._bar = RichProgress(
                TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} steps/s"), TextColumn("loss {task.fields[loss]:.4f}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self._start, loss=float("nan"), rate=0.0)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.tr.state.step)
            self._bar.__exit__(*exc)

    def advance(self, step: int) -> None:
        """Called after every step."""
        if self._bar is None:
            return
        now = time.perf_counter()
        if now - self._last >= _REFRESH_S:
            self._last = now
            self._bar.update(self._task, completed=step)

    def update_loss(self, loss: float, rate: float) -> None:
        """Called every ``log_every`` steps with the synced loss."""
        self._loss, self._rate = loss, rate
        if self._bar is not None:
            self._bar.update(self._task, loss=loss, rate=rate)
        elif self.enabled:
            step = self.tr.state.step
            left = (self.total - step) / rate if rate > 0 else float("nan")
            self.console.print(
                f"step {step}/{self.total}  loss {loss:.4f}  {rate:.1f} steps/s  lr {self.tr.lr:.3g}  eta {_fmt_time(left)}",
                highlight=False,
            )

    def print_summary(self, summary: dict[str, Any]) -> None:
        """The table at the end of a run."""
        if not self.enabled:
            return
        table = Table(title=f"kktrain: {summary['status']} after {summary['steps']} steps in {_fmt_time(summary['time_s'])}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        final = {k: v for k, v in summary.get("final", {}).items() if not k.endswith("time_s")}
        grouped: dict[str, dict[str, float]] = {}
        for key, value in sorted(final.items()):
            parts = key.split("/")
            if len(parts) == 3:  # val/<metric>/<group>: shown pivoted below
                grouped.setdefault(f"{parts[0]}/{parts[1]}", {})[parts[2]] = value
                continue
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        best = summary.get("best") or {}
        if best.get("metric") and best.get("value") is not None:
            table.add_row(f"best {best['metric']}", f"{best['value']:.4f} @ step {best['step']}")
        if summary.get("skipped_steps"):
            table.add_row("skipped steps", str(summary["skipped_steps"]))
        for name, section in summary.items():
            if name in self.tr.plugins and isinstance(section, dict):
                for key, value in section.items():
                    if isinstance(value, (int, float, str)):
                        table.add_row(f"{name}: {key}", f"{value:.4f}" if isinstance(value, float) else str(value))
        self.console.print(table)
        if grouped:
            groups = sorted({g for per in grouped.values() for g in per}, key=_natural)
            pivot = Table(title="per group")
            pivot.add_column("metric")
            for g in groups:
                pivot.add_column(g, justify="right")
            for metric, per in grouped.items():
                pivot.add_row(metric, *(f"{per[g]:.4f}" if g in per else "" for g in groups))
            self.console.print(pivot)
        self.console.print(f"run directory: {summary['run_dir']}", highlight=False)


def _natural(text: str) -> tuple[str, int]:
    digits = "".join(c for c in text if c.isdigit())
    return (text.rstrip("0123456789"), int(digits) if digits else -1)


def _fmt_time(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"

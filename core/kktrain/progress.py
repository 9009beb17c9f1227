"""What a run shows: a start block, a progress bar (plain lines off a terminal), a compact line per
validation, and a summary table at the end.

Streams: progress, the start block, validation lines and echoed log events go to stderr (the
trainer's console); the final summary goes to stdout, so ``kktrain run ... | tee run.txt`` keeps it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

if TYPE_CHECKING:
    import torch

    from kktrain.trainer import Trainer

_REFRESH_S = 0.1
_EARLY_SYNC_S = 0.5  # before the first log point: at most one loss sync per this many seconds
_EARLY_WINDOW = 20  # the early loss estimate: the mean of the latest steps, so it follows the loss down
_ESTIMATE_AFTER_S = 3.0  # the start block's duration estimate: once the steps of this long are timed


class Progress:
    """Shows steps/s, loss and ETA; cheap to call every step (updates at most every 0.1 s).

    Until the first ``log_every`` point of this session, the rate is the running mean since the
    first step and the loss the mean of the latest 20 steps (synced at most twice a second, and
    only then), so the bar never shows ``nan`` or ``0.0 steps/s`` while it waits; the ETA is always
    the steps left divided by the rate shown.
    """

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
        self._t_first: float | None = None  # after the first step of this session
        self._step_first = start
        self._logged = False  # a log point gave the loss and rate
        self._last_sync = 0.0
        self._estimated = False

    def __enter__(self) -> Progress:
        if self.rich:
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
                console=self.console, transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self._start, **self._fields(self._start))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.tr.state.step, **self._fields(self.tr.state.step))
            self._bar.__exit__(*exc)

    def _fields(self, step: int) -> dict[str, Any]:
        rate = self._rate
        left = (self.total - step) / rate if rate > 0 else float("nan")
        return {"rate": f"{rate:.1f} steps/s" if rate > 0 else "-- steps/s",
                "loss": f"{self._loss:.4f}" if self._loss == self._loss else "--",
                "eta": _fmt_time(left)}

    # ------------------------------------------------------------------ start

    def print_start(self, resumed_from: str | None = None) -> None:
        """The block at the start: task and size, device, threads, batch, seed, plugins, steps, directory."""
        if not self.enabled:
            return
        import torch

        import kktrain
        from kktrain.hardware import usable_cores

        tr, cfg = self.tr, self.tr.config
        params = sum(p.numel() for p in tr.model.parameters())
        accum = f" x {cfg.grad_accum} accumulation" if cfg.grad_accum > 1 else ""
        world = f" x {tr.world_size} processes" if tr.world_size > 1 else ""
        epochs = self.total / max(tr.steps_per_epoch, 1)
        length = f"{self.total} ({epochs:.3g} epoch{'s' if epochs != 1 else ''} of {tr.steps_per_epoch} steps)"
        if self._start:
            length += f", from step {self._start}"
        cores = usable_cores()
        rows = [
            ("task", f"{tr.task.name} ({params:,} parameters)"),
            ("device", f"{tr.device}, {_count(torch.get_num_threads(), 'thread')} ({_count(cores, 'usable core')})"),
            ("batch", f"{cfg.batch_size}{accum}{world}, seed {cfg.seed}"),
            ("plugins", ", ".join(tr.plugins) or "none"),
            ("steps", length),
        ]
        if resumed_from:
            rows.append(("resumed", resumed_from))
        rows.append(("run dir", str(tr.run_dir.resolve()) if tr.run_dir is not None else "?"))
        lines = [f"kktrain {kktrain.__version__}"] + [f"  {k:<8} {v}" for k, v in rows]
        self.console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)

    # ------------------------------------------------------------------ steps

    def advance(self, step: int, losses: list[torch.Tensor] | None = None) -> None:
        """Called after every step, with the losses not yet logged."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._t_first is None:
            self._t_first, self._step_first = now, step
            return
        if not self._logged and step > self._step_first:
            self._rate = (step - self._step_first) / max(now - self._t_first, 1e-9)
            if losses and now - self._last_sync >= _EARLY_SYNC_S:
                import torch

                self._last_sync = now
                self._loss = torch.stack(losses[-_EARLY_WINDOW:]).mean().item()  # early estimate: first interval only
        timed = now - self._t_first
        if not self._estimated and self._rate > 0 and (timed >= _ESTIMATE_AFTER_S or (timed >= 0.5 and step - self._step_first >= 20)):
            self._print_estimate(step)
        if self._bar is not None and now - self._last >= _REFRESH_S:
            self._last = now
            self._bar.update(self._task, completed=step, **self._fields(step))

    def _print_estimate(self, step: int) -> None:
        self._estimated = True
        left = (self.total - step) / self._rate
        self.console.print(
            f"  estimate {_fmt_time(left)} left at {self._rate:.1f} steps/s (timed over {_count(step - self._step_first, 'step')})",
            highlight=False, markup=False,
        )

    def update_loss(self, loss: float, rate: float) -> None:
        """Called every ``log_every`` steps with the synced loss."""
        self._loss, self._rate, self._logged = loss, rate, True
        step = self.tr.state.step
        if not self._estimated and self.enabled and rate > 0 and step < self.total:
            self._print_estimate(step)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, **self._fields(step))
        elif self.enabled:
            left = (self.total - step) / rate if rate > 0 else float("nan")
            self.console.print(
                f"step {step}/{self.total}  loss {loss:.4f}  {rate:.1f} steps/s  lr {self.tr.lr:.3g}  eta {_fmt_time(left)}",
                highlight=False,
            )

    # ------------------------------------------------------------------ validation

    def validation_started(self) -> None:
        """The bar says ``validating...`` while validation runs."""
        if self._bar is not None:
            self._bar.update(self._task, description="validating...")
            self._bar.refresh()

    def validation_done(self, metrics: dict[str, float]) -> None:
        """One compact line with the key metrics (and the best so far)."""
        if self._bar is not None:
            self._bar.update(self._task, description="train")
        if not self.enabled:
            return
        self.console.print(validation_line(self.tr, metrics, self.console.width), highlight=False, markup=False)

    # ------------------------------------------------------------------ end

    def print_summary(self, summary: dict[str, Any], out: Console | None = None) -> None:
        """The table at the end of a run, on stdout (nothing when quiet: ``kktrain run --quiet``
        prints :func:`quiet_summary` itself, ``kktrain.fit(quiet=True)`` prints nothing)."""
        if not self.enabled:
            return
        out = out if out is not None else Console(highlight=False, soft_wrap=True)
        status = summary_status(summary)
        table = Table(title=status)
        table.add_column("metric")
        table.add_column("value", justify="right")
        if summary.get("train_loss") is not None:
            table.add_row("train/loss", f"{summary['train_loss']:.4f} @ step {summary['train_loss_step']}")
        final = {k: v for k, v in summary.get("final", {}).items() if not k.endswith("time_s")}
        if final and summary.get("val_step") is not None:
            table.add_row("last validation", f"step {summary['val_step']}")
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
        out.print(table)
        if grouped:
            groups = sorted({g for per in grouped.values() for g in per}, key=_natural)
            pivot = Table(title="per group")
            pivot.add_column("metric", no_wrap=True)
            for g in groups:
                pivot.add_column(g, justify="right")
            for metric, per in grouped.items():
                pivot.add_row(metric.removeprefix("val/"), *(f"{per[g]:.4f}" if g in per else "" for g in groups))
            out.print(pivot)
        out.print(f"run directory: {_absolute(summary['run_dir'])}", highlight=False, markup=False)


def quiet_summary(summary: dict[str, Any]) -> str:
    """What ``--quiet`` leaves: the final status line and the run directory."""
    return f"{summary_status(summary)}\nrun directory: {_absolute(summary['run_dir'])}"


def summary_status(summary: dict[str, Any]) -> str:
    """``kktrain: completed after 600 steps in 1:02`` (and why it stopped, when it did early)."""
    line = f"kktrain: {summary['status']} after {summary['steps']} steps in {_fmt_time(summary['time_s'])}"
    if summary["status"] != "completed" and summary.get("stop_reason"):
        line += f" ({summary['stop_reason']})"
    return line


def validation_line(tr: Trainer, metrics: dict[str, float], width: int = 80) -> str:
    """``val @ step 300: loss 0.4123  acc 0.8125  (best acc 0.8125 @ 300)  1.2s``: the headline
    metrics (``val/x`` and ``val_plugin/x``; loss and the best metric first), as many as fit in
    ``width`` columns, not the per-group ones."""
    best_metric = tr.config.checkpoint.best_metric
    keys = [k for k in metrics if k.count("/") == 1 and not k.endswith("time_s")]
    keys.sort(key=lambda k: (k.split("/")[0] != "val", k.split("/")[1] != "loss", k != best_metric, k))
    best = ""
    if best_metric and tr.state.best_value is not None:
        best = f"  (best {best_metric.removeprefix('val/')} {tr.state.best_value:.4g} @ {tr.state.best_step})"
    took = metrics.get("val/time_s")
    tail = best + (f"  {took:.1f}s" if took is not None else "")
    head = f"val @ step {tr.state.step}:"
    parts: list[str] = []
    for i, k in enumerate(keys):
        part = f"{k.removeprefix('val/')} {metrics[k]:.4g}"
        left = len(keys) - i - 1
        more = f"  (+{left} more)" if left else ""
        if parts and len(head) + sum(len(p) + 2 for p in parts) + 1 + len(part) + len(more) + len(tail) > width:
            parts.append(f"(+{len(keys) - i} more)")
            break
        parts.append(part)
    return f"{head} {'  '.join(parts) or 'no metrics'}{tail}"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _absolute(path: str) -> str:
    from pathlib import Path

    return str(Path(path).resolve())


def _natural(text: str) -> tuple[str, int]:
    digits = "".join(c for c in text if c.isdigit())
    return (text.rstrip("0123456789"), int(digits) if digits else -1)


def _fmt_time(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"

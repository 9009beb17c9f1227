"""Looking at runs: ``kktrain plot``, ``kktrain compare`` and ``kktrain lr-find``.

Everything here reads what a run directory already holds (``metrics.jsonl``, ``summary.json``,
``config.toml``, ``log.jsonl``); nothing is written into a run directory except the plot file
``kktrain plot`` is told to write (default: beside the runs, ``RUN_DIR/plot.png`` for one run).
matplotlib is optional (``pip install 'kktrain[plot]'``); without it the commands that draw say so.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kktrain.errors import ConfigError, KKTrainError
from kktrain.hookspecs import hookimpl

PLOT_EXTRA = "pip install 'kktrain[plot]' (or pip install matplotlib)"
STAGE_EVENT = "curriculum_stage"


def _pyplot(command: str) -> Any:
    """matplotlib's pyplot on the Agg backend, or a one-line error naming what to install."""
    try:
        import matplotlib
    except ImportError:
        raise KKTrainError(f"kktrain {command} draws with matplotlib, which is not installed: {PLOT_EXTRA}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------
# Reading a run directory
# ----------------------------------------------------------------------------------------------


@dataclass
class RunRecords:
    """What one run directory holds, as plain data."""

    path: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The run's name: its directory's."""
        return self.path.name

    started: float | None = None
    """When the run's first session started (its ``run_metadata`` in ``log.jsonl``), epoch seconds."""

    def series(self, kind: str, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``key`` in the records of ``kind``."""
        pts = [(int(r["step"]), float(r[key])) for r in self.records if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
        return [s for s, _ in pts], [v for _, v in pts]

    def minutes(self) -> list[float | None]:
        """Per record, the run's wall time in minutes when it was written: from the start of the
        first session, leaving out the downtime between a stop and its resume (the gap before each
        ``resume`` record). ``None`` for a record without a time."""
        out: list[float | None] = []
        total, last = 0.0, self.started
        for r in self.records:
            t = r.get("time")
            if not isinstance(t, (int, float)):
                out.append(None)
                continue
            if r.get("kind") != "resume" and last is not None:
                total += max(float(t) - last, 0.0)
            last = float(t)
            out.append(total / 60.0)
        return out

    def time_series(self, kind: str, key: str) -> tuple[list[float], list[float]]:
        """Like :meth:`series`, against :meth:`minutes` instead of steps."""
        pts = [(m, float(r[key])) for r, m in zip(self.records, self.minutes())
               if m is not None and r.get("kind") == kind and isinstance(r.get(key), (int, float))]
        return [m for m, _ in pts], [v for _, v in pts]

    def keys(self, kind: str) -> list[str]:
        """Metric keys of the records of ``kind``, in first-seen order."""
        seen: dict[str, None] = {}
        for r in self.records:
            if r.get("kind") == kind:
                seen.update({k: None for k, v in r.items() if k not in ("step", "kind", "time", "epoch") and isinstance(v, (int, float))})
        return list(seen)


def read_run(path: Path) -> RunRecords:
    """Load a run directory; a directory without ``metrics.jsonl`` is a one-line error."""
    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory: give a run directory (runs/NAME, as `kktrain run --out` made it)")
    if not metrics.is_file():
        raise ConfigError(f"{path} has no metrics.jsonl: give a run directory that kktrain run wrote (runs/NAME)")
    lines = [_json_line(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [r for r in lines if r is not None]
    summary = _json_file(path / "summary.json")
    config: dict[str, Any] = {}
    if (path / "config.toml").is_file():
        from kktrain.config import tomllib

        try:
            config = tomllib.loads((path / "config.toml").read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError:
            config = {}
    stages = []
    started = None
    log = path / "log.jsonl"
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            event = _json_line(line)
            if event is not None and event.get("event") == STAGE_EVENT:
                stages.append(event)
            elif event is not None and event.get("event") == "run_metadata" and started is None:
                started = _epoch_seconds(event.get("timestamp"))
    return RunRecords(path, records, summary or {}, config, _dedupe_stages(stages), started)


def _epoch_seconds(stamp: Any) -> float | None:
    """An ISO timestamp of the log (``2026-12-02T13:00:21.469624Z``) as epoch seconds, or ``None``."""
    import datetime

    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def _dedupe_stages(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per stage change step (a resumed run logs a change again after a crash)."""
    by_step = {int(s.get("step", 0)): s for s in stages}
    return [by_step[k] for k in sorted(by_step)]


def _json_line(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None  # a line cut short by a crash
    return value if isinstance(value, dict) else None


def _json_file(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# ----------------------------------------------------------------------------------------------
# kktrain plot
# ----------------------------------------------------------------------------------------------


def default_metrics(runs: Sequence[RunRecords]) -> list[str]:
    """The validation metrics to draw when none are named: the best-checkpoint metric and the
    top-level ``val*/`` metrics of the first run (no per-difficulty breakdowns), at most four."""
    chosen: list[str] = []
    for run in runs:
        best = (run.config.get("checkpoint") or {}).get("best_metric")
        if best and best not in chosen:
            chosen.append(best)
    for run in runs:
        for key in run.keys("val"):
            if key.count("/") == 1 and not key.endswith("time_s") and key not in chosen:
                chosen.append(key)
    return chosen[:4]


def plot_runs(run_dirs: Sequence[Path], *, metrics: Sequence[str] = (), out: Path | None = None,
              width: float = 10.0, panel_height: float = 2.6, dpi: int = 100, x: str = "step") -> Path:
    """Draw train loss, LR and ``metrics`` against steps (``x="time"``: against the run's wall
    time in minutes, :meth:`RunRecords.minutes`) for each run (overlaid), stage changes marked;
    return the PNG's path."""
    if x not in ("step", "time"):
        raise ConfigError(f"--x {x!r}: give step or time")
    plt = _pyplot("plot")
    runs = [read_run(Path(p)) for p in run_dirs]
    metrics = list(metrics) or default_metrics(runs)
    missing = [m for m in metrics if not any(run.series("val", m)[0] or run.series("train", m)[0] for run in runs)]
    if missing:
        known = sorted({k for run in runs for k in run.keys("val") + run.keys("train")})
        raise ConfigError(f"no run has metric {missing[0]!r}: known metrics are {', '.join(known[:20])}")
    panels = ["train/loss", "train/lr", *[m for m in metrics if m not in ("train/loss", "train/lr")]]
    if out is None:
        out = runs[0].path / "plot.png" if len(runs) == 1 else Path("runs_comparison.png")
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, panel_height * len(panels)), sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        stage_x = [_stage_x(run, int(stage.get("step", 0)), x) for stage in run.stages]
        for ax, key in zip(axes[:, 0], panels):
            kind = "train" if run.series("train", key)[0] else "val"
            xs, values = run.time_series(kind, key) if x == "time" else run.series(kind, key)
            if xs:
                ax.plot(xs, values, color=color, label=run.name, marker="o" if (kind == "val" and len(xs) < 30) or len(xs) < 3 else None,
                        markersize=3, linewidth=1.4)
            for at in stage_x:
                ax.axvline(at, color=color, linestyle="--", linewidth=0.9, alpha=0.7)
        top = axes[0, 0]
        for stage, at in zip(run.stages, stage_x):
            label = stage.get("name") or f"stage {stage.get('stage')}"
            top.annotate(str(label), xy=(at, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(3, -12), textcoords="offset points", fontsize=8, color=color)
    for ax, key in zip(axes[:, 0], panels):
        ax.set_ylabel(key, fontsize=9)
        ax.grid(True, alpha=0.3)
        if key == "train/loss" and all(v > 0 for run in runs for v in run.series("train", key)[1]):
            ax.set_yscale("log")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("step" if x == "step" else "wall time (minutes; the time between a stop and its resume left out)")
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    fig.suptitle(f"kktrain: {title} (dashed: curriculum stage changes)" if any(r.stages for r in runs) else f"kktrain: {title}", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _stage_x(run: RunRecords, step: int, x: str) -> float:
    """Where a stage change at ``step`` goes on the x axis: the step, or the time of the first
    record at or after it."""
    if x == "step":
        return float(step)
    for r, m in zip(run.records, run.minutes()):
        if m is not None and int(r.get("step", 0)) >= step:
            return m
    return 0.0


# ----------------------------------------------------------------------------------------------
# kktrain compare
# ----------------------------------------------------------------------------------------------


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if prefix == "" and key == "trust":
                continue  # a signature of this machine, not a setting
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def compare_runs(run_dirs: Sequence[Path], metrics: Sequence[str] = ()) -> dict[str, Any]:
    """Each run's final and best metrics (only ``metrics`` when given), steps, time, plugins, and
    the config keys that differ."""
    runs = [read_run(Path(p)) for p in run_dirs]
    if metrics:
        known = sorted({k for run in runs for k in run.keys("val")})
        missing = [m for m in metrics if m not in known]
        if missing:
            raise ConfigError(f"no run has metric {missing[0]!r}: known metrics are {', '.join(k for k in known if k.count('/') == 1)}")
    rows = []
    for run in runs:
        s = run.summary
        _, train_loss = run.series("train", "train/loss")
        final = dict(s.get("final") or {})
        if not final:  # a run still going, or killed: its latest validation record
            vals = [r for r in run.records if r.get("kind") == "val"]
            final = {k: v for k, v in (vals[-1] if vals else {}).items() if k not in ("step", "kind", "time")}
        best: dict[str, Any] = {}
        for key in [k for k in run.keys("val") if k.count("/") == 1 and not k.endswith("time_s")]:
            steps, values = run.series("val", key)
            finite = [(v, st) for st, v in zip(steps, values) if math.isfinite(v)]
            if finite:
                from kktrain.config import smaller_is_better

                v, st = min(finite) if smaller_is_better(key) else max(finite, key=lambda p: (p[0], -p[1]))
                best[key] = {"value": v, "step": st}
        if metrics:
            final = {k: v for k, v in final.items() if k in metrics}
            best = {k: v for k, v in best.items() if k in metrics}
        steps = s.get("steps", max((int(r["step"]) for r in run.records), default=0))
        rows.append({
            "run": run.name, "path": str(run.path), "status": s.get("status", "unfinished"), "steps": steps,
            "time_s": s.get("time_s"), "plugins": s.get("plugins", (run.config.get("plugins") or {}).get("enabled", [])),
            "final_train_loss": train_loss[-1] if train_loss else None, "final": final, "best": best,
        })
    flats = [_flatten(r.config) for r in runs]
    keys = sorted({k for f in flats for k in f})
    differ = {k: [f.get(k) for f in flats] for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1}
    differ.pop("out", None)
    return {"runs": rows, "config_differences": differ, "metrics": list(metrics)}


def print_comparison(result: dict[str, Any]) -> None:
    """The comparison as rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    rows = result["runs"]
    table = Table(title="runs")
    table.add_column("metric", no_wrap=True)
    for col in [r["run"] for r in rows]:
        table.add_column(col, overflow="fold")

    def add(label: str, values: list[Any]) -> None:
        table.add_row(label, *[_cell(v) for v in values])

    add("status", [r["status"] for r in rows])
    add("steps", [r["steps"] for r in rows])
    add("time", [None if r["time_s"] is None else f"{r['time_s']:.1f} s" for r in rows])
    add("plugins", [", ".join(r["plugins"]) or "-" for r in rows])
    add("final train/loss", [r["final_train_loss"] for r in rows])
    chosen = result.get("metrics") or []
    finals = sorted({k for r in rows for k in r["final"] if (k in chosen) or (not chosen and not k.endswith("time_s") and k.count("/") == 1)})
    for key in finals:
        add(f"final {key}", [r["final"].get(key) for r in rows])
    bests = sorted({k for r in rows for k in r["best"]})
    for key in bests:
        add(f"best {key}", [None if key not in r["best"] else f"{_cell(r['best'][key]['value'])} @ {r['best'][key]['step']}" for r in rows])
    differ = result["config_differences"]
    cfg = Table(title="config keys that differ")
    cfg.add_column("key", no_wrap=True)
    for col in [r["run"] for r in rows]:
        cfg.add_column(col, overflow="fold")
    for key, values in differ.items():
        cfg.add_row(key, *[json.dumps(v, default=str) if v is not None else "-" for v in values])
    console = Console(soft_wrap=False)
    if not console.is_terminal:  # a file or a pipe: as wide as the tables need, never folded
        from rich.measure import Measurement

        unbounded = console.options.update_width(10_000)
        widest = max(Measurement.get(console, unbounded, t).maximum for t in (table, cfg))
        console = Console(soft_wrap=False, width=max(80, widest))
    console.print(table)
    if differ:
        console.print(cfg)
    else:
        console.print("config: the runs share every key")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------------------------------------
# kktrain lr-find
# ----------------------------------------------------------------------------------------------


def smooth(values: Sequence[float], beta: float = 0.98) -> list[float]:
    """Debiased exponential moving average (fastai's LR finder smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], skip_start: int = 3) -> tuple[float | None, int | None]:
    """The LR at the steepest descent of the smoothed loss against log(lr), before its minimum
    (as fastai's ``steep`` and Lightning's ``suggestion()``); ``(None, None)`` with too few points."""
    smoothed = smooth(losses)
    end = min(range(len(smoothed)), key=smoothed.__getitem__) if smoothed else 0
    if end - skip_start < 2:
        end = len(smoothed) - 1
    if end - skip_start < 2:
        return None, None
    best_i, best_slope = None, math.inf
    for i in range(skip_start + 1, end):
        slope = (smoothed[i + 1] - smoothed[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
        if slope < best_slope:
            best_i, best_slope = i, slope
    return (lrs[best_i], best_i) if best_i is not None else (None, None)


class LRFinder:
    """An in-process plugin for ``kktrain lr-find``: raises the LR exponentially each step,
    records the loss, stops when the smoothed loss diverges; validation is skipped."""

    name = "lr-find"
    Options = None

    def __init__(self, start: float, end: float, steps: int, diverge: float = 4.0) -> None:
        self.start, self.end, self.steps, self.diverge = start, end, steps, diverge
        self.gamma = (end / start) ** (1.0 / max(steps - 1, 1))
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.stopped_early = False

    @hookimpl
    def on_step(self, trainer: Any, loss: Any) -> None:
        """Record (lr, loss) of the step just taken, then raise the LR for the next one."""
        value = float(loss)  # the LR finder needs each step's loss: one sync per step, by design
        self.lrs.append(trainer.lr)
        self.losses.append(value)
        smoothed = smooth(self.losses)
        if not math.isfinite(value) or (len(self.losses) > 5 and smoothed[-1] > self.diverge * min(smoothed)):
            self.stopped_early = True
            trainer.request_stop("lr-find: the loss diverged")
            return
        trainer.scale_lr(self.gamma)

    @hookimpl(tryfirst=True)
    def validate(self, trainer: Any) -> dict[str, float]:
        """No validation during the sweep."""
        return {}


def lr_find(assembly: Any, *, start: float, end: float, steps: int, out: Path) -> dict[str, Any]:
    """Sweep the LR from ``start`` to ``end`` over ``steps`` steps of the real task, model and
    plugins (in a temporary run directory); write ``lr_find.json`` and ``lr_find.png`` to ``out``."""
    from kktrain.trainer import Trainer

    if not 0 < start < end:
        raise ConfigError(f"--start {start:g} must be below --end {end:g}, both above 0: e.g. --start 1e-7 --end 1")
    if steps < 10:
        raise ConfigError(f"--steps {steps} is too few for a sweep: use at least 10 (default 100)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists: lr-find never touches an existing directory; give a new --out")
    cfg = assembly.config
    cfg.max_steps, cfg.stop_at_step = steps, None
    cfg.schedule.name = "constant"
    cfg.optimizer.lr = start
    cfg.val_every = 0
    cfg.log_every = max(steps, 1)
    cfg.checkpoint.every_steps, cfg.checkpoint.at_epoch_end, cfg.checkpoint.best_metric = 0, False, None
    finder = LRFinder(start, end, steps)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kktrain-lr-find-") as tmp:
        cfg.out = str(Path(tmp) / "run")
        trainer = Trainer.from_assembly(assembly, plugins=[finder], quiet=True)
        trainer.meter.warned_clipping = True  # a sweep to huge LRs clips by design
        trainer.fit()
    lr, index = suggest_lr(finder.lrs, finder.losses)
    result: dict[str, Any] = {
        "task": trainer.task.name, "plugins": [p for p in trainer.plugins if p != finder.name],
        "start": start, "end": end, "steps": steps, "steps_run": len(finder.lrs), "stopped_early": finder.stopped_early,
        "time_s": time.perf_counter() - t0, "lr": finder.lrs, "loss": finder.losses, "smoothed_loss": smooth(finder.losses),
        "suggested_lr": lr, "suggested_index": index,
        "rule": "steepest descent of the smoothed loss (EMA 0.98, debiased) against log(lr), before its minimum (fastai, Lightning)",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_find.json").write_text(json.dumps(result, indent=2))
    try:
        plt = _pyplot("lr-find")
    except KKTrainError:
        result["plot"] = None
        return result
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(finder.lrs, finder.losses, color="0.75", linewidth=1, label="loss")
    ax.plot(finder.lrs, result["smoothed_loss"], color="C0", linewidth=1.8, label="smoothed loss")
    if lr is not None and index is not None:
        ax.plot([lr], [result["smoothed_loss"][index]], "o", color="C3", markersize=8, label=f"suggested lr {lr:.2e}")
    ax.set_xscale("log")
    finite = [v for v in finder.losses if math.isfinite(v)]
    if finite:  # spikes past the divergence would flatten the part that matters
        ax.set_ylim(min(finite) * 0.9 if min(finite) > 0 else None, max(result["smoothed_loss"][: (index or 0) + 1] + finite[:1]) * 1.5)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"kktrain lr-find: {result['task']}, {len(finder.lrs)} steps")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "lr_find.png", dpi=100)
    plt.close(fig)
    result["plot"] = str(out / "lr_find.png")
    return result


# ----------------------------------------------------------------------------------------------
# The commands (registered in kktrain.cli)
# ----------------------------------------------------------------------------------------------

def commands(run_options: Any, build: Any) -> list[Any]:
    """The click commands ``plot``, ``compare`` and ``lr-find`` (``kktrain.cli`` passes its shared
    run options and its config builder, so lr-find takes every option ``kktrain run`` takes)."""
    import click

    @click.command("plot")
    @click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...", type=click.Path(path_type=Path))
    @click.option("--metric", "metrics", multiple=True, metavar="NAME",
                  help="A validation (or train) metric to draw below loss and LR (repeatable; default: the best-checkpoint metric and the val/* metrics).")
    @click.option("--out", "out", type=click.Path(path_type=Path), metavar="FILE.png",
                  help="The PNG to write (default: RUN_DIR/plot.png for one run, runs_comparison.png for several).")
    @click.option("--x", "x", type=click.Choice(["step", "time"]), default="step", show_default=True,
                  help="The x axis: steps, or the run's wall time in minutes (compare runs at equal time; downtime between a stop and its resume is left out).")
    def plot_cmd(run_dirs: tuple[Path, ...], metrics: tuple[str, ...], out: Path | None, x: str) -> None:
        """Plot loss, LR and validation metrics against steps or time; several runs overlaid, curriculum stage changes marked."""
        path = plot_runs(run_dirs, metrics=metrics, out=out, x=x)
        click.echo(f"wrote {path}")


    @click.command("compare")
    @click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...", type=click.Path(path_type=Path))
    @click.option("--metric", "metrics", multiple=True, metavar="NAME",
                  help="Only these validation metrics in the final and best rows (repeatable; default: every val*/NAME metric).")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def compare_cmd(run_dirs: tuple[Path, ...], metrics: tuple[str, ...], as_json: bool) -> None:
        """Compare runs: final and best metrics, steps, time, plugins, and the config keys that differ."""
        result = compare_runs(run_dirs, metrics)
        if as_json:
            click.echo(json.dumps(result, indent=2, default=str))
        else:
            print_comparison(result)


    @click.command("lr-find")
    @run_options
    @click.option("--start", type=float, default=1e-7, show_default=True, help="First learning rate of the sweep.")
    @click.option("--end", type=float, default=1.0, show_default=True, help="Last learning rate of the sweep.")
    @click.option("--steps", "sweep_steps", type=int, default=100, show_default=True, help="Steps of the sweep (it stops early when the loss diverges).")
    def lr_find_cmd(start: float, end: float, sweep_steps: int, **kwargs: Any) -> None:
        """Find a learning rate: an exponential LR sweep on the real task, model and plugins.

        Writes lr_find.json and lr_find.png into --out (a new directory; default
        runs/lr-find-<task>-<time>) and prints the suggested LR: the steepest descent of the
        smoothed loss, as fastai and Lightning suggest. No run directory is created or changed.
        """
        import datetime as dt
        import os

        out = kwargs.pop("out", None)
        kwargs.pop("max_steps", None)
        assembly = build(**kwargs)
        if out is None:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            out = str(Path(os.environ.get("KKTRAIN_RUNS_DIR", "runs")) / f"lr-find-{assembly.task.name if assembly.task is not None else 'task'}-{stamp}")
        result = lr_find(assembly, start=start, end=end, steps=sweep_steps, out=Path(out))
        ran = f"{result['steps_run']} steps" + (" (stopped early: the loss diverged)" if result["stopped_early"] else "")
        click.echo(f"lr-find: {result['task']}, lr {start:g} -> {result['lr'][-1]:.3g} in {ran}")
        click.echo(f"wrote {Path(out) / 'lr_find.json'}" + (f" and {result['plot']}" if result["plot"] else f" (no lr_find.png: {PLOT_EXTRA})"))
        if result["suggested_lr"] is None:
            click.echo("no suggestion: too few steps before the loss diverged; lower --start or raise --steps")
            return
        click.echo(f"suggested lr {result['suggested_lr']:.3g} (rule: steepest descent of the smoothed loss)")
        click.echo(f"use it with: kktrain run -o optimizer.lr={result['suggested_lr']:.3g} ...")

    return [plot_cmd, compare_cmd, lr_find_cmd]

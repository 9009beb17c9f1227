"""tensorboard: every metrics record as TensorBoard scalars, events as text, hparams at the end.

    kktrain run --plugin tensorboard                  # events in RUN_DIR/tensorboard/
    tensorboard --logdir runs/                        # every run side by side

Train records go under their own names (``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/clipped`` ...), validation records too (``val/acc``, ``val_ema/acc``), epoch records
under ``epoch/`` (``epoch/train/loss``). Run events (curriculum stage changes, rollbacks, early
stopping) become text entries at the step they happened; a curriculum stage change is also the
scalar ``curriculum/stage``. At the end the run's config goes in as hparams with the final
metrics. Everything is written at the core's log points from values it already synced: no
host sync on the hot path. A resume appends to the same event directory and purges the
events after the checkpoint it continues from, so no step appears twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from kktrain import PluginOptions, hookimpl

if TYPE_CHECKING:
    from kktrain import Trainer

__all__ = ["TensorBoardPlugin", "flat_config"]

BOOKKEEPING = ("step", "kind", "time", "epoch")


def flat_config(trainer: Trainer) -> dict[str, Any]:
    """The run's config (core, task and plugin options) as flat ``a.b`` keys with scalar values."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif node is None or isinstance(node, (bool, int, float, str)):
            flat[prefix] = node
        else:
            flat[prefix] = json.dumps(node, default=str)

    walk("", trainer.config.model_dump(mode="json"))
    task_options = getattr(trainer, "task_options", None)
    if task_options is not None:
        walk("task", task_options.model_dump(mode="json"))
    for name, options in trainer.plugin_options.items():
        if options is not None:
            walk(f"plugins.{name}", options.model_dump(mode="json"))
    return flat


class TensorBoardPlugin:
    """TensorBoard event files: metrics records as scalars, run events as text, hparams at the end."""

    class Options(PluginOptions):
        """``-o tensorboard.KEY=VALUE`` / ``[plugins.tensorboard]``."""

        dir: str = "tensorboard"
        """Event directory, relative to the run directory (or absolute)."""
        flush_secs: int = Field(30, ge=1)
        """How often the writer's background thread flushes; every checkpoint flushes too."""
        events: bool = True
        """Write run events (curriculum stages, rollbacks, stops) as text entries."""
        hparams: bool = True
        """Write the run's config as hparams with the final metrics at the end."""

    def __init__(self, options: TensorBoardPlugin.Options | None = None) -> None:
        self.options = options or self.Options()
        self.writer: Any = None
        self.log_dir: Path | None = None
        self._events_seen = 0
        self._last_train: dict[str, float] = {}

    @hookimpl(tryfirst=True)  # before other plugins log their start events (curriculum's first stage)
    def on_train_start(self, trainer: Trainer) -> None:
        """Open the writer (rank 0); a resumed run purges the events after its checkpoint's step."""
        if not trainer.is_main or trainer.run_dir is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        path = Path(self.options.dir)
        self.log_dir = path if path.is_absolute() else trainer.run_dir / path
        step = int(trainer.state.step)
        # purge_step: events at steps >= it that a crashed process wrote are hidden on reading.
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step + 1 if step > 0 else None,
                                    flush_secs=self.options.flush_secs)
        self._events_seen = len(trainer.state.events)  # earlier events were written before the checkpoint

    @hookimpl
    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Each numeric value of the record as a scalar at the record's step."""
        if self.writer is None:
            return
        step, kind, wall = int(record["step"]), record.get("kind"), record.get("time")
        prefix = "epoch/" if kind == "epoch" else ""
        for key, value in record.items():
            if key in BOOKKEEPING or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(prefix + key, value, step, walltime=wall)
            if kind == "train":
                self._last_train[key] = float(value)
        self._write_events(trainer)

    @hookimpl
    def on_checkpoint(self, trainer: Trainer, path: str, kind: str) -> None:
        """Flush: what a checkpoint covers is on disk before a crash can lose it."""
        if self.writer is not None:
            self._write_events(trainer)
            self.writer.flush()

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """Remaining events, the hparams with the final metrics; close the writer."""
        if self.writer is None:
            return
        self._write_events(trainer)
        if self.options.hparams and summary.get("status") not in ("paused", "interrupted"):  # the resume writes them
            self._write_hparams(trainer, summary)
        self.writer.close()
        self.writer = None
        summary["tensorboard"] = {"log_dir": str(self.log_dir)}

    def _write_events(self, trainer: Trainer) -> None:
        events = trainer.state.events
        if len(events) < self._events_seen:  # a rollback does not shorten history, but be safe
            self._events_seen = len(events)
        for event in events[self._events_seen:]:
            name, step = str(event.get("event")), int(event.get("step", trainer.state.step))
            if name == "curriculum_stage" and isinstance(event.get("stage"), (int, float)):
                self.writer.add_scalar("curriculum/stage", event["stage"], step)
            if self.options.events and name != "checkpoint":
                detail = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "step"))
                self.writer.add_text(f"events/{name}", f"step {step}: {detail}" if detail else f"step {step}", step)
        self._events_seen = len(events)

    def _write_hparams(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = {k: float(v) for k, v in (summary.get("final") or {}).items() if isinstance(v, (int, float))}
        if "train/loss" in self._last_train:
            metrics.setdefault("train/loss", self._last_train["train/loss"])
        config = {k: ("" if v is None else v) for k, v in flat_config(trainer).items()}
        exp, ssi, sei = hparams(config, metrics)
        file_writer = self.writer._get_file_writer()
        for part in (exp, ssi, sei):
            file_writer.add_summary(part)

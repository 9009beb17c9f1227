"""spike-rollback: on a loss spike (or a NaN), go back to the last good state, halve the LR, skip the batch.

    kktrain run --plugin spike-rollback                                  # factor 3, snapshot every 10 steps
    kktrain run --plugin spike-rollback -o spike-rollback.factor=5 -o spike-rollback.snapshot_every=50
    kktrain run --plugin nan-guard --plugin spike-rollback -o nan-guard.policy=rollback

A moving average of the loss (bias-corrected EMA, after ``warmup_steps`` good steps) defines a
spike: ``loss > factor x average``. The check runs in ``on_step`` (``trylast``: after every other
plugin's ``on_step``, so the restore undoes their updates too), where the optimizer has already
applied the spiking gradients; the restore undoes that step. The last good state is an in-memory
``trainer.snapshot()`` taken every ``snapshot_every`` steps after the check passed (or the newest
checkpoint on disk with ``source=checkpoint``): model, optimizer, scheduler, plugin states, RNG
and data position. ``trainer.restore(..., skip_last_step=True)`` records the spiking step's batches
in ``state.skip_batches``, so they are never trained on again and a resume replays the same data.
See docs/plugins/spike-rollback.md.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal, TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from kktrain import CheckpointError, ConfigError, PluginOptions, TrainingAborted, hookimpl, load_checkpoint

if TYPE_CHECKING:
    from kktrain import Trainer

__all__ = ["SpikeRollbackPlugin"]

NAME = "spike-rollback"
_RESTORED_PARTS = ("model", "optimizer", "scheduler", "state", "rng", "plugins")
# The run's history in the training state: Trainer.restore keeps the current values, so a snapshot
# need not carry them (the event log alone grows with the run).
_NEUTRAL: dict[str, Any] = {"events": [], "last_val": {}, "last_val_step": None, "best_value": None, "best_step": None, "skipped_steps": 0}
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def _num(value: float) -> float | str:
    """A float for JSON: non-finite values as strings ("nan", "inf")."""
    return float(value) if math.isfinite(value) else str(float(value))


class SpikeRollbackOptions(PluginOptions):
    """``-o spike-rollback.KEY=VALUE`` / ``[plugins.spike-rollback]``."""

    factor: float = Field(3.0, gt=1.0)
    """A spike is a step loss above ``factor`` times the moving average."""
    ema_beta: float = Field(0.9, ge=0.0, lt=1.0)
    """Decay of the loss moving average (bias-corrected EMA over good steps)."""
    warmup_steps: int = Field(10, ge=0)
    """Good steps to average before spikes are checked (non-finite losses are always caught)."""
    snapshot_every: int = Field(10, ge=1)
    """Take the in-memory snapshot every this many steps (source=memory)."""
    source: Literal["memory", "checkpoint"] = "memory"
    """Roll back to the in-memory snapshot, or to the newest checkpoint on disk."""
    lr_factor: float = Field(0.5, gt=0.0, le=1.0)
    """Multiply the learning rate by this at every rollback (for the rest of the run)."""
    max_rollbacks: int = Field(3, ge=1)
    """Abort when one more rollback would exceed this many within ``window`` steps."""
    window: int = Field(1000, ge=1)
    """The window, in steps, for ``max_rollbacks``."""
    persist: bool = True
    """Keep the snapshot in checkpoints, so a resume rolls back to the same state (exact resume)."""
    check_every: int = Field(1, ge=1)
    """Read the step losses every this many steps: one host sync per ``check_every`` steps instead
    of one per step (what a GPU waits for). A spike is then found up to ``check_every - 1`` steps
    late; the rollback discards those steps too (they are trained again, the spiking batch skipped),
    and in-memory snapshots are taken at check steps only."""


class SpikeRollbackPlugin:
    """Rolls back to the last good snapshot on a loss spike or NaN, scales the LR down and skips the batch."""

    Options = SpikeRollbackOptions
    name = NAME

    def __init__(self, options: SpikeRollbackOptions | None = None) -> None:
        self.options = options or SpikeRollbackOptions()
        self.avg_raw = 0.0  # EMA accumulator (divide by 1 - beta**seen for the average)
        self.seen = 0  # good steps folded into the average
        self.history: list[dict[str, Any]] = []  # one entry per rollback
        self.snapshots = 0
        self._snapshot: dict[str, Any] | None = None
        self._snap_meta: dict[str, Any] = {}  # step and loss tracker at the snapshot
        self._snapshotting = False
        # check_every > 1: the steps not checked yet, as (step, loss on the device, its batches' positions)
        self._pending: list[tuple[int, torch.Tensor, list[list[int]]]] = []

    # ------------------------------------------------------------------ the loss tracker

    @property
    def average(self) -> float:
        """The bias-corrected moving average of good losses (nan before the first)."""
        if self.seen == 0:
            return math.nan
        return self.avg_raw / (1.0 - self.options.ema_beta**self.seen)

    def _fold(self, value: float) -> None:
        beta = self.options.ema_beta
        self.avg_raw = beta * self.avg_raw + (1.0 - beta) * value
        self.seen += 1

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_model_built(self, trainer: Trainer, model: Any) -> None:
        """``source=checkpoint`` reads single-file checkpoints: refuse it with sharded ones, before anything is on disk."""
        if self.options.source == "checkpoint" and trainer.checkpoints.sharded:
            raise ConfigError(
                "spike-rollback: source=checkpoint does not combine with sharded checkpoints (torchrun, "
                f"{trainer.world_size} processes): use -o spike-rollback.source=memory"
            )

    @hookimpl
    def on_train_start(self, trainer: Trainer) -> None:
        """A first snapshot (fresh run, or a resume without a persisted one): never without a target."""
        if self._snapshot is None:
            self._take_snapshot(trainer)

    @hookimpl(trylast=True)
    def on_step(self, trainer: Trainer, loss: Any) -> None:
        """Check the loss (one host sync); roll back on a spike, else fold it in and maybe snapshot."""
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            # Every rank must take the same decision: check the mean loss over the ranks.
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= trainer.world_size
        if self.options.check_every > 1:
            self._on_step_batched(trainer, loss)
            return
        value = float(loss)  # the one host sync per step
        step = trainer.state.step
        average = self.average
        spike = self.seen >= max(1, self.options.warmup_steps) and value > self.options.factor * average
        if not math.isfinite(value) or spike:
            kind = "spike" if math.isfinite(value) else "nonfinite"
            detail = {"step": step, "loss": value, "average": average, "factor": self.options.factor}
            trainer.hook.on_anomaly(trainer=trainer, kind=kind, detail=detail)
            return
        self._fold(value)
        if self.options.source == "memory" and step % self.options.snapshot_every == 0:
            self._take_snapshot(trainer)

    def _on_step_batched(self, trainer: Trainer, loss: torch.Tensor) -> None:
        """``check_every > 1``: keep the loss on the device; every k steps (and at the last) read
        the window's losses in one sync and check them in step order."""
        step = trainer.state.step
        self._pending.append((step, loss.detach().float().reshape(()), [list(p) for p in trainer.data.last_positions]))
        if step % self.options.check_every and step < trainer.total_steps:
            return
        pending, self._pending = self._pending, []
        values = torch.stack([t.to(loss.device) for _, t, _ in pending]).tolist()  # the one host sync per window
        for (at, _, positions), value in zip(pending, values):
            average = self.average
            spike = self.seen >= max(1, self.options.warmup_steps) and value > self.options.factor * average
            if not math.isfinite(value) or spike:
                kind = "spike" if math.isfinite(value) else "nonfinite"
                detail = {"step": at, "loss": value, "average": average, "factor": self.options.factor,
                          "positions": positions, "found_at": step}
                trainer.hook.on_anomaly(trainer=trainer, kind=kind, detail=detail)
                return
            self._fold(value)
        every = self.options.snapshot_every
        if self.options.source == "memory" and step // every > int(self._snap_meta.get("step", 0)) // every:
            self._take_snapshot(trainer)

    @hookimpl(trylast=True)
    def on_anomaly(self, trainer: Trainer, kind: str, detail: dict[str, Any]) -> bool | None:
        """Handle ``nonfinite`` (nan-guard) and ``spike`` by rolling back; others are not ours."""
        if kind not in ("nonfinite", "spike"):
            return None
        self._rollback(trainer, kind, detail)
        return True

    # ------------------------------------------------------------------ snapshots and rollback

    def _take_snapshot(self, trainer: Trainer) -> None:
        self._snapshotting = True  # our own state_dict leaves the previous snapshot out
        try:
            full = trainer.snapshot()
        finally:
            self._snapshotting = False
        snap = {k: full[k] for k in _RESTORED_PARTS}
        snap["plugins"].pop(NAME, None)  # restored with keep_plugins=(NAME,): never read
        snap["state"].update(_NEUTRAL)  # never read back (a rollback keeps the current history)
        self._snapshot = snap
        self._snap_meta = {"step": trainer.state.step, "avg_raw": self.avg_raw, "seen": self.seen}
        self.snapshots += 1

    def _rollback_target(self, trainer: Trainer, before: int) -> tuple[dict[str, Any], dict[str, Any], str]:
        """The state to go back to (from before step ``before``), its loss-tracker values, and where it came from."""
        if self.options.source == "checkpoint":
            found = self._newest_checkpoint(trainer, before)
            if found is not None:
                payload, path = found
                mine = payload.get("plugins", {}).get(NAME, {})
                meta = {"step": int(payload["step"]), "avg_raw": float(mine.get("avg_raw", self.avg_raw)),
                        "seen": int(mine.get("seen", self.seen))}
                return payload, meta, path.name
        assert self._snapshot is not None, "spike-rollback: no snapshot (on_train_start did not run)"
        return self._snapshot, self._snap_meta, "memory"

    def _newest_checkpoint(self, trainer: Trainer, before: int) -> tuple[dict[str, Any], Path] | None:
        """The newest verified rolling checkpoint of a step before ``before``."""
        directory = Path(trainer.checkpoint_dir)
        found = []
        for path in directory.glob("step_*.pt") if directory.is_dir() else ():
            m = _STEP_FILE.match(path.name)
            if m and int(m.group(1)) < before:
                found.append((int(m.group(1)), path))
        for _, path in sorted(found, reverse=True):
            try:
                return load_checkpoint(path), path
            except CheckpointError as e:
                trainer.log.warning("spike_rollback_checkpoint_skipped", path=str(path), reason=str(e))
        return None

    def _rollback(self, trainer: Trainer, kind: str, detail: dict[str, Any]) -> None:
        opts = self.options
        bad_step = int(detail.get("step", trainer.state.step))
        loss = float(detail.get("loss", math.nan))
        recent = [r for r in self.history if r["step"] > bad_step - opts.window]
        if len(recent) >= opts.max_rollbacks:
            message = (
                f"spike-rollback: {kind} at step {bad_step} (loss {loss:.4g}) after {len(recent)} rollbacks within "
                f"{opts.window} steps (max_rollbacks={opts.max_rollbacks}): training does not stabilise; lower "
                "optimizer.lr, or raise -o spike-rollback.max_rollbacks"
            )
            trainer.log_event("rollback_limit", at_step=bad_step, kind=kind, rollbacks=len(recent))
            trainer.request_stop(message)
            raise TrainingAborted(message)
        late = detail.get("positions")  # check_every > 1: the spiking step is not the last one
        target, meta, source = self._rollback_target(trainer, bad_step if late is not None else trainer.state.step + 1)
        # The core keeps the run's history and every batch skipped so far across the restore.
        if late is not None:
            for pos in late:
                if pos not in trainer.state.skip_batches:
                    trainer.state.skip_batches.append(list(pos))
        self._pending = []
        trainer.restore(target, keep_plugins=(NAME,), skip_last_step=late is None)
        trainer.scale_lr(opts.lr_factor)
        self.avg_raw, self.seen = float(meta["avg_raw"]), int(meta["seen"])
        entry = {"step": bad_step, "to_step": int(trainer.state.step), "kind": kind, "loss": _num(loss),
                 "lr": trainer.lr, "source": source}
        self.history.append(entry)
        trainer.log_event("rollback", **{("at_step" if k == "step" else k): v for k, v in entry.items()},
                          average=_num(detail.get("average", math.nan)), skip_batches=len(trainer.state.skip_batches))
        trainer.log.warning("spike_rollback", **{("at_step" if k == "step" else k): v for k, v in entry.items()})
        # The new last good state: later rollbacks keep the lower LR and the skipped batches.
        if source == "memory":
            self._take_snapshot(trainer)
        else:  # source=checkpoint: the good state lives on disk
            trainer.save_checkpoint("step")

    # ------------------------------------------------------------------ state and summary

    def state_dict(self) -> dict[str, Any]:
        """Loss tracker, rollback history and (``persist``) the last good snapshot."""
        state: dict[str, Any] = {
            "avg_raw": self.avg_raw, "seen": self.seen, "history": [dict(h) for h in self.history],
            "snapshots": self.snapshots, "snap_meta": dict(self._snap_meta), "snapshot": None,
            # check_every > 1: the window not checked yet (read now: a checkpoint syncs anyway)
            "pending": [[at, float(t), [list(p) for p in pos]] for at, t, pos in self._pending],
        }
        if self.options.persist and self.options.source == "memory" and not self._snapshotting:
            state["snapshot"] = self._snapshot
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the snapshot too, when it was persisted)."""
        self.avg_raw = float(state["avg_raw"])
        self.seen = int(state["seen"])
        self.history = [dict(h) for h in state["history"]]
        self.snapshots = int(state["snapshots"])
        self._snap_meta = dict(state["snap_meta"])
        self._snapshot = state["snapshot"]
        self._pending = [(int(at), torch.tensor(value, dtype=torch.float32), [list(p) for p in pos])
                         for at, value, pos in state.get("pending", [])]

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """``summary["spike-rollback"]``: rollbacks (with steps), snapshots taken, the loss average."""
        summary[NAME] = {
            "rollbacks": len(self.history),
            "rollback_steps": [h["step"] for h in self.history],
            "snapshots": self.snapshots,
            "loss_average": self.average if self.seen else None,
            "lr": trainer.lr,
            "history": [dict(h) for h in self.history],
        }

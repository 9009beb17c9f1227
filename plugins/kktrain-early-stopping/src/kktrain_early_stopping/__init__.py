"""early-stopping: stop when a validation metric has not improved for ``patience`` validations.

    kktrain run --plugin early-stopping -o early-stopping.monitor=val/acc -o early-stopping.mode=max
    kktrain run --plugin ema --plugin early-stopping -o early-stopping.monitor=val_ema/loss

Any metric the validation produces can be monitored, including those other plugins add (the EMA
plugin's ``val_ema/...``): the check runs ``trylast`` in ``on_validation_end``. The stop goes
through ``trainer.request_stop(reason)``: the step finishes, the final checkpoint is written and
the summary's ``status`` is ``stopped``. See docs/plugins/early-stopping.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from kktrain import PluginError, PluginOptions, hookimpl, smaller_is_better

if TYPE_CHECKING:
    from kktrain import Trainer

__all__ = ["EarlyStoppingPlugin"]

NAME = "early-stopping"
STATE_VERSION = 1


class EarlyStoppingOptions(PluginOptions):
    """``-o early-stopping.KEY=VALUE`` / ``[plugins.early-stopping]``."""

    monitor: str = "val/loss"
    """The validation metric, with its prefix (``val/acc``, ``val_ema/loss``)."""
    mode: Literal["auto", "min", "max"] = "auto"
    """Whether lower (``min``) or higher (``max``) is better; ``auto``: min for a loss- or
    error-like name (``kktrain.smaller_is_better``), else max."""
    patience: int = Field(5, ge=1)
    """Stop after this many validations in a row without improvement."""
    min_delta: float = Field(0.0, ge=0)
    """An improvement must beat the best by more than this."""
    min_steps: int = Field(0, ge=0)
    """Never stop before this step (validations before it still track the best)."""
    check_finite: bool = True
    """Stop at once when the monitored value is NaN or infinite."""


class EarlyStoppingPlugin:
    """Stops training when a validation metric stops improving (patience, min_delta, min or max)."""

    Options = EarlyStoppingOptions

    def __init__(self, options: EarlyStoppingOptions | None = None) -> None:
        self.options = options or EarlyStoppingOptions()
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_count = 0
        self.validations = 0
        self.stopped_step: int | None = None
        self.reason: str | None = None
        self._warned = False

    def improved(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        if self.best is None:
            return True
        delta = self.options.min_delta
        return value < self.best - delta if self.mode == "min" else value > self.best + delta

    @property
    def mode(self) -> str:
        """``min`` or ``max``, ``auto`` resolved from the monitored metric's name."""
        if self.options.mode != "auto":
            return self.options.mode
        return "min" if smaller_is_better(self.options.monitor) else "max"

    @hookimpl(trylast=True)
    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Track the best value; request the stop when patience runs out."""
        o = self.options
        if o.monitor not in metrics:
            if not self._warned:
                self._warned = True
                trainer.log.warning(
                    "early_stopping_metric_missing", monitor=o.monitor, available=sorted(metrics),
                    note="set -o early-stopping.monitor to one of the available metrics; nothing is stopped",
                )
            return
        if self.stopped_step is not None:
            return
        step = trainer.state.step
        value = float(metrics[o.monitor])
        self.validations += 1
        if not math.isfinite(value):
            if o.check_finite:
                self._stop(trainer, f"{o.monitor} is {value} at step {step}")
            return
        if self.improved(value):
            self.best, self.best_step, self.bad_count = value, step, 0
            return
        self.bad_count += 1
        if self.bad_count >= o.patience and step >= o.min_steps:
            self._stop(
                trainer,
                f"{o.monitor} did not improve on {self.best:.6g} (step {self.best_step}) by more than "
                f"{o.min_delta:g} for {self.bad_count} validations",
            )

    @hookimpl
    def on_train_start(self, trainer: Trainer) -> None:
        """A run resumed after an early stop goes on (the user asked for it); say so once."""
        if self.stopped_step is not None:
            trainer.log.info("early_stopping_already_stopped", stopped_step=self.stopped_step, reason=self.reason,
                             note="resumed after an early stop: training goes on and early stopping stays off")

    def _stop(self, trainer: Trainer, reason: str) -> None:
        self.stopped_step = trainer.state.step
        self.reason = f"early stopping: {reason}"
        trainer.log_event(
            "early_stop", monitor=self.options.monitor, mode=self.mode, best=self.best,
            best_step=self.best_step, bad_count=self.bad_count, reason=reason,
        )
        trainer.request_stop(self.reason)

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """``summary["early-stopping"]``: monitor, best value and step, whether and why it stopped."""
        o = self.options
        summary[NAME] = {
            "monitor": o.monitor, "mode": self.mode, "patience": o.patience, "min_delta": o.min_delta,
            "best": self.best, "best_step": self.best_step, "bad_count": self.bad_count,
            "validations": self.validations, "stopped": self.stopped_step is not None,
            "stopped_step": self.stopped_step, "reason": self.reason,
        }

    def state_dict(self) -> dict[str, Any]:
        """Best value and step, the count of validations without improvement, the stop if any."""
        return {
            "version": STATE_VERSION, "best": self.best, "best_step": self.best_step, "bad_count": self.bad_count,
            "validations": self.validations, "stopped_step": self.stopped_step, "reason": self.reason,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if state.get("version") != STATE_VERSION:
            raise PluginError(
                f"early-stopping state version {state.get('version')!r} is not {STATE_VERSION}: resume with the "
                "kktrain version that wrote the checkpoint"
            )
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_count, self.validations = int(state["bad_count"]), int(state["validations"])
        self.stopped_step, self.reason = state["stopped_step"], state["reason"]

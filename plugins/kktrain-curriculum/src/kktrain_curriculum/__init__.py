"""curriculum: schedule any task knob in stages, by step, epoch, share of the run or a metric.

A stage sets knobs (``trainer.task.default_knobs()`` names them: data knobs such as the Latin
task's ``sizes``/``modes``/``fill_min``/``fill_max``, which travel to data-loader workers inside
the SampleKeys, or main-process knobs such as loss weights). Knobs are cumulative: a stage keeps
what earlier stages set unless it sets the knob again, so stage k's knobs are always
``task defaults | stage 0 | ... | stage k`` (a pure function of the schedule).

    kktrain run --plugin curriculum -o curriculum.preset=latin
    kktrain run --task tiny --plugin curriculum -o curriculum.file=stages.toml

A stage file::

    [[stage]]
    name = "clean"
    until_step = 100                     # or until_epoch / until_fraction / steps
    knobs = { noise = 0.0 }

    [[stage]]
    name = "noisy"
    steps = 400                          # a deadline ...
    advance_when = { metric = "val/acc", op = ">=", value = 0.9, min_steps = 50 }   # ... or earlier
    knobs = { noise = 0.5 }

    [[stage]]                            # the last stage runs to the end
    knobs = { noise = 1.0 }

See docs/plugins/curriculum.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from kktrain import ConfigError, PluginError, PluginOptions, hookimpl

if TYPE_CHECKING:
    from kktrain import Trainer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["AdvanceRule", "CurriculumPlugin", "PRESETS", "Stage", "load_schedule"]

NAME = "curriculum"
STATE_VERSION = 1
CLOCKS = ("until_step", "until_epoch", "until_fraction", "steps")
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt,
}


class AdvanceRule(BaseModel):
    """Leave the stage early once a validation metric crosses a threshold."""

    model_config = ConfigDict(extra="forbid")

    metric: str
    """A key of the validation metrics, with its prefix: ``val/acc``, ``val_ema/loss``."""
    op: Literal[">=", ">", "<=", "<"]
    value: float
    min_steps: int = Field(0, ge=0)
    """The stage lasts at least this many steps; validations before that do not count."""
    consecutive: int = Field(1, ge=1)
    """The condition must hold at this many validations in a row."""


class Stage(BaseModel):
    """One stage: its knobs and when it ends (one clock, an ``advance_when`` rule, or both)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    until_step: int | None = Field(None, ge=1)
    """Ends once ``step >= until_step`` (counted from the schedule's origin, normally step 0)."""
    until_epoch: int | None = Field(None, ge=1)
    """Ends when epoch ``until_epoch`` begins (counted from the origin's epoch)."""
    until_fraction: float | None = Field(None, gt=0, le=1)
    """Ends at this share of the run: ``origin + round(f * (total_steps - origin))``."""
    steps: int | None = Field(None, ge=1)
    """Ends ``steps`` steps after the stage began (a duration, not a position)."""
    knobs: dict[str, Any] = Field(default_factory=dict)
    advance_when: AdvanceRule | None = None

    @model_validator(mode="after")
    def _one_clock(self) -> Stage:
        clocks = [c for c in CLOCKS if getattr(self, c) is not None]
        if len(clocks) > 1:
            raise ValueError(f"a stage has one clock, got {' and '.join(clocks)}: keep one (advance_when may be added)")
        return self

    def clock(self) -> tuple[str, float] | None:
        """``(field, value)`` of the stage's clock, or None."""
        for c in CLOCKS:
            value = getattr(self, c)
            if value is not None:
                return c, value
        return None


class CurriculumOptions(PluginOptions):
    """``-o curriculum.KEY=VALUE`` / ``[plugins.curriculum]``; exactly one of file, preset, stages."""

    file: str | None = None
    """A TOML file of ``[[stage]]`` tables (relative paths are relative to the working directory)."""
    preset: Literal["latin", "early", "phased"] | None = None
    """A shipped schedule (see ``PRESETS``)."""
    stages: list[Stage] | None = None
    """Stages inline in the config file: ``stages = [{until_step = 100, knobs = {noise = 0.0}}, ...]``."""
    on_resume_change: Literal["jump", "restart"] = "jump"
    """Resuming with a different schedule: jump to its stage at this step, or start it now."""


# ---------------------------------------------------------------------------------------- presets

_ALL_MODES = ["STANDARD", "ZERO_INCLUSIVE", "NEGATIVE"]

PRESETS: dict[str, list[Stage]] = {
    # Seed 000's 60-epoch Latin schedule, scaled to the run: four equal quarters of total_steps.
    "latin": [
        Stage(name="sizes 3-5, STANDARD, 50-70% shown", until_fraction=0.25,
              knobs={"sizes": [3, 4, 5], "modes": ["STANDARD"], "fill_min": 0.5, "fill_max": 0.7}),
        Stage(name="sizes 3-8, STANDARD, 30-50% shown", until_fraction=0.5,
              knobs={"sizes": list(range(3, 9)), "modes": ["STANDARD"], "fill_min": 0.3, "fill_max": 0.5}),
        Stage(name="sizes 3-12, +ZERO_INCLUSIVE, 10-30% shown", until_fraction=0.75,
              knobs={"sizes": list(range(3, 13)), "modes": ["STANDARD", "ZERO_INCLUSIVE"], "fill_min": 0.1, "fill_max": 0.3}),
        Stage(name="sizes 3-16, +NEGATIVE, 0-10% shown",
              knobs={"sizes": list(range(3, 17)), "modes": list(_ALL_MODES), "fill_min": 0.0, "fill_max": 0.1}),
    ],
    # Seed 004's auxiliary-loss schedules, as shares of its 50k-step run ("early" brings in its first
    # auxiliary loss at 10k and its second at 20k; "phased" at 15k and 30k), moving the Latin task's
    # own loss knobs: the constraint loss (penalises a symbol repeated in a row or column, the
    # structural term, like seed 004's spectrum loss) first, then focal loss (hard cells weigh more).
    "early": [
        Stage(name="cross-entropy only", until_fraction=0.2, knobs={"constraint_weight": 0.0, "focal_gamma": 0.0}),
        Stage(name="+constraint loss", until_fraction=0.4, knobs={"constraint_weight": 0.5}),
        Stage(name="+focal loss", knobs={"focal_gamma": 1.0}),
    ],
    "phased": [
        Stage(name="cross-entropy only", until_fraction=0.3, knobs={"constraint_weight": 0.0, "focal_gamma": 0.0}),
        Stage(name="+constraint loss", until_fraction=0.6, knobs={"constraint_weight": 0.5}),
        Stage(name="+focal loss", knobs={"focal_gamma": 1.0}),
    ],
}


# ---------------------------------------------------------------------------------------- loading

_STAGES = TypeAdapter(list[Stage])


def _read_stage_file(path: Path) -> list[Stage]:
    """Stages from a TOML file of ``[[stage]]`` tables; errors are one line naming the fix."""
    if not path.is_file():
        raise PluginError(f"curriculum file {path} does not exist: check -o curriculum.file=PATH")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PluginError(f"curriculum file {path} is not valid TOML ({e}): fix its syntax") from None
    extra = sorted(set(data) - {"stage"})
    if extra or "stage" not in data:
        raise PluginError(
            f"curriculum file {path}: expected only [[stage]] tables, found {extra or 'none'}: "
            "write each stage as [[stage]] with until_step/until_epoch/until_fraction/steps, knobs, advance_when"
        )
    try:
        return _STAGES.validate_python(data["stage"])
    except ValidationError as err:
        first = err.errors()[0]
        loc = list(first["loc"])
        where = f"stage {int(loc[0]) + 1}" if loc and isinstance(loc[0], int) else "stage"
        key = ".".join(str(x) for x in loc[1:]) or "(table)"
        hint = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise PluginError(
            f"curriculum file {path}: {where} key '{key}': {hint}: keys are name, {', '.join(CLOCKS)}, knobs, advance_when"
        ) from None


def check_schedule(stages: list[Stage], source: str) -> None:
    """Every stage but the last must end somehow; same-kind clocks must move forward."""
    if not stages:
        raise PluginError(f"curriculum {source} has no stages: give at least one")
    last = len(stages) - 1
    for i, s in enumerate(stages):
        if i < last and s.clock() is None and s.advance_when is None:
            raise PluginError(
                f"curriculum {source}: stage {i + 1} ({s.name or 'unnamed'}) never ends: give it until_step, "
                "until_epoch, until_fraction, steps or advance_when (only the last stage runs to the end)"
            )
        if i == last and s.advance_when is not None:
            raise PluginError(f"curriculum {source}: the last stage has advance_when but no stage follows: remove it or add a stage")
    for kind in ("until_step", "until_epoch", "until_fraction"):
        seen = [(i, getattr(s, kind)) for i, s in enumerate(stages) if getattr(s, kind) is not None]
        for (i, a), (j, b) in zip(seen, seen[1:]):
            if b <= a:
                raise PluginError(
                    f"curriculum {source}: stage {j + 1} {kind}={b} is not after stage {i + 1}'s {kind}={a}: "
                    "boundaries count from the schedule's start; use steps=N for durations"
                )


def load_schedule(options: CurriculumOptions) -> tuple[list[Stage], str]:
    """The stages named by the options, and a description of where they came from."""
    given = [k for k in ("file", "preset", "stages") if getattr(options, k) is not None]
    if not given:
        # The default task's schedule (seed 000), scaled to the run; other tasks name their own.
        stages = [s.model_copy(deep=True) for s in PRESETS["latin"]]
        check_schedule(stages, "preset latin (the default)")
        return stages, "preset latin (the default)"
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise PluginError(
            f"plugin 'curriculum' needs exactly one of file, preset or stages (got {what}): "
            "e.g. -o curriculum.preset=latin or -o curriculum.file=stages.toml"
        )
    if options.file is not None:
        path = Path(options.file).expanduser()
        stages, source = _read_stage_file(path), f"file {path}"
    elif options.preset is not None:
        stages, source = [s.model_copy(deep=True) for s in PRESETS[options.preset]], f"preset {options.preset}"
    else:
        stages, source = list(options.stages or []), "inline stages"
    check_schedule(stages, source)
    return stages, source


def fingerprint(stages: list[Stage]) -> str:
    """A short hash of the schedule as specified (a resume compares it to detect a change)."""
    text = json.dumps([s.model_dump(mode="json") for s in stages], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- plugin


class CurriculumPlugin:
    """Schedules task knobs (data difficulty, loss weights) in stages by step, epoch, share or metric."""

    Options = CurriculumOptions
    # For kktrain's contract suite (tiny task, 10 steps, cut at 7): a stage change before the cut.
    contract_options = {"stages": [{"until_step": 5, "knobs": {"noise": 0.0}}, {"knobs": {"noise": 0.1}}]}

    def __init__(self, options: CurriculumOptions | None = None) -> None:
        self.options = options or CurriculumOptions()
        self.stages, self.source = load_schedule(self.options)
        self.fingerprint = fingerprint(self.stages)
        self.index = 0
        self.stage_start_step = 0
        self.origin_step = 0
        self.origin_epoch = 0
        self.consecutive = 0
        self.transitions: list[dict[str, Any]] = []
        self._loaded: dict[str, Any] | None = None
        self._boundary: int | None = None  # the step at which the current stage's clock ends
        self._running = False  # on_train_start has placed the run in the schedule
        self._total_steps = 0
        self._steps_per_epoch = 1
        self._warned_metrics: set[str] = set()

    def resolved_options(self) -> dict[str, str]:
        """What unset options resolve to, for ``kktrain config show``: the schedule that applies."""
        o = self.options
        if o.file is None and o.preset is None and o.stages is None:
            return {"preset": self.source.removeprefix("preset ")}
        return {}

    # ------------------------------------------------------------------ knobs

    def cumulative_knobs(self, defaults: Mapping[str, Any], index: int) -> dict[str, Any]:
        """Knobs in force during stage ``index``: task defaults, then stages 0..index in order."""
        knobs = dict(defaults)
        for stage in self.stages[: index + 1]:
            knobs.update(stage.knobs)
        return knobs

    def _stage_label(self, i: int) -> str:
        return self.stages[i].name or f"stage {i}"

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_model_built(self, trainer: Trainer, model: Any) -> None:
        """Check the schedule against the task before anything is written: knob names and values."""
        task = trainer.task
        known = task.default_knobs()
        used = sorted({k for s in self.stages for k in s.knobs})
        missing = [k for k in used if k not in known]
        if missing:
            raise ConfigError(
                f"curriculum {self.source} sets knob(s) {missing} that task '{task.name}' does not have: "
                f"its knobs are {sorted(known)}; use a task that exposes them or a stage file with its knobs"
            )
        try:
            for i in range(len(self.stages)):
                try:
                    task.set_knobs(self.cumulative_knobs(known, i))
                except (ValueError, TypeError, KeyError) as e:
                    raise ConfigError(
                        f"curriculum {self.source}: task '{task.name}' rejects the knobs of stage {i + 1} "
                        f"({self._stage_label(i)}): {e}"
                    ) from None
        finally:
            task.set_knobs(trainer.state.knobs)

    @hookimpl
    def on_train_start(self, trainer: Trainer) -> None:
        """Place the run in the schedule (fresh, resumed, or resumed with a changed schedule)."""
        st = trainer.state
        self._total_steps, self._steps_per_epoch = int(trainer.total_steps), int(trainer.steps_per_epoch)
        loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded.get("fingerprint") == self.fingerprint:
            self._restore(loaded)
        elif loaded is None and st.step == 0:
            self.origin_step = self.origin_epoch = 0
            self._enter(trainer, 0, "start")
        else:
            self._resume_changed(trainer, loaded)
        self._running = True
        self._apply(trainer)
        self._catch_up(trainer)

    @hookimpl
    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Epoch-based stages end here, before the epoch's first batch."""
        self._catch_up(trainer)

    @hookimpl
    def on_step(self, trainer: Trainer, loss: Any) -> None:
        """Step-based stages: after step s, if the stage ends, the next batch sees the new knobs."""
        boundary = self._boundary
        if boundary is not None and trainer.state.step >= boundary:
            self._catch_up(trainer)

    @hookimpl(trylast=True)
    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Adaptive advancement (``trylast``: sees metrics other plugins add, e.g. ``val_ema/...``)."""
        if self.index >= len(self.stages) - 1:
            return
        rule = self.stages[self.index].advance_when
        if rule is None:
            return
        if rule.metric not in metrics:
            if rule.metric not in self._warned_metrics:
                self._warned_metrics.add(rule.metric)
                trainer.log.warning(
                    "curriculum_metric_missing", metric=rule.metric, stage=self.index,
                    available=sorted(metrics), note="fix advance_when.metric; the stage's clock still applies",
                )
            return
        step = trainer.state.step
        if step - self.stage_start_step < rule.min_steps:
            return
        value = float(metrics[rule.metric])
        self.consecutive = self.consecutive + 1 if OPS[rule.op](value, rule.value) else 0
        if self.consecutive >= rule.consecutive:
            self._enter(trainer, self.index + 1, "metric", metric=rule.metric, value=value, op=rule.op, threshold=rule.value)
            self._apply(trainer)
            self._catch_up(trainer)

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """``summary["curriculum"]``: the stage transitions with their steps and the final stage."""
        summary[NAME] = {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "on_resume_change": self.options.on_resume_change,
            "origin_step": self.origin_step,
            "stages": [dict(t) for t in self.transitions],
            "final_stage": {"index": self.index, "name": self._stage_label(self.index), "knobs": dict(trainer.state.knobs)},
        }

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Stage index, its start, the schedule's origin, the adaptive rule's count, the fingerprint."""
        if self._loaded is not None:  # loaded but not applied yet (before on_train_start)
            return dict(self._loaded)
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "index": self.index,
            "stage_start_step": self.stage_start_step,
            "origin_step": self.origin_step,
            "origin_epoch": self.origin_epoch,
            "consecutive": self.consecutive,
            "transitions": [dict(t) for t in self.transitions],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """A checkpoint's state is kept until ``on_train_start`` compares the schedules; a snapshot
        restored mid-run (rollback) applies at once (the core restores the knobs with it)."""
        if state.get("version") != STATE_VERSION:
            raise PluginError(
                f"curriculum state version {state.get('version')!r} is not {STATE_VERSION}: resume with the kktrain "
                "version that wrote the checkpoint"
            )
        if self._running and state.get("fingerprint") == self.fingerprint:
            self._restore(state)
            self._set_boundary()
        else:
            self._loaded = dict(state)

    def _restore(self, saved: Mapping[str, Any]) -> None:
        self.index = int(saved["index"])
        self.stage_start_step = int(saved["stage_start_step"])
        self.origin_step = int(saved["origin_step"])
        self.origin_epoch = int(saved["origin_epoch"])
        self.consecutive = int(saved["consecutive"])
        self.transitions = [dict(t) for t in saved["transitions"]]

    # ------------------------------------------------------------------ schedule mechanics

    def _clock_end(self, index: int, start_step: int) -> tuple[str, int] | None:
        """When stage ``index`` (begun at ``start_step``) ends by its clock: ("step"|"epoch", at)."""
        clock = self.stages[index].clock()
        if clock is None:
            return None
        kind, value = clock
        if kind == "until_step":
            return "step", self.origin_step + int(value)
        if kind == "steps":
            return "step", start_step + int(value)
        if kind == "until_fraction":
            span = max(self._total_steps - self.origin_step, 0)
            return "step", self.origin_step + int(math.floor(value * span + 0.5))
        return "epoch", self.origin_epoch + int(value)

    def _catch_up(self, trainer: Trainer) -> None:
        """Move past every stage whose clock has run out; apply the knobs once if anything moved."""
        st = trainer.state
        moved = False
        while self.index < len(self.stages) - 1:
            end = self._clock_end(self.index, self.stage_start_step)
            if end is None:
                break
            kind, at = end
            if (st.step if kind == "step" else st.epoch) < at:
                break
            self._enter(trainer, self.index + 1, self.stages[self.index].clock()[0])  # type: ignore[index]
            moved = True
        if moved:
            self._apply(trainer)
        self._set_boundary()

    def _set_boundary(self) -> None:
        end = self._clock_end(self.index, self.stage_start_step) if self.index < len(self.stages) - 1 else None
        self._boundary = end[1] if end is not None and end[0] == "step" else None

    def _enter(self, trainer: Trainer, index: int, reason: str, **detail: Any) -> None:
        st = trainer.state
        previous = self.index if self.transitions else None
        self.index = index
        self.stage_start_step = st.step
        self.consecutive = 0
        record = {"stage": index, "name": self._stage_label(index), "step": st.step, "epoch": st.epoch,
                  "from_stage": previous, "reason": reason, **detail}
        self.transitions.append(record)
        trainer.log_event("curriculum_stage", **{k: v for k, v in record.items() if k != "step"},
                          knobs=self.stages[index].knobs)

    def _apply(self, trainer: Trainer) -> None:
        trainer.set_knobs(self.cumulative_knobs(trainer.task.default_knobs(), self.index))

    def _resume_changed(self, trainer: Trainer, loaded: Mapping[str, Any] | None) -> None:
        """The checkpoint has another schedule (or none): jump into the new one, or restart it now."""
        st = trainer.state
        policy = self.options.on_resume_change
        old_index = None if loaded is None else int(loaded["index"])
        trainer.log.warning(
            "curriculum_changed", step=st.step, policy=policy,
            saved_fingerprint=None if loaded is None else loaded.get("fingerprint"), fingerprint=self.fingerprint,
            note="the checkpoint was written with another curriculum" if loaded is not None
            else "the checkpoint has no curriculum state",
        )
        self.transitions = [dict(t) for t in loaded["transitions"]] if loaded is not None else []
        self.consecutive = 0
        if policy == "restart":
            self.origin_step, self.origin_epoch = st.step, st.epoch
            self.index = old_index if old_index is not None else 0  # only for from_stage in the record
            self._enter(trainer, 0, "resume-restart", saved_stage=old_index)
            return
        # jump: walk the new schedule from step 0 by its clocks to where it is at this step.
        self.origin_step = self.origin_epoch = 0
        index, start = 0, 0
        while index < len(self.stages) - 1:
            end = self._clock_end(index, start)
            if end is None:
                break
            kind, at = end
            if (st.step if kind == "step" else st.epoch) < at:
                break
            index, start = index + 1, at if kind == "step" else min(at * self._steps_per_epoch, st.step)
        self.index = old_index if old_index is not None else 0
        self._enter(trainer, index, "resume-jump", saved_stage=old_index)
        self.stage_start_step = start

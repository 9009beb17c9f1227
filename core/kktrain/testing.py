"""kktrain's pytest plugin: fixtures for testing kktrain plugins (entry point ``pytest11``).

Imports torch and kktrain only when a fixture is used, so installing kktrain does not slow
down unrelated test suites.

Fixtures:

``kktrain_run``
    ``kktrain_run(plugins=["ema"], options={"ema.decay": 0.9}, steps=20)`` trains the tiny task
    in-process into a fresh directory and returns a :class:`RunOutcome`.
``hook_recorder``
    A :class:`HookRecorder`; pass it as ``kktrain_run(..., recorder=hook_recorder)``.
``fault_injector``
    The :class:`FaultInjector` class: ``fault_injector(nan_at=[5], spike_at={8: 20.0},
    oom_at=[3], oom_above=8)``; pass the instance in ``plugins``.
``assert_resume_equivalent``
    ``assert_resume_equivalent(plugins=["ema"], steps=12, cut=5)``: N steps in one go equal
    k steps, resume, N-k steps, bit for bit (model, optimizer, plugin state).
``tiny_task``
    A fresh tiny task (an MLP on synthetic points).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

_counter = itertools.count()


@dataclass
class HookCall:
    """One recorded hook call."""

    name: str
    kwargs: dict[str, Any]
    plugins: list[str]


@dataclass
class HookRecorder:
    """Records hook calls via pluggy's hook-call monitoring."""

    calls: list[HookCall] = field(default_factory=list)
    ignore: frozenset[str] = frozenset()

    def attach(self, pm: Any) -> None:
        """Start recording the calls of plugin manager ``pm``."""

        def before(hook_name: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
            if hook_name not in self.ignore:
                self.calls.append(HookCall(hook_name, dict(kwargs), [i.plugin_name for i in impls]))

        def after(outcome: Any, hook_name: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
            return None

        pm.add_hookcall_monitoring(before, after)

    @property
    def names(self) -> list[str]:
        """The hook names in call order."""
        return [c.name for c in self.calls]

    def of(self, name: str) -> list[HookCall]:
        """The calls of one hook."""
        return [c for c in self.calls if c.name == name]


@dataclass
class RunOutcome:
    """What a test run left behind."""

    summary: dict[str, Any]
    run_dir: Path
    trainer: Any
    error: BaseException | None = None

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl``."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def checkpoints(self) -> list[Path]:
        """Checkpoint files, newest step first."""
        from kktrain.checkpoint import list_checkpoints

        return list_checkpoints(self.run_dir / "checkpoints")

    def final_payload(self) -> dict[str, Any]:
        """The loaded ``final.pt`` (or the newest checkpoint when the run did not finish)."""
        from kktrain.checkpoint import load_checkpoint

        final = self.run_dir / "checkpoints" / "final.pt"
        return load_checkpoint(final if final.exists() else self.checkpoints[0])

    def assert_success(self) -> None:
        """The run completed, with a summary and finite final validation metrics."""
        import math

        assert self.error is None, f"run failed: {self.error!r}"
        assert self.summary.get("status") == "completed", f"status {self.summary.get('status')}: {self.summary.get('stop_reason')}"
        assert (self.run_dir / "summary.json").exists()
        bad = {k: v for k, v in self.summary.get("final", {}).items() if not math.isfinite(v)}
        assert not bad, f"non-finite final metrics: {bad}"


class FaultInjector:
    """A real plugin that injects faults at chosen steps: NaN loss, a loss spike, out-of-memory.

    Steps are the 1-based number of the optimizer step being computed (``state.step + 1``).
    ``oom_above``: the OOM is raised only while the micro-batch is larger than this, so a
    retry with smaller micro-batches succeeds, like a real OOM.
    """

    name = "fault-inject"

    def __init__(
        self,
        nan_at: Iterable[int] = (),
        spike_at: Mapping[int, float] | None = None,
        oom_at: Iterable[int] = (),
        oom_above: int = 0,
        inf_at: Iterable[int] = (),
    ) -> None:
        self.nan_at = set(nan_at)
        self.inf_at = set(inf_at)
        self.spike_at = dict(spike_at or {})
        self.oom_at = set(oom_at)
        self.oom_above = oom_above
        self.injected: list[tuple[str, int]] = []
        from kktrain.hookspecs import hookimpl

        def forward_loss(trainer: Any, batch: Any) -> Any:
            from kktrain import batch_size_of

            step = trainer.state.step + 1
            if step in self.oom_at and batch_size_of(batch) > self.oom_above:
                import torch

                self.injected.append(("oom", step))
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected by fault-inject at step {step})")
            loss = yield
            if step in self.nan_at:
                self.injected.append(("nan", step))
                return loss * float("nan")
            if step in self.inf_at:
                self.injected.append(("inf", step))
                return loss * float("inf")
            if step in self.spike_at:
                self.injected.append(("spike", step))
                return loss * self.spike_at[step]
            return loss

        self.forward_loss = hookimpl(wrapper=True, tryfirst=True)(forward_loss)


def run_tiny(
    tmp_dir: Path,
    *,
    plugins: Sequence[str | object] = (),
    options: Mapping[str, Any] | None = None,
    steps: int = 20,
    task: str = "tiny",
    task_options: Mapping[str, Any] | None = None,
    resume: str | None = None,
    stop_at_step: int | None = None,
    recorder: HookRecorder | None = None,
    out: Path | None = None,
    raise_errors: bool = True,
    **core: Any,
) -> RunOutcome:
    """Train in-process; ``options`` take the same dotted keys as ``-o`` (``ema.decay``)."""
    from kktrain.config import Layered, build_run_config, split_layers
    from kktrain.trainer import Trainer, make_task

    out = out or tmp_dir / f"run{next(_counter)}"
    layered = Layered()
    names = [p for p in plugins if isinstance(p, str)]
    task_obj, _ = make_task(task, task_options or {})
    base = {**task_obj.config_defaults(), "max_steps": steps, "task": task, "out": str(out), "plugins": names}
    layered.add(base, "default")
    layered.add({**core, **(options or {})}, "-o")
    config = build_run_config(layered)
    config.stop_at_step = stop_at_step
    _, plugin_tables, _ = split_layers(layered)
    trainer = Trainer(
        config, list(plugins), plugin_options=plugin_tables, task=make_task(task, task_options or {})[0],
        user_set=layered.user_set(), resume=resume, quiet=True,
    )
    if recorder is not None:
        recorder.attach(trainer.pm)
    try:
        summary = trainer.fit()
    except BaseException as e:
        trainer.close()
        if raise_errors:
            raise
        return RunOutcome({}, out, trainer, e)
    return RunOutcome(summary, out, trainer)


def _tensors_equal(a: Any, b: Any, path: str = "") -> list[str]:
    import torch

    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            return [path]
        return []
    if isinstance(a, Mapping):
        if not isinstance(b, Mapping) or set(a) != set(b):
            return [f"{path} (keys differ)"]
        return [d for k in a for d in _tensors_equal(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [f"{path} (length differs)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _tensors_equal(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and a != a and isinstance(b, float) and b != b:
        return []
    return [] if a == b else [f"{path} ({a!r} != {b!r})"]


def compare_payloads(a: Mapping[str, Any], b: Mapping[str, Any], parts: Sequence[str] = ("model", "optimizer", "scheduler", "plugins")) -> list[str]:
    """Paths at which two checkpoints differ (tensors compared bit for bit)."""
    diffs: list[str] = []
    for part in parts:
        diffs += _tensors_equal(a.get(part), b.get(part), part)
    for key in ("step", "epoch", "batch_in_epoch", "skipped_steps", "knobs", "skip_batches"):
        diffs += _tensors_equal(a["state"].get(key), b["state"].get(key), f"state.{key}")
    return diffs


def resume_equivalent(
    tmp_dir: Path, *, plugins: Sequence[str | object] | Callable[[], Sequence[object]] = (), steps: int = 12, cut: int = 5, **kwargs: Any
) -> tuple[RunOutcome, RunOutcome]:
    """Run ``steps`` in one go and ``cut`` + resume; assert bit-identical final state."""
    make = plugins if callable(plugins) else (lambda: plugins)
    whole = run_tiny(tmp_dir, plugins=make(), steps=steps, **kwargs)
    out = tmp_dir / f"cut{next(_counter)}"
    run_tiny(tmp_dir, plugins=make(), steps=steps, stop_at_step=cut, out=out, **kwargs)
    resumed = run_tiny(tmp_dir, plugins=make(), steps=steps, resume="auto", out=out, **kwargs)
    diffs = compare_payloads(whole.final_payload(), resumed.final_payload())
    assert not diffs, f"resumed run differs from the uninterrupted one at: {diffs[:10]}"
    return whole, resumed


@pytest.fixture
def kktrain_run(tmp_path: Path) -> Callable[..., RunOutcome]:
    """Run a tiny training in-process: ``kktrain_run(plugins=[...], options={...}, steps=N)``."""

    def _run(**kwargs: Any) -> RunOutcome:
        return run_tiny(tmp_path, **kwargs)

    return _run


@pytest.fixture
def hook_recorder() -> HookRecorder:
    """Records hook calls; pass to ``kktrain_run(recorder=...)``."""
    return HookRecorder()


@pytest.fixture
def fault_injector() -> type[FaultInjector]:
    """The fault-injection plugin class (NaN, spike, OOM at chosen steps)."""
    return FaultInjector


@pytest.fixture
def assert_resume_equivalent(tmp_path: Path) -> Callable[..., tuple[RunOutcome, RunOutcome]]:
    """``assert_resume_equivalent(plugins=[...], steps=12, cut=5, options={...})``."""

    def _check(**kwargs: Any) -> tuple[RunOutcome, RunOutcome]:
        return resume_equivalent(tmp_path, **kwargs)

    return _check


@pytest.fixture
def tiny_task() -> Any:
    """A fresh tiny task."""
    from kktrain.tasks.tiny import make_task

    return make_task()

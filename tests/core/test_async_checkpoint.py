"""``checkpoint.async = true`` on one process: the same checkpoints as synchronous writes, a failed
background write reported at the next step, and real SIGKILL / SIGTERM while a write is in flight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kktrain import CheckpointError, hookimpl, load_checkpoint
from kktrain.checkpoint import list_checkpoints, verify
from kktrain.testing import compare_payloads, run_tiny

OPTIONS: dict[str, Any] = {"checkpoint.every_steps": 3, "batch_size": 16}
TASK = {"samples": 128, "dropout": 0.1}


class CheckpointWatch:
    name = "checkpoint-watch"

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str]] = []
        self.last_step = 0

    @hookimpl
    def on_checkpoint(self, trainer: Any, path: str, kind: str) -> None:
        self.seen.append((kind, load_checkpoint(path)["step"], Path(path).name))

    @hookimpl
    def on_step(self, trainer: Any, loss: Any) -> None:
        self.last_step = trainer.state.step


def test_async_checkpoints_hold_what_synchronous_ones_hold(tmp_path: Path) -> None:
    """Bit for bit the same files (training went on while they were written), every one reported
    through on_checkpoint once verified, and the final one written before the run returns."""
    watch_sync, watch_async = CheckpointWatch(), CheckpointWatch()
    sync = run_tiny(tmp_path, plugins=["ema", watch_sync], steps=20, options=OPTIONS, task_options=TASK)
    bg = run_tiny(tmp_path, plugins=["ema", watch_async], steps=20, options={**OPTIONS, "checkpoint.async": True}, task_options=TASK)
    names = [p.name for p in sync.checkpoints]
    assert names == [p.name for p in bg.checkpoints] and "final.pt" in names
    for a, b in zip(sync.checkpoints, bg.checkpoints):
        assert verify(b) == (True, "ok")
        assert not compare_payloads(load_checkpoint(a), load_checkpoint(b)), b.name
    assert watch_async.seen == watch_sync.seen and watch_async.seen[-1][0] == "final"
    writer = bg.trainer.checkpoints.writer
    assert writer is not None and writer.background and not writer.in_flight
    assert len(writer.stalls) == len(watch_async.seen)


class BreaksAt:
    """From step ``at`` on, its state holds a function, which torch.save cannot write."""

    name = "breaks-at"

    def __init__(self, at: int) -> None:
        self.at = at
        self.trainer: Any = None

    @hookimpl
    def on_train_start(self, trainer: Any) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        if self.trainer is not None and self.trainer.state.step >= self.at:
            return {"fn": lambda: None}
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def test_a_failed_background_write_is_reported_at_the_next_step_and_leaves_nothing(tmp_path: Path) -> None:
    watch = CheckpointWatch()
    with pytest.raises(CheckpointError, match=r"writing checkpoint .*step_00000006\.pt failed .*earlier checkpoints are intact"):
        run_tiny(tmp_path, plugins=[BreaksAt(6), watch], steps=20, options={**OPTIONS, "checkpoint.async": True},
                 task_options=TASK, out=tmp_path / "run")
    # Reported after step 7 at the latest when the write took long: before step 9 wrote anything.
    assert 7 <= watch.last_step <= 9, watch.last_step
    ck = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(ck)] == ["step_00000003.pt"]
    assert verify(ck / "step_00000003.pt") == (True, "ok")
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000003.pt", "step_00000003.pt.json"]
    assert '"event": "checkpoint_failed"' in (tmp_path / "run" / "log.jsonl").read_text()


SCRIPT = """
import json, os, signal, sys, torch
from pathlib import Path
from kktrain import hookimpl
from kktrain.testing import run_tiny

class Big:
    name = "big"
    def __init__(self):
        self.weights = torch.zeros(16 * 1024 * 1024)  # 64 MiB: the background write takes a while
    def state_dict(self):
        return {"weights": self.weights}
    def load_state_dict(self, state):
        self.weights.copy_(state["weights"])

class SignalWhileWriting:
    name = "signal-while-writing"
    def __init__(self, signum, marker):
        self.signum, self.marker, self.done = signum, marker, False
    @hookimpl
    def on_step(self, trainer, loss):
        writer = trainer.checkpoints.writer
        if not self.done and trainer.state.step > 8 and writer.busy:
            self.done = True
            Path(self.marker).write_text(json.dumps({"step": trainer.state.step, "busy": True}))
            os.kill(os.getpid(), self.signum)

mode, out = sys.argv[1], Path(sys.argv[2])
signum = {"kill": signal.SIGKILL, "term": signal.SIGTERM}.get(mode)
watcher = SignalWhileWriting(signum, str(out) + ".marker")
watcher.done = signum is None  # the same plugins in every run (a resume needs them), armed only to kill
plugins = [Big(), watcher]
run_tiny(out.parent, plugins=plugins, steps=16, out=out, resume="auto" if mode == "resume" else None,
         options={"checkpoint.every_steps": 4, "checkpoint.async": True, "batch_size": 16},
         task_options={"samples": 128, "dropout": 0.1})
"""


def _script(tmp_path: Path, mode: str, out: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "async_run.py"
    script.write_text(SCRIPT)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KKTRAIN_")}, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), mode, str(out)], capture_output=True, text=True, timeout=240, env=env)


def _whole(tmp_path: Path) -> dict[str, Any]:
    proc = _script(tmp_path, "whole", tmp_path / "whole")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_checkpoint(tmp_path / "whole" / "checkpoints" / "final.pt")


def test_sigkill_while_a_background_write_is_in_flight_then_resume_is_bit_identical(tmp_path: Path) -> None:
    run = tmp_path / "killed"
    proc = _script(tmp_path, "kill", run)
    assert proc.returncode == -9, proc.stderr[-3000:]
    marker = json.loads(Path(f"{run}.marker").read_text())
    assert marker["busy"], "the write had finished before the kill: nothing was tested"
    ck = run / "checkpoints"
    assert verify(ck / "step_00000004.pt") == (True, "ok")
    unfinished = list(ck.glob(".step_00000008.pt.tmp-*")) or not verify(ck / "step_00000008.pt")[0]
    resumed = _script(tmp_path, "resume", run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    start = [r for r in log if r["event"] == "resumed"][0]
    assert start["step"] == (4 if unfinished else 8)  # 8 only when the kill came after its manifest, while verifying
    diffs = compare_payloads(_whole(tmp_path), load_checkpoint(ck / "final.pt"), parts=("model", "optimizer", "scheduler"))
    assert not diffs, diffs


def test_sigterm_waits_for_the_write_in_flight_then_writes_the_interrupt_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "termed"
    proc = _script(tmp_path, "term", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    marker = json.loads(Path(f"{run}.marker").read_text())
    assert marker["busy"], "the write had finished before SIGTERM: nothing was tested"
    ck = run / "checkpoints"
    step = marker["step"]
    assert verify(ck / "step_00000008.pt") == (True, "ok")  # the write in flight, completed
    interrupt = load_checkpoint(ck / f"step_{step:08d}.pt")
    assert interrupt["kind"] == "interrupt" and interrupt["step"] == step
    assert not [p for p in ck.iterdir() if ".tmp" in p.name]


class Big:
    """64 MiB of state: a background write takes long enough to be caught in flight."""

    name = "big"

    def __init__(self) -> None:
        self.weights = torch.zeros(16 * 1024 * 1024)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights.copy_(state["weights"])


class CrashWhileWriting:
    """Raises from ``on_step`` while a background write is running (a bug in the user's code)."""

    name = "crash-while-writing"

    def __init__(self) -> None:
        self.crashed_at: int | None = None

    @hookimpl
    def on_step(self, trainer: Any, loss: Any) -> None:
        if self.crashed_at is None and trainer.state.step > 8 and trainer.checkpoints.writer.busy:
            self.crashed_at = trainer.state.step
            raise RuntimeError("a crash in the middle of a background write")


def test_a_crash_waits_for_the_write_in_flight(tmp_path: Path) -> None:
    crash = CrashWhileWriting()
    with pytest.raises(RuntimeError, match="a crash in the middle"):
        run_tiny(tmp_path, plugins=[Big(), crash], steps=16, out=tmp_path / "run", task_options=TASK,
                 options={"checkpoint.every_steps": 4, "checkpoint.async": True, "batch_size": 16})
    assert crash.crashed_at is not None, "the write had finished before the crash: nothing was tested"
    assert verify(tmp_path / "run" / "checkpoints" / "step_00000008.pt") == (True, "ok")

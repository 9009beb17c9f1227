"""Every exit path leaves summary.json and a resumable run; one run per directory (issue 15, issue 11)."""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path

import pytest
import torch

from kktrain.testing import FaultInjector, compare_payloads, run_tiny
from rel import TINY, kk, one_line_error, start, step_checkpoints, wait_for


def _final(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)


def test_an_error_in_a_step_leaves_a_checkpoint_before_it_and_a_crashed_summary(tmp_path: Path) -> None:
    """Injected through the fault-inject test plugin: a RuntimeError in step 7's forward."""
    whole = run_tiny(tmp_path, steps=12, out=tmp_path / "whole", log_every=1)
    crashed = run_tiny(tmp_path, steps=12, out=tmp_path / "crashed", plugins=[FaultInjector(raise_at=[7])],
                       raise_errors=False, log_every=1)
    assert isinstance(crashed.error, RuntimeError) and "fault-inject at step 7" in str(crashed.error)
    summary = json.loads((tmp_path / "crashed" / "summary.json").read_text())
    assert summary["status"] == "crashed" and "RuntimeError: error injected" in summary["error"]
    payload = torch.load(Path(summary["checkpoint"]), weights_only=True)
    assert payload["step"] == 6 and payload["kind"] == "crash"
    log = [json.loads(ln) for ln in (tmp_path / "crashed" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "crashed" and "Traceback" in r.get("traceback", "") for r in log)
    assert not (tmp_path / "crashed" / ".lock").exists()
    # The crash checkpoint is the state after step 6 at the batch of step 7: resuming is exact.
    run_tiny(tmp_path, steps=12, out=tmp_path / "crashed", resume="auto", log_every=1, plugins=[FaultInjector()])
    assert not compare_payloads(_final(tmp_path / "whole"), _final(tmp_path / "crashed"))


_FAULTY = '''
from pathlib import Path

from kktrain.tasks.tiny import TinyTask

class Faulty(TinyTask):
    name = "faulty"
    calls = 0

    def loss(self, model, batch):
        Faulty.calls += 1
        if Faulty.calls == 5 and Path("armed").exists():  # the 4th step (the batch check is call 1)
            Path("armed").unlink()
            raise ZeroDivisionError("a bug in the user's loss")
        return super().loss(model, batch)

def make():
    return Faulty()
'''


def test_the_cli_says_one_line_with_the_resume_command(tmp_path: Path) -> None:
    (tmp_path / "faulty.py").write_text(textwrap.dedent(_FAULTY))
    (tmp_path / "armed").write_text("")
    proc = kk("run", "--task", "faulty:make", "-q", "--max-steps", "8", "--out", "r", cwd=tmp_path)
    line = one_line_error(proc, 1)
    assert "training crashed at step 3" in line and "ZeroDivisionError: a bug in the user's loss" in line, line
    assert "resume with: kktrain run --resume auto --out r" in line, line
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "crashed" and summary["steps"] == 3
    # The resume command works (the bug fires only once per process).
    kk("run", "--task", "faulty:make", "-q", "--max-steps", "8", "--out", "r", "--resume", "auto", cwd=tmp_path, check=True)
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "completed"


# ---------------------------------------------------------------- the run lock

LONG = (*TINY, "--max-steps", "100000", "-o", "checkpoint.every_steps=50", "-o", "task.samples=4096")


def test_a_second_run_on_the_same_directory_is_refused_while_the_first_lives(tmp_path: Path) -> None:
    first = start(*LONG, "--out", "r", cwd=tmp_path)
    try:
        wait_for(lambda: (tmp_path / "r" / "config.toml").exists(), first, "the run's config")
        before = (tmp_path / "r" / "config.toml").read_bytes(), (tmp_path / "r" / ".lock").read_bytes()
        second = kk(*LONG, "--out", "r", "--resume", "auto", cwd=tmp_path)
        line = one_line_error(second, 2)
        assert "in use by another kktrain run" in line and f"pid {first.pid}" in line, line
        assert ((tmp_path / "r" / "config.toml").read_bytes(), (tmp_path / "r" / ".lock").read_bytes()) == before
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    assert not (tmp_path / "r" / ".lock").exists(), "the lock outlived its run"


def test_a_stale_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    first = start(*LONG, "--out", "r", cwd=tmp_path)
    wait_for(lambda: len(step_checkpoints(tmp_path / "r")) >= 1, first, "a checkpoint")
    first.kill()
    first.wait(timeout=30)
    assert (tmp_path / "r" / ".lock").exists()
    again = kk(*TINY, "--max-steps", "60", "-o", "task.samples=4096", "--out", "r", "--resume", "auto", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "took over the lock" in again.stderr and f"pid {first.pid}" in again.stderr, again.stderr
    assert not (tmp_path / "r" / ".lock").exists()


def test_bad_input_on_an_existing_run_leaves_no_lock_behind(tmp_path: Path) -> None:
    kk(*TINY, "--max-steps", "2", "--out", "r", cwd=tmp_path, check=True)
    proc = kk(*TINY, "--max-steps", "4", "--out", "r", "--resume", "auto", "--task", "latin", cwd=tmp_path)
    one_line_error(proc, 2)
    assert not (tmp_path / "r" / ".lock").exists()


# ---------------------------------------------------------------- the non-finite loss

def test_a_nan_loss_without_a_guard_is_warned_once_and_in_the_summary(tmp_path: Path) -> None:
    out = run_tiny(tmp_path, steps=8, plugins=[FaultInjector(nan_at=[3, 4, 5])], log_every=1)
    warned = [e for e in out.summary["events"] if e.get("event") == "loss_not_finite"]
    assert out.summary["loss_not_finite_at"] == 3, out.summary
    proc = kk(*TINY, "--max-steps", "6", "-o", "optimizer.lr=1e30", "-o", "log_every=1", "-o", "grad_clip=0",
              "--out", "nan", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("loss_not_finite") == 1, proc.stderr
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["loss_not_finite_at"] is not None
    del warned

"""Fault battery helpers: the real ``kktrain`` CLI in real processes, faults from outside."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


KKTRAIN = str(Path(sys.executable).parent / "kktrain")
TINY = ("run", "--task", "tiny", "-q")


def env_for(cwd: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI child: one torch thread, runs and trust key under ``cwd``."""
    base = {k: v for k, v in os.environ.items() if k != "KKTRAIN_TRACE_HOOKS" and not k.startswith("KKTRAIN_")}
    return {**base, "OMP_NUM_THREADS": "1", "KKTRAIN_RUNS_DIR": str(cwd / "runs"), "KKTRAIN_HOME": str(cwd / "home"), **extra}


def kk(*args: str, cwd: Path, timeout: float = 240, check: bool = False, preexec_fn=None, **extra: str) -> subprocess.CompletedProcess[str]:
    """``kktrain ARGS`` in ``cwd``, to completion."""
    proc = subprocess.run([KKTRAIN, *args], cwd=cwd, env=env_for(cwd, **extra), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn)
    if check and proc.returncode != 0:
        raise AssertionError(f"kktrain {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def start(*args: str, cwd: Path, new_session: bool = False, **extra: str) -> subprocess.Popen[str]:
    """``kktrain ARGS`` in the background (its own process group with ``new_session``)."""
    return subprocess.Popen([KKTRAIN, *args], cwd=cwd, env=env_for(cwd, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_session)


def wait_for(predicate, proc: subprocess.Popen[str], what: str, timeout: float = 120) -> None:
    """Poll until ``predicate()``; fail with the child's stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}:\n{err}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def step_checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step_*.pt"))


def one_line_error(proc: subprocess.CompletedProcess[str], code: int = 2, *, warnings: bool = False) -> str:
    """Assert the CLI failed with ``code``, one line on stderr, no traceback; return the line.

    With ``warnings``, earlier ``warning ...`` lines (a resume's notes) are allowed before it.
    """
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    if warnings:
        lines = [ln for ln in lines if not ln.startswith("warning")]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one line:\n{proc.stderr}"
    return lines[0]


def killpg(proc: subprocess.Popen[str], sig: int) -> None:
    os.killpg(os.getpgid(proc.pid), sig)



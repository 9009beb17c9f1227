"""Random ``kill -9`` trials: however a run dies, ``--resume auto`` continues it bit-exactly (issue 15).

A handful of trials by default; ``KKTRAIN_KILL_TRIALS=50`` (or any number) runs more, and
``KKTRAIN_KILL_SEED`` replays a sequence. Each trial kills the run at a random moment, often
several times over, including in the middle of checkpoint writes (every 3 steps, and ``best.pt``
rewritten at each validation), then resumes it to the end and compares the final state with an
uninterrupted run's.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from kktrain.testing import compare_payloads
from rel import TINY, kk, start

TRIALS = int(os.environ.get("KKTRAIN_KILL_TRIALS", "3"))
SEED = int(os.environ.get("KKTRAIN_KILL_SEED", str(random.SystemRandom().randrange(10**6))))
RUN = (*TINY, "--max-steps", "400", "-o", "checkpoint.every_steps=3", "-o", "checkpoint.keep_last=2",
       "-o", "val_every=4", "-o", "checkpoint.best_metric=val/loss", "-o", "task.samples=2048", "-o", "task.hidden=64")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, float]:
    """The uninterrupted run's final state, and how long the whole run took here (start included)."""
    root = tmp_path_factory.mktemp("ref")
    t0 = time.monotonic()
    kk(*RUN, "--out", "whole", cwd=root, check=True)
    return torch.load(root / "whole" / "checkpoints" / "final.pt", weights_only=True), time.monotonic() - t0


@pytest.mark.parametrize("trial", range(TRIALS))
def test_random_kill_9_then_resume_is_bit_identical(reference: tuple[dict, float], tmp_path: Path, trial: int) -> None:
    expected, duration = reference
    rng = random.Random(SEED * 1000 + trial)
    kills = 0
    for attempt in range(rng.randint(1, 3)):
        args = (*RUN, "--out", "r") + (("--resume", "auto") if attempt else ())
        proc = start(*args, cwd=tmp_path)
        # Anywhere in the run, start-up included: mostly in training and checkpoint writes.
        time.sleep(rng.uniform(0.2, 0.95) * duration)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=120)
    assert kills, "every attempt finished before its kill: lengthen RUN (more steps) for this machine"
    print(f"kill trial {trial} (seed {SEED}): {kills} kill(s)")
    final = kk(*RUN, "--out", "r", "--resume", "auto", cwd=tmp_path)
    assert final.returncode == 0, f"seed {SEED} trial {trial}: {final.stderr}"
    assert "Traceback" not in final.stderr
    got = torch.load(tmp_path / "r" / "checkpoints" / "final.pt", weights_only=True)
    diffs = compare_payloads(expected, got)
    assert not diffs, f"seed {SEED} trial {trial} ({kills} kills): {diffs[:5]}"
    left = [p.name for p in (tmp_path / "r" / "checkpoints").iterdir() if ".tmp" in p.name or ".prev" in p.name]
    assert not left, left

"""SIGTERM/SIGINT to the whole process group with data workers on (`timeout`, Slurm, kill -TERM -PGID)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from kktrain.testing import compare_payloads
from rel import TINY, kk, killpg, start, step_checkpoints, wait_for

RUN = (*TINY, "--max-steps", "400", "-o", "data.workers=2", "-o", "task.samples=4096", "-o", "checkpoint.every_steps=40",
       "-o", "task.dropout=0.1")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_group_checkpoints_and_resumes_exactly(tmp_path: Path, sig: int) -> None:
    proc = start(*RUN, "--out", "r", cwd=tmp_path, new_session=True)
    try:
        wait_for(lambda: len(step_checkpoints(tmp_path / "r")) >= 1, proc, "a checkpoint")
        killpg(proc, sig)  # the main process and both workers
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            killpg(proc, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "killed by signal" not in err, err
    assert "--resume auto --out r" in err, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert not (tmp_path / "r" / ".lock").exists()
    resumed = kk(*RUN, "--out", "r", "--resume", "auto", cwd=tmp_path, check=True)
    assert "killed by signal" not in resumed.stderr and "Traceback" not in resumed.stderr, resumed.stderr
    kk(*RUN, "--out", "whole", cwd=tmp_path, check=True)
    final = lambda d: torch.load(tmp_path / d / "checkpoints" / "final.pt", weights_only=True)  # noqa: E731
    assert not compare_payloads(final("whole"), final("r"))

"""ema with amp and grad-checkpoint: exact resume together, and the issue's command on the Latin task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

LATIN_TINY = ["-o", "task.d_model=16", "-o", "task.layers=2", "-o", "task.heads=2", "-o", "task.samples_per_epoch=256",
              "-o", "task.val_puzzles=6", "-o", "task.val_sizes=[4]", "-o", "batch_size=16", "-o", "val_every=4",
              "-o", "checkpoint.every_steps=0", "-o", "schedule.warmup_steps=2"]


def test_resume_is_exact_with_amp_bf16_ema_and_grad_checkpoint(assert_resume_equivalent):
    whole, _ = assert_resume_equivalent(
        plugins=["amp", "ema", "grad-checkpoint"], options={"amp.dtype": "bf16", "ema.decay": 0.9}, steps=12, cut=5,
        val_every=4, task_options={"dropout": 0.2},
    )
    summary = whole.summary
    assert summary["amp"]["dtype"] == "bf16" and summary["grad-checkpoint"]["blocks"] == 3
    assert {"val/loss", "val_ema/loss"} <= set(summary["final"])


@pytest.mark.slow
def test_issue_command_trains_the_default_task(tmp_path):
    """`kktrain run --plugin amp -o amp.dtype=bf16 --plugin ema --plugin curriculum` (a small Latin model)."""
    exe = Path(sys.executable).parent / "kktrain"
    out = tmp_path / "latin"
    done = subprocess.run(
        [str(exe), "run", "--plugin", "amp", "-o", "amp.dtype=bf16", "--plugin", "ema", "--plugin", "curriculum",
         "--out", str(out), "--max-steps", "8", *LATIN_TINY],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    final = summary["final"]
    assert {"val/valid_iter", "val_ema/valid_iter", "val/loss", "val_ema/loss"} <= set(final)
    assert summary["amp"]["dtype"] == "bf16"
    assert summary["ema"]["updates"] == 8
    assert "ema valid_iter" in summary["ema"] and "raw valid_iter" in summary["ema"]
    # The curriculum's default (the seed-000 Latin schedule) advanced at each quarter of the run.
    assert [t["step"] for t in summary["curriculum"]["stages"]][-3:] == [2, 4, 6]

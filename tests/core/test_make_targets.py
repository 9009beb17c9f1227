"""Seed 000's Makefile targets are thin wrappers over the CLI: run them for real, briefly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make(target: str, tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    # BIN: this interpreter's scripts; -o: never reinstall the venv from inside a test.
    args = ["make", "-s", "-C", str(ROOT), "-o", ".venv/.installed", f"BIN={Path(sys.executable).parent}", target,
            *(f"{k}={v}" for k, v in variables.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KKTRAIN_RUNS_DIR": str(tmp_path / "runs")}
    env.pop("KKTRAIN_TRACE_HOOKS", None)
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, f"make {target}: {proc.stdout}\n{proc.stderr}"
    return proc


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_train_quick_then_train_resume(tmp_path):
    run = tmp_path / "q"
    make("train-quick", tmp_path, ARGS=f"--task tiny --quiet --out {run} --stop-at-step 3")
    s = _summary(run)
    assert s["status"] == "paused" and s["total_steps"] == 100  # train-quick is 100 steps
    make("train-resume", tmp_path, RUN=str(run), ARGS="--quiet --max-steps 6")
    assert _summary(run)["steps"] == 6


def test_train_full_enables_curriculum_augmentation_and_ema(tmp_path):
    run = tmp_path / "full"
    small = "-o batch_size=8 -o task.samples_per_epoch=64 -o task.val_puzzles=4"
    make("train-full", tmp_path, ARGS=f"--max-steps 2 --quiet --out {run} {small}")
    s = _summary(run)
    assert s["status"] == "completed" and s["plugins"] == ["curriculum", "ema"]
    config = (run / "config.toml").read_text()
    assert "augment = true" in config


def test_train_and_hw_report(tmp_path):
    run = tmp_path / "t"
    make("train", tmp_path, ARGS=f"--task tiny --quiet --max-steps 2 --out {run}")
    assert _summary(run)["steps"] == 2
    report = json.loads(make("hw-report", tmp_path, ARGS="--json").stdout)
    assert isinstance(report, dict) and report


def test_train_9x9_runs_the_recipe_file(tmp_path):
    # the recipe's own length is ~30 CPU-minutes; --stop-at-step keeps its schedule and stops at 2
    run = tmp_path / "r9"
    make("train-9x9", tmp_path, ARGS=f"--quiet --out {run} --stop-at-step 2 -o task.val_puzzles=4 -o val_every=2")
    s = _summary(run)
    assert s["status"] == "paused" and s["total_steps"] == 3000 and s["steps"] == 2
    config = (run / "config.toml").read_text()
    for line in ("batch_size = 64", "size_min = 9", "size_max = 9", "constraint_weight = 0.5", "best_metric = \"val/valid_iter\""):
        assert line in config, line
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "val"' in x]
    assert val and "val/valid_iter" in val[-1]  # validated on 9 x 9 only: no per-size breakdown of other sizes
    assert not any(k.endswith("/n5") for k in val[-1])

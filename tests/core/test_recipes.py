"""The files under recipes/ are real configs: their first steps run with the CLI in a subprocess."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kktrain.testing import run_cli

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--stop-at-step", "2", "-q", "-o", "task.val_puzzles=4", "-o", "val_every=2"]


def test_the_ab_curriculum_arm_moves_the_fill_knobs(tmp_path):
    out = tmp_path / "curriculum"
    proc = run_cli("run", "--config", str(ROOT / "recipes/latin-9x9.toml"), "--plugin", "curriculum",
                   "-o", f"curriculum.file={ROOT / 'recipes/latin-9x9-fill-curriculum.toml'}", "--out", str(out), *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    stages = [e for e in events if e.get("event") == "curriculum_stage"]
    assert stages and stages[0]["name"] == "easy", stages
    assert stages[0]["knobs"] == {"fill_min": 0.5, "fill_max": 0.9}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "paused" and summary["total_steps"] == 3000


@pytest.mark.skipif(shutil.which("bash") is None, reason="recipes/latin-9x9-ab.sh is a bash script and this machine has no bash")
def test_the_ab_script_runs_every_arm_then_compares_and_plots(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "ab"
    # every arm for 2 steps (the options after OUT_DIR go to each arm), so the script runs in seconds
    env = {**os.environ, "KK": str(Path(sys.executable).parent / "kktrain"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "recipes/latin-9x9-ab.sh"), str(out), "--max-steps", "2",
                           "-o", "task.val_puzzles=4", "-o", "val_every=2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for arm in ("recipe", "no-constraint", "ema", "curriculum", "focal"):
        assert json.loads((out / arm / "summary.json").read_text())["status"] == "completed", arm
    assert "no-constraint" in proc.stdout and "task_options.constraint_weight" in proc.stdout  # kktrain compare
    assert (out / "ab.png").stat().st_size > 10_000
    tta = json.loads((out / "recipe-tta4.json").read_text())
    assert "val/valid_iter_tta" in tta and "val/valid_iter" in tta

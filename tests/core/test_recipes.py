"""The files under recipes/ are real configs: their first steps run with the CLI in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

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

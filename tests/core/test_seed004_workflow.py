"""Seed 004's workflow end to end, small: a base run, two branches with different curricula, compared."""

from __future__ import annotations

import json

import pytest

from kkcli import kk, tree_state

SMALL = ["-o", "batch_size=8", "-o", "task.samples_per_epoch=256", "-o", "task.val_puzzles=2", "-o", "log_every=1",
         "-o", "checkpoint.at_epoch_end=false"]


def test_base_run_then_early_and_phased_branches(tmp_path):
    pytest.importorskip("kktrain_curriculum", reason="the workflow branches with curricula: needs the kktrain-curriculum distribution")
    kk("run", "--max-steps", "6", "--out", "base", "--quiet", "-o", "checkpoint.every_steps=3", "-o", "checkpoint.keep_last=1",
       "-o", "checkpoint.keep_every=3", *SMALL, cwd=tmp_path, check=True)
    point = "base/checkpoints/step_00000003.pt"
    before = tree_state(tmp_path / "base")
    for preset in ("early", "phased"):
        kk("run", "--resume", point, "--out", f"branch-{preset}", "--max-steps", "12", "--quiet", "--plugin", "curriculum",
           "-o", f"curriculum.preset={preset}", *SMALL, cwd=tmp_path, check=True)
    assert tree_state(tmp_path / "base") == before
    stages = {}
    for preset in ("early", "phased"):
        summary = json.loads((tmp_path / f"branch-{preset}" / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 12
        assert summary["parent"] == {"run_dir": "base", "checkpoint": point, "step": 3}
        stages[preset] = [(t["step"], t["stage"], t["reason"]) for t in summary["curriculum"]["stages"]]
        assert summary["curriculum"]["final_stage"]["knobs"]["constraint_weight"] == 0.5
        assert summary["curriculum"]["final_stage"]["knobs"]["focal_gamma"] == 1.0
    # Shares of the 12-step run: early 20 % / 40 % (steps 2 and 5), phased 30 % / 60 % (4 and 7);
    # the branch enters at step 3 where each schedule is then (resume-jump).
    assert stages["early"] == [(3, 1, "resume-jump"), (5, 2, "until_fraction")]
    assert stages["phased"] == [(3, 0, "resume-jump"), (4, 1, "until_fraction"), (7, 2, "until_fraction")]

    compared = kk("compare", "branch-early", "branch-phased", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    assert "branch-early" in compared.stdout and "branch-phased" in compared.stdout

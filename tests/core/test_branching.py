"""Branching runs from one checkpoint (seed 004) and milestone checkpoints that survive pruning."""

from __future__ import annotations

import json
from pathlib import Path

from kktrain.checkpoint import prune
from kktrain.testing import run_tiny

from kkcli import kk, tree_state

MILESTONES = {"checkpoint.every_steps": 2, "checkpoint.keep_last": 1, "checkpoint.keep_every": 4,
              "checkpoint.at_epoch_end": False}


def _names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.endswith(".json"))


def test_milestones_survive_keep_last(tmp_path):
    out = run_tiny(tmp_path, steps=10, options=MILESTONES)
    # step 10 is the newest rolling one (keep_last 1), 4 and 8 are milestones; 2 and 6 were pruned.
    assert _names(out.run_dir) == ["final.pt", "step_00000004.pt", "step_00000008.pt", "step_00000010.pt"]


def test_without_keep_every_the_branch_point_is_pruned(tmp_path):
    out = run_tiny(tmp_path, steps=10, options={**MILESTONES, "checkpoint.keep_every": 0})
    assert _names(out.run_dir) == ["final.pt", "step_00000010.pt"]


def test_prune_keeps_sharded_milestone_directories(tmp_path):
    """Sharded (DCP) checkpoints are ``step_N/`` directories: milestones among them stay too."""
    ck = tmp_path / "checkpoints"
    for step in (3, 6, 9, 12, 15):
        d = ck / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "state.pt").write_bytes(b"x")
    removed = prune(ck, keep_last=2, keep_every=6)
    assert sorted(p.name for p in removed) == ["step_00000003", "step_00000009"]
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000006", "step_00000012", "step_00000015"]


def test_branch_records_its_parent_and_leaves_the_parent_alone(tmp_path):
    opts = [f"-o{k}={json.dumps(v)}" for k, v in MILESTONES.items()]
    kk("run", "--task", "tiny", "--max-steps", "10", "--out", "base", "--quiet", *opts, cwd=tmp_path, check=True)
    before = tree_state(tmp_path / "base")
    point = Path("base") / "checkpoints" / "step_00000004.pt"
    kk("run", "--resume", str(point), "--out", "branch", "--max-steps", "8", "--quiet", "-o", "optimizer.lr=0.003",
       cwd=tmp_path, check=True)
    assert tree_state(tmp_path / "base") == before  # the parent is untouched
    summary = json.loads((tmp_path / "branch" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert summary["parent"] == {"run_dir": "base", "checkpoint": str(point), "step": 4}
    assert any(e["event"] == "branched" for e in summary["events"])
    # Its checkpoints are its own, after the branch point (6 was pruned, 8 is a milestone).
    assert _names(tmp_path / "branch") == ["final.pt", "step_00000008.pt"]
    # Resumed later from its own directory, the branch still names its parent.
    kk("run", "--resume", "auto", "--out", "branch", "--max-steps", "10", "--quiet", cwd=tmp_path, check=True)
    summary = json.loads((tmp_path / "branch" / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["parent"]["step"] == 4


def test_a_branch_into_a_run_with_checkpoints_is_refused(tmp_path):
    opts = [f"-o{k}={json.dumps(v)}" for k, v in MILESTONES.items()]
    for name in ("a", "b"):
        kk("run", "--task", "tiny", "--max-steps", "6", "--out", name, "--quiet", *opts, cwd=tmp_path, check=True)
    before = tree_state(tmp_path / "b")
    proc = kk("run", "--resume", "a/checkpoints/step_00000004.pt", "--out", "b", "--quiet", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "needs a new --out" in proc.stderr and "Traceback" not in proc.stderr
    assert tree_state(tmp_path / "b") == before


def test_keep_every_must_be_a_multiple_of_every_steps(tmp_path):
    proc = kk("run", "--task", "tiny", "--max-steps", "6", "--out", "r", "-o", "checkpoint.every_steps=4",
              "-o", "checkpoint.keep_every=6", cwd=tmp_path)
    assert proc.returncode == 2
    assert "not a multiple of checkpoint.every_steps" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()

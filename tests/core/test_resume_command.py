"""`kktrain resume RUN_DIR` is `kktrain run --resume auto --out RUN_DIR`."""

from __future__ import annotations

import json

from kktrain.checkpoint import load_checkpoint
from kktrain.testing import compare_payloads

from kkcli import kk, tree_state


def test_resume_command_continues_exactly(tmp_path):
    kk("run", "--task", "tiny", "--max-steps", "12", "--out", "whole", "--quiet", cwd=tmp_path, check=True)
    kk("run", "--task", "tiny", "--max-steps", "12", "--out", "cut", "--quiet", "--stop-at-step", "5", cwd=tmp_path, check=True)
    kk("resume", "cut", "--quiet", cwd=tmp_path, check=True)
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "final.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "final.pt")
    assert not compare_payloads(a, b)
    # Run options pass through: extend the finished run.
    kk("resume", "cut", "--quiet", "--max-steps", "14", cwd=tmp_path, check=True)
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["steps"] == 14


def test_resume_command_refuses_what_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    before = tree_state(tmp_path)
    for target in ("missing", "empty"):
        proc = kk("resume", target, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "is not a run directory" in proc.stderr and "Traceback" not in proc.stderr
    assert tree_state(tmp_path) == before
    proc = kk("resume", "empty", "--out", "elsewhere", cwd=tmp_path)
    assert proc.returncode == 2 and "drop --out" in proc.stderr
    assert "--resume auto --out RUN_DIR" in kk("resume", "--help", cwd=tmp_path).stdout

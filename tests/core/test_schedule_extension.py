"""Extending a run: ``--resume ... --max-steps N`` continues the LR schedule of the new length."""

from __future__ import annotations

import math

import pytest

from kktrain.testing import compare_payloads, run_tiny

CORE = {"log_every": 1, "schedule.warmup_steps": 2, "checkpoint.keep_last": 5}


def _lrs(outcome, first_step: int) -> dict[int, float]:
    return {m["step"]: m["train/lr"] for m in outcome.metrics if m["kind"] == "train" and m["step"] >= first_step}


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_extended_run_follows_the_longer_schedule(tmp_path, schedule):
    """After 8 of 8 steps, resuming with 16 gives the LRs a 16-step run has at steps 9-16: no restart."""
    opts = {**CORE, "schedule.name": schedule}
    planned = run_tiny(tmp_path, steps=16, options=opts)
    base = run_tiny(tmp_path, steps=8, options=opts, out=tmp_path / "base")
    assert base.summary["status"] == "completed"
    extended = run_tiny(tmp_path, steps=16, options=opts, resume="auto", out=tmp_path / "base")
    assert extended.summary["steps"] == 16
    got, want = _lrs(extended, 9), _lrs(planned, 9)
    assert sorted(got) == list(range(9, 17))
    assert got == want  # bit for bit: the steps are replayed on the scheduler
    if schedule == "cosine":
        # The old schedule ended at min_lr (0); the new one picks up where a 16-step run is and decays.
        values = [got[s] for s in sorted(got)]
        assert values[0] > 0 and all(a >= b for a, b in zip(values, values[1:]))
        assert math.isclose(values[-1], 0.0, abs_tol=1e-12)
    log = (tmp_path / "base" / "log.jsonl").read_text()
    assert '"schedule_extended"' in log


def test_without_extension_the_old_cosine_would_climb(tmp_path):
    """The failure the extension fixes: the 8-step cosine stepped past its end rises again."""
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    lrs = []
    for _ in range(16):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[-1] > lrs[7] + 0.5


def test_extended_run_resumes_exactly(tmp_path):
    """An extended run cut at step 12 and resumed equals the uninterrupted extension, bit for bit."""
    whole_dir, cut_dir = tmp_path / "whole", tmp_path / "cut"
    for out in (whole_dir, cut_dir):
        run_tiny(tmp_path, steps=8, options=CORE, out=out)
    whole = run_tiny(tmp_path, steps=16, options=CORE, resume="auto", out=whole_dir)
    run_tiny(tmp_path, steps=16, options=CORE, resume="auto", out=cut_dir, stop_at_step=12)
    resumed = run_tiny(tmp_path, steps=16, options=CORE, resume="auto", out=cut_dir)
    diffs = compare_payloads(whole.final_payload(), resumed.final_payload())
    assert not diffs, diffs[:10]


def test_unchanged_length_does_not_rebuild_the_schedule(tmp_path):
    """Resuming with the same length keeps the checkpoint's scheduler (the exact-resume path)."""
    out = tmp_path / "r"
    run_tiny(tmp_path, steps=12, options=CORE, out=out, stop_at_step=6)
    run_tiny(tmp_path, steps=12, options=CORE, out=out, resume="auto")
    assert '"schedule_extended"' not in (out / "log.jsonl").read_text()


def test_a_new_lr_on_resume_is_the_lr_the_run_continues_with(tmp_path):
    """-o optimizer.lr=... on resume: the optimizer's state carries the checkpoint's LR; the new
    one must replace it (scaled base LRs, the schedule followed from the current step)."""
    const = {"log_every": 1, "schedule.name": "constant", "optimizer.lr": 0.01, "checkpoint.keep_last": 5}
    run_tiny(tmp_path, steps=8, options=const, out=tmp_path / "r")
    resumed = run_tiny(tmp_path, steps=16, options={**const, "optimizer.lr": 0.001}, resume="auto", out=tmp_path / "r")
    lrs = _lrs(resumed, 9)
    assert sorted(lrs) == list(range(9, 17))
    assert all(math.isclose(v, 0.001, rel_tol=1e-9) for v in lrs.values()), lrs
    cosine = {**CORE, "optimizer.lr": 0.01}
    planned = run_tiny(tmp_path, steps=16, options={**cosine, "optimizer.lr": 0.002})
    run_tiny(tmp_path, steps=8, options=cosine, out=tmp_path / "c")
    changed = run_tiny(tmp_path, steps=16, options={**cosine, "optimizer.lr": 0.002}, resume="auto", out=tmp_path / "c")
    got, want = _lrs(changed, 9), _lrs(planned, 9)
    assert sorted(got) == sorted(want) and all(math.isclose(got[s], want[s], rel_tol=1e-9, abs_tol=1e-15) for s in got)
    assert '"lr_changed"' in (tmp_path / "c" / "log.jsonl").read_text()


def test_epochs_on_resume_extends_a_run_saved_with_max_steps(tmp_path):
    """The run's length is max_steps or epochs: --epochs on resume replaces the saved max_steps."""
    from kkcli import kk

    first = kk("run", "--task", "tiny", "--max-steps", "16", "-q", "--out", "r", cwd=tmp_path)  # 1 epoch of 16 steps
    assert first.returncode == 0, first.stderr
    more = kk("resume", "r", "--epochs", "2", "-q", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    import json

    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["steps"] == 32 and summary["status"] == "completed", summary

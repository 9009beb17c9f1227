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

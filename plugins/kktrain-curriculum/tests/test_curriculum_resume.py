"""curriculum: exact resume (with workers, across stage changes) and resuming with another schedule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

STEP_STAGES = [
    {"name": "clean", "until_step": 6, "knobs": {"noise": 0.0}},
    {"name": "noisy", "steps": 4, "knobs": {"noise": 0.4, "loss_weight": 0.7}},
    {"name": "noisier", "knobs": {"noise": 0.8}},
]


def events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


@pytest.mark.parametrize("cut", [4, 8])
def test_resume_is_bit_exact_with_workers_across_a_stage_change(assert_resume_equivalent, cut):
    whole, resumed = assert_resume_equivalent(
        plugins=["curriculum"], steps=14, cut=cut,
        options={"curriculum.stages": STEP_STAGES, "data.workers": 2}, task_options={"dropout": 0.2},
    )
    assert [t["step"] for t in resumed.summary["curriculum"]["stages"]] == [0, 6, 10]
    assert resumed.summary["curriculum"]["stages"] == whole.summary["curriculum"]["stages"]
    assert not events(resumed.run_dir, "curriculum_changed")


def test_resume_is_bit_exact_mid_adaptive_count_and_epoch_stage(assert_resume_equivalent):
    # The cut (step 12) falls between the first and the second validation that satisfy the rule
    # (consecutive=2): the count must come back from the checkpoint.
    stages = [
        {"name": "a", "until_epoch": 1, "knobs": {"noise": 0.2}},
        {"name": "b", "advance_when": {"metric": "val/acc", "op": ">=", "value": 0.0, "min_steps": 1, "consecutive": 2}},
        {"name": "c", "knobs": {"noise": 0.6}},
    ]
    whole, resumed = assert_resume_equivalent(
        plugins=["curriculum"], steps=24, cut=20, options={"curriculum.stages": stages, "val_every": 4},
    )
    got = [(t["name"], t["step"], t["reason"]) for t in resumed.summary["curriculum"]["stages"]]
    assert got == [("a", 0, "start"), ("b", 16, "until_epoch"), ("c", 24, "metric")]


def test_fraction_boundaries_resume_exactly(assert_resume_equivalent):
    """Fraction boundaries are recomputed from total_steps on resume, and land the same."""
    stages = [{"until_fraction": 0.25, "knobs": {"noise": 0.1}}, {"until_fraction": 0.75, "knobs": {"noise": 0.2}}, {}]
    _, resumed = assert_resume_equivalent(plugins=["curriculum"], steps=12, cut=5, options={"curriculum.stages": stages})
    assert [t["step"] for t in resumed.summary["curriculum"]["stages"]] == [0, 3, 9]


OLD = [{"name": "old", "until_step": 100, "knobs": {"noise": 0.9}}, {}]
NEW = [
    {"name": "n0", "until_step": 4, "knobs": {"noise": 0.0}},
    {"name": "n1", "until_step": 10, "knobs": {"loss_weight": 0.5}},
    {"name": "n2", "knobs": {"loss_weight": 0.25}},
]


def _branch(kktrain_run, tmp_path, policy: str):
    out = tmp_path / f"branch-{policy}"
    kktrain_run(plugins=["curriculum"], options={"curriculum.stages": OLD}, steps=20, stop_at_step=8, out=out)
    return kktrain_run(
        plugins=["curriculum"], steps=20, resume="auto", out=out,
        options={"curriculum.stages": NEW, "curriculum.on_resume_change": policy, "log_every": 1},
    )


def test_resume_with_another_schedule_jumps_to_its_stage_at_this_step(kktrain_run, tmp_path):
    run = _branch(kktrain_run, tmp_path, "jump")
    (changed,) = events(run.run_dir, "curriculum_changed")
    assert changed["level"] == "warning" and changed["policy"] == "jump" and changed["step"] == 8
    got = [(t["name"], t["step"], t["reason"]) for t in run.summary["curriculum"]["stages"]]
    # the old run's start, then the jump into n1 (4 <= 8 < 10), then n2 at step 10
    assert got == [("old", 0, "start"), ("n1", 8, "resume-jump"), ("n2", 10, "until_step")]
    assert run.summary["curriculum"]["stages"][1]["saved_stage"] == 0
    assert run.summary["curriculum"]["final_stage"]["knobs"] == {"noise": 0.0, "loss_weight": 0.25}


def test_resume_with_another_schedule_restarts_it_with_relative_steps(kktrain_run, tmp_path):
    run = _branch(kktrain_run, tmp_path, "restart")
    got = [(t["name"], t["step"], t["reason"]) for t in run.summary["curriculum"]["stages"]]
    # stage 0 begins at step 8; until_step 4 and 10 become steps 12 and 18
    assert got == [("old", 0, "start"), ("n0", 8, "resume-restart"), ("n1", 12, "until_step"), ("n2", 18, "until_step")]
    assert run.summary["curriculum"]["origin_step"] == 8
    assert events(run.run_dir, "curriculum_changed")[0]["policy"] == "restart"


def test_enabling_the_curriculum_on_resume_places_the_run_in_it(kktrain_run, tmp_path):
    out = tmp_path / "late"
    kktrain_run(steps=20, stop_at_step=12, out=out)
    run = kktrain_run(plugins=["curriculum"], steps=20, resume="auto", out=out, options={"curriculum.stages": NEW})
    (changed,) = events(run.run_dir, "curriculum_changed")
    assert changed["saved_fingerprint"] is None
    assert [(t["name"], t["step"]) for t in run.summary["curriculum"]["stages"]] == [("n2", 12)]

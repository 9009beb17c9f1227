"""`kktrain validate` / `kktrain.validate`: a trained run validated again, without training; real
runs, the CLI in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kktrain
from kktrain.errors import ConfigError
from kktrain.testing import run_cli

TASKS = Path(__file__).parent / "tasks"
VOLATILE = {"val/time_s"}


def _last_val(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "val"][-1]
    return {k: v for k, v in last.items() if k.startswith("val") and k not in VOLATILE}


def test_validate_gives_the_runs_own_final_metrics(kktrain_run, tmp_path):
    run = kktrain_run(steps=12, val_every=6)
    assert run.summary["status"] == "completed"
    proc = run_cli("validate", str(run.run_dir), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["val/time_s"] >= 0
    assert {k: v for k, v in again.items() if k not in VOLATILE} == _last_val(run.run_dir)  # the same weights, the same numbers
    table = run_cli("validate", str(run.run_dir), cwd=tmp_path)
    assert table.returncode == 0 and table.stdout.splitlines()[0].startswith("val/acc ")
    assert table.stderr.startswith("validating ") and "final.pt (auto weights) ..." in table.stderr  # progress on stderr


def test_validate_over_a_val_dataset_with_metrics(tmp_path):
    env = {"PYTHONPATH": str(TASKS)}
    trained = run_cli("run", "--task", "user_tasks:Points", "--out", "run", "-q", "-o", "val_every=30", cwd=tmp_path, env=env)
    assert trained.returncode == 0, trained.stderr
    proc = run_cli("validate", "run", "--task", "user_tasks:Points", "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    expected = _last_val(tmp_path / "run")
    assert set(expected) == {"val/loss", "val/acc"}
    for key, value in expected.items():  # batched in the run's validation batch size, in the same order
        assert again[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_latin_tta_metrics_appear_with_the_option(tmp_path):
    out = tmp_path / "latin"
    small = ["-o", "batch_size=8", "-o", "task.samples_per_epoch=16", "-o", "task.val_puzzles=6", "-o", "task.size_max=4",
             "-o", "task.val_sizes=[4]", "-o", "task.d_model=32", "-o", "task.layers=1"]
    trained = run_cli("run", "--max-steps", "2", "--out", str(out), "-q", *small, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    plain = json.loads(run_cli("validate", str(out), "--json", cwd=tmp_path, check=True).stdout)
    assert "val/valid_iter" in plain and "val/valid_iter_tta" not in plain
    tta = json.loads(run_cli("validate", str(out), "--json", "-o", "task.tta=2", cwd=tmp_path, check=True).stdout)
    assert "val/valid_iter_tta" in tta and tta["val/valid_iter"] == plain["val/valid_iter"]
    # the change is for this validation only: the run's config and checkpoints are untouched
    assert "tta = 0" in (out / "config.toml").read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["-o", "batch_size=3"], "kktrain validate changes task options only"),
    (["-o", "task.bogus=1"], "has no option 'bogus'"),
    (["--weights", "ema"], "ema"),
])
def test_bad_validate_input_is_one_line_exit_2(kktrain_run, tmp_path, args, message):
    run = kktrain_run(steps=4, val_every=4)
    proc = run_cli("validate", str(run.run_dir), *args, cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


def test_a_task_object_takes_no_option_changes(kktrain_run):
    run = kktrain_run(steps=4, val_every=4)
    from kktrain.tasks.tiny import make_task

    with pytest.raises(ConfigError, match="only for a task rebuilt from its name"):
        kktrain.validate(run.run_dir, task=make_task(), options={"noise": 0.1})
    assert "val/acc" in kktrain.validate(run.run_dir, task=make_task())

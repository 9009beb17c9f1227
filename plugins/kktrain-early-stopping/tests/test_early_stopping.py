"""early-stopping: patience, min_delta, min/max, min_steps, non-finite values, other plugins' metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kktrain import ConfigError, hookimpl

KKTRAIN = Path(sys.executable).parent / "kktrain"


def events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


def es(**options: Any) -> dict[str, Any]:
    return {f"early-stopping.{k}": v for k, v in options.items()}


def test_unknown_option_is_rejected(kktrain_run):
    with pytest.raises(ConfigError) as err:
        kktrain_run(plugins=["early-stopping"], options=es(patiense=3), steps=1)
    msg = str(err.value)
    assert "plugin 'early-stopping' has no option 'patiense'" in msg and "patience" in msg and "\n" not in msg


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("patience", "three", "expected int"), ("patience", 0, "expected int"), ("min_delta", "tiny", "expected float"),
    ("mode", "up", "'min'"),
])
def test_wrong_values_name_the_expected_type(kktrain_run, key, value, expected):
    with pytest.raises(ConfigError) as err:
        kktrain_run(plugins=["early-stopping"], options=es(**{key: value}), steps=1)
    msg = str(err.value)
    assert f"plugin 'early-stopping' option '{key}'" in msg and expected in msg and "\n" not in msg


def test_stops_after_patience_validations_without_improvement(kktrain_run):
    # val/loss falls while training, so in mode max only the first validation is a "best".
    out = kktrain_run(plugins=["early-stopping"], options={**es(monitor="val/loss", mode="max", patience=3), "val_every": 2}, steps=40)
    assert out.summary["status"] == "stopped" and out.summary["steps"] == 8
    assert out.summary["stop_reason"].startswith("early stopping: val/loss did not improve")
    section = out.summary["early-stopping"]
    assert (section["stopped"], section["stopped_step"], section["best_step"], section["bad_count"]) == (True, 8, 2, 3)
    assert section["validations"] == 4
    (event,) = events(out.run_dir, "early_stop")
    assert event["step"] == 8 and event["best_step"] == 2 and event["best"] == section["best"]
    assert out.final_payload()["step"] == 8  # the final checkpoint is written at the stop


def test_min_mode_keeps_training_while_the_loss_improves(kktrain_run):
    out = kktrain_run(plugins=["early-stopping"], options={**es(monitor="val/loss", patience=2), "val_every": 4}, steps=24)
    out.assert_success()
    section = out.summary["early-stopping"]
    assert not section["stopped"] and section["best_step"] == 24 and section["validations"] == 6


def test_min_delta_counts_small_improvements_as_none(kktrain_run):
    out = kktrain_run(plugins=["early-stopping"], options={**es(monitor="val/loss", patience=2, min_delta=10.0), "val_every": 4}, steps=24)
    assert out.summary["status"] == "stopped" and out.summary["early-stopping"]["stopped_step"] == 12


def test_min_steps_delays_the_stop(kktrain_run):
    out = kktrain_run(plugins=["early-stopping"],
                      options={**es(monitor="val/loss", mode="max", patience=1, min_steps=9), "val_every": 2}, steps=24)
    assert out.summary["early-stopping"]["stopped_step"] == 10


def test_non_finite_metric_stops_at_once(kktrain_run, fault_injector):
    out = kktrain_run(plugins=["early-stopping", fault_injector(nan_at=[3])], options={**es(patience=10), "val_every": 2}, steps=20)
    assert out.summary["status"] == "stopped" and out.summary["steps"] == 4
    assert "val/loss is nan at step 4" in out.summary["stop_reason"]


def test_missing_metric_warns_once_naming_the_available_ones(kktrain_run):
    out = kktrain_run(plugins=["early-stopping"], options={**es(monitor="val/accuracy", patience=1), "val_every": 2}, steps=8)
    out.assert_success()
    (warning,) = events(out.run_dir, "early_stopping_metric_missing")
    assert warning["level"] == "warning" and warning["monitor"] == "val/accuracy"
    assert {"val/acc", "val/loss"} <= set(warning["available"])


def test_monitors_metrics_another_plugin_adds(kktrain_run):
    class ConstantEmaMetric:
        """Adds a val_ema/... key the way a wrapping validate (the EMA plugin) does."""

        name = "ema-like"

        @hookimpl(wrapper=True)
        def validate(self, trainer):
            metrics = yield
            return {**metrics, "val_ema/acc": 0.5}

    out = kktrain_run(plugins=["early-stopping", ConstantEmaMetric()],
                      options={**es(monitor="val_ema/acc", mode="max", patience=2), "val_every": 3}, steps=30)
    assert out.summary["early-stopping"]["best"] == 0.5 and out.summary["early-stopping"]["stopped_step"] == 9


@pytest.mark.parametrize("cut", [5, 7])
def test_resume_is_bit_exact_with_a_pending_bad_count(assert_resume_equivalent, cut):
    whole, resumed = assert_resume_equivalent(
        plugins=["early-stopping"], steps=16, cut=cut, options={**es(monitor="val/loss", mode="max", patience=4), "val_every": 2},
    )
    assert whole.summary["early-stopping"]["stopped_step"] == resumed.summary["early-stopping"]["stopped_step"] == 10
    assert resumed.summary["status"] == "stopped"


def test_cli_stop_is_logged_and_in_the_summary(tmp_path):
    done = subprocess.run(
        [str(KKTRAIN), "run", "--task", "tiny", "--plugin", "early-stopping", "-o", "early-stopping.monitor=val/loss",
         "-o", "early-stopping.mode=max", "-o", "early-stopping.patience=2", "-o", "val_every=2", "--max-steps", "30",
         "--out", "run", "-q"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] == 6
    assert summary["early-stopping"]["best_step"] == 2
    assert [e["step"] for e in summary["events"] if e["event"] == "early_stop"] == [6]

"""curriculum, optim8bit, early-stopping and memory-monitor in one run, and resumed exactly together."""

from __future__ import annotations

import pytest

pytest.importorskip("bitsandbytes", reason="optim8bit's 8-bit path needs bitsandbytes (extra 'bnb')")

PLUGINS = ["curriculum", "optim8bit", "early-stopping", "memory-monitor"]
OPTIONS = {
    "curriculum.stages": [
        {"name": "clean", "until_step": 6, "knobs": {"noise": 0.0}},
        {"name": "noisy", "advance_when": {"metric": "val/acc", "op": ">=", "value": 0.0, "min_steps": 3}, "knobs": {"noise": 0.3}},
        {"name": "noisier", "knobs": {"noise": 0.6}},
    ],
    "optim8bit.min_8bit_size": 256,
    "early-stopping.monitor": "val/loss",
    "early-stopping.mode": "max",  # the loss falls, so this stops after `patience` validations
    "early-stopping.patience": 4,
    "memory-monitor.sample_every": 3,
    "val_every": 2,
    "data.workers": 2,
}


def test_all_four_together_resume_bit_exactly(assert_resume_equivalent):
    whole, resumed = assert_resume_equivalent(
        plugins=PLUGINS, steps=16, cut=7, options=OPTIONS, task_options={"hidden": 64},
    )
    for out in (whole, resumed):
        s = out.summary
        assert s["status"] == "stopped" and s["steps"] == 10
        assert [(t["name"], t["step"]) for t in s["curriculum"]["stages"]] == [("clean", 0), ("noisy", 6), ("noisier", 10)]
        assert s["optim8bit"]["impl"] == "bitsandbytes" and s["optim8bit"]["params_8bit_states"] == 3
        assert s["early-stopping"]["stopped_step"] == 10 and s["early-stopping"]["best_step"] == 2
        assert s["memory-monitor"]["epochs"][-1]["mem/cpu_rss_peak_mb"] > 20

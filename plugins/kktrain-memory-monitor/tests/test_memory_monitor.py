"""memory-monitor: per-epoch peaks in metrics and summary, sampling cadence, real allocations seen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kktrain import ConfigError, hookimpl

KKTRAIN = Path(sys.executable).parent / "kktrain"
STEPS_PER_EPOCH = 16  # tiny: 512 samples, batch 32


def epoch_records(out) -> list[dict[str, Any]]:
    return [r for r in out.metrics if r["kind"] == "epoch"]


def test_unknown_option_is_rejected(kktrain_run):
    with pytest.raises(ConfigError) as err:
        kktrain_run(plugins=["memory-monitor"], options={"memory-monitor.every": 3}, steps=1)
    msg = str(err.value)
    assert "plugin 'memory-monitor' has no option 'every'" in msg and "sample_every" in msg and "\n" not in msg


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("sample_every", 0, "expected int"), ("sample_every", "often", "expected int"), ("include_children", "maybe", "expected bool"),
])
def test_wrong_values_name_the_expected_type(kktrain_run, key, value, expected):
    with pytest.raises(ConfigError) as err:
        kktrain_run(plugins=["memory-monitor"], options={f"memory-monitor.{key}": value}, steps=1)
    msg = str(err.value)
    assert f"plugin 'memory-monitor' option '{key}'" in msg and expected in msg and "\n" not in msg


def test_epoch_metrics_summary_and_sampling_cadence(kktrain_run):
    out = kktrain_run(plugins=["memory-monitor"], options={"memory-monitor.sample_every": 4}, steps=40)
    records = epoch_records(out)
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert 20 < r["mem/cpu_rss_peak_mb"] < 100_000
        assert r["mem/cpu_rss_mb"] <= r["mem/cpu_rss_peak_mb"] <= r["mem/process_max_rss_mb"]
    section = out.summary["memory-monitor"]
    assert [e["epoch"] for e in section["epochs"]] == [0, 1, 2] and section["epochs"][-1]["partial"]
    assert section["peak"]["mem/cpu_rss_peak_mb"] == max(e["mem/cpu_rss_peak_mb"] for e in section["epochs"])
    # train start + 3 epoch starts + every 4th of 40 steps + 2 epoch ends + the train end
    assert section["samples"] == 1 + 3 + 40 // 4 + 2 + 1


class Ballast:
    """Holds a large, touched tensor from step ``start`` to step ``stop`` (a real allocation)."""

    name = "ballast"

    def __init__(self, start: int, stop: int, mb: int) -> None:
        self.start, self.stop, self.mb = start, stop, mb
        self.tensor: torch.Tensor | None = None

    @hookimpl(tryfirst=True)
    def on_step(self, trainer: Any, loss: Any) -> None:
        step = trainer.state.step
        if step == self.start:
            self.tensor = torch.ones(self.mb * 2**20 // 4)
        elif step == self.stop:
            self.tensor = None


def test_a_real_allocation_shows_in_its_epoch_only(kktrain_run):
    ballast = Ballast(start=20, stop=26, mb=160)
    out = kktrain_run(plugins=["memory-monitor", ballast], options={"memory-monitor.sample_every": 2}, steps=49)
    e0, e1, e2 = (r["mem/cpu_rss_peak_mb"] for r in epoch_records(out))
    assert e1 - e0 > 120, (e0, e1, e2)  # epoch 1 (steps 17-32) held 160 MB for six steps
    assert e1 - e2 > 120, (e0, e1, e2)  # freed before epoch 2
    assert epoch_records(out)[1]["mem/process_max_rss_mb"] >= e1


def test_data_loader_workers_are_counted(kktrain_run):
    out = kktrain_run(plugins=["memory-monitor"], options={"data.workers": 2}, steps=STEPS_PER_EPOCH + 2)
    (record,) = epoch_records(out)
    assert record["mem/children_rss_peak_mb"] > 20
    quiet = kktrain_run(plugins=["memory-monitor"], options={"data.workers": 2, "memory-monitor.include_children": False}, steps=STEPS_PER_EPOCH + 1)
    assert "mem/children_rss_peak_mb" not in epoch_records(quiet)[0]


def test_resume_is_bit_exact(assert_resume_equivalent):
    _, resumed = assert_resume_equivalent(plugins=["memory-monitor"], steps=20, cut=9)
    # the resumed process reports the epochs it ran (earlier ones are in metrics.jsonl)
    assert [e["epoch"] for e in resumed.summary["memory-monitor"]["epochs"]] == [0, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peaks_per_epoch(kktrain_run):
    out = kktrain_run(plugins=["memory-monitor"], options={"device": "cuda"}, steps=STEPS_PER_EPOCH + 1)
    (record,) = epoch_records(out)
    assert 0 < record["mem/cuda_peak_allocated_mb"] <= record["mem/cuda_peak_reserved_mb"]


@pytest.mark.skipif(not (torch.backends.mps.is_available()), reason="needs Apple MPS")
def test_mps_peaks_per_epoch(kktrain_run):
    out = kktrain_run(plugins=["memory-monitor"], options={"device": "mps"}, steps=STEPS_PER_EPOCH + 1)
    (record,) = epoch_records(out)
    assert record["mem/mps_allocated_peak_mb"] > 0 and record["mem/mps_driver_peak_mb"] > 0


def test_cli_epoch_records_and_summary(tmp_path):
    done = subprocess.run(
        [str(KKTRAIN), "run", "--task", "tiny", "--plugin", "memory-monitor", "-o", "memory-monitor.sample_every=1",
         "--max-steps", "20", "--out", "run", "-q"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in lines if r["kind"] == "epoch"]
    assert epoch["mem/cpu_rss_peak_mb"] > 20
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["memory-monitor"]["sample_every"] == 1 and summary["memory-monitor"]["samples"] == 1 + 2 + 20 + 1 + 1

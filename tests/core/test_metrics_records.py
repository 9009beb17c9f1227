"""metrics.jsonl tells the truth: across a pause, a crash and a resume; gradient norm and clipping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kktrain import hookimpl

# 128 samples in batches of 16: 8 steps per epoch; the cut at step 5 is mid-epoch and mid-interval.
RUN = {"batch_size": 16, "log_every": 3, "task_options": {"samples": 128, "dropout": 0.1}}
VOLATILE = {"time", "train/steps_per_s", "train/samples_per_s", "train/epoch_time_s", "val/time_s"}
BOOKKEEPING = {"step", "kind", "time", "epoch"}


def _stable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records without the resume marker and the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records if r["kind"] != "resume"]


def test_pause_and_resume_write_the_records_of_the_uninterrupted_run(assert_resume_equivalent):
    whole, resumed = assert_resume_equivalent(steps=16, cut=5, **RUN)
    assert _stable(resumed.metrics) == _stable(whole.metrics)
    # no record at the cut: the resumed run's record at step 6 covers steps 4-6, the epoch's all 8
    assert [r["step"] for r in resumed.metrics if r["kind"] == "train"] == [3, 6, 9, 12, 15, 16]
    assert [r["step"] for r in resumed.metrics if r["kind"] == "epoch"] == [8, 16]
    (marker,) = [r for r in resumed.metrics if r["kind"] == "resume"]
    assert marker["step"] == 5 and marker["dropped_records"] == 0 and marker["checkpoint"].endswith("step_00000005.pt")


def test_epoch_loss_is_the_mean_over_the_whole_epoch(kktrain_run):
    losses: list[float] = []

    class Losses:
        name = "losses"

        @hookimpl
        def on_step(self, trainer, loss):
            losses.append(float(loss))

    out = kktrain_run(plugins=[Losses()], steps=8, **RUN)
    (epoch,) = [r for r in out.metrics if r["kind"] == "epoch"]
    assert epoch["train/loss"] == pytest.approx(sum(losses) / 8, rel=1e-12)
    intervals = [r for r in out.metrics if r["kind"] == "train"]
    assert [r["step"] for r in intervals] == [3, 6, 8]
    assert intervals[1]["train/loss"] == pytest.approx(sum(losses[3:6]) / 3, rel=1e-12)
    assert intervals[2]["train/loss"] == pytest.approx(sum(losses[6:8]) / 2, rel=1e-12)


def test_gradient_norm_is_before_clipping_and_clipped_share_counts_steps(kktrain_run):
    norms: list[float] = []

    class Norms:
        name = "norms"

        @hookimpl
        def on_before_optimizer_step(self, trainer, loss, grad_norm):
            norms.append(float(grad_norm))

    clip = 0.3
    out = kktrain_run(plugins=[Norms()], steps=8, grad_clip=clip, **{**RUN, "log_every": 4})
    train = [r for r in out.metrics if r["kind"] == "train"]
    for record, chunk in zip(train, (norms[:4], norms[4:8])):
        assert record["train/grad_norm"] == pytest.approx(sum(chunk) / 4, rel=1e-6)
        assert record["train/clipped"] == sum(n > clip for n in chunk) / 4
    assert max(norms) > clip, "the test needs steps that clip"
    log = [json.loads(line) for line in (out.run_dir / "log.jsonl").read_text().splitlines()]
    warned = [e for e in log if e["event"] == "grad_clipping_often"]
    assert len(warned) == 1 and warned[0]["share"] > 0.1


def test_no_gradient_norm_without_clipping_and_no_warning_when_rare(kktrain_run):
    off = kktrain_run(steps=4, grad_clip="off", **RUN)
    assert all("train/grad_norm" not in r for r in off.metrics)
    rare = kktrain_run(steps=4, grad_clip=1e6, **RUN)
    assert all(r["train/clipped"] == 0.0 for r in rare.metrics if r["kind"] == "train")
    assert "grad_clipping_often" not in (rare.run_dir / "log.jsonl").read_text()


def test_every_record_has_a_timestamp_and_one_naming_scheme(kktrain_run):
    out = kktrain_run(steps=8, val_every=4, **RUN)
    kinds = {r["kind"] for r in out.metrics}
    assert kinds == {"train", "val", "epoch"}
    for r in out.metrics:
        assert isinstance(r["time"], float) and r["time"] > 1.6e9, r
        metric_keys = set(r) - BOOKKEEPING
        assert metric_keys and all("/" in k for k in metric_keys), r
    assert all(k.startswith("train/") for r in out.metrics if r["kind"] == "train" for k in set(r) - BOOKKEEPING)
    assert all(k.startswith("val/") for r in out.metrics if r["kind"] == "val" for k in set(r) - BOOKKEEPING)


_CRASHING_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from kktrain import hookimpl
    from kktrain.testing import run_tiny

    class Killer:
        name = "killer"
        def __init__(self, at):
            self.at = at
        @hookimpl
        def on_step(self, trainer, loss):
            if trainer.state.step == self.at:
                os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9, mid-run

    out, kill_at, resume = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "resume"
    run_tiny(out.parent, plugins=[Killer(kill_at)], steps=16, out=out, resume="auto" if resume else None,
             batch_size=16, log_every=1, val_every=4, task_options={"samples": 128, "dropout": 0.1},
             **{"checkpoint.every_steps": 5})
    """
)


def _python(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "crashing_run.py"
    script.write_text(_CRASHING_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=120)


def test_crash_then_resume_leaves_no_duplicate_records(tmp_path: Path):
    whole = _python(tmp_path, str(tmp_path / "whole"), "0", "fresh")
    assert whole.returncode == 0, whole.stderr
    crashed = _python(tmp_path, str(tmp_path / "killed"), "13", "fresh")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    before = _records(tmp_path / "killed")
    assert max(r["step"] for r in before) == 12, "records past the checkpoint at step 10 to drop"
    resumed = _python(tmp_path, str(tmp_path / "killed"), "0", "resume")
    assert resumed.returncode == 0, resumed.stderr
    after = _records(tmp_path / "killed")
    (marker,) = [r for r in after if r["kind"] == "resume"]
    assert marker["step"] == 10 and marker["dropped_records"] == 3  # train 11, train 12, val 12
    keys = [(r["kind"], r["step"]) for r in after if r["kind"] != "resume"]
    assert len(keys) == len(set(keys)), "a step's record is written twice"
    assert _stable(after) == _stable(_records(tmp_path / "whole"))
    assert after.index(marker) == len([r for r in before if r["step"] <= 10])


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class RecordCounter:
    """Counts the records it sees, by kind, in its checkpointed state."""

    name = "record-counter"

    def __init__(self) -> None:
        self.counts = {"train": 0, "val": 0, "epoch": 0}

    @hookimpl
    def on_log(self, trainer, record):
        self.counts[record["kind"]] += 1

    def state_dict(self):
        return dict(self.counts)

    def load_state_dict(self, state):
        self.counts = dict(state)


def test_a_plugin_counting_records_resumes_to_the_same_counts(assert_resume_equivalent):
    """The contract's cut at --stop-at-step sees the records a crash there would have left."""
    whole, resumed = assert_resume_equivalent(plugins=lambda: [RecordCounter()], steps=16, cut=7, val_every=4, **RUN)
    counts = whole.final_payload()["plugins"]["record-counter"]
    assert counts == {"train": 6, "val": 4, "epoch": 2}  # train at 3 6 9 12 15 16; val at 4 8 12 16

"""tensorboard: events read back with TensorBoard's own EventAccumulator (names, steps, values)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

STAGES = [{"name": "full", "until_step": 5, "knobs": {"loss_weight": 1.0}}, {"name": "muted", "knobs": {"loss_weight": 0.5}}]
RUN: dict[str, Any] = {"batch_size": 16, "log_every": 2, "val_every": 4, "task_options": {"samples": 128}}


def _events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_every_record_is_a_scalar_under_its_own_name(kktrain_run):
    out = kktrain_run(plugins=["tensorboard", "curriculum"], steps=10, options={"curriculum.stages": STAGES}, **RUN)
    out.assert_success()
    acc = _events(out.run_dir)
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/clipped", "val/loss", "val/acc",
            "epoch/train/loss", "curriculum/stage"} <= tags
    for kind, prefix in (("train", ""), ("val", ""), ("epoch", "epoch/")):
        records = [r for r in out.metrics if r["kind"] == kind]
        assert records
        for key in ("train/loss", "train/lr", "val/acc"):
            expected = [(r["step"], r[key]) for r in records if key in r]
            if expected:
                got = _scalars(acc, prefix + key)
                assert [s for s, _ in got] == [s for s, _ in expected]
                assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)  # stored as float32
    assert _scalars(acc, "curriculum/stage") == [(0, 0.0), (5, 1.0)]  # the first stage at the start, then the change
    text = acc.Tensors("events/curriculum_stage/text_summary")
    assert [t.step for t in text] == [0, 5] and b"muted" in text[1].tensor_proto.string_val[0]


def test_hparams_hold_the_config_and_the_final_metrics(kktrain_run):
    out = kktrain_run(plugins=["tensorboard"], steps=6, **RUN)
    acc = _events(out.run_dir)
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in content and "_hparams_/session_start_info" in content
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["batch_size"].number_value == 16
    assert start.hparams["task"].string_value == "tiny"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    names = {m.name.tag for m in experiment.metric_infos}
    assert {"val/loss", "val/acc", "train/loss"} <= names
    assert out.summary["tensorboard"]["log_dir"] == str(out.run_dir / "tensorboard")


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
                os.kill(os.getpid(), signal.SIGKILL)

    out, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    run_tiny(out.parent, plugins=["tensorboard", Killer(kill_at)], steps=12, out=out,
             resume="auto" if kill_at == 0 else None, batch_size=16, log_every=1,
             task_options={"samples": 128}, options={"tensorboard.flush_secs": 1}, **{"checkpoint.every_steps": 5})
    """
)


def test_a_resume_after_kill_appends_without_duplicate_steps(tmp_path: Path):
    script = tmp_path / "run.py"
    script.write_text(_CRASHING_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    crashed = subprocess.run([sys.executable, str(script), str(run_dir), "9"], env=env, capture_output=True, text=True, timeout=120)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    resumed = subprocess.run([sys.executable, str(script), str(run_dir), "0"], env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per process, one run
    steps = [s for s, _ in _scalars(_events(run_dir), "train/loss")]
    assert steps == list(range(1, 13)), steps
    losses = dict(_scalars(_events(run_dir), "train/loss"))
    records = {r["step"]: r["train/loss"] for r in map(_json, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"}
    assert [losses[s] for s in sorted(losses)] == pytest.approx([records[s] for s in sorted(records)], rel=1e-6)


def _json(line: str) -> dict[str, Any]:
    import json

    return json.loads(line)


def test_contract(plugin_contract):
    plugin_contract("tensorboard")

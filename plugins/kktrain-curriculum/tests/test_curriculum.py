"""curriculum: options, stage clocks (step, epoch, share), adaptive advancement, knobs in workers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kktrain import ConfigError, KKTrainError, PluginError, hookimpl


class BatchRecorder:
    """Keeps the batch each step trained on (a real plugin wrapping forward_loss)."""

    name = "batch-recorder"

    def __init__(self) -> None:
        self.batches: dict[int, Any] = {}
        self.knobs: dict[int, dict[str, Any]] = {}

    @hookimpl(wrapper=True)
    def forward_loss(self, trainer: Any, batch: Any) -> Any:
        step = trainer.state.step + 1
        self.batches[step] = batch
        self.knobs[step] = dict(trainer.state.knobs)
        return (yield)


def events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


def clean_rows(x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Which rows of a batch are exact rows of the task's (noise-free) training points."""
    return (x[:, None, :] == data[None]).all(-1).any(1)


# ------------------------------------------------------------------------------------ options


def test_unknown_option_is_rejected_naming_plugin_and_key(kktrain_run):
    with pytest.raises(ConfigError) as err:
        kktrain_run(plugins=["curriculum"], options={"curriculum.preset": "latin", "curriculum.stagez": []}, steps=1)
    msg = str(err.value)
    assert "\n" not in msg
    assert "plugin 'curriculum'" in msg and "'stagez'" in msg and "on_resume_change" in msg


def test_wrong_type_is_rejected_naming_expected_type(kktrain_run):
    with pytest.raises(ConfigError) as err:
        kktrain_run(plugins=["curriculum"], options={"curriculum.preset": "latin", "curriculum.on_resume_change": "later"}, steps=1)
    msg = str(err.value)
    assert "\n" not in msg
    assert "plugin 'curriculum'" in msg and "on_resume_change" in msg and "'jump'" in msg and "'restart'" in msg


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({}, "preset latin (the default) sets knob(s)"),
        ({"curriculum.preset": "latin", "curriculum.stages": [{"knobs": {}}]}, "got preset and stages"),
        ({"curriculum.stages": [{"knobs": {"noise": 0.1}}, {"knobs": {"noise": 0.2}}]}, "stage 1 (unnamed) never ends"),
        ({"curriculum.stages": [{"until_step": 9, "knobs": {}}, {"until_step": 4, "knobs": {}}, {}]}, "stage 2 until_step=4 is not after"),
        ({"curriculum.stages": [{"until_step": 9}, {"advance_when": {"metric": "val/acc", "op": ">", "value": 1}}]},
         "the last stage has advance_when"),
    ],
)
def test_bad_schedules_are_one_line_errors(kktrain_run, options, needle):
    with pytest.raises(KKTrainError) as err:
        kktrain_run(plugins=["curriculum"], options=options, steps=1)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_two_clocks_in_one_stage_are_rejected(kktrain_run):
    with pytest.raises(ConfigError) as err:
        kktrain_run(plugins=["curriculum"], options={"curriculum.stages": [{"until_step": 3, "until_epoch": 1}, {}]}, steps=1)
    assert "until_step and until_epoch" in str(err.value)


def test_stage_file_errors_name_file_stage_and_key(kktrain_run, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[stage]]\nuntil_stepp = 3\n\n[[stage]]\nknobs = {noise = 1.0}\n')
    with pytest.raises(PluginError) as err:
        kktrain_run(plugins=["curriculum"], options={"curriculum.file": str(bad)}, steps=1)
    msg = str(err.value)
    assert str(bad) in msg and "stage 1" in msg and "until_stepp" in msg and "unknown key" in msg
    with pytest.raises(PluginError, match="does not exist"):
        kktrain_run(plugins=["curriculum"], options={"curriculum.file": str(tmp_path / "nope.toml")}, steps=1)
    other = tmp_path / "other.toml"
    other.write_text('[[stages]]\nknobs = {noise = 1.0}\n')
    with pytest.raises(PluginError, match=r"expected only \[\[stage\]\] tables"):
        kktrain_run(plugins=["curriculum"], options={"curriculum.file": str(other)}, steps=1)


def test_unknown_knob_names_missing_and_known_knobs(kktrain_run):
    with pytest.raises(ConfigError) as err:
        kktrain_run(plugins=["curriculum"], options={"curriculum.stages": [{"until_step": 2, "knobs": {"nois": 1.0}}, {}]}, steps=1)
    msg = str(err.value)
    assert "['nois']" in msg and "task 'tiny'" in msg and "['loss_weight', 'noise']" in msg


def test_bad_knob_value_is_rejected_before_training(kktrain_run, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="rejects the knobs of stage 2"):
        kktrain_run(plugins=["curriculum"], out=out, steps=1,
                    options={"curriculum.stages": [{"until_step": 2}, {"knobs": {"loss_weight": "heavy"}}]})
    assert not out.exists()


@pytest.mark.parametrize("preset", ["early", "phased"])
def test_loss_weight_presets_need_their_knobs(kktrain_run, preset):
    with pytest.raises(ConfigError) as err:
        kktrain_run(plugins=["curriculum"], options={"curriculum.preset": preset}, steps=1)
    msg = str(err.value)
    assert f"preset {preset}" in msg and "['constraint_weight', 'focal_gamma']" in msg
    assert "['loss_weight', 'noise']" in msg and "\n" not in msg


# ------------------------------------------------------------------------------------ behaviour


def test_step_stage_changes_main_process_knob_after_the_boundary_step(kktrain_run):
    stages = [{"name": "full", "until_step": 5, "knobs": {"loss_weight": 1.0}}, {"name": "muted", "knobs": {"loss_weight": 0.0}}]
    out = kktrain_run(plugins=["curriculum"], options={"curriculum.stages": stages, "log_every": 1}, steps=9)
    losses = {r["step"]: r["train/loss"] for r in out.metrics if r["kind"] == "train"}
    assert all(losses[s] > 0.1 for s in range(1, 6)), losses
    assert all(losses[s] == 0.0 for s in range(6, 10)), losses
    section = out.summary["curriculum"]
    assert [(t["stage"], t["step"], t["reason"]) for t in section["stages"]] == [(0, 0, "start"), (1, 5, "until_step")]
    assert section["final_stage"]["name"] == "muted" and section["final_stage"]["knobs"]["loss_weight"] == 0.0
    logged = events(out.run_dir, "curriculum_stage")
    assert [(e["step"], e["stage"]) for e in logged] == [(0, 0), (5, 1)]


def test_data_knob_reaches_worker_processes_at_the_next_batch(kktrain_run):
    rec = BatchRecorder()
    stages = [{"until_step": 4, "knobs": {"noise": 0.0}}, {"knobs": {"noise": 0.5}}]
    out = kktrain_run(plugins=["curriculum", rec], options={"curriculum.stages": stages, "data.workers": 2}, steps=8)
    data = out.trainer.task._x
    for step, (x, _) in rec.batches.items():
        clean = clean_rows(x, data)
        if step <= 4:
            assert clean.all(), f"step {step} trained on noisy data before the stage change"
        else:
            assert not clean.any(), f"step {step}: workers did not get noise=0.5"
    assert out.summary["curriculum"]["stages"][-1]["step"] == 4


def test_epoch_and_fraction_clocks_from_a_stage_file(kktrain_run, tmp_path):
    # tiny: 512 samples / batch 32 = 16 steps per epoch; 40 steps in all.
    path = tmp_path / "stages.toml"
    path.write_text(
        '[[stage]]\nname = "a"\nuntil_epoch = 1\nknobs = { noise = 0.0 }\n\n'
        '[[stage]]\nname = "b"\nuntil_fraction = 0.6\nknobs = { loss_weight = 0.5 }\n\n'
        '[[stage]]\nname = "c"\nsteps = 5\nknobs = { noise = 0.25 }\n\n'
        '[[stage]]\nname = "d"\nknobs = { loss_weight = 2.0 }\n'
    )
    rec = BatchRecorder()
    out = kktrain_run(plugins=["curriculum", rec], options={"curriculum.file": str(path)}, steps=40)
    got = [(t["name"], t["step"], t["reason"]) for t in out.summary["curriculum"]["stages"]]
    assert got == [("a", 0, "start"), ("b", 16, "until_epoch"), ("c", 24, "until_fraction"), ("d", 29, "steps")]
    # knobs are cumulative: stage d keeps c's noise and sets its own loss weight
    assert rec.knobs[16] == {"noise": 0.0, "loss_weight": 1.0}
    assert rec.knobs[17] == {"noise": 0.0, "loss_weight": 0.5}
    assert rec.knobs[25] == {"noise": 0.25, "loss_weight": 0.5}
    assert rec.knobs[30] == {"noise": 0.25, "loss_weight": 2.0}


def test_adaptive_rule_waits_for_min_steps_and_consecutive(kktrain_run):
    rule = {"metric": "val/acc", "op": ">=", "value": 0.0, "min_steps": 5, "consecutive": 2}
    stages = [{"name": "learn", "advance_when": rule}, {"name": "hard", "knobs": {"noise": 0.3}}]
    out = kktrain_run(plugins=["curriculum"], options={"curriculum.stages": stages, "val_every": 2}, steps=12)
    # validations at 2, 4, 6, 8 ...: 2 and 4 are inside min_steps, 6 counts once, 8 twice -> advance at 8
    (start, adv) = out.summary["curriculum"]["stages"]
    assert (adv["stage"], adv["step"], adv["reason"], adv["metric"]) == (1, 8, "metric", "val/acc")
    assert adv["value"] >= 0.0 and adv["threshold"] == 0.0


def test_adaptive_rule_never_met_falls_back_to_the_stage_clock(kktrain_run):
    rule = {"metric": "val/acc", "op": ">", "value": 1.0}
    stages = [{"steps": 7, "advance_when": rule}, {"knobs": {"noise": 0.3}}]
    out = kktrain_run(plugins=["curriculum"], options={"curriculum.stages": stages, "val_every": 2}, steps=10)
    assert [(t["step"], t["reason"]) for t in out.summary["curriculum"]["stages"]] == [(0, "start"), (7, "steps")]


def test_missing_adaptive_metric_warns_once_with_available_metrics(kktrain_run):
    stages = [{"steps": 9, "advance_when": {"metric": "val/accuracy", "op": ">=", "value": 0.5}}, {}]
    out = kktrain_run(plugins=["curriculum"], options={"curriculum.stages": stages, "val_every": 2}, steps=8)
    (warning,) = events(out.run_dir, "curriculum_metric_missing")
    assert warning["level"] == "warning" and warning["metric"] == "val/accuracy"
    assert "val/acc" in warning["available"] and "val/loss" in warning["available"]


def test_ema_style_metrics_added_by_another_plugin_can_drive_advancement(kktrain_run):
    class ExtraMetrics:
        """Adds val_ema/... keys the way a wrapping validate (EMA) does."""

        name = "extra-metrics"

        @hookimpl(wrapper=True)
        def validate(self, trainer):
            metrics = yield
            return {**metrics, "val_ema/acc": 1.0}

    stages = [{"advance_when": {"metric": "val_ema/acc", "op": ">=", "value": 1.0}}, {"knobs": {"noise": 0.3}}]
    out = kktrain_run(plugins=["curriculum", ExtraMetrics()], options={"curriculum.stages": stages, "val_every": 3}, steps=6)
    assert out.summary["curriculum"]["stages"][-1]["step"] == 3


@pytest.mark.parametrize(("preset", "boundaries"), [("early", (2, 4)), ("phased", (3, 6))])
def test_loss_weight_presets_on_a_task_that_has_their_knobs(tmp_path, preset, boundaries):
    from kktrain import RunConfig, Trainer
    from kktrain.tasks.tiny import TinyTask

    class AuxLossTask(TinyTask):
        """The tiny task with the Latin task's loss knobs (used in its loss)."""

        def default_knobs(self):
            return {**super().default_knobs(), "constraint_weight": 0.0, "focal_gamma": 0.0}

        def set_knobs(self, knobs):
            super().set_knobs(knobs)
            self.aux = float(knobs.get("constraint_weight", 0.0)) + float(knobs.get("focal_gamma", 0.0))

        def loss(self, model, batch):
            main = super().loss(model, batch)
            return main + self.aux * model[0].weight.square().mean()

    rec = BatchRecorder()
    cfg = RunConfig(task="tiny", max_steps=10, batch_size=32, log_every=5, out=str(tmp_path / preset))
    tr = Trainer(cfg, ["curriculum", rec], plugin_options={"curriculum": {"preset": preset}}, task=AuxLossTask(), quiet=True)
    summary = tr.fit()
    first, second = boundaries
    assert [(t["step"], t["reason"]) for t in summary["curriculum"]["stages"]] == [
        (0, "start"), (first, "until_fraction"), (second, "until_fraction")]
    assert (rec.knobs[first]["constraint_weight"], rec.knobs[first + 1]["constraint_weight"]) == (0.0, 0.5)
    assert (rec.knobs[second]["focal_gamma"], rec.knobs[second + 1]["focal_gamma"]) == (0.0, 1.0)
    assert rec.knobs[10] == {"noise": 0.0, "loss_weight": 1.0, "constraint_weight": 0.5, "focal_gamma": 1.0}


@pytest.mark.parametrize(("preset", "boundaries"), [("early", (2, 4)), ("phased", (3, 6))])
def test_loss_presets_move_the_builtin_latin_tasks_loss(kktrain_run, preset, boundaries):
    """`-o curriculum.preset=phased` on the default task: its real loss knobs change the loss."""
    from kktrain.tasks.latin import LatinTask

    rec = BatchRecorder()
    small = {"batch_size": 8, "task.samples_per_epoch": 128, "task.val_puzzles": 2, "log_every": 1}
    out = kktrain_run(task="latin", plugins=["curriculum", rec], steps=10, options={**small, "curriculum.preset": preset})
    first, second = boundaries
    assert [(t["step"], t["reason"]) for t in out.summary["curriculum"]["stages"]] == [
        (0, "start"), (first, "until_fraction"), (second, "until_fraction")]
    assert (rec.knobs[first]["constraint_weight"], rec.knobs[first + 1]["constraint_weight"]) == (0.0, 0.5)
    assert (rec.knobs[second]["focal_gamma"], rec.knobs[second + 1]["focal_gamma"]) == (0.0, 1.0)
    # The knobs reach the loss: the same model and batch give another loss under the last stage's knobs.
    model, batch = out.trainer.model, rec.batches[10]
    plain, staged = LatinTask(), LatinTask()
    staged.set_knobs(rec.knobs[10])
    model.eval()
    assert staged.loss(model, batch).item() != pytest.approx(plain.loss(model, batch).item(), rel=1e-3)


class RollbackOnce:
    """Takes a snapshot after step ``snap_at`` and restores it once after step ``restore_at``."""

    name = "rollback-once"

    def __init__(self, snap_at: int, restore_at: int) -> None:
        self.snap_at, self.restore_at = snap_at, restore_at
        self.snapshot: dict[str, Any] | None = None
        self.done = False

    @hookimpl(tryfirst=True)
    def on_step(self, trainer: Any, loss: Any) -> None:
        step = trainer.state.step
        if step == self.snap_at and self.snapshot is None:
            self.snapshot = trainer.snapshot()
        elif step == self.restore_at and not self.done:
            self.done = True
            trainer.restore(self.snapshot)


def test_a_rollback_across_a_stage_change_rolls_the_stage_back(kktrain_run):
    rec = BatchRecorder()
    stages = [{"name": "a", "until_step": 5, "knobs": {"noise": 0.0}}, {"name": "b", "knobs": {"noise": 0.5}}]
    out = kktrain_run(plugins=["curriculum", rec, RollbackOnce(snap_at=3, restore_at=7)],
                      options={"curriculum.stages": stages}, steps=10)
    # steps 4..7 ran twice; the second time the stage changed again after step 5
    assert [rec.knobs[s]["noise"] for s in range(1, 11)] == [0.0] * 5 + [0.5] * 5
    assert [(t["name"], t["step"]) for t in out.summary["curriculum"]["stages"]] == [("a", 0), ("b", 5)]
    assert [e["step"] for e in events(out.run_dir, "curriculum_stage")] == [0, 5, 5]

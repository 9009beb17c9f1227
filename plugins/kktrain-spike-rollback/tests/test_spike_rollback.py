"""spike-rollback: spike detection, the exact restore, LR scaling, skipped batches, bounds, resume.

Spikes and NaNs come from the ``fault_injector`` fixture; each fires once per listed step, so the
replay after a rollback computes that step number again on another batch, cleanly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# A rollback restores the state mid-run; should the loop ever lose track of it, fail, don't hang.
pytestmark = pytest.mark.timeout(120)

from kktrain import ConfigError, PluginError, TrainingAborted, hookimpl

# Tiny task: 512 samples in batches of 32 = 16 batches per epoch; step k trains on batch k-1.
OPTS = {"spike-rollback.snapshot_every": 5, "spike-rollback.warmup_steps": 5}




class Observer:
    """Records parameters and LR after every step, and around each anomaly's handling."""

    name = "observer"

    def __init__(self) -> None:
        self.at_step: dict[int, tuple[dict[str, torch.Tensor], float]] = {}
        self.anomalies: list[dict] = []

    @staticmethod
    def _params(trainer) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    @hookimpl(tryfirst=True)
    def on_step(self, trainer, loss):
        self.at_step.setdefault(trainer.state.step, (self._params(trainer), trainer.lr))

    @hookimpl(wrapper=True)
    def on_anomaly(self, trainer, kind, detail):
        before = self._params(trainer)
        handled = yield
        self.anomalies.append({"kind": kind, "step": detail["step"], "before": before, "after": self._params(trainer),
                               "lr_after": trainer.lr, "to_step": trainer.state.step, "handled": handled})
        return handled


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_options_defaults_and_strictness(kktrain_run):
    from kktrain_spike_rollback import SpikeRollbackPlugin

    o = SpikeRollbackPlugin.Options()
    assert (o.factor, o.snapshot_every, o.lr_factor, o.source, o.max_rollbacks) == (3.0, 10, 0.5, "memory", 3)
    with pytest.raises((ConfigError, PluginError), match="spike-rollback.*no option 'factr'"):
        kktrain_run(plugins=["spike-rollback"], options={"spike-rollback.factr": 5}, steps=1)
    for key, value in (("factor", 1.0), ("snapshot_every", "often"), ("source", "cloud"), ("lr_factor", 2.0)):
        with pytest.raises(ConfigError, match=f"spike-rollback.*'{key}'"):
            kktrain_run(plugins=["spike-rollback"], options={f"spike-rollback.{key}": value}, steps=1)


def test_x20_spike_restores_exactly_the_pre_spike_parameters_and_halves_the_lr(kktrain_run, fault_injector):
    obs = Observer()
    inj = fault_injector(spike_at={13: 20.0})
    out = kktrain_run(plugins=["spike-rollback", inj, obs], options=OPTS, steps=20)
    out.assert_success()
    assert inj.injected == [("spike", 13)]
    (event,) = obs.anomalies
    assert (event["kind"], event["step"], event["handled"], event["to_step"]) == ("spike", 13, True, 10)
    params_10, lr_10 = obs.at_step[10]
    assert not _equal(event["before"], params_10)  # the spiking update had been applied ...
    assert _equal(event["after"], params_10)  # ... and the restore undid it, bit for bit
    assert event["lr_after"] == pytest.approx(0.5 * lr_10, rel=1e-12)
    section = out.summary["spike-rollback"]
    assert section["rollbacks"] == 1 and section["rollback_steps"] == [13]
    assert out.summary["steps"] == 20
    # The spiking batch (step 13 trained on batch 12 of epoch 0) is never trained on again.
    assert out.final_payload()["state"]["skip_batches"] == [[0, 12]]
    rollback = [e for e in out.summary["events"] if e["event"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["at_step"] == 13 and rollback[0]["to_step"] == 10


def test_the_lower_lr_lasts_for_the_rest_of_the_schedule(kktrain_run, fault_injector):
    const = {"schedule.name": "constant", "optimizer.lr": 0.01}
    out = kktrain_run(plugins=["spike-rollback", fault_injector(spike_at={8: 20.0, 14: 20.0})], options=OPTS, steps=18, **const)
    out.assert_success()
    assert out.summary["spike-rollback"]["rollback_steps"] == [8, 14]
    assert out.trainer.lr == pytest.approx(0.01 * 0.25)  # halved twice: the second rollback kept the first's LR


def test_no_spike_check_during_warmup(kktrain_run, fault_injector):
    out = kktrain_run(plugins=["spike-rollback", fault_injector(spike_at={3: 20.0})], options=OPTS, steps=6)
    out.assert_success()
    assert out.summary["spike-rollback"]["rollbacks"] == 0


def test_nan_loss_alone_is_rolled_back(kktrain_run, fault_injector):
    """Without nan-guard the optimizer steps on NaN gradients; the on_step check undoes it."""
    obs = Observer()
    out = kktrain_run(plugins=["spike-rollback", fault_injector(nan_at=[12]), obs], options=OPTS, steps=16)
    out.assert_success()
    (event,) = obs.anomalies
    assert event["kind"] == "nonfinite" and event["to_step"] == 10
    assert any(not bool(torch.isfinite(v).all()) for v in event["before"].values())
    assert all(bool(torch.isfinite(v).all()) for v in out.final_payload()["model"].values())


def test_too_many_rollbacks_in_the_window_abort_with_one_line(kktrain_run, fault_injector):
    inj = fault_injector(spike_at={13: 50.0}, repeat=True)  # step 13 spikes however often it is replayed
    out = kktrain_run(plugins=["spike-rollback", inj], options={**OPTS, "spike-rollback.max_rollbacks": 2},
                      steps=20, raise_errors=False)
    assert isinstance(out.error, TrainingAborted) and out.error.exit_code == 3
    message = str(out.error)
    assert "after 2 rollbacks within 1000 steps" in message and "max_rollbacks=2" in message and "\n" not in message
    assert [k for k, _ in inj.injected] == ["spike"] * 3
    summary = json.loads((out.run_dir / "summary.json").read_text())
    assert summary["status"] == "aborted" and summary["spike-rollback"]["rollback_steps"] == [13, 13]


def test_rollback_from_the_newest_checkpoint(kktrain_run, fault_injector):
    obs = Observer()
    out = kktrain_run(plugins=["spike-rollback", fault_injector(spike_at={13: 20.0}), obs],
                      options={**OPTS, "spike-rollback.source": "checkpoint"}, steps=16, **{"checkpoint.every_steps": 4})
    out.assert_success()
    (event,) = obs.anomalies
    assert event["to_step"] == 12 and _equal(event["after"], obs.at_step[12][0])
    assert out.summary["spike-rollback"]["history"][0]["source"] == "step_00000012.pt"
    assert out.final_payload()["plugins"]["spike-rollback"]["snapshot"] is None  # nothing extra in checkpoints


@pytest.mark.parametrize("cut", [11, 15], ids=["cut-before-spike", "cut-after-rollback"])
def test_resume_is_bit_exact_around_a_rollback(assert_resume_equivalent, fault_injector, cut):
    whole, resumed = assert_resume_equivalent(
        plugins=lambda: ["spike-rollback", fault_injector(spike_at={13: 20.0})], options=OPTS, steps=20, cut=cut,
        task_options={"dropout": 0.2},
    )
    assert whole.summary["spike-rollback"]["rollback_steps"] == [13]
    assert resumed.final_payload()["state"]["skip_batches"] == [[0, 12]]


BATCHED = {**OPTS, "spike-rollback.check_every": 4}


def test_check_every_finds_the_spike_late_and_rolls_back_to_a_snapshot_before_it(kktrain_run, fault_injector):
    """check_every=4: the losses of steps 13-16 are read at step 16; the rollback goes back to the
    snapshot of check step 12 (before the spike), skips step 13's batch, and trains 13-16 again."""
    obs = Observer()
    inj = fault_injector(spike_at={13: 20.0})
    out = kktrain_run(plugins=["spike-rollback", inj, obs], options=BATCHED, steps=20)
    out.assert_success()
    (event,) = obs.anomalies
    assert (event["kind"], event["step"], event["handled"], event["to_step"]) == ("spike", 13, True, 12)
    assert _equal(event["after"], obs.at_step[12][0])  # bit for bit the state before the spike
    assert out.final_payload()["state"]["skip_batches"] == [[0, 12]]  # step 13's batch, not step 16's
    assert out.summary["steps"] == 20 and out.summary["spike-rollback"]["rollback_steps"] == [13]


def test_check_every_without_spikes_trains_the_same_weights(kktrain_run):
    """Reading the losses in windows changes when the check happens, not what is trained."""
    plain = kktrain_run(plugins=["spike-rollback"], options=OPTS, steps=18)
    batched = kktrain_run(plugins=["spike-rollback"], options=BATCHED, steps=18)
    a, b = plain.final_payload()["model"], batched.final_payload()["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


class BadBatch:
    """A x20 loss on one batch of the data (epoch 0, batch 12: step 13's), wherever it is trained:
    unlike the step-numbered injector, it behaves the same in a resumed process."""

    name = "bad-batch"

    @hookimpl(wrapper=True)
    def forward_loss(self, trainer, batch):
        loss = yield
        return loss * 20.0 if trainer.data.last_positions == [[0, 12]] else loss


@pytest.mark.parametrize("cut", [14, 17], ids=["cut-inside-the-window", "cut-after-rollback"])
def test_check_every_resume_is_bit_exact_around_a_late_rollback(assert_resume_equivalent, cut):
    whole, resumed = assert_resume_equivalent(
        plugins=lambda: ["spike-rollback", BadBatch()], options=BATCHED, steps=20, cut=cut,
        task_options={"dropout": 0.2},
    )
    assert whole.summary["spike-rollback"]["rollback_steps"] == [13]
    assert resumed.final_payload()["state"]["skip_batches"] == [[0, 12]]


def test_check_every_with_checkpoints_rolls_back_to_one_before_the_spike(kktrain_run, fault_injector):
    """source=checkpoint: a checkpoint written inside the window (step 14) holds the spike; the
    rollback takes the newest one before it (step 12)."""
    obs = Observer()
    out = kktrain_run(plugins=["spike-rollback", fault_injector(spike_at={13: 20.0}), obs],
                      options={**BATCHED, "spike-rollback.source": "checkpoint"}, steps=16,
                      **{"checkpoint.every_steps": 2, "checkpoint.keep_last": 5})
    out.assert_success()
    (event,) = obs.anomalies
    assert event["to_step"] == 12 and _equal(event["after"], obs.at_step[12][0])


def test_without_the_persisted_snapshot_a_resume_rolls_back_elsewhere(tmp_path, fault_injector):
    """Why persist=True: cut between the snapshot (10) and the spike (13), the resumed run's only
    snapshot would be the resume point (11), not step 10."""
    from kktrain.testing import resume_equivalent

    with pytest.raises(AssertionError, match="resumed run differs"):
        resume_equivalent(tmp_path, plugins=lambda: ["spike-rollback", fault_injector(spike_at={13: 20.0})],
                          options={**OPTS, "spike-rollback.persist": False}, steps=20, cut=11)


def test_cli_run_and_bad_option(tmp_path):
    import kktrain_spike_rollback

    exe = Path(sys.executable).parent / "kktrain"
    paths = [str(Path(kktrain_spike_rollback.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "KKTRAIN_RUNS_DIR": str(tmp_path)}
    ok = subprocess.run([str(exe), "run", "--quiet", "--task", "tiny", "--plugin", "spike-rollback", "-o",
                         "spike-rollback.snapshot_every=2", "--max-steps", "6", "--out", str(tmp_path / "ok")],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["spike-rollback"]["snapshots"] == 4 and summary["spike-rollback"]["rollbacks"] == 0  # steps 0, 2, 4, 6
    bad = subprocess.run([str(exe), "run", "--task", "tiny", "--plugin", "spike-rollback", "-o",
                          "spike-rollback.factor=0.5", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "spike-rollback" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


LATIN = {"task": "latin", "batch_size": 16, "log_every": 4, "val_every": 0, "checkpoint.every_steps": 0,
         "task_options": {"d_model": 16, "layers": 1, "heads": 2, "size_min": 4, "size_max": 5, "samples_per_epoch": 512,
                          "val_sizes": [4], "val_puzzles": 8}}


def test_latin_task_x20_spike_restores_the_pre_spike_parameters_and_halves_the_lr(kktrain_run, fault_injector):
    """The done-when of the issue on the default task: a x20 spike at step 13 of a Latin run."""
    obs = Observer()
    out = kktrain_run(plugins=["spike-rollback", fault_injector(spike_at={13: 20.0}), obs], options=OPTS, steps=20, **LATIN)
    out.assert_success()
    (event,) = obs.anomalies
    assert (event["kind"], event["step"], event["handled"], event["to_step"]) == ("spike", 13, True, 10)
    params_10, lr_10 = obs.at_step[10]
    assert not _equal(event["before"], params_10) and _equal(event["after"], params_10)
    assert event["lr_after"] == pytest.approx(0.5 * lr_10, rel=1e-12)
    assert out.summary["steps"] == 20 and out.final_payload()["state"]["skip_batches"] == [[0, 12]]

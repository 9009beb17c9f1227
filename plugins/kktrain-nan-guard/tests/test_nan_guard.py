"""nan-guard: the finite check, its three policies, the diagnosis report, first-step gradient health.

Faults come from the ``fault_injector`` fixture (NaN/inf in the loss after forward) or from real
layers of the test-only tasks below, whose output or gradient is not finite at a chosen input.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from kktrain import ConfigError, PluginError, TrainingAborted
from kktrain.tasks.tiny import TinyOptions, TinyTask

HERE = Path(__file__).resolve().parent




# ---------------------------------------------------------------------------------------------
# Test-only tasks: the tiny task with a layer that goes non-finite at one chosen sample
# ---------------------------------------------------------------------------------------------

POISONED = 5  # index of the sample that makes a layer go non-finite


class LogFeatures(torch.nn.Module):
    """log(1 + x): NaN for any input below -1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log1p(x)


class SqrtAbs(torch.nn.Module):
    """sqrt(|x|): finite forward, but an infinite slope (NaN gradient) where x is exactly 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.abs(x))


class _FaultyTask(TinyTask):
    name = "nan-test"

    def __init__(self) -> None:
        super().__init__(TinyOptions(samples=64))
        self._x, self._vx = self._x.abs(), self._vx.abs()  # valid inputs for LogFeatures


class LogNanTask(_FaultyTask):
    """Forward NaN: LogFeatures gets -5 in one feature of one sample."""

    def __init__(self) -> None:
        super().__init__()
        self._x[POISONED, 0] = -5.0

    def build_model(self) -> torch.nn.Module:
        o = self.options
        return torch.nn.Sequential(OrderedDict(
            log=LogFeatures(), fc1=torch.nn.Linear(o.dim, o.hidden), act=torch.nn.ReLU(), fc2=torch.nn.Linear(o.hidden, o.classes),
        ))


class SqrtGradTask(_FaultyTask):
    """Backward NaN only: one all-zero sample puts fc1's (bias-free) output at exactly 0 under SqrtAbs."""

    def __init__(self) -> None:
        super().__init__()
        self._x[POISONED] = 0.0

    def build_model(self) -> torch.nn.Module:
        o = self.options
        return torch.nn.Sequential(OrderedDict(
            fc1=torch.nn.Linear(o.dim, o.hidden, bias=False), sqrt=SqrtAbs(), fc2=torch.nn.Linear(o.hidden, o.classes),
        ))


class DeadParamTask(TinyTask):
    """A parameter the forward never uses and one whose gradient is always zero."""

    name = "dead-test"

    def build_model(self) -> torch.nn.Module:
        return _DeadModel(self.options)


class _DeadModel(torch.nn.Module):
    def __init__(self, o: TinyOptions) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(o.dim, o.hidden), torch.nn.ReLU(), torch.nn.Linear(o.hidden, o.classes))
        self.unused = torch.nn.Linear(2, 2)
        self.gate = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + 0.0 * self.gate


def make_log_task() -> LogNanTask:
    return LogNanTask()


def make_sqrt_task() -> SqrtGradTask:
    return SqrtGradTask()


def make_dead_task() -> DeadParamTask:
    return DeadParamTask()


def _report(out, step: int) -> dict:
    return json.loads((out.run_dir / "checkpoints" / f"nan_report_step_{step}.json").read_text())


def _events(out, name: str) -> list[dict]:
    return [e for e in out.summary["events"] if e["event"] == name]


def _all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def test_options_defaults_and_strictness(kktrain_run):
    from kktrain_nan_guard import NanGuardPlugin

    opts = NanGuardPlugin.Options()
    assert (opts.policy, opts.diagnose, opts.check_first_step, opts.max_consecutive) == ("skip", True, True, 10)
    with pytest.raises((ConfigError, PluginError), match="nan-guard.*no option 'polcy'"):
        kktrain_run(plugins=["nan-guard"], options={"nan-guard.polcy": "stop"}, steps=1)
    with pytest.raises(ConfigError, match="nan-guard.*'policy'"):
        kktrain_run(plugins=["nan-guard"], options={"nan-guard.policy": "explode"}, steps=1)
    with pytest.raises(ConfigError, match="nan-guard.*'max_consecutive'"):
        kktrain_run(plugins=["nan-guard"], options={"nan-guard.max_consecutive": 0}, steps=1)
    with pytest.raises(ConfigError, match="nan-guard.*'diagnose'"):
        kktrain_run(plugins=["nan-guard"], options={"nan-guard.diagnose": "sometimes"}, steps=1)


def test_rollback_policy_alone_is_a_config_error_before_anything_is_written(kktrain_run, tmp_path):
    out_dir = tmp_path / "never"
    with pytest.raises(ConfigError, match="policy=rollback needs --plugin spike-rollback"):
        kktrain_run(plugins=["nan-guard"], options={"nan-guard.policy": "rollback"}, steps=3, out=out_dir)
    assert not out_dir.exists()


# ---------------------------------------------------------------------------------------------
# policy=skip
# ---------------------------------------------------------------------------------------------


def test_skip_drops_injected_nan_steps_and_reports_the_loss(kktrain_run, fault_injector):
    inj = fault_injector(nan_at=[3, 7])
    out = kktrain_run(plugins=["nan-guard", inj], steps=10)
    out.assert_success()
    assert inj.injected == [("nan", 3), ("nan", 7)]
    assert out.summary["steps"] == 10 and out.summary["skipped_steps"] == 2
    section = out.summary["nan-guard"]
    assert (section["skipped"], section["nonfinite_steps"], section["first_step"]) == (2, 2, 3)
    assert [e["at_step"] for e in _events(out, "nan_skipped")] == [3, 7]
    assert _all_finite(out.final_payload()["model"])
    # The injector multiplies the loss after forward: every module output was finite.
    report = _report(out, 3)
    assert (report["tensor"], report["module"], report["loss"]) == ("output", "loss", "nan")
    assert "all module outputs were finite" in report["note"]
    assert not (out.run_dir / "checkpoints" / "nan_report_step_7.json").exists()  # first step only
    # Without the guard the same fault reaches the weights.
    bare = kktrain_run(plugins=[fault_injector(nan_at=[3])], steps=4)
    assert not _all_finite(bare.final_payload()["model"])


def test_inf_loss_with_clipping_off_uses_the_total_norm(kktrain_run, fault_injector):
    out = kktrain_run(plugins=["nan-guard", fault_injector(inf_at=[2])], steps=4, grad_clip=None)
    out.assert_success()
    assert [e["at_step"] for e in _events(out, "nan_skipped")] == [2]
    assert _events(out, "nan_skipped")[0]["loss"] == "inf"


def test_nan_gradient_with_finite_loss_is_caught_and_its_module_named(kktrain_run):
    out = kktrain_run(plugins=["nan-guard"], steps=4, task=f"{__name__}:make_sqrt_task", grad_clip=None)
    out.assert_success()
    skipped = _events(out, "nan_skipped")
    assert skipped and skipped[0]["nonfinite"] == "gradients" and math.isfinite(skipped[0]["loss"])
    report = _report(out, skipped[0]["at_step"])
    assert (report["tensor"], report["module"], report["module_type"]) == ("grad", "sqrt", "SqrtAbs")
    assert report["reproduced"] is True
    assert "fc1.weight" in report["nonfinite_param_grads"]
    assert _all_finite(out.final_payload()["model"])


def test_diagnosis_names_the_first_module_whose_output_is_nan(kktrain_run):
    out = kktrain_run(plugins=["nan-guard"], steps=4, task=f"{__name__}:make_log_task")
    out.assert_success()
    first = _events(out, "nan_skipped")[0]["at_step"]
    report = _report(out, first)
    assert (report["tensor"], report["module"], report["module_type"]) == ("output", "log", "LogFeatures")
    assert out.summary["nan-guard"]["first_module"] == "log"
    assert out.summary["nan-guard"]["report"].endswith(f"nan_report_step_{first}.json")


def test_diagnosis_does_not_change_the_training_trajectory(kktrain_run, fault_injector):
    """The re-run draws dropout masks: under a forked RNG, so training goes on exactly as without it."""
    runs = [
        kktrain_run(plugins=["nan-guard", fault_injector(nan_at=[3])], options={"nan-guard.diagnose": diagnose},
                    steps=6, task_options={"dropout": 0.3})
        for diagnose in (True, False)
    ]
    a, b = (r.final_payload()["model"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _report(runs[0], 3)["reproduced"] is False and "diagnosis off" in _report(runs[1], 3)["note"]


def test_diagnosis_off_still_skips_and_writes_a_plain_report(kktrain_run):
    out = kktrain_run(plugins=["nan-guard"], options={"nan-guard.diagnose": False}, steps=4, task=f"{__name__}:make_log_task")
    out.assert_success()
    report = _report(out, out.summary["nan-guard"]["first_step"])
    assert report["module"] is None and "diagnosis off" in report["note"]


def test_too_many_consecutive_nonfinite_steps_abort(kktrain_run, fault_injector):
    inj = fault_injector(nan_at=[3], repeat=True)  # step 3 stays NaN however often it is retried
    out = kktrain_run(plugins=["nan-guard", inj], options={"nan-guard.max_consecutive": 3}, steps=6, raise_errors=False)
    assert isinstance(out.error, TrainingAborted)
    assert "4 non-finite steps in a row" in str(out.error) and "\n" not in str(out.error)
    assert out.trainer.state.step == 2


# ---------------------------------------------------------------------------------------------
# policy=stop
# ---------------------------------------------------------------------------------------------


def test_stop_aborts_with_one_line_and_never_steps_on_nan(kktrain_run, fault_injector):
    out = kktrain_run(plugins=["nan-guard", fault_injector(nan_at=[4])], options={"nan-guard.policy": "stop"},
                      steps=8, raise_errors=False)
    assert isinstance(out.error, TrainingAborted) and out.error.exit_code == 3
    message = str(out.error)
    assert "non-finite loss at step 4" in message and "policy=stop" in message and "\n" not in message
    assert "nan_report_step_4.json" in message
    assert out.trainer.state.step == 3
    assert _all_finite(out.trainer.model.state_dict())
    assert (out.run_dir / "checkpoints" / "nan_report_step_4.json").exists()
    summary = json.loads((out.run_dir / "summary.json").read_text())
    assert summary["status"] == "aborted" and summary["stop_reason"] == message
    assert summary["nan-guard"]["first_step"] == 4 and summary["nan-guard"]["first_module"] == "loss"


# ---------------------------------------------------------------------------------------------
# first-step gradient health (seed 003 §9)
# ---------------------------------------------------------------------------------------------


def test_first_step_health_names_parameters_without_useful_gradient(kktrain_run):
    out = kktrain_run(plugins=["nan-guard"], steps=2, task=f"{__name__}:make_dead_task")
    health = out.summary["nan-guard"]["grad_health"]
    assert health["no_grad"] == ["unused.weight", "unused.bias"]
    assert health["zero_grad"] == ["gate"]
    assert health["nonfinite_grad"] == []
    off = kktrain_run(plugins=["nan-guard"], options={"nan-guard.check_first_step": False}, steps=2,
                      task=f"{__name__}:make_dead_task")
    assert "grad_health" not in off.summary["nan-guard"]


# ---------------------------------------------------------------------------------------------
# resume, the Latin task, the CLI
# ---------------------------------------------------------------------------------------------


def test_resume_is_bit_exact_across_skips_and_the_diagnosis(assert_resume_equivalent, fault_injector):
    # dropout: the diagnosis re-runs forward; it must not move the RNG. The first NaN (step 4) is
    # before the cut, so the resumed run must know it was diagnosed already (no second pass at 9).
    _, resumed = assert_resume_equivalent(
        plugins=lambda: ["nan-guard", fault_injector(nan_at=[4, 9])], steps=12, cut=6, task_options={"dropout": 0.2},
    )
    assert resumed.summary["nan-guard"]["skipped"] == 2
    assert not (resumed.run_dir / "checkpoints" / "nan_report_step_9.json").exists()


def test_latin_task_with_nan_at_random_steps_completes(kktrain_run, fault_injector):
    rng = random.Random(20240521)
    nan_steps = sorted(rng.sample(range(2, 24), 4))
    inj = fault_injector(nan_at=nan_steps)
    out = kktrain_run(
        plugins=["nan-guard", inj], steps=24, task="latin",
        task_options={"d_model": 16, "layers": 1, "heads": 2, "size_min": 4, "size_max": 5, "samples_per_epoch": 512,
                      "val_sizes": [4], "val_puzzles": 8},
        batch_size=16, log_every=4, val_every=0, **{"checkpoint.every_steps": 0},
    )
    out.assert_success()
    assert [s for _, s in inj.injected] == nan_steps
    assert out.summary["skipped_steps"] == len(nan_steps) == out.summary["nan-guard"]["skipped"]
    assert out.summary["steps"] == 24
    losses = [r["train/loss"] for r in out.metrics if r["kind"] == "train"]
    assert losses and all(math.isfinite(v) for v in losses)
    assert math.isfinite(out.summary["final"]["val/loss"])
    # The Latin model masks logits with -inf on purpose: that is no culprit, the loss is.
    assert out.summary["nan-guard"]["first_module"] == "loss"


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    import kktrain_nan_guard

    exe = Path(sys.executable).parent / "kktrain"
    paths = [str(Path(kktrain_nan_guard.__file__).resolve().parents[1]), str(HERE), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "KKTRAIN_RUNS_DIR": str(tmp_path)}
    return subprocess.run([str(exe), "run", "--quiet", *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_skip_and_stop_and_bad_option(tmp_path):
    ok = _cli(["--task", "tiny", "--plugin", "nan-guard", "--max-steps", "4", "--out", str(tmp_path / "ok")], tmp_path)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["nan-guard"]["policy"] == "skip" and summary["nan-guard"]["nonfinite_steps"] == 0

    stop = _cli(["--task", f"{__name__}:make_log_task", "--plugin", "nan-guard", "-o", "nan-guard.policy=stop",
                 "--max-steps", "4", "--out", str(tmp_path / "stop")], tmp_path)
    assert stop.returncode == 3, stop.stderr
    lines = [ln for ln in stop.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "nan-guard: non-finite loss" in lines[0] and "'log'" in lines[0], stop.stderr
    assert "Traceback" not in stop.stderr
    assert json.loads((tmp_path / "stop" / "summary.json").read_text())["status"] == "aborted"

    bad = _cli(["--task", "tiny", "--plugin", "nan-guard", "-o", "nan-guard.policy=sometimes", "--out", str(tmp_path / "bad")], tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nan-guard" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()

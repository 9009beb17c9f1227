"""Adaptive validation frequency (val_schedule, val_at_epoch_end) and validation under inference mode."""

from __future__ import annotations

import pytest
import torch

from kktrain import RunConfig, Trainer, hookimpl
from kktrain.tasks.tiny import TinyTask
from kktrain.testing import run_tiny

from kkcli import kk

# 20 steps: every 2 up to step 5 (25 %), every 5 up to step 10, then every 10; the tiny task's
# epoch has 16 steps.
SCHEDULE = {"val_schedule": [[0.25, 2], [0.5, 5], [1.0, 10]], "log_every": 5}


def _val_steps(outcome) -> list[int]:
    return [m["step"] for m in outcome.metrics if m["kind"] == "val"]


def test_schedule_intervals_follow_the_share_of_the_run(tmp_path):
    out = run_tiny(tmp_path, steps=20, options={**SCHEDULE, "val_at_epoch_end": False})
    # 2, 4 (every 2); 9 = 4 + 5; 19 = 9 + 10; 20: the end always validates.
    assert _val_steps(out) == [2, 4, 9, 19, 20]


def test_epoch_end_validation_counts_as_the_last_validation(tmp_path):
    out = run_tiny(tmp_path, steps=20, options=SCHEDULE)
    assert _val_steps(out) == [2, 4, 9, 16, 20]  # epoch end at 16; 16 + 10 is past the end


def test_epoch_end_validation_can_be_switched_off(tmp_path):
    on = run_tiny(tmp_path, steps=20)
    off = run_tiny(tmp_path, steps=20, options={"val_at_epoch_end": False})
    assert _val_steps(on) == [16, 20] and _val_steps(off) == [20]


def test_schedule_resumes_exactly(tmp_path):
    from kktrain.testing import compare_payloads

    opts = {**SCHEDULE, "val_at_epoch_end": False}
    whole = run_tiny(tmp_path, steps=20, options=opts)
    out = tmp_path / "cut"
    run_tiny(tmp_path, steps=20, options=opts, out=out, stop_at_step=7)
    resumed = run_tiny(tmp_path, steps=20, options=opts, out=out, resume="auto")
    assert _val_steps(resumed) == _val_steps(whole) == [2, 4, 9, 19, 20]
    assert not compare_payloads(whole.final_payload(), resumed.final_payload())


@pytest.mark.parametrize(("args", "message"), [
    (["-o", "val_every=5", "-o", "val_schedule=[[1.0, 4]]"], "keep one (val_schedule replaces val_every)"),
    (["-o", "val_schedule=[[0.5, 4], [0.2, 8]]"], "shares rising in (0, 1]"),
    (["-o", "val_schedule=[[1.0, 0]]"], "at least 1 step"),
])
def test_bad_schedules_are_one_line_exit_2(tmp_path, args, message):
    proc = kk("run", "--task", "tiny", "--max-steps", "4", "--out", "never", *args, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "never").exists()


class ModeTask(TinyTask):
    """The tiny task, recording the grad mode its validation runs in."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[tuple[bool, bool]] = []

    def validate(self, model, device):
        self.modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return super().validate(model, device)


class NeedsAutograd:
    """A plugin that asks for no_grad validation."""

    name = "needs-autograd"

    @hookimpl
    def on_model_built(self, trainer, model):
        trainer.require_autograd_in_validation("needs-autograd: test")


@pytest.mark.parametrize(("plugins", "options", "expected"), [
    ([], {}, (True, False)),
    ([NeedsAutograd()], {}, (False, False)),
    ([], {"val_grad_mode": "no_grad"}, (False, False)),
])
def test_validation_grad_mode(tmp_path, plugins, options, expected):
    task = ModeTask()
    cfg = RunConfig(task="tiny", max_steps=3, out=str(tmp_path / "r"), **options)
    tr = Trainer(cfg, plugins, task=task, quiet=True)
    tr.fit()
    assert task.modes and set(task.modes) == {expected}
    assert tr.validation_grad_mode == ("inference" if expected[0] else "no_grad")


class CachingTask(TinyTask):
    """Keeps a tensor computed in validation and uses it in the training loss (what inference mode forbids)."""

    def validate(self, model, device):
        x = self._vx[:4].to(device)
        self.cache = model(x).mean(0)  # made under the validation's grad mode
        return super().validate(model, device)

    def loss(self, model, batch):
        x, y = batch
        out = model(x)
        extra = (out * self.cache).sum() * 0.0 if hasattr(self, "cache") else 0.0
        return torch.nn.functional.cross_entropy(out, y) + extra


def test_inference_mode_breaks_a_validation_cache_and_no_grad_fixes_it(tmp_path):
    """Why a plugin can ask: the same run fails under inference mode and trains under no_grad."""
    opts = {"max_steps": 6, "val_every": 2}
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        Trainer(RunConfig(task="tiny", out=str(tmp_path / "a"), **opts), task=CachingTask(), quiet=True).fit()
    summary = Trainer(RunConfig(task="tiny", out=str(tmp_path / "b"), val_grad_mode="no_grad", **opts),
                      task=CachingTask(), quiet=True).fit()
    assert summary["status"] == "completed"

"""ema with buffers: BatchNorm statistics copied from the model or averaged like the weights."""

from __future__ import annotations

import pytest
import torch

from kktrain import hookimpl
from kktrain.tasks.tiny import TinyTask

TASK = f"{__name__}:make_bn_task"


class BatchNormTask(TinyTask):
    """The tiny task with a BatchNorm layer (running statistics: float buffers and an int counter)."""

    def build_model(self) -> torch.nn.Module:
        o = self.options
        return torch.nn.Sequential(
            torch.nn.Linear(o.dim, o.hidden), torch.nn.BatchNorm1d(o.hidden), torch.nn.ReLU(), torch.nn.Linear(o.hidden, o.classes)
        )


def make_bn_task() -> BatchNormTask:
    """Factory for ``--task test_ema_buffers:make_bn_task``."""
    return BatchNormTask()


class BufferWatch:
    """The running mean the core's validation sees."""

    name = "buffer-watch"

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    @hookimpl(trylast=True, wrapper=True)
    def validate(self, trainer):
        self.seen.append(trainer.model[1].running_mean.clone())
        return (yield)


@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_buffers_copied_or_averaged(kktrain_run, buffers):
    watch = BufferWatch()
    out = kktrain_run(task=TASK, plugins=["ema", watch], options={"ema.buffers": buffers, "ema.decay": 0.8}, steps=10)
    out.assert_success()
    payload = out.final_payload()
    ema, model = payload["plugins"]["ema"]["weights"], payload["model"]
    assert set(ema) == set(model), "the EMA state is a complete, loadable state dict"
    assert torch.equal(ema["1.num_batches_tracked"], model["1.num_batches_tracked"])
    averaged = not torch.equal(ema["1.running_mean"], model["1.running_mean"])
    assert averaged is (buffers == "average")
    ema_validation, raw_validation = watch.seen  # the average first, then the training weights
    assert torch.equal(ema_validation, ema["1.running_mean"])
    assert torch.equal(raw_validation, model["1.running_mean"])


def test_resume_is_exact_with_averaged_buffers(assert_resume_equivalent):
    assert_resume_equivalent(task=TASK, plugins=["ema"], options={"ema.buffers": "average"}, steps=10, cut=4)

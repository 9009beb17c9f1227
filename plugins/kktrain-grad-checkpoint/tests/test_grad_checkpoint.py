"""grad-checkpoint: identical losses and gradients, fewer saved activations, every/enabled, resume, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kktrain import ConfigError, hookimpl
from kktrain.tasks.tiny import TinyTask
from kktrain.testing import compare_payloads
from kktrain_grad_checkpoint import is_checkpointed

LATIN_TINY = {"d_model": 16, "layers": 3, "heads": 2, "samples_per_epoch": 64, "val_puzzles": 4, "val_sizes": [4],
              "size_min": 4, "size_max": 5}
NO_BLOCKS = f"{__name__}:make_blockless_task"


class BlocklessTask(TinyTask):
    """The tiny task, declaring nothing to checkpoint."""

    def checkpoint_blocks(self, model):
        return []


def make_blockless_task() -> BlocklessTask:
    """Factory for ``--task test_grad_checkpoint:make_blockless_task``."""
    return BlocklessTask()


class StepProbe:
    """Per step: the loss, the gradients, and how many tensors autograd saved outside checkpoints."""

    name = "step-probe"

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.grads: list[list[torch.Tensor]] = []
        self.saved: list[int] = []
        self.model: torch.nn.Module | None = None

    @hookimpl(trylast=True)
    def on_model_built(self, trainer, model):
        self.model = model

    @hookimpl(wrapper=True, tryfirst=True)
    def forward_loss(self, trainer, batch):
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        # Inside a checkpointed block the checkpoint's own hooks take over: what it keeps is not seen here.
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = yield
        self.saved.append(count[0])
        return loss

    @hookimpl
    def on_before_optimizer_step(self, trainer, loss, grad_norm):
        self.losses.append(loss.clone())
        self.grads.append([p.grad.clone() for p in trainer.model.parameters()])


def _same(a, b) -> bool:
    return not compare_payloads(a.final_payload(), b.final_payload(), parts=("model", "optimizer", "scheduler"))


def _identical_steps(a: StepProbe, b: StepProbe) -> None:
    assert len(a.losses) == len(b.losses) > 0
    for la, lb in zip(a.losses, b.losses):
        assert torch.equal(la, lb)
    for ga, gb in zip(a.grads, b.grads):
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"grad-checkpoint.blocks": 2}, "has no option 'blocks'"),
        ({"grad-checkpoint.every": 0}, "option 'every'"),
        ({"grad-checkpoint.every": "2"}, "option 'every'"),
        ({"grad-checkpoint.enabled": "on"}, "option 'enabled'"),
    ],
)
def test_options_reject_unknown_keys_and_wrong_types(kktrain_run, options, message):
    with pytest.raises(ConfigError, match=message):
        kktrain_run(plugins=["grad-checkpoint"], options=options, steps=2)


# ------------------------------------------------------------------ equivalence


def test_tiny_task_identical_losses_and_gradients(kktrain_run):
    ckpt, plain = StepProbe(), StepProbe()
    a = kktrain_run(plugins=["grad-checkpoint", ckpt], steps=10, task_options={"dropout": 0.3})
    b = kktrain_run(plugins=[plain], steps=10, task_options={"dropout": 0.3})
    assert a.summary["grad-checkpoint"]["blocks"] == 3
    assert all(is_checkpointed(m) for m in ckpt.model if isinstance(m, torch.nn.Linear))
    assert max(ckpt.saved) < min(plain.saved), (ckpt.saved, plain.saved)
    _identical_steps(ckpt, plain)
    assert _same(a, b)
    assert list(a.final_payload()["model"]) == list(b.final_payload()["model"])


def test_latin_model_identical_losses_and_gradients(kktrain_run):
    ckpt, plain = StepProbe(), StepProbe()
    kw = {"task": "latin", "task_options": LATIN_TINY, "steps": 3, "batch_size": 8, "val_every": 0}
    a = kktrain_run(plugins=["grad-checkpoint", ckpt], **kw)
    b = kktrain_run(plugins=[plain], **kw)
    assert a.summary["grad-checkpoint"] == {"blocks": 3, "declared": 3, "every": 1, "enabled": True}
    assert all(is_checkpointed(block) for block in ckpt.model.blocks)
    assert max(ckpt.saved) < min(plain.saved) / 2, (ckpt.saved, plain.saved)
    _identical_steps(ckpt, plain)
    assert _same(a, b)


def test_every_second_block(kktrain_run):
    every, allb = StepProbe(), StepProbe()
    kw = {"task": "latin", "task_options": LATIN_TINY, "steps": 2, "batch_size": 8, "val_every": 0}
    out = kktrain_run(plugins=["grad-checkpoint", every], options={"grad-checkpoint.every": 2}, **kw)
    kktrain_run(plugins=["grad-checkpoint", allb], **kw)
    assert out.summary["grad-checkpoint"]["blocks"] == 2
    assert [is_checkpointed(b) for b in every.model.blocks] == [True, False, True]
    assert allb.saved[0] < every.saved[0]


def test_disabled_changes_nothing(kktrain_run):
    off, plain = StepProbe(), StepProbe()
    out = kktrain_run(plugins=["grad-checkpoint", off], options={"grad-checkpoint.enabled": False}, steps=3)
    kktrain_run(plugins=[plain], steps=3)
    assert out.summary["grad-checkpoint"]["blocks"] == 0
    assert not any(is_checkpointed(m) for m in off.model)
    assert off.saved == plain.saved


def test_task_without_blocks_warns_and_trains(kktrain_run):
    out = kktrain_run(task=NO_BLOCKS, plugins=["grad-checkpoint"], steps=4)
    out.assert_success()
    assert out.summary["grad-checkpoint"]["blocks"] == 0
    (event,) = [e for e in out.summary["events"] if e["event"] == "grad_checkpoint"]
    assert event["blocks"] == 0 and event["declared"] == 0


def test_validation_runs_blocks_plainly(kktrain_run):
    """Without gradients a checkpointed block is just called: validation metrics are unchanged."""
    a = kktrain_run(plugins=["grad-checkpoint"], steps=6, val_every=3)
    b = kktrain_run(steps=6, val_every=3)
    va = [r["val/loss"] for r in a.metrics if r["kind"] == "val"]
    vb = [r["val/loss"] for r in b.metrics if r["kind"] == "val"]
    assert va == vb and len(va) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_memory_is_lower(kktrain_run):
    class Peak:
        name = "peak"

        def __init__(self) -> None:
            self.peaks: list[int] = []

        @hookimpl(wrapper=True, tryfirst=True)
        def forward_loss(self, trainer, batch):
            torch.cuda.reset_peak_memory_stats()
            return (yield)

        @hookimpl
        def on_after_backward(self, trainer):
            self.peaks.append(torch.cuda.max_memory_allocated())

    kw = {"task": "latin", "task_options": {**LATIN_TINY, "d_model": 128, "heads": 4, "size_min": 12, "size_max": 12},
          "steps": 2, "batch_size": 32, "val_every": 0, "device": "cuda"}
    ckpt, plain = Peak(), Peak()
    kktrain_run(plugins=["grad-checkpoint", ckpt], **kw)
    kktrain_run(plugins=[plain], **kw)
    assert max(ckpt.peaks) < 0.8 * max(plain.peaks), (ckpt.peaks, plain.peaks)


# ------------------------------------------------------------------ resume, CLI


def test_resume_is_exact(assert_resume_equivalent):
    assert_resume_equivalent(plugins=["grad-checkpoint"], steps=12, cut=5, task_options={"dropout": 0.2})


def test_cli_run_with_grad_checkpoint(tmp_path):
    exe = Path(sys.executable).parent / "kktrain"
    out = tmp_path / "cli"
    done = subprocess.run(
        [str(exe), "run", "--task", "tiny", "--out", str(out), "--max-steps", "6", "-q", "--plugin", "grad-checkpoint",
         "-o", "grad-checkpoint.every=2"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grad-checkpoint"] == {"blocks": 2, "declared": 3, "every": 2, "enabled": True}

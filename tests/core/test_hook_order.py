"""Golden tests: the exact order of hook calls in short runs of the tiny task.

The recorder registers a pass-through plugin that implements every hook (``fire_all``), so the
hot-path hooks that the core otherwise skips when nobody implements them are called and
recorded too. Calls are labelled with the argument that tells them apart (the epoch, the
checkpoint kind, the kind of metrics record). A change in the loop that changes the order of
hooks must change these lists, on purpose, together with docs/hooks.md and kktrain/phases.py.
"""

from __future__ import annotations


from kktrain import StepRetry, hookimpl
from kktrain.testing import HookCall, HookRecorder




def label(call: HookCall) -> str:
    k = call.kwargs
    if call.name in ("on_epoch_start", "on_epoch"):
        return f"{call.name}[{k['epoch']}]"
    if call.name == "on_checkpoint":
        return f"on_checkpoint[{k['kind']}]"
    if call.name == "on_log":
        return f"on_log[{k['record']['kind']}]"
    return call.name


def assert_sequence(recorder: HookRecorder, expected: list[str]) -> None:
    got = [label(c) for c in recorder.calls]
    if got != expected:
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        lo = max(0, first - 4)
        raise AssertionError(
            f"hook order differs at call {first}:\n  expected ...{expected[lo:first + 6]}\n  got      ...{got[lo:first + 6]}\n"
            f"(expected {len(expected)} calls, got {len(got)})"
        )


# One optimizer step without faults, one micro-batch per step.
STEP = ["forward_loss", "backward", "on_after_backward", "on_before_optimizer_step", "optimizer_step", "on_step"]
EPOCH_END = ["validate", "on_validation_end", "on_log[val]"]  # then on_epoch, its record, its checkpoint

TWO_EPOCHS = [
    "on_hw_detect",
    "on_model_built",
    "build_optimizer",
    "on_train_start",
    "on_epoch_start[0]",
    *STEP,  # step 1
    *STEP, "on_log[train]",  # step 2: log_every 2
    *STEP,  # step 3
    *STEP, "on_log[train]",  # step 4: the epoch's last batch
    *EPOCH_END, "on_epoch[0]", "on_log[epoch]", "on_checkpoint[epoch]",
    "on_epoch_start[1]",
    *STEP,  # step 5
    *STEP, "on_log[train]",  # step 6
    *STEP,  # step 7
    *STEP, "on_log[train]",  # step 8: the last epoch's last batch, and the run's last step
    *EPOCH_END, "on_epoch[1]", "on_log[epoch]", "on_checkpoint[epoch]",
    "on_checkpoint[final]",  # validation already ran at this step: not again
    "on_train_end",
]


def test_hook_order_two_epochs(kktrain_run):
    """64 samples, batch 16: 4 steps per epoch, 2 epochs; log every 2; validate and checkpoint at epoch ends."""
    recorder = HookRecorder(fire_all=True)
    out = kktrain_run(steps=8, batch_size=16, task_options={"samples": 64}, log_every=2, recorder=recorder)
    assert out.summary["status"] == "completed"
    assert len(TWO_EPOCHS) == 4 + 1 + 8 * 6 + 4 + 2 * 6 + 1 + 2  # 72: the list above, counted
    assert_sequence(recorder, TWO_EPOCHS)


class Retry:
    name = "retry"

    @hookimpl
    def on_step_exception(self, trainer, error, attempt):
        return StepRetry(micro_batches=2, reason="oom")


class VetoThenReport:
    """Vetoes the first attempt at step 3; reports an anomaly after step 3."""

    name = "veto-then-report"
    vetoed = False

    @hookimpl
    def on_before_optimizer_step(self, trainer, loss, grad_norm):
        if trainer.state.step == 2 and not self.vetoed:
            self.vetoed = True
            return False
        return None

    @hookimpl
    def on_step(self, trainer, loss):
        if trainer.state.step == 3:
            trainer.hook.on_anomaly(trainer=trainer, kind="spike", detail={"step": 3, "loss": 0.0})


MICRO = ["forward_loss", "backward"]
AFTER = ["on_after_backward", "on_before_optimizer_step"]
COMMIT = ["optimizer_step", "on_step"]

FAULTS = [
    "on_hw_detect",
    "on_model_built",
    "build_optimizer",
    "on_train_start",
    "on_epoch_start[0]",
    *MICRO, *MICRO, *AFTER, *COMMIT,  # step 1: two micro-batches (grad_accum 2)
    "forward_loss", "on_step_exception",  # step 2: OOM in the first forward; a plugin asks to retry in halves
    *MICRO, *MICRO, *MICRO, *MICRO, *AFTER, *COMMIT,  # the retry: 2 micro-batches x 2 pieces
    *EPOCH_END, "on_epoch[0]", "on_log[epoch]", "on_checkpoint[epoch]",  # 4 batches = 2 steps: epoch over
    "on_epoch_start[1]",
    *MICRO, *MICRO, *AFTER,  # step 3, first try: vetoed, no optimizer_step, no on_step
    *MICRO, *MICRO, *AFTER, *COMMIT,  # step 3 on the next two batches
    "on_anomaly",  # fired by the plugin from its on_step
    "on_log[train]",  # log_every 3
    *EPOCH_END, "on_epoch[1]", "on_log[epoch]", "on_checkpoint[epoch]",
    "on_checkpoint[final]",
    "on_train_end",
]


def test_hook_order_with_accumulation_retry_veto_and_anomaly(kktrain_run, fault_injector):
    recorder = HookRecorder(fire_all=True)
    plugins = [fault_injector(oom_at=[2], oom_above=8), Retry(), VetoThenReport()]
    out = kktrain_run(plugins=plugins, steps=3, batch_size=16, grad_accum=2, task_options={"samples": 64},
                      log_every=3, recorder=recorder)
    assert (out.summary["steps"], out.summary["skipped_steps"]) == (3, 1)
    assert_sequence(recorder, FAULTS)

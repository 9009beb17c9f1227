"""The loop's phases, in order. Each phase is the moment one hook fires.

The loop, in pseudocode (``kktrain.loop.run`` is this, with the details)::

    REGISTER_COMMANDS       (the command line, before any run) plugins add subcommands
    HW_DETECT               detect hardware; plugins may adjust the config
    MODEL_BUILT             task builds the model, moved to the device; plugins may modify it
    BUILD_OPTIMIZER         the optimizer (replaceable), then the core builds the scheduler
    TRAIN_START             state restored when resuming
    for each epoch:
        EPOCH_START
        for each batch:
            try:
                for each micro-batch:
                    FORWARD_LOSS    loss = forward + loss      (replaceable, wrappable)
                    BACKWARD        loss.backward()            (replaceable)
                AFTER_BACKWARD      gradients complete
                (clip)              grad_norm = clip_grad_norm_(...)
                BEFORE_OPTIMIZER_STEP  any False vetoes the step
                OPTIMIZER_STEP      optimizer.step()           (replaceable)
                (scheduler.step, zero_grad, step += 1)
            except error:
                STEP_EXCEPTION      a plugin may ask to retry the batch, split smaller
            STEP                    the step is done
            ANOMALY                 (fired by guards) a rollback plugin may handle a NaN or a spike
            LOG                     every log_every steps: a metrics record
            VALIDATE, VALIDATION_END    every val_every steps (or val_schedule)
            CHECKPOINT              every checkpoint.every_steps steps
        VALIDATE, VALIDATION_END    at the epoch's end
        EPOCH
        CHECKPOINT                  at the epoch's end
    VALIDATE, VALIDATION_END, CHECKPOINT    the final validation and checkpoint
    TRAIN_END                               the summary

The enum's order is the order of the hooks in ``hookspecs.py`` (a test checks both); the exact
order of calls in a short run is pinned by the golden test ``tests/core/test_hook_order.py``.
"""

from __future__ import annotations

import enum


class Phase(enum.IntEnum):
    """Ordered loop phases; ``Phase.X.hook`` names the hook that fires at X."""

    REGISTER_COMMANDS = 0
    HW_DETECT = 1
    MODEL_BUILT = 2
    BUILD_OPTIMIZER = 3
    TRAIN_START = 4
    EPOCH_START = 5
    FORWARD_LOSS = 6
    BACKWARD = 7
    AFTER_BACKWARD = 8
    BEFORE_OPTIMIZER_STEP = 9
    OPTIMIZER_STEP = 10
    STEP = 11
    STEP_EXCEPTION = 12
    ANOMALY = 13
    VALIDATE = 14
    VALIDATION_END = 15
    EPOCH = 16
    CHECKPOINT = 17
    LOG = 18
    TRAIN_END = 19

    @property
    def hook(self) -> str:
        """The name of the hook that fires in this phase."""
        return _HOOKS[self]


_HOOKS = {
    Phase.REGISTER_COMMANDS: "register_commands",
    Phase.HW_DETECT: "on_hw_detect",
    Phase.BUILD_OPTIMIZER: "build_optimizer",
    Phase.MODEL_BUILT: "on_model_built",
    Phase.TRAIN_START: "on_train_start",
    Phase.EPOCH_START: "on_epoch_start",
    Phase.FORWARD_LOSS: "forward_loss",
    Phase.BACKWARD: "backward",
    Phase.AFTER_BACKWARD: "on_after_backward",
    Phase.BEFORE_OPTIMIZER_STEP: "on_before_optimizer_step",
    Phase.OPTIMIZER_STEP: "optimizer_step",
    Phase.STEP: "on_step",
    Phase.STEP_EXCEPTION: "on_step_exception",
    Phase.ANOMALY: "on_anomaly",
    Phase.VALIDATE: "validate",
    Phase.VALIDATION_END: "on_validation_end",
    Phase.EPOCH: "on_epoch",
    Phase.CHECKPOINT: "on_checkpoint",
    Phase.LOG: "on_log",
    Phase.TRAIN_END: "on_train_end",
}

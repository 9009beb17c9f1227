"""The hook contract: every hook kktrain calls, in the order a run calls them.

Each hook is listed once here and once in :class:`kktrain.phases.Phase` (a test keeps the two in
step), has a section in ``docs/hooks.md`` and a ``test_hook_<name>`` of its own.

Conventions:

* Arguments are passed by keyword; an implementation may accept any subset of them (pluggy).
* ``trainer`` is the running :class:`kktrain.Trainer`. Plugins read ``trainer.model``,
  ``trainer.optimizer``, ``trainer.state``, ``trainer.config`` ... and call its small public API
  (``set_knobs``, ``request_stop``, ``snapshot``/``restore``, ``log_event``, ``log_metrics``).
* Hooks marked *firstresult* stop at the first implementation that returns something other than
  ``None``. The core ships the default behaviour of those hooks as its own ``trylast`` plugin
  (:mod:`kktrain.defaults`), the way pytest runs its own protocol: a plugin replaces it by
  returning a value, or wraps it with ``@hookimpl(wrapper=True)``.
* Per-step hooks are marked ``@hot`` below (:data:`HOT_HOOKS`, the one list the trainer plans
  from). The core checks once, at set-up, which of them any enabled plugin implements; a hook
  nobody implements costs nothing. Implementations should not force a host-device sync
  (``.item()``, ``bool(tensor)``) unless their feature needs one, and should say so in their docs.
* ``register_commands`` is called on the plugin *classes* listed in the ``kktrain.commands``
  entry-point group (enabled or not) when the command line needs commands beyond the core's;
  implement it as a ``@staticmethod``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

if TYPE_CHECKING:
    import click
    import torch

    from kktrain.config import RunConfig
    from kktrain.hardware import HardwareInfo
    from kktrain.trainer import Trainer

PROJECT = "kktrain"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

_F = TypeVar("_F", bound=Callable[..., Any])


def hot(func: _F) -> _F:
    """Mark a hookspec as per-step (hot path): the trainer calls it only if a plugin implements it."""
    func.kktrain_hot = True  # type: ignore[attr-defined]
    return func


@dataclass(frozen=True)
class StepRetry:
    """Returned from ``on_step_exception``: retry the batch split into ``micro_batches`` pieces.

    ``sticky``: once the retry succeeds, start every later step with that split (it is part of the
    training state, so a resume keeps it).
    """

    micro_batches: int = 1
    reason: str = ""
    sticky: bool = False


# ----------------------------------------------------------------------------------------------
# The command line: before any run
# ----------------------------------------------------------------------------------------------


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``kktrain`` command line (datasette's ``register_commands``).

    Phase ``REGISTER_COMMANDS``. Called on the plugin *class* of every installed plugin listed in
    the entry-point group ``kktrain.commands`` (enabled or not), when a command that the core does
    not have is asked for (or the command list is shown): implement it as a ``@staticmethod`` and
    call ``cli.command()`` / ``cli.add_command``. The group keeps ``kktrain --help`` from importing
    every installed plugin (and torch with them). A core
    command of the same name wins; a plugin whose class fails to import is skipped with a warning.
    The vcache plugin adds ``kktrain hw-report`` this way. Raise :class:`kktrain.ConfigError` (or
    any ``KKTrainError``) from a command for a one-line error with exit code 2.

    Since 0.1.
    """


# ----------------------------------------------------------------------------------------------
# Set-up: before anything is built
# ----------------------------------------------------------------------------------------------


@hookspec
def on_hw_detect(
    hw: HardwareInfo, config: RunConfig, user_set: frozenset[str]
) -> dict[str, Any] | None:
    """Hardware was detected; the model and data are not built yet.

    Phase ``HW_DETECT``. ``hw`` describes CPU, GPUs and MPS. ``config`` is the validated run
    configuration (read-only here). ``user_set`` holds the dotted keys the user set explicitly
    (config file, ``KKTRAIN_*`` env, flags).

    Return a dict of dotted config keys to new values (``{"batch_size": 160,
    "data.workers": 8}``) or ``None``. The core applies them, skipping any key in ``user_set``,
    re-validates the config and logs every change with the plugin that asked for it. When two
    plugins set the same key, the one called first wins (use ``tryfirst`` to insist).

    Since 0.1.
    """


@hookspec
def on_model_built(trainer: Trainer, model: torch.nn.Module) -> None:
    """The model is built and on its device; the optimizer is not built yet.

    Phase ``MODEL_BUILT``. Modify the model in place (activation checkpointing of
    ``trainer.task.checkpoint_blocks(model)``, ``model.compile()``). Do not replace
    parameters: the optimizer is built from them next. Under ``distributed.strategy = fsdp`` the
    core shards the model right after this hook (parameters become ``DTensor`` shards); a plugin
    that runs the model in another dtype asks ``trainer.request_mixed_precision(dtype)`` here.

    Since 0.1.
    """


@hookspec(firstresult=True)
def build_optimizer(trainer: Trainer, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
    """Return the optimizer for ``params`` (the model's trainable parameters).

    Return ``None`` to let the next implementation (in the end the core's default) build it.

    Phase ``BUILD_OPTIMIZER``, *firstresult*. The core's default builds ``torch.optim.AdamW`` from
    ``trainer.config.optimizer`` (fused or foreach where the device supports it). A plugin
    (e.g. ``optim8bit``) returns its own optimizer to replace it. The LR scheduler is built by the
    core on top of whatever optimizer is returned.

    Since 0.1.
    """


@hookspec
def on_train_start(trainer: Trainer) -> None:
    """Everything is built and, when resuming, restored from the checkpoint.

    Phase ``TRAIN_START``. ``trainer.state.step`` is 0 on a fresh run, the checkpoint's step on a
    resume. Plugin state has already been restored through ``load_state_dict``.

    Since 0.1.
    """


# ----------------------------------------------------------------------------------------------
# Epochs
# ----------------------------------------------------------------------------------------------


@hookspec
def on_epoch_start(trainer: Trainer, epoch: int) -> None:
    """An epoch begins (also fires for the epoch a resume lands in, mid-epoch or not).

    Phase ``EPOCH_START``. A curriculum may call ``trainer.set_knobs(...)`` here; the data loader
    picks the knobs up before the next batch.

    Since 0.1.
    """


# ----------------------------------------------------------------------------------------------
# One optimizer step: forward+loss and backward per micro-batch, then the optimizer step
# ----------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
@hot
def forward_loss(trainer: Trainer, batch: Any) -> torch.Tensor | None:
    """Run forward and the loss for one micro-batch; return the scalar loss tensor.

    Return ``None`` to let the next implementation (in the end the core's default) do it.

    Phase ``FORWARD_LOSS``, *firstresult*, hot path. The core's default calls
    ``trainer.task.loss(trainer.train_model, batch)`` (the DDP wrapper or FSDP model under torchrun). AMP wraps it (``wrapper=True``) in
    ``torch.autocast``. Do not call ``.item()`` on the loss here.

    Since 0.1.
    """


@hookspec(firstresult=True)
@hot
def backward(trainer: Trainer, loss: torch.Tensor) -> bool | None:
    """Back-propagate ``loss`` (already divided for gradient accumulation); return ``True``.

    Return ``None`` to let the next implementation (in the end ``loss.backward()``) do it.

    Phase ``BACKWARD``, *firstresult*, hot path. The core's default calls ``loss.backward()``;
    AMP with fp16 calls ``scaler.scale(loss).backward()`` instead.

    Since 0.1.
    """


@hookspec
@hot
def on_after_backward(trainer: Trainer) -> None:
    """All micro-batches are back-propagated; gradients are complete, not yet clipped.

    Phase ``AFTER_BACKWARD``, hot path. AMP unscales the gradients here (``tryfirst``) so that
    clipping and gradient checks see true values.

    Since 0.1.
    """


@hookspec
@hot
def on_before_optimizer_step(
    trainer: Trainer, loss: torch.Tensor, grad_norm: torch.Tensor | None
) -> bool | None:
    """Gradients are clipped (when ``grad_clip`` is set); the optimizer has not stepped.

    Phase ``BEFORE_OPTIMIZER_STEP``, hot path. ``loss`` is the step's loss (mean over
    micro-batches, detached); ``grad_norm`` is the total gradient norm before clipping, or ``None``
    when clipping is off. Return ``False`` to veto the step: the core then zeroes the gradients,
    does not step the optimizer or the scheduler, counts the step as skipped and does not advance
    ``state.step``. Any ``False`` vetoes.

    Since 0.1.
    """


@hookspec(firstresult=True)
@hot
def optimizer_step(trainer: Trainer) -> bool | None:
    """Step the optimizer; return ``True``.

    Return ``None`` to let the next implementation (in the end ``optimizer.step()``) do it.

    Phase ``OPTIMIZER_STEP``, *firstresult*, hot path. The core's default calls
    ``trainer.optimizer.step()``; AMP with fp16 calls ``scaler.step`` and ``scaler.update``. The
    core steps the LR scheduler and zeroes the gradients (``set_to_none=True``) afterwards.

    Since 0.1.
    """


@hookspec
@hot
def on_step(trainer: Trainer, loss: torch.Tensor) -> None:
    """An optimizer step finished; ``trainer.state.step`` counts it already.

    Phase ``STEP``, hot path. ``loss`` is the step's detached loss tensor (call ``.item()`` only
    when your feature needs the value: it syncs the device). EMA updates here; spike rollback
    checks the loss here and may call ``trainer.restore(...)``.

    Since 0.1.
    """


@hookspec(firstresult=True)
@hot
def on_step_exception(trainer: Trainer, error: BaseException, attempt: int) -> StepRetry | None:
    """Forward or backward of the step raised ``error``; ``attempt`` counts from 0.

    Phase ``STEP_EXCEPTION``, *firstresult*. Return :class:`kktrain.StepRetry` to retry the same
    batch (its gradients are zeroed first), e.g. ``StepRetry(micro_batches=4)`` to split it into
    smaller micro-batches with the same effective batch (``sticky=True``: keep that split for the
    rest of the run); return ``None`` to let the error propagate. Errors of the optimizer step are
    not retried: a half-applied update cannot be undone.

    Since 0.1.
    """


@hookspec(firstresult=True)
def on_anomaly(trainer: Trainer, kind: str, detail: dict[str, Any]) -> bool | None:
    """A guard found an anomaly and asks whether a plugin handles it; return ``True`` if you did.

    Phase ``ANOMALY``, *firstresult*. Fired by plugins, not by the core: nan-guard with
    ``policy=rollback`` fires it with ``kind="nonfinite"`` from ``on_before_optimizer_step``;
    spike-rollback fires it for ``kind="spike"`` and handles both by restoring its last good
    snapshot. Return ``None`` if you did not handle it; when nobody answers, the caller applies its
    fallback.
    ``detail`` holds at least ``step`` and ``loss`` (a float, possibly nan).

    Since 0.1.
    """


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def validate(trainer: Trainer) -> dict[str, float] | None:
    """Compute validation metrics; return a flat dict of floats (without the ``val/`` prefix).

    Return ``None`` to let the next implementation (in the end the core's default) compute them.

    Phase ``VALIDATE``, *firstresult*. The core's default runs ``trainer.task.validate(model,
    device)`` under ``torch.inference_mode()`` (``torch.no_grad()`` when ``val_grad_mode = no_grad``
    or a plugin called ``trainer.require_autograd_in_validation(reason)``) with the model in eval
    mode. EMA wraps it
    (``wrapper=True``): it swaps its weights in, and swaps the training weights back afterwards,
    bit for bit. Global RNG state is saved and restored around this hook, so validation never
    changes the training trajectory.

    Since 0.1.
    """


@hookspec
def on_validation_end(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Validation metrics are in; ``metrics`` holds them with their ``val/`` (etc.) prefixes.

    Phase ``VALIDATION_END``. Early stopping and adaptive curricula decide here; they may add
    entries to ``metrics`` (logged afterwards) or call ``trainer.request_stop(reason)``.

    Since 0.1.
    """


@hookspec
def on_epoch(trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
    """Epoch ``epoch`` finished (after its end-of-epoch validation, when one ran).

    Phase ``EPOCH``. ``metrics`` holds the epoch's training summary (``train/loss`` mean,
    ``train/epoch_time_s`` ...) plus the latest validation metrics; plugins may add entries,
    which go to ``metrics.jsonl`` and the summary (memory-monitor adds peak memory here).

    Since 0.1.
    """


# ----------------------------------------------------------------------------------------------
# Checkpoints, logging, the end
# ----------------------------------------------------------------------------------------------


@hookspec
def on_checkpoint(trainer: Trainer, path: str, kind: str) -> None:
    """A checkpoint was written and verified at ``path`` (under torchrun: a sharded checkpoint's
    directory, on rank 0 once every rank's shard is committed; with ``checkpoint.async``: once the
    background write is verified, at the next step).

    Phase ``CHECKPOINT``. ``kind`` is ``"step"``, ``"epoch"``, ``"best"``, ``"final"`` or
    ``"interrupt"``. Plugin state is not saved here but through the plugin's own
    ``state_dict()``/``load_state_dict()``, which the core stores under the plugin's name.

    Since 0.1.
    """


@hookspec
@hot
def on_log(trainer: Trainer, record: dict[str, Any]) -> None:
    """A metrics record (one line of ``metrics.jsonl``) is about to be written (rank 0 only).

    Phase ``LOG``. ``record`` has ``step``, ``kind`` (``"train"``, ``"val"``, ``"epoch"``), ``time``
    and the metric values, named ``group/name`` (``train/loss``, ``val/acc``); a plugin may add
    entries. Train records come every ``log_every`` steps and after the last step, never at
    ``--stop-at-step`` (docs/hooks.md says exactly when). Loggers (tensorboard, csv, mlflow)
    implement this hook.

    Since 0.1.
    """


@hookspec
def on_train_end(trainer: Trainer, summary: dict[str, Any]) -> None:
    """Training stopped (finished, stopped early or interrupted); ``summary`` is about to be written.

    Phase ``TRAIN_END``. ``summary`` holds ``status``, ``steps``, ``final`` (the last metrics),
    ``best`` and ``events``; plugins add their own section under their name (``summary["ema"] =
    {...}``).

    Since 0.1.
    """


HOT_HOOKS: tuple[str, ...] = tuple(
    name for name, func in list(globals().items()) if callable(func) and getattr(func, "kktrain_hot", False)
)
"""The per-step hooks, in contract order: the trainer plans the hot path from this list."""

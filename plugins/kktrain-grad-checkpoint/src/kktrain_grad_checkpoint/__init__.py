"""grad-checkpoint: activation checkpointing of the blocks the task declares.

    kktrain run --plugin grad-checkpoint                    # every block of task.checkpoint_blocks(model)
    kktrain run --plugin grad-checkpoint -o grad-checkpoint.every=2   # blocks 0, 2, 4, ...

At ``on_model_built`` each chosen block's ``forward`` is wrapped in
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the block keeps only its inputs
for backward and runs its forward again there. Parameters, modules and state-dict keys are
unchanged (the wrapper is an instance attribute, not a module), so checkpoints stay portable, and
with ``preserve_rng_state`` (default) the gradients equal those of the plain model bit for bit.
Without gradients (validation) blocks run as usual. See ``docs/plugins/grad-checkpoint.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.checkpoint import checkpoint

from kktrain import PluginOptions, hookimpl

if TYPE_CHECKING:
    from kktrain import Trainer

__all__ = ["GradCheckpointPlugin", "checkpoint_forward", "is_checkpointed"]

_MARK = "_kktrain_checkpointed_forward"


def is_checkpointed(block: torch.nn.Module) -> bool:
    """Whether ``block``'s forward has been wrapped by :func:`checkpoint_forward`."""
    return getattr(block.__dict__.get("forward"), _MARK, False)


def checkpoint_forward(block: torch.nn.Module, *, preserve_rng_state: bool = True) -> None:
    """Wrap ``block.forward`` (in place, as an instance attribute) in non-reentrant checkpointing."""
    if is_checkpointed(block):
        return
    original: Callable[..., Any] = block.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(original, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state, **kwargs)
        return original(*args, **kwargs)

    setattr(forward, _MARK, True)
    block.forward = forward


class GradCheckpointPlugin:
    """Activation checkpointing of the task's blocks: less activation memory, one more forward per block."""

    class Options(PluginOptions):
        """``-o grad-checkpoint.KEY=VALUE`` / ``[plugins.grad-checkpoint]``."""

        model_config = ConfigDict(strict=True)

        enabled: bool = True
        """Switch checkpointing off without removing the plugin (e.g. in a shared config file)."""
        every: int = Field(1, ge=1)
        """Checkpoint every k-th block (0, k, 2k, ...): k > 1 trades memory back for speed."""
        preserve_rng_state: bool = True
        """Replay the RNG in the recomputation, so dropout masks (and gradients) match the plain model."""

    def __init__(self, options: GradCheckpointPlugin.Options | None = None) -> None:
        self.options = options or self.Options()
        self.blocks = 0
        self.declared = 0

    @hookimpl(tryfirst=True)
    def on_model_built(self, trainer: Trainer, model: torch.nn.Module) -> None:
        """Wrap the chosen blocks (before compile, which runs ``trylast``, sees the model)."""
        if not self.options.enabled:
            trainer.log_event("grad_checkpoint", blocks=0, enabled=False)
            return
        declare = getattr(trainer.task, "checkpoint_blocks", None)
        blocks = list(declare(model)) if declare is not None else []
        self.declared = len(blocks)
        if not blocks:
            trainer.log.warning(
                "grad_checkpoint_no_blocks", task=getattr(trainer.task, "name", "?"),
                note="the task's checkpoint_blocks(model) returned no blocks: training runs without checkpointing",
            )
            trainer.log_event("grad_checkpoint", blocks=0, declared=0, every=self.options.every)
            return
        chosen = blocks[:: self.options.every]
        for block in chosen:
            checkpoint_forward(block, preserve_rng_state=self.options.preserve_rng_state)
        self.blocks = len(chosen)
        trainer.log_event("grad_checkpoint", blocks=self.blocks, declared=self.declared, every=self.options.every)

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """``summary["grad-checkpoint"]``: how many blocks were checkpointed."""
        summary["grad-checkpoint"] = {"blocks": self.blocks, "declared": self.declared, "every": self.options.every,
                                      "enabled": self.options.enabled}

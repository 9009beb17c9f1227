"""The core's own implementations of the replaceable hooks, registered ``trylast``.

A plugin replaces one by returning a value first, or wraps it with ``@hookimpl(wrapper=True)``.
The trainer calls these functions directly when no plugin implements the hook (no pluggy cost).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kktrain.hookspecs import hookimpl

if TYPE_CHECKING:
    from kktrain.trainer import Trainer


def default_forward_loss(trainer: Trainer, batch: Any) -> torch.Tensor:
    """``task.loss(model, batch)`` (through the DDP wrapper under torchrun)."""
    return trainer.task.loss(trainer.train_model, batch)


def default_backward(trainer: Trainer, loss: torch.Tensor) -> bool:
    """``loss.backward()``."""
    loss.backward()
    return True


def default_optimizer_step(trainer: Trainer) -> bool:
    """``optimizer.step()``."""
    trainer.optimizer.step()
    return True


def default_validate(trainer: Trainer) -> dict[str, float]:
    """``task.validate(model, device)`` in eval mode without gradients."""
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return dict(trainer.task.validate(model, trainer.device))
    finally:
        model.train(was_training)


def default_build_optimizer(trainer: Trainer, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW from the config; fused or foreach kernels where the device supports them."""
    cfg = trainer.config.optimizer
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": tuple(cfg.betas), "eps": cfg.eps}
    impl = cfg.impl
    if impl == "auto":
        # fused AdamW is fastest on CUDA/MPS; on CPU torch's foreach path is the quick one.
        impl = "fused" if trainer.device.type in ("cuda", "mps") else "foreach"
    if impl == "fused":
        kwargs["fused"] = True
    elif impl == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    return torch.optim.AdamW(params, **kwargs)


class CoreDefaults:
    """The core's default behaviour of every replaceable hook."""

    @hookimpl(trylast=True)
    def build_optimizer(self, trainer: Trainer, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """AdamW from ``config.optimizer``."""
        return default_build_optimizer(trainer, params)

    @hookimpl(trylast=True)
    def forward_loss(self, trainer: Trainer, batch: Any) -> torch.Tensor:
        """``task.loss(model, batch)``."""
        return default_forward_loss(trainer, batch)

    @hookimpl(trylast=True)
    def backward(self, trainer: Trainer, loss: torch.Tensor) -> bool:
        """``loss.backward()``."""
        return default_backward(trainer, loss)

    @hookimpl(trylast=True)
    def optimizer_step(self, trainer: Trainer) -> bool:
        """``optimizer.step()``."""
        return default_optimizer_step(trainer)

    @hookimpl(trylast=True)
    def validate(self, trainer: Trainer) -> dict[str, float]:
        """``task.validate(model, device)``."""
        return default_validate(trainer)

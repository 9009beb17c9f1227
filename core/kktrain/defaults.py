"""The core's own implementations of the replaceable hooks, registered ``trylast``.

A plugin replaces one by returning a value first, or wraps it with ``@hookimpl(wrapper=True)``.
The trainer calls these functions directly when no plugin implements the hook (no pluggy cost).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kktrain.batch import batch_size_of, to_device
from kktrain.hookspecs import hookimpl

if TYPE_CHECKING:
    from kktrain.trainer import Trainer


def default_forward_loss(trainer: Trainer, batch: Any) -> torch.Tensor:
    """``task.loss(model, batch)`` (through the DDP wrapper or the FSDP model under torchrun)."""
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
    """The task's validation in eval mode without autograd: its ``validate(model, device)`` when it
    has one, else the batched loop over ``val_dataset()`` (:func:`validation_loop`), else nothing;
    under ``torch.inference_mode()``, or ``torch.no_grad()`` (``trainer.validation_grad_mode``)."""
    task = trainer.task
    if not (task.has("validate") or task.has("val_dataset")):
        return {}
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode() if trainer.validation_grad_mode == "inference" else torch.no_grad():
            if task.has("validate"):
                return dict(task.validate(model, trainer.device))
            return validation_loop(trainer)
    finally:
        model.train(was_training)


def validation_loop(trainer: Trainer) -> dict[str, float]:
    """Every batch of ``task.val_dataset()``: ``task.metrics(model, batch)`` (or ``loss``), averaged
    over samples (each batch weighs its size). Sums stay on the device; one sync at the end."""
    return loader_metrics(trainer.task, trainer.model, trainer.val_loader(), trainer.device, trainer.data.non_blocking)


def loader_metrics(task: Any, model: torch.nn.Module, loader: Any, device: torch.device, non_blocking: bool = False) -> dict[str, float]:
    """:func:`validation_loop` over any loader, without a trainer (``kktrain validate``)."""
    use_metrics = task.has("metrics")
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    for batch in loader:
        batch = to_device(batch, device, non_blocking)
        n = batch_size_of(batch)
        values = task.metrics(model, batch) if use_metrics else {"loss": task.loss(model, batch)}
        for key, value in values.items():
            weighted = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(()) * n
            sums[key] = sums[key] + weighted if key in sums else weighted
        seen += n
    if not seen:
        return {}
    keys = list(sums)
    totals = torch.stack([sums[k] for k in keys]).cpu().tolist()
    return {k: v / seen for k, v in zip(keys, totals)}


def _optimizer_kwargs(trainer: Trainer) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The torch optimizer class and its arguments for ``config.optimizer``."""
    cfg = trainer.config.optimizer
    name = cfg.name
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.effective_weight_decay}
    if name in ("adamw", "adam"):
        cls: type[torch.optim.Optimizer] = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        kwargs.update(betas=tuple(cfg.betas), eps=cfg.eps)
    elif name == "sgd":
        cls = torch.optim.SGD
        kwargs.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    elif name == "rmsprop":
        cls = torch.optim.RMSprop
        kwargs.update(momentum=cfg.momentum, alpha=cfg.alpha, eps=cfg.eps)
    else:  # adagrad
        cls = torch.optim.Adagrad
        kwargs.update(eps=cfg.eps)
    impl = cfg.impl
    fusable = name in ("adamw", "adam", "sgd", "adagrad")
    if impl == "auto":
        # torch's fused kernels are the fastest everywhere they exist, the CPU included (AdamW
        # step, 1 thread: MLP 119 us fused / 319 foreach / 348 for-loop; Latin model 1.6 / 5.1 / 6.1 ms).
        impl = "fused" if fusable else "foreach"
    if impl == "fused":
        if not fusable:
            from kktrain.errors import ConfigError

            raise ConfigError(f"optimizer.impl = fused: torch has no fused {name}; use foreach or auto")
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = impl == "foreach"
    return cls, kwargs


def param_groups(trainer: Trainer, params: list[torch.nn.Parameter]) -> list[dict[str, Any]] | list[torch.nn.Parameter]:
    """``params`` as they are, or two groups when ``optimizer.no_decay``: biases and normalisation
    weights (every tensor with fewer than 2 dimensions, nanoGPT's and timm's rule) without decay."""
    if not trainer.config.optimizer.no_decay:
        return params
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups: list[dict[str, Any]] = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
    return groups


def default_build_optimizer(trainer: Trainer, params: list[Any]) -> torch.optim.Optimizer:
    """``config.optimizer.name`` (torch's own), fused or foreach kernels where the device has them."""
    cls, kwargs = _optimizer_kwargs(trainer)
    return cls(params, **kwargs)


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

"""A tiny classification task for tests and benchmarks: an MLP on fixed synthetic data.

Samples depend only on their :class:`~kktrain.task.SampleKey` (the ``noise`` knob draws from
``key.seed``), so runs resume bit-exactly with any number of workers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kktrain.task import SampleKey


class TinyOptions(BaseModel):
    """Options of the tiny task."""

    model_config = ConfigDict(extra="forbid")
    samples: int = Field(512, ge=8)
    dim: int = Field(8, ge=1)
    hidden: int = Field(16, ge=1)
    classes: int = Field(4, ge=2)
    layers: int = Field(2, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class TinyDataset(torch.utils.data.Dataset):
    """Fixed inputs and labels; optional per-sample noise from the key's seed."""

    sample_keys = True  # noise is drawn from key.seed, so a resume is exact with any workers

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, keys: Sequence[SampleKey]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([k.index for k in keys])
        x = self.x[idx]
        noise = float(keys[0].knobs.get("noise", 0.0)) if keys else 0.0
        if noise > 0:
            g = torch.Generator().manual_seed(keys[0].seed)
            x = x + noise * torch.randn(x.shape, generator=g)
        return x, self.y[idx]

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([key])
        return x[0], y[0]


class TinyTask:
    """Classify points by which of ``classes`` random directions they align with most."""

    name = "tiny"

    def __init__(self, options: TinyOptions | None = None) -> None:
        self.options = options or TinyOptions()
        o = self.options
        g = torch.Generator().manual_seed(1234)
        w = torch.randn(o.dim, o.classes, generator=g)
        self._x = torch.randn(o.samples, o.dim, generator=g)
        self._y = (self._x @ w).argmax(dim=1)
        self._vx = torch.randn(256, o.dim, generator=g)
        self._vy = (self._vx @ w).argmax(dim=1)
        self.loss_weight = 1.0

    def config_defaults(self) -> dict[str, Any]:
        """Small and fast."""
        return {"batch_size": 32, "max_steps": 40, "log_every": 10, "optimizer.lr": 0.01}

    def build_model(self) -> torch.nn.Module:
        """An MLP."""
        o = self.options
        layers: list[torch.nn.Module] = []
        width = o.dim
        for _ in range(o.layers):
            layers += [torch.nn.Linear(width, o.hidden), torch.nn.ReLU()]
            if o.dropout:
                layers.append(torch.nn.Dropout(o.dropout))
            width = o.hidden
        layers.append(torch.nn.Linear(width, o.classes))
        return torch.nn.Sequential(*layers)

    def train_dataset(self) -> TinyDataset:
        """The fixed training points."""
        return TinyDataset(self._x, self._y)

    def collate(self, items: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``__getitems__`` already returns the batch."""
        return items

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy, times the ``loss_weight`` knob."""
        x, y = batch
        loss = torch.nn.functional.cross_entropy(model(x), y)
        return loss if self.loss_weight == 1.0 else loss * self.loss_weight

    def distill_logits(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        """The logits that count for distillation (the distill plugin): all of them, (batch, classes)."""
        return output

    def num_classes(self) -> int:
        """The number of classes (``kktrain preflight`` compares the initial loss with ln of it)."""
        return self.options.classes

    def validate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """Accuracy and loss on fixed held-out points."""
        logits = model(self._vx.to(device))
        y = self._vy.to(device)
        return {
            "loss": torch.nn.functional.cross_entropy(logits, y).item(),
            "acc": (logits.argmax(1) == y).float().mean().item(),
        }

    def default_knobs(self) -> dict[str, Any]:
        """``noise`` (data, reaches workers) and ``loss_weight`` (main process)."""
        return {"noise": 0.0, "loss_weight": 1.0}

    def set_knobs(self, knobs: Mapping[str, Any]) -> None:
        """Apply the main-process knob."""
        self.loss_weight = float(knobs.get("loss_weight", 1.0))

    def checkpoint_blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The Linear layers."""
        return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def make_task(options: TinyOptions | None = None) -> TinyTask:
    """A tiny MLP classifier on fixed random points: smoke runs and tests in seconds.

    The factory for ``--task tiny``.
    """
    return TinyTask(options)


make_task.Options = TinyOptions  # type: ignore[attr-defined]

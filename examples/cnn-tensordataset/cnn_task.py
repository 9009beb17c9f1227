"""A small CNN on an ordinary ``TensorDataset``: the worked example of docs/your-model.md.

The data is made here (no downloads): 12x12 grey images of one bar, horizontal, vertical or on
one of the two diagonals, at a random place, with noise. The task is to say which bar it is.
Nothing in this file knows kktrain: it is the model, the data and the loss a user already has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

SIZE, CLASSES = 12, 4


def make_bars(count: int, seed: int, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images (N, 1, 12, 12) and their labels 0..3."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=g)
    images = noise * torch.randn(count, 1, SIZE, SIZE, generator=g)
    offsets = torch.randint(2, SIZE - 2, (count,), generator=g)
    idx = torch.arange(SIZE)
    for i in range(count):
        o, label = int(offsets[i]), int(labels[i])
        if label == 0:
            images[i, 0, o, :] += 1.0
        elif label == 1:
            images[i, 0, :, o] += 1.0
        elif label == 2:
            images[i, 0, idx, idx] += 1.0
        else:
            images[i, 0, idx, SIZE - 1 - idx] += 1.0
    return images, labels


class SmallCNN(nn.Module):
    """Two convolutions, global pooling, a linear head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.norm = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.norm(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


class CNNTask:
    """Which bar is in the picture."""

    def build_model(self) -> nn.Module:
        return SmallCNN()

    def train_dataset(self) -> TensorDataset:
        return TensorDataset(*make_bars(2048, seed=0))

    def val_dataset(self) -> TensorDataset:
        return TensorDataset(*make_bars(512, seed=1))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def metrics(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(1) == y).float().mean()}

    def example_input(self) -> torch.Tensor:
        return torch.zeros(2, 1, SIZE, SIZE)

    def config_defaults(self) -> dict[str, object]:
        return {"batch_size": 64, "max_steps": 200, "val_every": 50, "log_every": 25,
                "optimizer.lr": 3e-3, "checkpoint.best_metric": "val/acc"}

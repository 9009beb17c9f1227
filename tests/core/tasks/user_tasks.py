"""Tasks as a user writes them (an ordinary model, an ordinary Dataset), good and broken on purpose.

Imported by the tests as ``user_tasks:NAME`` (the tests put this folder on PYTHONPATH).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset


def points(n: int = 256, seed: int = 0) -> TensorDataset:
    """Points in 4-d labelled by the sign of their sum and first coordinate (4 classes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x.sum(1) > 0).long() * 2 + (x[:, 0] > 0).long()
    return TensorDataset(x, y)


class Points:
    """A plain task: an MLP on a TensorDataset, validation through val_dataset + metrics."""

    def build_model(self):
        return nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))

    def train_dataset(self):
        return points(256, 0)

    def val_dataset(self):
        return points(100, 1)

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    def metrics(self, model, batch):
        x, y = batch
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(1) == y).float().mean()}

    def config_defaults(self):
        return {"batch_size": 16, "max_steps": 30, "log_every": 5, "optimizer.lr": 0.01}


class Minimal:
    """Only the three required methods."""

    def build_model(self):
        return nn.Linear(4, 4)

    def train_dataset(self):
        return points(64)

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)


class NoLoss(Minimal):
    loss = None  # type: ignore[assignment]


class Empty:
    """Nothing at all."""


class VectorLoss(Minimal):
    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")


class FloatLoss(Minimal):
    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y).item()


class WrongShape(Minimal):
    def build_model(self):
        return nn.Linear(7, 4)  # the data has 4 features


class NoParameters(Minimal):
    def build_model(self):
        return nn.ReLU()


class NotAModule(Minimal):
    def build_model(self):
        return "a model"


class StringMetrics(Points):
    def metrics(self, model, batch):
        return {"acc": "high"}


class VectorMetrics(Points):
    def metrics(self, model, batch):
        x, y = batch
        return {"acc": (model(x).argmax(1) == y).float()}


class Stream(IterableDataset):
    def __iter__(self):
        yield from points(32)


class IterableData(Minimal):
    def train_dataset(self):
        return Stream()


class NoLen(Dataset):
    def __getitem__(self, i):
        return points(32)[i]


class LenlessData(Minimal):
    def train_dataset(self):
        return NoLen()


class NoneData(Minimal):
    def train_dataset(self):
        return None


class EmptyData(Minimal):
    def train_dataset(self):
        return TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))


def not_a_task():
    return "I am not a task"


class Knobbed(Points):
    """A dataset that opts in to SampleKeys: each item is noised by its key's seed and a knob."""

    def train_dataset(self):
        return NoisyPoints(points(256, 0))

    def default_knobs(self):
        return {"noise": 0.0}


class NoisyPoints(Dataset):
    sample_keys = True

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        x, y = self.base[key.index]
        noise = float(key.knobs.get("noise", 0.0))
        if noise:
            g = torch.Generator().manual_seed(key.seed)
            x = x + noise * torch.randn(x.shape, generator=g)
        return x, y

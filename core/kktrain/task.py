"""What a task is: the model, the data, the loss, the metrics and the knobs a curriculum may turn.

A task is any object with the attributes of :class:`Task`. It is made by a *factory*: a callable
named by ``--task module:factory`` or registered in the entry-point group ``kktrain.tasks``. When
the factory has an ``Options`` attribute (a pydantic model), the ``[task]`` table of the config and
``-o task.KEY=VALUE`` are validated against it and the factory is called with the model instance;
otherwise it is called with no argument.

Data and exact resume
---------------------
The core owns the order of the data: an epoch is a permutation of ``range(len(dataset))`` drawn
from ``(seed, epoch)``, cut into batches (sharded by rank under torchrun). Each item the dataset is
asked for is a :class:`SampleKey` carrying the index, a per-sample seed derived from
``(seed, epoch, index)`` and the current knobs. A dataset whose samples depend only on their key
(use ``key.seed`` for any randomness, never a global RNG) resumes bit-exactly mid-epoch with any
number of data-loader workers, and sees knob changes in worker processes as soon as they happen:
knobs travel with the keys, they are not mutated on a dataset object. A dataset may implement
``__getitems__(keys)`` to build a whole batch at once (vectorized); ``Task.collate`` then turns the
result into the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch


class SampleKey(NamedTuple):
    """One item the data loader asks the dataset for."""

    index: int  # type: ignore[assignment]  # a field named like tuple.index, kept for readability
    seed: int
    knobs: Mapping[str, Any]


@runtime_checkable
class Task(Protocol):
    """The protocol every task follows (structural: no base class needed)."""

    name: str

    def config_defaults(self) -> dict[str, Any]:
        """Core config values this task recommends (``{"batch_size": 128, "epochs": 4}``)."""

    def build_model(self) -> torch.nn.Module:
        """A freshly initialised model (the core seeds the global RNG before calling this)."""

    def train_dataset(self) -> torch.utils.data.Dataset:
        """The training data: a map-style dataset indexed by :class:`SampleKey`, with ``len``."""

    def collate(self, items: Any) -> Any:
        """Turn what the dataset returned for one batch of keys into the batch."""

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Forward and loss for one (micro-)batch: a scalar tensor, never ``.item()``-ed here."""

    def validate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """Validation metrics on held-out data (model in eval mode, no grad)."""

    def default_knobs(self) -> dict[str, Any]:
        """The knobs a curriculum may set, with their starting values (JSON-able)."""

    def set_knobs(self, knobs: Mapping[str, Any]) -> None:
        """Apply knobs in the main process (loss weights ...); data knobs reach workers via keys."""

    def checkpoint_blocks(self, model: torch.nn.Module) -> Sequence[torch.nn.Module]:
        """The blocks worth activation checkpointing (transformer layers); may be empty."""

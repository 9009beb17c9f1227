"""The training state the core owns, and the RNG state it saves with it."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """Counters and bookkeeping of a run; everything here goes into checkpoints.

    ``batch_in_epoch`` counts batches (per process) consumed in ``epoch`` after its first
    ``sample_offset`` samples (the data position: ``sample_offset + batch_in_epoch x batch_size x
    world_size`` samples of the epoch's order); ``world_size`` is the number of processes the
    position is counted in, so a resume on another world size continues at the same sample
    (:meth:`kktrain.data.DataStream.rebase`); ``total_steps`` is the run's length when it was saved.
    ``micro_split`` splits every batch into that many pieces (set by a sticky OOM retry);
    ``skip_batches`` lists ``[epoch, batch]`` positions never to train on again (set by rollbacks),
    so a resume after a rollback replays the same data. ``sums`` holds the training loss and
    gradient-norm sums of the current log interval and epoch (:mod:`kktrain.meters`), so a
    resumed run logs the same means; ``metrics_records`` counts the lines of ``metrics.jsonl``
    written so far, so a resume drops the ones written after its checkpoint. ``parent`` names the
    checkpoint a branch started from (``kktrain run --resume OTHER_RUN/checkpoints/step_N.pt --out NEW``).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    sample_offset: int = 0
    world_size: int = 1
    total_steps: int = 0
    skipped_steps: int = 0
    micro_split: int = 1
    knobs: dict[str, Any] = field(default_factory=dict)
    best_value: float | None = None
    best_step: int | None = None
    skip_batches: list[list[int]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    last_val: dict[str, float] = field(default_factory=dict)
    last_val_step: int | None = None
    sums: dict[str, float] = field(default_factory=dict)
    metrics_records: int = 0
    parent: dict[str, Any] | None = None
    """The run this one branched from (``run_dir``, ``checkpoint``, ``step``), or ``None``."""

    # Run history, not position: a rollback (Trainer.restore) keeps the current values.
    HISTORY = ("events", "last_val", "last_val_step", "best_value", "best_step", "skipped_steps", "metrics_records")

    def state_dict(self) -> dict[str, Any]:
        """Plain containers only (checkpoints load with ``weights_only=True``)."""
        return asdict(self)

    def load_state_dict(self, data: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` output."""
        for key, value in data.items():
            if hasattr(self, key):
                setattr(self, key, value)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain values."""
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

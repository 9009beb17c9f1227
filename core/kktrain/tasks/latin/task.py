"""The Latin task: options, loss, validation, knobs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from kktrain.tasks.latin.decode import decode_iterative, is_valid_completion, latin_violations
from kktrain.tasks.latin.generator import LatinDataset, check_knobs, make_puzzles, pad_cat
from kktrain.tasks.latin.model import LatinTransformer
from kktrain.tasks.latin.vocab import BATCH_KEYS, EMPTY, MAX_SIZE, MIN_SIZE, Mode, ModeName

# ------------------------------------------------------------------------------ task

_VAL_SEED = 0x7A11DA7E  # the held-out puzzles' seeds, apart from any training key's


class LatinOptions(BaseModel):
    """Options of the Latin task (``[task_options]`` in a config file, ``-o task.KEY=VALUE``)."""

    model_config = ConfigDict(extra="forbid")

    size_min: int = Field(default=4, ge=MIN_SIZE, le=MAX_SIZE)
    size_max: int = Field(default=6, ge=MIN_SIZE, le=MAX_SIZE)
    modes: list[ModeName] = ["STANDARD", "ZERO_INCLUSIVE", "NEGATIVE"]
    fill_min: float = Field(default=0.3, ge=0.0, le=1.0)
    fill_max: float = Field(default=0.7, ge=0.0, le=1.0)
    augment: bool = True
    d_model: int = Field(default=128, ge=8)
    layers: int = Field(default=4, ge=1)
    heads: int = Field(default=4, ge=1)
    samples_per_epoch: int = Field(default=25_600, ge=1)
    val_sizes: list[int] = [4, 5, 6]
    val_puzzles: int = Field(default=200, ge=1)  # per size
    val_fill: float = Field(default=0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> LatinOptions:
        if self.size_min > self.size_max:
            raise ValueError(f"size_min={self.size_min} > size_max={self.size_max}: swap them")
        if self.fill_min > self.fill_max:
            raise ValueError(f"fill_min={self.fill_min} > fill_max={self.fill_max}: swap them")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of heads={self.heads}")
        if not self.modes:
            raise ValueError("modes is empty: name at least one of STANDARD, ZERO_INCLUSIVE, NEGATIVE")
        if not self.val_sizes or any(not MIN_SIZE <= n <= MAX_SIZE for n in self.val_sizes):
            raise ValueError(f"val_sizes={self.val_sizes}: give sizes in {MIN_SIZE}..{MAX_SIZE}")
        return self


def _device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


class LatinTask:
    """Latin-square completion: the default kktrain task."""

    name = "latin"

    def __init__(self, options: LatinOptions | None = None) -> None:
        self.options = options or LatinOptions()
        self.knobs = self.default_knobs()
        self._val_set: dict[int, dict[str, torch.Tensor]] | None = None

    def config_defaults(self) -> dict[str, Any]:
        """Five minutes on two CPU cores to >= 99% valid grids on held-out n = 4..6 puzzles."""
        return {
            "batch_size": 128,
            "epochs": 8,
            "max_steps": 1600,
            "optimizer.lr": 1e-3,
            "schedule.warmup_steps": 100,
            "val_every": 200,
            "log_every": 50,
            "checkpoint.every_steps": 0,  # epochs are 200 steps and each ends with a checkpoint
            "checkpoint.best_metric": "val/valid_iter",
        }

    def build_model(self) -> nn.Module:
        """A fresh LatinTransformer of the configured shape."""
        o = self.options
        return LatinTransformer(o.d_model, o.layers, o.heads)

    def train_dataset(self) -> LatinDataset:
        """``samples_per_epoch`` puzzles drawn from the knobs each key carries."""
        return LatinDataset(self.options.samples_per_epoch, self.default_knobs(), self.options.augment)

    def collate(self, items: Any) -> dict[str, torch.Tensor]:
        """A batch from ``__getitems__`` as is; a list of single puzzles padded and stacked."""
        if isinstance(items, Mapping):
            return dict(items)
        return pad_cat([{k: v.unsqueeze(0) for k, v in item.items()} for item in items])

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy over the hidden cells."""
        device = _device_of(model)
        tokens, target, size, mode = (batch[k].to(device, non_blocking=True) for k in BATCH_KEYS)
        logits = model(tokens, size, mode)
        hidden = tokens == EMPTY
        total = F.cross_entropy(logits.flatten(0, 2), target.masked_fill(~hidden, -100).flatten(), reduction="sum")
        return total / hidden.sum().clamp(min=1)

    def validation_set(self) -> dict[int, dict[str, torch.Tensor]]:
        """The fixed held-out puzzles per size: val_fill shown, modes in turn, from a constant seed."""
        if self._val_set is None:
            o, count = self.options, self.options.val_puzzles
            modes = np.array([Mode[m] for m in o.modes])[np.arange(count) % len(o.modes)]
            self._val_set = {}
            for n in o.val_sizes:
                seeds = np.uint64(_VAL_SEED) + np.uint64(n << 32) + np.arange(count, dtype=np.uint64)
                self._val_set[n] = make_puzzles(
                    seeds, np.full(count, n), modes, np.full(count, o.val_fill), augment=True
                )
        return self._val_set

    @torch.no_grad()
    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Per size and averaged: loss, cell accuracy, valid grids (one-shot and iterative), ..."""
        metrics: dict[str, float] = {}
        for n, batch in self.validation_set().items():
            tokens, target, size, mode = (batch[k].to(device) for k in BATCH_KEYS)
            logits = model(tokens, size, mode)
            hidden = tokens == EMPTY
            log_probs = logits[hidden].log_softmax(-1)
            probs = log_probs.exp()
            oneshot = torch.where(hidden, logits.argmax(-1), tokens)
            iterative = decode_iterative(model, tokens, size, mode, logits=logits)  # reuses this pass
            per_size = {
                "loss": F.nll_loss(log_probs, target[hidden]),
                "cell_acc": (oneshot[hidden] == target[hidden]).float().mean(),
                "valid_oneshot": is_valid_completion(oneshot, tokens, size, mode).float().mean(),
                "valid_iter": is_valid_completion(iterative, tokens, size, mode).float().mean(),
                "violations": latin_violations(oneshot).float().mean(),
                "confidence": probs.max(-1).values.mean(),
                "entropy": -torch.where(probs > 0, probs * log_probs, 0.0).sum(-1).mean(),
            }
            metrics.update({f"{k}/n{n}": float(v) for k, v in per_size.items()})
        names = ("loss", "cell_acc", "valid_oneshot", "valid_iter", "violations", "confidence", "entropy")
        for k in names:
            metrics[k] = sum(metrics[f"{k}/n{n}"] for n in self.options.val_sizes) / len(self.options.val_sizes)
        return metrics

    def default_knobs(self) -> dict[str, Any]:
        """Sizes size_min..size_max, the configured modes and fill range."""
        o = self.options
        return {
            "sizes": list(range(o.size_min, o.size_max + 1)),
            "modes": list(o.modes),
            "fill_min": o.fill_min,
            "fill_max": o.fill_max,
        }

    def set_knobs(self, knobs: Mapping[str, Any]) -> None:
        """Check the knobs here, where a bad value can still stop the run; data reads them from keys."""
        self.knobs = check_knobs({**self.knobs, **knobs})

    def checkpoint_blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer layers (each callable as ``block(x)``, see :class:`Block`)."""
        blocks = model.blocks
        assert isinstance(blocks, nn.ModuleList), "checkpoint_blocks expects a LatinTransformer"
        return list(blocks)


def make_task(options: LatinOptions | None = None) -> LatinTask:
    """The factory named by ``--task kktrain.tasks.latin:make_task`` (entry point ``latin``)."""
    return LatinTask(options)


make_task.Options = LatinOptions  # type: ignore[attr-defined]

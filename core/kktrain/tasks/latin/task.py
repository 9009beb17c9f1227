"""The Latin task: options, loss, validation, knobs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from kktrain.tasks.latin.decode import (
    Logits,
    decode_fast,
    decode_iterative,
    is_valid_completion,
    latin_violations,
    tta_logits,
    tta_views,
)
from kktrain.tasks.latin.generator import LatinDataset, check_knobs, make_puzzles, pad_cat
from kktrain.tasks.latin.model import LatinTransformer
from kktrain.tasks.latin.vocab import BATCH_KEYS, EMPTY, MAX_SIZE, MIN_SIZE, VALUE_MIN, VALUE_OFFSET, VOCAB_SIZE, Mode, ModeName

# ------------------------------------------------------------------------------ options

_VAL_SEED = 0x7A11DA7E  # the held-out puzzles' seeds, apart from any training key's
LOSS_KNOBS = ("focal_gamma", "constraint_weight")


class LatinOptions(BaseModel):
    """Options of the Latin task (``[task_options]`` in a config file, ``-o task.KEY=VALUE``)."""

    model_config = ConfigDict(extra="forbid")

    size_min: int = Field(default=4, ge=MIN_SIZE, le=MAX_SIZE)
    size_max: int = Field(default=6, ge=MIN_SIZE, le=MAX_SIZE)
    modes: list[ModeName] = ["STANDARD", "ZERO_INCLUSIVE", "NEGATIVE"]
    fill_min: float = Field(default=0.3, ge=0.0, le=1.0)
    fill_max: float = Field(default=0.7, ge=0.0, le=1.0)
    augment: bool = True
    focal_gamma: float = Field(default=0.0, ge=0.0)
    """The ``focal_gamma`` knob's starting value: 0 is plain cross-entropy."""
    constraint_weight: float = Field(default=0.0, ge=0.0)
    """The ``constraint_weight`` knob's starting value: 0 is no constraint loss."""
    d_model: int = Field(default=128, ge=8)
    layers: int = Field(default=4, ge=1)
    heads: int = Field(default=4, ge=1)
    samples_per_epoch: int = Field(default=25_600, ge=1)
    val_sizes: list[int] = [4, 5, 6]
    val_puzzles: int = Field(default=200, ge=1)  # per size
    val_fill: float | list[float] = 0.5
    """Shown share of the held-out puzzles; a list gives each fill in turn (and metrics per fill)."""
    val_fast: bool = False
    """Also decode with several cells per pass: ``valid_fast`` (+40 % validation time on the default run)."""
    tta: int = Field(default=0, ge=0, le=64)
    """Isotopic views (besides the grid itself) averaged at validation: ``*_tta`` metrics; 0: none."""

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
        if not self.val_fills or any(not 0.0 <= f <= 1.0 for f in self.val_fills):
            raise ValueError(f"val_fill={self.val_fill}: give shares in 0..1")
        return self

    @property
    def val_fills(self) -> list[float]:
        """``val_fill`` as a list."""
        return list(self.val_fill) if isinstance(self.val_fill, list) else [self.val_fill]


def check_loss_knobs(knobs: Mapping[str, Any]) -> dict[str, float]:
    """Validate the loss knobs (focal_gamma, constraint_weight); raise ValueError naming the fix."""
    out = {}
    for name in LOSS_KNOBS:
        value = knobs[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
            raise ValueError(f"knob {name}={value!r}: give a number >= 0 (0 turns it off)")
        out[name] = float(value)
    return out


def _device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


# ------------------------------------------------------------------------------ losses


def focal_loss_sum(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Sum of ``-(1 - p)^gamma * log p`` of the target over the rows of logits (cells, V); gamma 0: cross-entropy."""
    if gamma == 0.0:
        return F.cross_entropy(logits, target, reduction="sum")
    log_p = logits.log_softmax(-1).gather(1, target[:, None]).squeeze(1)
    return -((1.0 - log_p.exp()).pow(gamma) * log_p).sum()


def constraint_penalty_sum(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed over hidden cells: the expected number of cells of its row or column with its symbol.

    With q a cell's distribution over symbols (the model's softmax for a hidden cell, the one-hot
    of the clue for a shown one) the term of hidden cell (r, c) is
    ``sum_s q_rc(s) * (sum_{c' != c} q_rc'(s) + sum_{r' != r} q_r'c(s))``; 0 for a Latin completion.
    """
    hidden = tokens == EMPTY
    values = slice(VALUE_OFFSET + VALUE_MIN, None)  # PAD and EMPTY carry no symbol
    probs = logits.softmax(-1)
    q = torch.where(hidden.unsqueeze(-1), probs, F.one_hot(tokens, VOCAB_SIZE).to(probs.dtype))[..., values]
    others = q.sum(2, keepdim=True) + q.sum(1, keepdim=True) - 2.0 * q
    return (q * others).sum(-1)[hidden].sum()


# ------------------------------------------------------------------------------ validation

CELL_METRICS = ("loss", "cell_acc", "confidence", "entropy", "cell_acc_tta")  # means over the hidden cells


@torch.no_grad()
def grid_scores(
    model: Logits, batch: Mapping[str, torch.Tensor], device: torch.device, fast: bool = True, tta: int = 0,
) -> dict[str, torch.Tensor]:
    """Per held-out grid (float64, (B,)): its hidden-cell count, and per metric its value or, for cell metrics, its sum."""
    tokens, target, size, mode = (batch[k].to(device) for k in BATCH_KEYS)
    hidden = tokens == EMPTY

    def per_grid(cells: torch.Tensor) -> torch.Tensor:
        """Values of the hidden cells (in ``hidden``'s order) summed per grid."""
        return torch.zeros(hidden.shape, dtype=torch.float64, device=device).masked_scatter(hidden, cells.double()).sum((1, 2))

    def completions(first: torch.Tensor, logits_of: Logits, **extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The one-shot and the iterative completion; ``first`` is ``logits_of`` for the puzzles."""
        oneshot = torch.where(hidden, first.argmax(-1), tokens)
        # give_up: a grid stops once a filled cell repeats a symbol; valid_iter is the same as
        # without it, and a weak model's grids stop after a few passes instead of n_hidden.
        iterative = decode_iterative(logits_of, tokens, size, mode, logits=first, give_up=True, extra=extra)
        return oneshot, iterative

    logits = model(tokens, size, mode)
    log_probs = logits[hidden].log_softmax(-1)
    probs = log_probs.exp()
    oneshot, iterative = completions(logits, model)
    scores = {
        "hidden": hidden.sum((1, 2)).double(),
        "loss": per_grid(-log_probs.gather(1, target[hidden][:, None]).squeeze(1)),
        "cell_acc": per_grid(oneshot[hidden] == target[hidden]),
        "confidence": per_grid(probs.max(-1).values),
        "entropy": per_grid(-torch.where(probs > 0, probs * log_probs, 0.0).sum(-1)),
        "valid_oneshot": is_valid_completion(oneshot, tokens, size, mode).double(),
        "valid_iter": is_valid_completion(iterative, tokens, size, mode).double(),
        "exact_oneshot": (oneshot == target).all(2).all(1).double(),
        "exact_iter": (iterative == target).all(2).all(1).double(),
        "violations": latin_violations(oneshot).double(),
    }
    if fast:
        quick = decode_fast(model, tokens, size, mode, logits=logits)
        scores["valid_fast"] = is_valid_completion(quick, tokens, size, mode).double()
    if tta:
        views = tta_views(len(tokens), size, tokens.shape[-1], tta)

        def averaged(grid: torch.Tensor, n: torch.Tensor, m: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
            return tta_logits(model, grid, n, m, views)

        oneshot, iterative = completions(averaged(tokens, size, mode, views), averaged, views=views)
        scores["cell_acc_tta"] = per_grid(oneshot[hidden] == target[hidden])
        scores["valid_oneshot_tta"] = is_valid_completion(oneshot, tokens, size, mode).double()
        scores["valid_iter_tta"] = is_valid_completion(iterative, tokens, size, mode).double()
    return scores


def group_means(scores: Mapping[str, torch.Tensor], select: torch.Tensor) -> dict[str, float]:
    """Each metric over the grids ``select``: cell metrics per hidden cell, the others per grid."""
    out = {}
    cells = scores["hidden"][select].sum().clamp(min=1.0)
    for name, values in scores.items():
        if name == "hidden":
            continue
        total = values[select].sum()
        out[name] = float(total / cells) if name in CELL_METRICS else float(total / max(int(select.sum()), 1))
    return out


# ------------------------------------------------------------------------------ task


class LatinTask:
    """Latin-square completion: the default kktrain task."""

    name = "latin"

    def __init__(self, options: LatinOptions | None = None) -> None:
        self.options = options or LatinOptions()
        self.knobs = self.default_knobs()
        self._val_sets: dict[int, dict[str, torch.Tensor]] = {}

    def config_defaults(self) -> dict[str, Any]:
        """Five minutes on two CPU cores to >= 99% valid grids on held-out n = 4..6 puzzles."""
        return {
            "batch_size": 128,
            "epochs": 3,
            "max_steps": 600,
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

    def example_input(self, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tokens, size, mode)`` of ``batch`` fixed puzzles of n = size_max: what ``model(*x)`` takes (export)."""
        o = self.options
        seeds = np.uint64(_VAL_SEED ^ 0xE1A3) + np.arange(batch, dtype=np.uint64)
        modes = np.array([Mode[m] for m in o.modes])[np.arange(batch) % len(o.modes)]
        puzzles = make_puzzles(seeds, np.full(batch, o.size_max), modes, np.full(batch, 0.5))
        return puzzles["tokens"], puzzles["size"], puzzles["mode"]

    def train_dataset(self) -> LatinDataset:
        """``samples_per_epoch`` puzzles drawn from the knobs each key carries."""
        return LatinDataset(self.options.samples_per_epoch, self.default_knobs(), self.options.augment)

    def collate(self, items: Any) -> dict[str, torch.Tensor]:
        """A batch from ``__getitems__`` as is; a list of single puzzles padded and stacked."""
        if isinstance(items, Mapping):
            return dict(items)
        return pad_cat([{k: v.unsqueeze(0) for k, v in item.items()} for item in items])

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy (focal with ``focal_gamma`` > 0) over the hidden cells, plus ``constraint_weight`` x the constraint penalty."""
        device = _device_of(model)
        tokens, target, size, mode = (batch[k].to(device, non_blocking=True) for k in BATCH_KEYS)
        logits = model(tokens, size, mode)
        hidden = tokens == EMPTY
        count = hidden.sum().clamp(min=1)
        gamma, weight = self.knobs["focal_gamma"], self.knobs["constraint_weight"]
        if gamma == 0.0:  # the plain path, kept as it was: the same numbers as before the knobs existed
            total = F.cross_entropy(logits.flatten(0, 2), target.masked_fill(~hidden, -100).flatten(), reduction="sum")
        else:
            total = focal_loss_sum(logits[hidden], target[hidden], gamma)
        if weight > 0.0:
            total = total + weight * constraint_penalty_sum(logits, tokens)
        return total / count

    def distill_logits(self, output: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The logits of the hidden cells, (cells, VOCAB_SIZE), for the distill plugin (symbols a cell may
        not hold are -inf, in teacher and student alike)."""
        return output[batch["tokens"].to(output.device) == EMPTY]

    def chance_loss(self, batch: Mapping[str, torch.Tensor]) -> float:
        """The loss of uniform predictions: the mean of ln(n) over the hidden cells (a cell of an n x n
        grid may hold n symbols); ``kktrain preflight`` compares the untrained model's loss with it."""
        hidden = (batch["tokens"] == EMPTY).flatten(1).sum(1).double()
        logs = batch["size"].double().log()
        return float((hidden * logs).sum() / hidden.sum().clamp(min=1))

    # -------------------------------------------------------------- validation

    def validation_sizes(self) -> list[int]:
        """``val_sizes`` and the sizes the current knobs train, in order."""
        return sorted(set(self.options.val_sizes) | set(self.knobs["sizes"]))

    def validation_puzzles(self, n: int) -> dict[str, torch.Tensor]:
        """The fixed held-out puzzles of size n (built once): modes in turn, then fills in turn, from a constant seed."""
        if n not in self._val_sets:
            o, count = self.options, self.options.val_puzzles
            index = np.arange(count)
            modes = np.array([Mode[m] for m in o.modes])[index % len(o.modes)]
            fills = np.array(o.val_fills)[(index // len(o.modes)) % len(o.val_fills)]
            seeds = np.uint64(_VAL_SEED) + np.uint64(n << 32) + index.astype(np.uint64)
            self._val_sets[n] = make_puzzles(seeds, np.full(count, n), modes, fills, augment=True)
        return self._val_sets[n]

    def validation_set(self) -> dict[int, dict[str, torch.Tensor]]:
        """The held-out puzzles of every size validated now (see :meth:`validation_sizes`)."""
        return {n: self.validation_puzzles(n) for n in self.validation_sizes()}

    @torch.no_grad()
    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Metrics per size (``name/n5``), per fill (``name/fill30``) and per mode (``name/NEGATIVE``), and headline ``name``.

        The headline is the mean over ``val_sizes`` of the per-size values, so it stays comparable
        while a curriculum changes the trained sizes; those sizes are validated too, per size.
        Fill and mode groups pool the grids of ``val_sizes`` and appear when there are several.
        """
        o = self.options
        metrics: dict[str, float] = {}
        pooled: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        for n, batch in self.validation_set().items():
            scores = grid_scores(model, batch, device, fast=o.val_fast, tta=o.tta)
            everything = torch.ones(len(batch["size"]), dtype=torch.bool, device=device)
            metrics.update({f"{k}/n{n}": v for k, v in group_means(scores, everything).items()})
            if n in o.val_sizes:
                pooled.append((scores, batch))
        names = [k for k in pooled[0][0] if k != "hidden"]
        for k in names:
            metrics[k] = sum(metrics[f"{k}/n{n}"] for n in o.val_sizes) / len(o.val_sizes)
        scores = {k: torch.cat([s[k] for s, _ in pooled]) for k in pooled[0][0]}
        hidden = torch.cat([b["tokens"].eq(EMPTY).flatten(1).sum(1) for _, b in pooled]).to(device)
        cells = torch.cat([torch.full((len(b["size"]),), int(b["size"][0]) ** 2) for _, b in pooled]).to(device)
        mode = torch.cat([b["mode"] for _, b in pooled]).to(device)
        if len(o.val_fills) > 1:
            for fill in sorted(set(o.val_fills)):
                # A grid's fill is what it shows, floor(f n^2 + 1/2) cells, so the group is exact.
                shown = torch.floor(fill * cells.double() + 0.5)
                group = group_means(scores, (cells - hidden).double() == shown)
                metrics.update({f"{k}/fill{round(fill * 100)}": v for k, v in group.items()})
        if len(o.modes) > 1:
            for name in o.modes:
                group = group_means(scores, mode == int(Mode[name]))
                metrics.update({f"{k}/{name}": v for k, v in group.items()})
        return metrics

    # -------------------------------------------------------------- knobs

    def default_knobs(self) -> dict[str, Any]:
        """Sizes size_min..size_max, the configured modes and fill range; the loss knobs' starting values."""
        o = self.options
        return {
            "sizes": list(range(o.size_min, o.size_max + 1)),
            "modes": list(o.modes),
            "fill_min": o.fill_min,
            "fill_max": o.fill_max,
            "focal_gamma": o.focal_gamma,
            "constraint_weight": o.constraint_weight,
        }

    def set_knobs(self, knobs: Mapping[str, Any]) -> None:
        """Check the knobs here, where a bad value can still stop the run; the loss reads its knobs from here, data from keys."""
        merged = {**self.knobs, **knobs}
        self.knobs = {**check_knobs(merged), **check_loss_knobs(merged)}

    def checkpoint_blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer layers (each callable as ``block(x)``, see :class:`Block`)."""
        blocks = model.blocks
        assert isinstance(blocks, nn.ModuleList), "checkpoint_blocks expects a LatinTransformer"
        return list(blocks)


def make_task(options: LatinOptions | None = None) -> LatinTask:
    """Latin-square completion (the default task): fill the hidden cells of n x n grids, n = 3-16, three symbol modes.

    The factory named by ``--task kktrain.tasks.latin:make_task`` (entry point ``latin``).
    """
    return LatinTask(options)


make_task.Options = LatinOptions  # type: ignore[attr-defined]

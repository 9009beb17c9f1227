"""Training metrics between log points: kept on the device, read at the points that sync anyway.

Every step appends its detached loss (and, with ``grad_clip`` set, the gradient norm that
``clip_grad_norm_`` returns before clipping) to a list: no host-device sync, no extra kernel.
The lists are folded into plain floats in :attr:`TrainState.sums` at a log point, an epoch's
end and before every checkpoint or snapshot (one ``tolist()`` each), so a checkpoint carries
the interval's and the epoch's sums: after a resume, the next train record and the epoch's
``train/loss`` are the means over the same steps as in the uninterrupted run, computed with
the same arithmetic (the uninterrupted run folds at the same checkpoints).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kktrain.trainer import Trainer

CLIP_WARN_SHARE = 0.10
"""Warn when more than this share of an interval's steps had their gradients clipped."""

_KEYS = ("loss", "steps", "grad_norm", "clipped", "epoch_loss", "epoch_steps")


class StepMeter:
    """Loss and gradient-norm accumulators of the current log interval and epoch."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.losses: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.warned_clipping = False

    @property
    def sums(self) -> dict[str, float]:
        """The folded sums (part of the checkpointed :class:`~kktrain.state.TrainState`)."""
        sums = self.trainer.state.sums
        for key in _KEYS:
            sums.setdefault(key, 0.0)
        return sums

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """One finished optimizer step (no sync)."""
        self.losses.append(loss)
        if grad_norm is not None:
            self.norms.append(grad_norm)

    def drop_pending(self) -> None:
        """Forget the steps not folded yet (a restore undid them)."""
        self.losses, self.norms = [], []

    def fold(self) -> None:
        """Move the pending device values into :attr:`sums`: one sync, or none when nothing is pending.

        The values are added one by one in step order, so the sums do not depend on where the
        folds happened (a resumed run folds at other points than the uninterrupted one).
        """
        if not self.losses:
            return
        n = len(self.losses)
        tensors = [torch.stack(self.losses).float()]
        if self.norms:
            tensors.append(torch.stack(self.norms).float().to(tensors[0].device))
        values = torch.cat(tensors).tolist()
        sums, clip = self.sums, self.trainer.config.grad_clip
        for loss in values[:n]:
            sums["loss"] += loss
            sums["epoch_loss"] += loss
        sums["steps"] += n
        sums["epoch_steps"] += n
        for norm in values[n:]:
            sums["grad_norm"] += norm
            if clip is not None and norm > clip:
                sums["clipped"] += 1
        self.drop_pending()

    def running_loss(self) -> float | None:
        """The mean train loss of the log interval so far (folds: one sync), or None if it is empty."""
        self.fold()
        steps = self.sums["steps"]
        return self.sums["loss"] / steps if steps else None

    def interval(self) -> dict[str, float]:
        """The log interval's means (``train/loss``, ``train/grad_norm``, ``train/clipped``); starts the next."""
        self.fold()
        sums = self.sums
        out: dict[str, float] = {}
        steps = sums["steps"]
        if steps:
            out["train/loss"] = sums["loss"] / steps
            if self.trainer.config.grad_clip is not None:
                out["train/grad_norm"] = sums["grad_norm"] / steps
                out["train/clipped"] = sums["clipped"] / steps
        for key in ("loss", "steps", "grad_norm", "clipped"):
            sums[key] = 0.0
        share = out.get("train/clipped", 0.0)
        if share > CLIP_WARN_SHARE and not self.warned_clipping:
            self.warned_clipping = True
            tr = self.trainer
            tr.log.warning("grad_clipping_often", step=tr.state.step, share=share, grad_norm=out["train/grad_norm"],
                           grad_clip=tr.config.grad_clip,
                           note=f"more than {CLIP_WARN_SHARE:.0%} of steps clip: lower optimizer.lr or raise grad_clip")
        return out

    def epoch(self) -> dict[str, float]:
        """The epoch's mean ``train/loss`` over every step it trained (across resumes); starts the next."""
        self.fold()
        sums = self.sums
        out = {"train/loss": sums["epoch_loss"] / sums["epoch_steps"]} if sums["epoch_steps"] else {}
        sums["epoch_loss"] = sums["epoch_steps"] = 0.0
        return out


"""ema: an exponential moving average of the weights, validated beside the training weights.

    kktrain run --plugin ema                              # decay 0.999 with warm-up
    kktrain run --plugin ema -o ema.decay=0.9999 -o ema.every=4
    kktrain run --plugin ema -o checkpoint.best_metric=val_ema/loss -o checkpoint.best_mode=min

After every ``every``-th optimizer step the average moves toward the weights with one multi-tensor
``torch._foreach_lerp_`` (no Python loop over parameters, no host sync). Validation swaps the
average into the model, validates, and copies the training weights back bit for bit. The
average's metrics are ``val_ema/*``; ``val/*`` keep meaning the training weights (with the
default ``validate_with = "both"`` both are reported), so ``-o checkpoint.best_metric=val_ema/acc``
picks the best checkpoint by the average. Checkpoints hold both (the average under
``plugins.ema.weights``, a state dict that ``model.load_state_dict`` takes as is).
Under FSDP (``-o distributed.strategy=fsdp``) the average is kept as ``DTensor`` shards like the
parameters it follows: no process holds more of it than its own shard, and sharded checkpoints
store it sharded. See ``docs/plugins/ema.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal, TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from kktrain import CheckpointError, PluginOptions, hookimpl

if TYPE_CHECKING:
    from kktrain import Trainer

__all__ = ["EMA_PREFIX", "EmaPlugin", "ema_key"]

EMA_PREFIX = "val_ema/"


def ema_key(key: str) -> str:
    """The name of an EMA-weights metric: ``acc`` and ``val/acc`` become ``val_ema/acc``."""
    return EMA_PREFIX + (key[len("val/"):] if key.startswith("val/") else key)


class EmaPlugin:
    """Exponential moving average of the weights; validation and checkpoints report EMA and raw."""

    class Options(PluginOptions):
        """``-o ema.KEY=VALUE`` / ``[plugins.ema]``."""

        model_config = ConfigDict(strict=True)

        decay: float = Field(0.999, gt=0, lt=1)
        """Weight of the old average per update."""
        warmup: bool = True
        """Use ``min(decay, (1 + n) / (10 + n))`` for the n-th update, so early averages are not stuck at init."""
        every: int = Field(1, ge=1)
        """Update after every k-th optimizer step."""
        buffers: Literal["copy", "average"] = "copy"
        """Buffers (BatchNorm statistics ...): use the model's own (copy), or average floating ones too."""
        validate_with: Literal["both", "ema", "raw"] = "both"
        """Validate ``both`` (``val/*`` training weights, ``val_ema/*`` the average), only ``ema``, or only ``raw``."""

    def __init__(self, options: EmaPlugin.Options | None = None) -> None:
        self.options = options or self.Options()
        self.updates = 0
        self._model: torch.nn.Module | None = None
        self._trainer: Trainer | None = None
        self._names: list[str] = []  # averaged tensors (parameters, then averaged buffers), by state-dict name
        self._live: list[torch.Tensor] = []
        self._shadow: list[torch.Tensor] | None = None
        self._copied: list[tuple[str, torch.Tensor]] = []  # buffers the EMA state copies from the model
        self._inside = False
        self._pending: dict[str, Any] | None = None  # state loaded before a model was tracked

    # ------------------------------------------------------------------ set-up

    def track(self, model: torch.nn.Module) -> None:
        """Note which tensors of ``model`` are averaged (parameters; buffers when ``buffers=average``)."""
        self._model = model
        persistent = set(model.state_dict().keys())
        names: list[str] = []
        live: list[torch.Tensor] = []
        for name, p in model.named_parameters():
            names.append(name)
            live.append(p)
        self._copied = []
        for name, b in model.named_buffers():
            if name not in persistent:
                continue
            if self.options.buffers == "average" and b.is_floating_point():
                names.append(name)
                live.append(b)
            else:
                self._copied.append((name, b))
        self._names, self._live = names, live
        self._shadow = None
        self.updates = 0

    def start(self) -> None:
        """Start the average from the current weights, unless a checkpoint restored it."""
        if self._shadow is None:
            with torch.no_grad():
                self._shadow = [t.detach().clone() for t in self._live]

    @hookimpl(trylast=True)
    def on_model_built(self, trainer: Trainer, model: torch.nn.Module) -> None:
        """Note the trainer; the model is tracked at ``on_train_start``, once it is final (FSDP
        replaces the parameters with ``DTensor`` shards after this hook)."""
        self._trainer = trainer

    @hookimpl
    def on_train_start(self, trainer: Trainer) -> None:
        """Track the model and start the average (a resume has restored it: applied now)."""
        self.track(trainer.model)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)
        self.start()
        trainer.log_event("ema", decay=self.options.decay, every=self.options.every, tensors=len(self._live),
                          updates=self.updates, validate_with=self.options.validate_with)

    # ------------------------------------------------------------------ hot path

    def decay_now(self) -> float:
        """The decay of the next update (warm-up: ``min(decay, (1 + n) / (10 + n))``)."""
        n = self.updates
        return min(self.options.decay, (1 + n) / (10 + n)) if self.options.warmup else self.options.decay

    def update(self) -> None:
        """One multi-tensor step of the average toward the live weights."""
        assert self._shadow is not None
        with torch.no_grad():
            torch._foreach_lerp_(self._shadow, self._live, 1.0 - self.decay_now())
        self.updates += 1

    @hookimpl
    def on_step(self, trainer: Trainer, loss: torch.Tensor) -> None:
        """Update the average after every ``every``-th step."""
        if trainer.state.step % self.options.every == 0:
            self.update()

    # ------------------------------------------------------------------ validation

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average inside the block; the training weights come back bit for bit."""
        assert self._shadow is not None
        live, shadow = _local(self._live), _local(self._shadow)
        with torch.no_grad():
            stash = [t.detach().clone() for t in live]
            torch._foreach_copy_(live, shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, stash)

    @hookimpl(wrapper=True)
    def validate(self, trainer: Trainer) -> Any:
        """Validate the average (``val_ema/*``) and, with ``both``, the training weights (``val/*``)."""
        mode = self.options.validate_with
        if self._inside or mode == "raw" or self._shadow is None:
            return (yield)
        with self.swapped_in():
            metrics = yield
        ema = {ema_key(k): v for k, v in metrics.items()}
        if mode == "ema":
            return ema
        # The whole validate chain once more, for the training weights (this wrapper passes through).
        self._inside = True
        try:
            raw = trainer.hook.validate(trainer=trainer)
        finally:
            self._inside = False
        return {**raw, **ema}

    # ------------------------------------------------------------------ summary

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """``summary["ema"]``: settings, update count, and the EMA and raw metrics of the last validation."""
        last = {k: v for k, v in trainer.state.last_val.items() if not k.endswith("time_s")}
        ema = {k: v for k, v in last.items() if k.startswith(EMA_PREFIX)}
        raw = {k: v for k, v in last.items() if k.startswith("val/")}
        section: dict[str, Any] = {
            "decay": self.options.decay, "every": self.options.every, "updates": self.updates,
            "validate_with": self.options.validate_with,
        }
        # A headline pair: the best metric (or the loss) for the average and for the training weights.
        best = trainer.config.checkpoint.best_metric or "val/loss"
        base = best.split("/", 1)[1] if "/" in best else best
        if f"{EMA_PREFIX}{base}" in ema:
            section[f"ema {base}"] = ema[f"{EMA_PREFIX}{base}"]
        if f"val/{base}" in raw:
            section[f"raw {base}"] = raw[f"val/{base}"]
        section["ema_metrics"], section["raw_metrics"] = ema, raw
        summary["ema"] = section

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """``updates`` and ``weights``: the average as a model state dict (copied buffers included)."""
        if self._shadow is None and self._pending is not None:
            return self._pending
        weights: dict[str, torch.Tensor] = {}
        if self._shadow is not None:
            weights.update(zip(self._names, self._shadow))
            weights.update((name, b.detach()) for name, b in self._copied)
        return {"updates": self.updates, "decay": self.options.decay, "weights": weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the average (into the existing tensors when there are some)."""
        if not self._names:  # not tracking a model yet: keep it until on_model_built
            self._pending = state
            return
        weights = state.get("weights") or {}
        missing = [n for n in self._names if n not in weights]
        if missing:
            raise CheckpointError(
                f"the checkpoint's EMA state lacks {len(missing)} tensor(s) of this model (e.g. '{missing[0]}'): "
                "resume with the same model and ema.buffers setting"
            )
        with torch.no_grad():
            if self._shadow is None:
                self._shadow = [torch.empty_like(t) for t in self._live]
            torch._foreach_copy_(_local(self._shadow), _local([_like(weights[n], t) for n, t in zip(self._names, self._shadow)]))
        self.updates = int(state.get("updates", 0))


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's shards of FSDP ``DTensor`` values (copies between equal shardings stay local:
    DTensor has no ``_foreach_copy_``); plain tensors as they are."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def _like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` in the form of ``target``: a full tensor becomes this rank's shard of a ``DTensor``
    (a checkpoint from DDP or one process resumed under FSDP), and the other way round."""
    if not (hasattr(target, "device_mesh") or hasattr(value, "device_mesh")):
        return value  # plain tensors: no need to import torch.distributed
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor) and not isinstance(value, DTensor):
        # Every rank holds the full value: each keeps its shard, no communication.
        return distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
    if isinstance(value, DTensor) and not isinstance(target, DTensor):
        return value.full_tensor()
    return value

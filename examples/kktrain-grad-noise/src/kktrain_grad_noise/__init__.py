"""grad-noise: add annealed Gaussian noise to the gradients (Neelakantan et al., 2015).

A third-party kktrain plugin, shipped as its own distribution (``kktrain-grad-noise``) and found
through its entry point in the ``kktrain`` group::

    pip install --no-deps ./examples/kktrain-grad-noise
    kktrain run --task tiny --plugin grad-noise -o grad-noise.eta=0.3

At every optimizer step ``t`` (0-based) it adds ``N(0, sigma_t^2)`` to every gradient, with
``sigma_t^2 = eta / (1 + t) ** gamma``, after the gradients are complete (and unscaled by AMP) and
before clipping. The noise comes from the plugin's own ``torch.Generator``, whose state is saved
in checkpoints, so a resumed run adds exactly the same noise as an uninterrupted one and the
training RNG (dropout, data) is never touched.

Hot path: one ``normal_`` kernel per (device, dtype) group into a flat buffer allocated once,
and one ``torch._foreach_add_`` into the gradients; no host-device sync. Collecting the
gradient list is a Python list comprehension over the parameters, as any optimizer does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kktrain import Trainer, hookimpl

__all__ = ["GradNoisePlugin"]
__version__ = "0.2.0"

NAME = "grad-noise"


class _Group:
    """The parameters of one (device, dtype) with a flat noise buffer and views of it."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        total = sum(p.numel() for p in params)
        self.buffer = torch.empty(total, device=params[0].device, dtype=params[0].dtype)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:  # once, at set-up
            self.views.append(self.buffer[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


class GradNoisePlugin:
    """Adds annealed Gaussian noise to the gradients before clipping (eta / (1 + t) ** gamma)."""

    name = NAME

    class Options(BaseModel):
        """``-o grad-noise.KEY=VALUE`` or ``[plugins.grad-noise]``."""

        model_config = ConfigDict(extra="forbid", validate_assignment=True)

        eta: float = Field(0.01, ge=0)
        """Noise variance at step 0; 0 turns the noise off (the run is then bit-identical)."""
        gamma: float = Field(0.55, ge=0)
        """Annealing exponent: the variance decays as (1 + t) ** -gamma."""
        seed: int | None = None
        """Seed of the plugin's own generator; default: the run's seed."""

    # The contract tests (kktrain's tests/contract) run every installed plugin with these options.
    contract_options = {"eta": 0.05}

    def __init__(self, options: GradNoisePlugin.Options | None = None) -> None:
        self.options = options or self.Options()
        self.generator: torch.Generator | None = None
        self._pending_rng: torch.Tensor | None = None  # loaded before the trainer is set up
        self._groups: list[_Group] = []
        self.steps_noised = 0
        self.last_std = 0.0

    def std_at(self, step: int) -> float:
        """The noise standard deviation at (0-based) optimizer step ``step``."""
        o = self.options
        return math.sqrt(o.eta / (1.0 + step) ** o.gamma)

    # ---------------------------------------------------------------- hooks

    @hookimpl
    def on_train_start(self, trainer: Trainer) -> None:
        """Group the trainable parameters and create the generator (or restore its state)."""
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.nn.Parameter]] = {}
        for p in params:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        self._groups = [_Group(ps) for ps in by_kind.values()]
        self.generator = torch.Generator(device=trainer.device)
        if self._pending_rng is not None:
            self.generator.set_state(self._pending_rng)
        else:
            seed = self.options.seed if self.options.seed is not None else trainer.config.seed
            self.generator.manual_seed(seed)
        trainer.log_event("grad_noise_start", eta=self.options.eta, gamma=self.options.gamma,
                          std=self.std_at(trainer.state.step))

    @hookimpl(trylast=True)
    def on_after_backward(self, trainer: Trainer) -> None:
        """Add the step's noise to the gradients (trylast: after AMP has unscaled them)."""
        std = self.std_at(trainer.state.step)
        self.last_std = std
        self.steps_noised += 1
        if std == 0.0:
            return
        for group in self._groups:
            group.buffer.normal_(generator=self.generator)
            pairs = [(p.grad, v) for p, v in zip(group.params, group.views) if p.grad is not None]
            if pairs:
                grads, noise = zip(*pairs)
                torch._foreach_add_(list(grads), list(noise), alpha=std)

    @hookimpl
    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Add the current noise level to the training records of ``metrics.jsonl``."""
        if record.get("kind") == "train":
            record["grad_noise/std"] = self.last_std

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """Report the schedule and how many steps were noised."""
        summary[NAME] = {
            "eta": self.options.eta,
            "gamma": self.options.gamma,
            "steps_noised": self.steps_noised,
            "final_std": self.last_std,
        }

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The generator state and counters (plain values and one uint8 tensor)."""
        rng = self.generator.get_state() if self.generator is not None else self._pending_rng
        return {"rng": rng, "steps_noised": self.steps_noised, "last_std": self.last_std}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the generator state is applied at ``on_train_start``."""
        self._pending_rng = state["rng"]
        if self.generator is not None and state["rng"] is not None:
            self.generator.set_state(state["rng"])
        self.steps_noised = int(state["steps_noised"])
        self.last_std = float(state["last_std"])

"""optim8bit: AdamW with 8-bit optimizer states (bitsandbytes ``AdamW8bit``), falling back to torch AdamW.

    kktrain run --plugin optim8bit
    kktrain run --plugin optim8bit -o optim8bit.min_8bit_size=1024

``build_optimizer`` (firstresult) returns ``bitsandbytes.optim.AdamW8bit`` built from
``config.optimizer`` (lr, betas, eps, weight_decay). Both Adam moments of every parameter with at
least ``min_8bit_size`` elements are kept as block-wise quantized uint8 (256-element blocks, one
float32 absmax per block): 2 bytes per element instead of AdamW's 8. Smaller tensors keep float32
states, as bitsandbytes does.

Before building it, the plugin probes bitsandbytes: one optimizer step on a small parameter of the
run's device and dtype. When ``import bitsandbytes`` fails, or the probe raises or does not
produce uint8 states, it logs one warning naming the cause and the fix and returns nothing, so the
core's torch AdamW is built instead (``on_unavailable="error"`` makes that an error instead).
See docs/plugins/optim8bit.md.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal, TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from kktrain import CheckpointError, PluginError, PluginOptions, hookimpl

if TYPE_CHECKING:
    from kktrain import Trainer

__all__ = ["Optim8bitPlugin", "probe_bitsandbytes"]

NAME = "optim8bit"
STATE_VERSION = 1
BNB = "bitsandbytes"
TORCH = "torch"


class Optim8bitOptions(PluginOptions):
    """``-o optim8bit.KEY=VALUE`` / ``[plugins.optim8bit]``."""

    min_8bit_size: int = Field(4096, ge=0)
    """Parameters with fewer elements keep float32 states (bitsandbytes' own default: 4096)."""
    percentile_clipping: int = Field(100, ge=1, le=100)
    """Clip gradients at this percentile of the last 100 norms (100: off). Older bitsandbytes only."""
    block_wise: bool = True
    """Quantize states per 256-element block (bitsandbytes >= 0.45 always does)."""
    is_paged: bool = False
    """Paged states (CUDA unified memory, spill to host under pressure); ignored on CPU."""
    on_unavailable: Literal["fallback", "error"] = "fallback"
    """When bitsandbytes is missing or cannot run here: warn and use torch AdamW, or stop."""


# Options passed to AdamW8bit only when its signature has them, with the value that means "as
# bitsandbytes does anyway" (asking for anything else on a version without it is an error).
_VERSIONED = {"percentile_clipping": 100, "block_wise": True}


def probe_bitsandbytes(device: torch.device, dtype: torch.dtype) -> tuple[Any, str | None]:
    """Import bitsandbytes and take one AdamW8bit step on ``device``/``dtype``.

    Returns ``(module, None)`` when it works (the states are uint8), else ``(None, reason)``.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        return None, f"bitsandbytes is not installed or fails to import ({e})"
    except Exception as e:  # noqa: BLE001 - a broken install raises anything at import time
        return None, f"importing bitsandbytes failed ({type(e).__name__}: {e})"
    try:
        param = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 512, device=device).to(dtype))
        param.grad = torch.full_like(param, 0.5)
        opt = bnb.optim.AdamW8bit([param], lr=1e-3, min_8bit_size=0)
        opt.step()
        state = opt.state[param]
        kinds = {state["state1"].dtype, state["state2"].dtype}
        if kinds != {torch.uint8}:
            return None, f"bitsandbytes {bnb.__version__} kept {sorted(map(str, kinds))} states on {device} (expected uint8)"
        if not bool(torch.isfinite(param).all()):
            return None, f"bitsandbytes {bnb.__version__} produced non-finite values on {device}/{dtype}"
    except Exception as e:  # noqa: BLE001 - any failure of the probe means "cannot run here"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run AdamW8bit on {device}/{dtype} ({type(e).__name__}: {first[:200]})"
    return bnb, None


class Optim8bitPlugin:
    """AdamW with 8-bit states from bitsandbytes; warns and falls back to torch AdamW where it cannot run."""

    Options = Optim8bitOptions

    def __init__(self, options: Optim8bitOptions | None = None) -> None:
        self.options = options or Optim8bitOptions()
        self.impl: str | None = None
        self.version: str | None = None
        self.fallback_reason: str | None = None
        self._saved_impl: str | None = None

    @hookimpl
    def build_optimizer(self, trainer: Trainer, params: list[Any]) -> torch.optim.Optimizer | None:
        """AdamW8bit from ``config.optimizer``; ``None`` (so the core's AdamW) where it cannot run."""
        o = self.options
        if trainer.config.optimizer.name != "adamw":
            raise PluginError(
                f"optim8bit replaces the optimizer with AdamW8bit, which does not combine with optimizer.name = "
                f"{trainer.config.optimizer.name}: use optimizer.name = adamw or run without --plugin optim8bit"
            )
        first = params[0]["params"][0] if params and isinstance(params[0], dict) else (params[0] if params else None)
        dtype = first.dtype if first is not None else torch.float32
        bnb, reason = probe_bitsandbytes(trainer.device, dtype)
        if bnb is None:
            self.impl, self.fallback_reason = TORCH, reason
            fix = "install a bitsandbytes build for this device (pip install bitsandbytes) or run without --plugin optim8bit"
            if o.on_unavailable == "error":
                raise PluginError(f"optim8bit: {reason}: {fix}, or set -o optim8bit.on_unavailable=fallback")
            trainer.log.warning("optim8bit_fallback", reason=reason, using="torch.optim.AdamW (32-bit states)", fix=fix)
            return None
        cls = bnb.optim.AdamW8bit
        accepted = inspect.signature(cls.__init__).parameters
        cfg = trainer.config.optimizer
        kwargs: dict[str, Any] = {
            "lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.effective_weight_decay,
            "min_8bit_size": o.min_8bit_size,
        }
        if o.is_paged:
            kwargs["is_paged"] = True
        for key, native in _VERSIONED.items():
            value = getattr(o, key)
            if key in accepted:
                kwargs[key] = value
            elif value != native:
                raise PluginError(
                    f"optim8bit option '{key}' = {value!r}: bitsandbytes {bnb.__version__}'s AdamW8bit has no {key} "
                    f"(it behaves as {key}={native!r}): remove the option or install a bitsandbytes version that has it"
                )
        self.impl, self.version = BNB, str(bnb.__version__)
        trainer.log.info("optim8bit", impl="bitsandbytes.optim.AdamW8bit", version=self.version,
                         min_8bit_size=o.min_8bit_size, device=str(trainer.device))
        return cls(params, **kwargs)

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """``summary["optim8bit"]``: which optimizer ran, and its state size against 32-bit AdamW."""
        eight_bit = fp32 = state_bytes = 0
        for param, state in trainer.optimizer.state.items():
            tensors = [v for k, v in state.items() if isinstance(v, torch.Tensor) and v.numel() > 1 and not k.startswith("qmap")]
            state_bytes += sum(t.numel() * t.element_size() for t in tensors)
            if any(t.dtype == torch.uint8 for t in tensors):
                eight_bit += 1
            elif tensors:
                fp32 += 1
        adamw_bytes = sum(2 * p.numel() * 4 for group in trainer.optimizer.param_groups for p in group["params"])
        summary[NAME] = {
            "impl": self.impl, "bitsandbytes": self.version, "fallback_reason": self.fallback_reason,
            "params_8bit_states": eight_bit, "params_32bit_states": fp32,
            "state_mb": state_bytes / 2**20, "adamw_fp32_state_mb": adamw_bytes / 2**20,
        }

    def state_dict(self) -> dict[str, Any]:
        """Which optimizer wrote the optimizer state (its tensors are in the checkpoint's ``optimizer``)."""
        return {"version": STATE_VERSION, "impl": self.impl if self.impl is not None else self._saved_impl}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refuse a checkpoint whose optimizer state comes from the other implementation."""
        saved = self._saved_impl = state.get("impl")
        if saved is not None and self.impl is not None and saved != self.impl:
            names = {BNB: "bitsandbytes AdamW8bit", TORCH: "torch AdamW"}
            raise CheckpointError(
                f"optim8bit: the checkpoint's optimizer state is from {names[saved]} but this run uses {names[self.impl]}"
                f"{' (' + self.fallback_reason + ')' if self.fallback_reason else ''}: resume where the same optimizer runs"
            )

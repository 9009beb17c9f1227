"""amp: mixed precision with ``torch.autocast``; fp16 adds a ``torch.amp.GradScaler``.

    kktrain run --plugin amp                          # auto: bf16 on Ampere+ and bf16 CPUs, else fp16 (GPU) / fp32 (CPU)
    kktrain run --plugin amp -o amp.dtype=bf16        # bf16 autocast, no loss scaling needed
    kktrain run --plugin amp -o amp.dtype=fp16        # fp16 autocast + GradScaler

Forward and loss run under autocast (a ``forward_loss`` wrapper). With fp16 the plugin also owns
``backward`` (``scaler.scale(loss).backward()``) and ``optimizer_step`` (``scaler.step`` +
``scaler.update``), and unscales the gradients first thing in ``on_after_backward`` so that
clipping and gradient checks see true values. Steps the scaler skips for inf/nan gradients are
counted on the device and read only at log points, where a scale that keeps halving is warned
about. A dtype the device cannot run falls back, with one warning naming what was chosen instead.
Under FSDP (``-o distributed.strategy=fsdp``) bf16 becomes FSDP's own ``MixedPrecisionPolicy``
(parameters gathered in bf16, gradients reduced in fp32) instead of autocast; fp16 does not
combine with FSDP (its GradScaler cannot unscale sharded gradients) and is refused in one line.
See ``docs/plugins/amp.md``.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from kktrain import ConfigError, PluginOptions, hookimpl

if TYPE_CHECKING:
    from kktrain import Trainer

_SCHEDULER_ORDER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"

__all__ = ["AmpPlugin", "autocast_problem", "cpu_has_native_bf16", "dtype_candidates"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU computes in bf16 (AVX512_BF16 or AMX); without it CPU autocast only adds casts."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def dtype_candidates(requested: str, device_type: str, cpu_bf16: bool = True) -> list[str]:
    """The dtypes to try, best first: the requested one, the other 16-bit one, then fp32.

    ``auto`` on a CPU without native bf16 is fp32: measured here (Xeon with AVX-512, no BF16), the
    Latin model's step took 4.4x as long under bf16 autocast and 28x under fp16.
    """
    if requested == "fp32":
        return ["fp32"]
    if requested == "auto":
        if device_type == "cpu":
            return ["bf16", "fp32"] if cpu_bf16 else ["fp32"]
        # MPS autocast runs fp16 on every Apple GPU, bf16 only on newer ones (macOS 14, M2+).
        first = ["fp16", "bf16"] if device_type == "mps" else ["bf16", "fp16"]
    else:
        first = [requested, "fp16" if requested == "bf16" else "bf16"]
    return [*first, "fp32"]


def autocast_problem(device: torch.device, name: str) -> str | None:
    """``None`` when autocast can run ``name`` (bf16/fp16) on ``device``, else why it cannot."""
    dtype = DTYPES[name]
    if not torch.amp.is_autocast_available(device.type):
        return f"torch has no autocast for device type '{device.type}'"
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm {major}.{minor}) has no bf16 support (needs Ampere, sm 8.0+)"
    # Probe for real: autocast warns and disables itself for an unsupported dtype.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autocast(device.type, dtype=dtype):
                out = torch.ones(4, 4, device=device) @ torch.ones(4, 4, device=device)
        except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
            return f"autocast({name}) failed on {device.type}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if out.dtype != dtype:
        said = next((str(w.message).splitlines()[0] for w in caught), f"matmul ran in {out.dtype}")
        return f"autocast({name}) is not supported on {device.type}: {said}"
    if dtype is torch.float16:
        return _scaler_problem(device)
    return None


def _scaler_problem(device: torch.device) -> str | None:
    """fp16 needs a working GradScaler on the device: one scale/unscale round trip."""
    try:
        scaler = torch.amp.GradScaler(device.type)
        w = torch.ones(2, device=device, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.0)
        scaler.scale((w * 2).sum()).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    except Exception as e:  # noqa: BLE001
        return f"GradScaler does not work on {device.type} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


class AmpPlugin:
    """Mixed precision: autocast bf16/fp16 for forward+loss; fp16 with a GradScaler (skips counted)."""

    class Options(PluginOptions):
        """``-o amp.KEY=VALUE`` / ``[plugins.amp]``."""

        model_config = ConfigDict(strict=True)

        dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
        """Autocast dtype; ``auto``: CUDA bf16 (fp16 before Ampere), MPS fp16, CPU bf16 only with native bf16 else fp32."""
        init_scale: float = Field(2.0**16, gt=0)
        """fp16: the GradScaler's starting loss scale."""
        growth_interval: int = Field(2000, ge=1)
        """fp16: steps without inf/nan before the scale doubles."""
        warn_halvings: int = Field(3, ge=1)
        """fp16: warn when the scale halves this many times between two log points (after calibration)."""

    def __init__(self, options: AmpPlugin.Options | None = None) -> None:
        self.options = options or self.Options()
        self.dtype: str | None = None  # chosen at on_model_built, when the device is known
        self.autocast_dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self.fallback_reason: str | None = None
        self.fsdp_policy = False  # FSDP's MixedPrecisionPolicy runs the dtype instead of autocast
        self.scaler: torch.amp.GradScaler | None = None
        self._trainer: Trainer | None = None
        self._unscaled = False
        self._skips: torch.Tensor | None = None  # steps the scaler skipped (inf/nan), on the device
        self._calibration: torch.Tensor | None = None  # of those, the ones before the first applied step
        self._applied_any: torch.Tensor | None = None
        self._checked_overflow = 0  # skips after calibration, as of the last log point
        self.warnings = 0
        self._pending: dict[str, Any] | None = None  # state loaded before the device was known

    # ------------------------------------------------------------------ set-up

    @hookimpl
    def on_model_built(self, trainer: Trainer, model: torch.nn.Module) -> None:
        """Choose the dtype the device can run; create the GradScaler for fp16."""
        self._trainer = trainer
        self.device = trainer.device
        requested = self.options.dtype
        problems: list[str] = []
        native = cpu_has_native_bf16() if self.device.type == "cpu" else True
        sharded = trainer.distributed.sharded
        if sharded and requested == "fp16":
            raise ConfigError(
                "amp: amp.dtype=fp16 does not combine with distributed.strategy=fsdp (the GradScaler cannot unscale "
                "sharded gradients): use -o amp.dtype=bf16, or -o distributed.strategy=ddp"
            )
        candidates = dtype_candidates(requested, self.device.type, cpu_bf16=native)
        for name in [c for c in candidates if not (sharded and c == "fp16")]:
            problem = None if name == "fp32" else autocast_problem(self.device, name)
            if problem is None:
                self.dtype = name
                break
            problems.append(problem)
        assert self.dtype is not None
        self.autocast_dtype = None if self.dtype == "fp32" else DTYPES[self.dtype]
        if self.autocast_dtype is not None and trainer.request_mixed_precision(self.autocast_dtype):
            self.fsdp_policy, self.autocast_dtype = True, None
        if requested not in ("auto", self.dtype):
            self.fallback_reason = problems[0]
            trainer.log.warning(
                "amp_dtype_fallback", requested=requested, chosen=self.dtype, device=str(self.device), reason=problems[0],
                note=f"amp.dtype={requested} cannot run here; training with {self.dtype} instead",
            )
        elif self.device.type == "cpu" and not native and self.dtype != "fp32":
            # It runs, so it is no fallback; but it is slower than fp32, which nobody expects of amp.
            trainer.log.warning(
                "amp_cpu_emulated", dtype=self.dtype, device="cpu",
                note=f"this CPU has no native bf16 (AVX512_BF16/AMX): {self.dtype} autocast only adds casts and runs "
                "slower than fp32 (Latin model, AVX-512 Xeon: 4.4x bf16, 28x fp16); amp.dtype=auto picks fp32 here",
            )
        self._new_counters()
        self._new_scaler()
        note: dict[str, Any] = {}
        if requested == "auto" and self.device.type == "cpu" and not native:
            note["note"] = "this CPU has no native bf16 (AVX512_BF16/AMX): autocast would only add casts; amp.dtype=bf16 forces it"
        if self.fsdp_policy:
            note["fsdp_mixed_precision"] = True
        trainer.log_event(
            "amp", dtype=self.dtype, requested=requested, device=str(self.device), grad_scaler=self.scaler is not None,
            autocast=self.autocast_dtype is not None, **note,
        )
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)

    def _new_scaler(self) -> None:
        if self.dtype != "fp16":
            self.scaler = None
            return
        assert self.device is not None
        self.scaler = torch.amp.GradScaler(
            self.device.type, init_scale=self.options.init_scale, growth_interval=self.options.growth_interval
        )
        self._unscaled = False
        # The scaler skips the first steps while its scale calibrates (counted in
        # amp/calibration_skips); the LR schedule still advances, as in torch's AMP recipe, and
        # torch would warn that the scheduler stepped before the optimizer. That is expected here.
        warnings.filterwarnings("ignore", message=_SCHEDULER_ORDER_WARNING, category=UserWarning)

    def _new_counters(self) -> None:
        dev = self.device
        self._skips = torch.zeros((), dtype=torch.int64, device=dev)
        self._calibration = torch.zeros((), dtype=torch.int64, device=dev)
        self._applied_any = torch.zeros((), dtype=torch.bool, device=dev)

    # ------------------------------------------------------------------ hot path

    @hookimpl(wrapper=True)
    def forward_loss(self, trainer: Trainer, batch: Any) -> Any:
        """Forward and loss under ``torch.autocast`` (nothing for fp32)."""
        if self.autocast_dtype is None:
            return (yield)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):  # type: ignore[union-attr]
            return (yield)

    @hookimpl
    def backward(self, trainer: Trainer, loss: torch.Tensor) -> bool | None:
        """fp16: back-propagate the scaled loss; otherwise leave it to the core."""
        if self.scaler is None:
            return None
        self.scaler.scale(loss).backward()
        return True

    @hookimpl(tryfirst=True)
    def on_after_backward(self, trainer: Trainer) -> None:
        """fp16: unscale the gradients before anyone (clipping, guards) looks at them."""
        if self.scaler is not None:
            self.scaler.unscale_(trainer.optimizer)
            self._unscaled = True

    @hookimpl(wrapper=True)
    def on_before_optimizer_step(self, trainer: Trainer, loss: torch.Tensor, grad_norm: Any) -> Any:
        """A vetoed step still tells the scaler whether it overflowed (``update``), so it can back off."""
        verdicts = yield
        if self.scaler is not None and self._unscaled and any(v is False for v in verdicts):
            self._update()
        return verdicts

    @hookimpl
    def optimizer_step(self, trainer: Trainer) -> bool | None:
        """fp16: ``scaler.step`` (skips the step on inf/nan) and ``scaler.update``."""
        if self.scaler is None:
            return None
        self.scaler.step(trainer.optimizer)
        self._update()
        return True

    def _update(self) -> None:
        """``scaler.update()``, counting a skipped step on the device: the scale falls only on inf/nan."""
        scaler = self.scaler
        assert scaler is not None and self._skips is not None
        assert self._calibration is not None and self._applied_any is not None
        # GradScaler has no sync-free public reading of found_inf; its scale tensor is compared instead.
        before = scaler._scale.clone()  # type: ignore[union-attr]
        scaler.update()
        dropped = scaler._scale < before  # type: ignore[operator]
        self._skips += dropped
        self._calibration += dropped & ~self._applied_any
        self._applied_any |= ~dropped
        self._unscaled = False

    # ------------------------------------------------------------------ log points

    def counts(self) -> tuple[int, int]:
        """(skipped steps, of which during the initial scale calibration): one host sync."""
        if self._skips is None:
            return 0, 0
        skips, calibration = torch.stack([self._skips, self._calibration]).tolist()  # type: ignore[list-item]
        return int(skips), int(calibration)

    def _check(self, trainer: Trainer) -> dict[str, float]:
        skips, calibration = self.counts()
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        overflow = skips - calibration
        fresh = overflow - self._checked_overflow
        self._checked_overflow = overflow
        if fresh >= self.options.warn_halvings:
            self.warnings += 1
            trainer.log.warning(
                "amp_scale_falling", step=trainer.state.step, halvings=fresh, scale=scale,
                note="the fp16 loss scale keeps halving: gradients overflow; lower the LR, use bf16, or check the data",
            )
            trainer.log_event("amp_scale_falling", halvings=fresh, scale=scale)
        return {"amp/scale": scale, "amp/skipped_steps": skips}

    @hookimpl
    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """fp16: add ``amp/scale`` and ``amp/skipped_steps`` to train records; warn on a falling scale."""
        if self.scaler is not None and record.get("kind") in ("train", "epoch"):
            record.update(self._check(trainer))

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """``summary["amp"]``: the dtype chosen, and for fp16 the skipped steps and the final scale."""
        section: dict[str, Any] = {
            "dtype": self.dtype, "requested": self.options.dtype, "device": str(self.device),
            "grad_scaler": self.scaler is not None,
        }
        if self.fsdp_policy:
            section["fsdp_mixed_precision"] = True
        if self.fallback_reason:
            section["fallback_reason"] = self.fallback_reason
        if self.scaler is not None:
            skips, calibration = self.counts()
            section.update(skipped_steps=skips, calibration_skips=calibration, scale=float(self.scaler.get_scale()),
                           scale_warnings=self.warnings)
        summary["amp"] = section

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state and the skip counters (plain values)."""
        if self.device is None and self._pending is not None:
            return self._pending
        skips, calibration = self.counts()
        return {
            "dtype": self.dtype,
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "skipped_steps": skips,
            "calibration_skips": calibration,
            "applied_any": bool(self._applied_any) if self._applied_any is not None else False,
            "checked_overflow": self._checked_overflow,
            "warnings": self.warnings,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scaler (a fresh one: no half-done unscale survives a restore) and the counters."""
        if self.device is None:  # not set up yet: keep it until on_model_built
            self._pending = state
            return
        self._new_scaler()
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        elif state.get("dtype") not in (None, self.dtype) and self._trainer is not None:
            self._trainer.log.info("amp_dtype_changed", saved=state.get("dtype"), now=self.dtype)
        self._new_counters()
        assert self._skips is not None and self._calibration is not None and self._applied_any is not None
        self._skips.fill_(int(state.get("skipped_steps", 0)))
        self._calibration.fill_(int(state.get("calibration_skips", 0)))
        self._applied_any.fill_(bool(state.get("applied_any", False)))
        self._checked_overflow = int(state.get("checked_overflow", 0))
        self.warnings = int(state.get("warnings", 0))

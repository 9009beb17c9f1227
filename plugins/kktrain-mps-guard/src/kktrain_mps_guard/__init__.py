"""mps-guard: Apple MPS memory limit and cache management; out-of-memory steps retried in smaller pieces.

    kktrain run --plugin mps-guard                                     # 14 GB limit on MPS, OOM retry
    kktrain run --plugin mps-guard -o mps-guard.memory_limit_gb=10 -o mps-guard.empty_cache_every=100
    kktrain run --plugin mps-guard -o mps-guard.max_retries=4          # also on CUDA and CPU

On MPS (only there; every MPS call sits behind a device check) it caps the process at
``memory_limit_gb`` through ``torch.mps.set_per_process_memory_fraction``, watches the allocated
and driver-held memory and empties the allocator cache above a threshold or every K steps. On any
device, an out-of-memory error in forward or backward (``torch.OutOfMemoryError``, the CPU
allocator's ``RuntimeError: ... DefaultCPUAllocator: can't allocate memory``, MPS's
``RuntimeError: MPS backend out of memory``) empties the cache and retries the same batch split into
2, 4, 8 ... micro-batches (the core weights them so the effective batch is unchanged), up to
``max_retries``; the working split is remembered. See docs/plugins/mps-guard.md.
"""

from __future__ import annotations

import gc
from typing import Any, TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from kktrain import PluginOptions, StepRetry, TrainingAborted, hookimpl

if TYPE_CHECKING:
    from kktrain import Trainer

__all__ = ["MpsGuardPlugin", "is_out_of_memory"]

NAME = "mps-guard"
GB = 1024**3
_MAX_FRACTION = 2.0  # torch.mps accepts fractions of the recommended maximum up to 2


class MpsGuardOptions(PluginOptions):
    """``-o mps-guard.KEY=VALUE`` / ``[plugins.mps-guard]``."""

    memory_limit_gb: float | None = Field(14.0, gt=0)
    """MPS: cap this process's GPU memory (GiB) via set_per_process_memory_fraction; None: torch's default."""
    empty_cache_above: float = Field(0.9, gt=0.0, le=2.0)
    """MPS: empty the cache when driver-held memory exceeds this share of the limit."""
    empty_cache_every: int = Field(0, ge=0)
    """MPS: also empty the cache every this many steps (0: only above the threshold)."""
    check_every: int = Field(10, ge=1)
    """MPS: read the memory counters every this many steps."""
    max_retries: int = Field(3, ge=0)
    """Out of memory: retry a step at most this many times (splits 2, 4, 8 ...), then abort."""
    remember_split: bool = True
    """Start the next out-of-memory retry at the split that worked last time."""


# What the real allocators say when they run out: CPU (c10's DefaultCPUAllocator, a plain
# RuntimeError "[enforce fail at alloc_cpu.cpp:...] ... can't allocate memory"), CUDA (the
# caching allocator's OutOfMemoryError, or a kernel's "CUDA error: out of memory"), MPS.
_OOM_TEXTS = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory",
              "CUDA out of memory", "CUDA error: out of memory", "MPS backend out of memory",
              "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(error: BaseException) -> bool:
    """An allocator's out-of-memory error: ``torch.OutOfMemoryError``, or the RuntimeError the CPU
    allocator, a CUDA kernel or MPS raises instead (also a ``MemoryError`` from Python code)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(t in text for t in _OOM_TEXTS)


def empty_device_cache(device: torch.device) -> None:
    """Release cached allocator blocks on ``device`` (CUDA, MPS); collect Python garbage first."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps" and torch.backends.mps.is_available():
        torch.mps.empty_cache()


class MpsGuardPlugin:
    """Apple MPS memory limit and cache clearing; retries out-of-memory steps in smaller micro-batches (MPS, CUDA, CPU)."""

    Options = MpsGuardOptions
    name = NAME

    def __init__(self, options: MpsGuardOptions | None = None) -> None:
        self.options = options or MpsGuardOptions()
        self.split = 1  # the micro-batch split that last worked after an out-of-memory error
        self.ooms = 0
        self.retries = 0
        self.cache_empties = 0
        self.peak_driver_bytes = 0
        self._pending: int | None = None  # split of a retry not yet known to have worked
        self._mps = False
        self._limit_bytes: int | None = None

    # ------------------------------------------------------------------ set-up

    @hookimpl
    def on_train_start(self, trainer: Trainer) -> None:
        """On MPS, apply the memory limit; elsewhere only the OOM retry is active."""
        self._mps = trainer.device.type == "mps"
        if not self._mps:
            trainer.log.info("mps_guard", device=str(trainer.device),
                             note="not MPS: memory limit and cache management off; out-of-memory retry on")
            return
        recommended = int(torch.mps.recommended_max_memory())
        limit = self.options.memory_limit_gb
        if limit is None:
            self._limit_bytes = recommended
            return
        fraction = limit * GB / recommended
        if fraction > _MAX_FRACTION:
            trainer.log.warning("mps_guard_limit_clamped", memory_limit_gb=limit, recommended_gb=recommended / GB,
                                note=f"torch.mps allows at most {_MAX_FRACTION} x the recommended maximum")
            fraction = _MAX_FRACTION
        torch.mps.set_per_process_memory_fraction(fraction)
        self._limit_bytes = int(fraction * recommended)
        trainer.log_event("mps_memory_limit", limit_gb=self._limit_bytes / GB, recommended_gb=recommended / GB,
                          fraction=fraction)

    # ------------------------------------------------------------------ per step (MPS memory watch)

    @hookimpl
    def on_step(self, trainer: Trainer, loss: torch.Tensor) -> None:
        """Confirm a pending retry worked; on MPS, watch memory and empty the cache when due."""
        if self._pending is not None:
            if self.options.remember_split:
                self.split = self._pending
            trainer.log_event("oom_recovered", micro_batches=self._pending, remembered=self.options.remember_split)
            self._pending = None
        if not self._mps:
            return
        step = trainer.state.step
        every = self.options.empty_cache_every
        scheduled = every > 0 and step % every == 0
        if not scheduled and step % self.options.check_every:
            return
        driver = int(torch.mps.driver_allocated_memory())  # allocator counters: no device sync
        self.peak_driver_bytes = max(self.peak_driver_bytes, driver)
        limit = self._limit_bytes or driver
        over = driver > self.options.empty_cache_above * limit
        if scheduled or over:
            torch.mps.empty_cache()
            self.cache_empties += 1
            after = int(torch.mps.driver_allocated_memory())
            trainer.log_event("mps_cache_emptied", reason="threshold" if over else "schedule",
                              current_gb=torch.mps.current_allocated_memory() / GB, driver_gb=driver / GB,
                              driver_after_gb=after / GB)

    # ------------------------------------------------------------------ out of memory

    @hookimpl
    def on_step_exception(self, trainer: Trainer, error: BaseException, attempt: int) -> StepRetry | None:
        """An out-of-memory error: empty the cache and retry in more pieces, up to ``max_retries``."""
        if not is_out_of_memory(error):
            return None
        device = trainer.device
        empty_device_cache(device)
        self.ooms += 1
        step = trainer.state.step + 1
        batch = trainer.config.batch_size
        # The core starts each step with its sticky split; double it with every attempt.
        base = max(1, int(trainer.state.micro_split))
        pieces = base * 2 ** (attempt + 1)
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        if attempt >= self.options.max_retries or pieces > batch:
            tried = base * 2**attempt
            message = (
                f"mps-guard: out of memory at step {step} on {device.type} with micro-batches of "
                f"{-(-batch // tried)} samples after {attempt} retries (max_retries={self.options.max_retries}): "
                "lower batch_size (or memory use), or raise -o mps-guard.max_retries"
            )
            trainer.log_event("oom_give_up", at_step=step, attempts=attempt, device=device.type, error=reason)
            raise TrainingAborted(message) from error
        self.retries += 1
        self._pending = pieces
        trainer.log_event("oom_retry", at_step=step, attempt=attempt + 1, micro_batches=pieces,
                          micro_batch_size=-(-batch // pieces), device=device.type, error=reason)
        return StepRetry(micro_batches=pieces, reason=f"out of memory on {device.type}: {pieces} micro-batches",
                         sticky=self.options.remember_split)

    # ------------------------------------------------------------------ state and summary

    def state_dict(self) -> dict[str, Any]:
        """The remembered split and the counters."""
        return {"split": self.split, "ooms": self.ooms, "retries": self.retries,
                "cache_empties": self.cache_empties, "peak_driver_bytes": self.peak_driver_bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.split = int(state["split"])
        self.ooms = int(state["ooms"])
        self.retries = int(state["retries"])
        self.cache_empties = int(state["cache_empties"])
        self.peak_driver_bytes = int(state["peak_driver_bytes"])

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """``summary["mps-guard"]``: device, limit, out-of-memory events, the split, cache empties."""
        section: dict[str, Any] = {"device": trainer.device.type, "ooms": self.ooms, "retries": self.retries,
                                   "split": self.split}
        if self._mps:
            section.update(memory_limit_gb=(self._limit_bytes or 0) / GB, cache_empties=self.cache_empties,
                           peak_driver_gb=self.peak_driver_bytes / GB)
        summary[NAME] = section

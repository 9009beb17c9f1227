"""memory-monitor: peak memory per epoch (CPU RSS, CUDA allocator, MPS) in the metrics and summary.

    kktrain run --plugin memory-monitor                       # sample every 10 steps
    kktrain run --plugin memory-monitor -o memory-monitor.sample_every=1

Per epoch it adds to the epoch record of ``metrics.jsonl`` (``on_epoch``):

* ``mem/cpu_rss_peak_mb``: the largest resident set size of the training process seen by the
  samples (epoch start, every ``sample_every`` steps, epoch end; psutil);
* ``mem/cpu_rss_mb``: the RSS at the epoch's end;
* ``mem/process_max_rss_mb``: the process's lifetime peak RSS as the kernel counts it
  (``resource.getrusage``, which sees peaks between samples; never less than a sample);
* ``mem/children_rss_peak_mb``: the summed RSS of child processes (data-loader workers), sampled;
* CUDA: ``mem/cuda_peak_allocated_mb`` and ``mem/cuda_peak_reserved_mb`` from the caching allocator
  (exact peaks; reset at each epoch's start);
* MPS: ``mem/mps_allocated_peak_mb`` and ``mem/mps_driver_peak_mb`` (sampled).

No sample synchronizes the device: psutil reads /proc, the CUDA figures are allocator counters.
See docs/plugins/memory-monitor.md.
"""

from __future__ import annotations

import sys
from typing import Any, TYPE_CHECKING

import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field

from kktrain import PluginOptions, hookimpl

if TYPE_CHECKING:
    from kktrain import Trainer

__all__ = ["MemoryMonitorPlugin", "process_max_rss_mb"]

NAME = "memory-monitor"
MB = 1024.0 * 1024.0
_REFRESH = 50  # samples between two listings of the child processes


def process_max_rss_mb() -> float | None:
    """The lifetime peak RSS of this process in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024.0


class MemoryMonitorOptions(PluginOptions):
    """``-o memory-monitor.KEY=VALUE`` / ``[plugins.memory-monitor]``."""

    sample_every: int = Field(10, ge=1)
    """Sample RSS (and MPS memory) every this many steps, plus at each epoch's start and end."""
    include_children: bool = True
    """Also sample the summed RSS of child processes (data-loader workers)."""


class MemoryMonitorPlugin:
    """Peak memory per epoch (CPU RSS, CUDA allocator, MPS) in the epoch metrics and the summary."""

    Options = MemoryMonitorOptions

    def __init__(self, options: MemoryMonitorOptions | None = None) -> None:
        self.options = options or MemoryMonitorOptions()
        self.epochs: list[dict[str, Any]] = []
        self.samples = 0
        self._proc = psutil.Process()
        self._device: torch.device | None = None
        self._countdown = self.options.sample_every
        self._epoch_steps = 0
        self._process_peak = 0
        self._children: list[psutil.Process] | None = None
        self._children_age = 0
        self._reset_peaks()

    # ------------------------------------------------------------------ sampling

    def _reset_peaks(self) -> None:
        self._rss_peak = 0
        self._children_peak = 0
        self._mps_alloc_peak = 0
        self._mps_driver_peak = 0

    def _children_rss(self, refresh: bool) -> int:
        """Summed RSS of child processes. Listing them scans every process of the machine
        (milliseconds), so the list is kept and refreshed every ``_REFRESH`` samples, at epoch ends
        and when a child has exited; reading a known child's RSS is one /proc read."""
        if refresh or self._children is None or self._children_age >= _REFRESH:
            self._children, self._children_age = self._proc.children(recursive=True), 0
        self._children_age += 1
        total = 0
        for child in self._children:
            try:
                total += child.memory_info().rss
            except psutil.Error:  # a worker that exited (e.g. the loader restarted)
                self._children = None
        return total

    def sample(self, refresh: bool = False) -> None:
        """Read the current memory figures and keep the epoch's maxima (no device sync)."""
        self.samples += 1
        self._rss_now = self._proc.memory_info().rss
        self._rss_peak = max(self._rss_peak, self._rss_now)
        if self.options.include_children:
            self._children_peak = max(self._children_peak, self._children_rss(refresh))
        if self._device is not None and self._device.type == "mps":
            self._mps_alloc_peak = max(self._mps_alloc_peak, torch.mps.current_allocated_memory())
            self._mps_driver_peak = max(self._mps_driver_peak, torch.mps.driver_allocated_memory())

    def _start_epoch(self) -> None:
        self._reset_peaks()
        self._epoch_steps = 0
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        self.sample()

    def _epoch_figures(self) -> dict[str, float]:
        """The figures of the epoch so far, in MiB, keyed as they appear in the metrics."""
        self.sample(refresh=True)
        out: dict[str, float] = {"mem/cpu_rss_peak_mb": self._rss_peak / MB, "mem/cpu_rss_mb": self._rss_now / MB}
        peak = process_max_rss_mb()
        if peak is not None:  # the kernel updates ru_maxrss lazily: never report less than a sample
            self._process_peak = max(self._process_peak, self._rss_peak)
            out["mem/process_max_rss_mb"] = max(peak, self._process_peak / MB)
        if self.options.include_children and self._children_peak:
            out["mem/children_rss_peak_mb"] = self._children_peak / MB
        dev = self._device
        if dev is not None and dev.type == "cuda":
            out["mem/cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / MB
            out["mem/cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved(dev) / MB
        if dev is not None and dev.type == "mps":
            out["mem/mps_allocated_peak_mb"] = self._mps_alloc_peak / MB
            out["mem/mps_driver_peak_mb"] = self._mps_driver_peak / MB
        return out

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def on_train_start(self, trainer: Trainer) -> None:
        """Remember the device; the first epoch's peaks start here."""
        self._device = trainer.device
        self._start_epoch()

    @hookimpl
    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Reset the epoch's peaks (CUDA: ``reset_peak_memory_stats``)."""
        self._start_epoch()

    @hookimpl
    def on_step(self, trainer: Trainer, loss: Any) -> None:
        """Every ``sample_every`` steps: one sample (a /proc read, no device sync)."""
        self._epoch_steps += 1
        self._countdown -= 1
        if self._countdown <= 0:
            self._countdown = self.options.sample_every
            self.sample()

    @hookimpl
    def on_epoch(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        """Add the epoch's peaks to its metrics record and keep them for the summary."""
        figures = self._epoch_figures()
        metrics.update(figures)
        self.epochs.append({"epoch": epoch, "step": trainer.state.step, **figures})
        self._epoch_steps = 0

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """``summary["memory-monitor"]``: per-epoch peaks (and the unfinished epoch), overall peaks."""
        epochs = list(self.epochs)
        if self._epoch_steps or not epochs:
            epochs.append({"epoch": trainer.state.epoch, "step": trainer.state.step, "partial": True, **self._epoch_figures()})
        keys = sorted({k for e in epochs for k in e if k.startswith("mem/") and k != "mem/cpu_rss_mb"})
        summary[NAME] = {
            "device": str(self._device),
            "sample_every": self.options.sample_every,
            "samples": self.samples,
            "epochs": epochs,
            "peak": {k: max(e[k] for e in epochs if k in e) for k in keys},
        }

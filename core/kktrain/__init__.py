"""kktrain: a PyTorch trainer whose core is small and whose features are plugins.

The public API; plugins import only from here. Names load on first use (PEP 562), so
``import kktrain`` (and kktrain's pytest plugin, loaded by every pytest session where kktrain is
installed) does not import torch until something is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "FitResult": "kktrain.api",
    "fit": "kktrain.api",
    "load_model": "kktrain.api",
    "validate": "kktrain.api",
    "batch_size_of": "kktrain.batch",
    "split_batch": "kktrain.batch",
    "to_device": "kktrain.batch",
    "load_checkpoint": "kktrain.checkpoint",
    "PluginOptions": "kktrain.config",
    "RunConfig": "kktrain.config",
    "smaller_is_better": "kktrain.config",
    "CheckpointError": "kktrain.errors",
    "ConfigError": "kktrain.errors",
    "KKTrainError": "kktrain.errors",
    "PluginError": "kktrain.errors",
    "TrainingAborted": "kktrain.errors",
    "CpuInfo": "kktrain.hardware",
    "GpuInfo": "kktrain.hardware",
    "HardwareInfo": "kktrain.hardware",
    "detect_hardware": "kktrain.hardware",
    "StepRetry": "kktrain.hookspecs",
    "hookimpl": "kktrain.hookspecs",
    "hookspec": "kktrain.hookspecs",
    "Phase": "kktrain.phases",
    "gradient_health": "kktrain.preflight",
    "BoundTask": "kktrain.task",
    "KeyedDataset": "kktrain.task",
    "SampleKey": "kktrain.task",
    "Task": "kktrain.task",
    "Trainer": "kktrain.trainer",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    """Import a public name on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kktrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from kktrain.api import FitResult, fit, load_model, validate
    from kktrain.batch import batch_size_of, split_batch, to_device
    from kktrain.checkpoint import load_checkpoint
    from kktrain.config import PluginOptions, RunConfig, smaller_is_better
    from kktrain.errors import CheckpointError, ConfigError, KKTrainError, PluginError, TrainingAborted
    from kktrain.hardware import CpuInfo, GpuInfo, HardwareInfo, detect_hardware
    from kktrain.hookspecs import StepRetry, hookimpl, hookspec
    from kktrain.phases import Phase
    from kktrain.preflight import gradient_health
    from kktrain.task import BoundTask, KeyedDataset, SampleKey, Task
    from kktrain.trainer import Trainer

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
    "load_checkpoint": "kktrain.checkpoint",
    "RunConfig": "kktrain.config",
    "CheckpointError": "kktrain.errors",
    "ConfigError": "kktrain.errors",
    "KKTrainError": "kktrain.errors",
    "PluginError": "kktrain.errors",
    "TrainingAborted": "kktrain.errors",
    "HardwareInfo": "kktrain.hardware",
    "HardwareProfile": "kktrain.hardware",
    "Plan": "kktrain.hardware",
    "detect": "kktrain.hardware",
    "load_profiles": "kktrain.hardware",
    "match_profile": "kktrain.hardware",
    "plan": "kktrain.hardware",
    "profile_by_name": "kktrain.hardware",
    "hookimpl": "kktrain.hookspecs",
    "hookspec": "kktrain.hookspecs",
    "Phase": "kktrain.phases",
    "SampleKey": "kktrain.task",
    "Task": "kktrain.task",
    "StepRetry": "kktrain.trainer",
    "Trainer": "kktrain.trainer",
    "batch_size_of": "kktrain.trainer",
    "split_batch": "kktrain.trainer",
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
    from kktrain.checkpoint import load_checkpoint
    from kktrain.config import RunConfig
    from kktrain.errors import CheckpointError, ConfigError, KKTrainError, PluginError, TrainingAborted
    from kktrain.hardware import (
        HardwareInfo,
        HardwareProfile,
        Plan,
        detect,
        load_profiles,
        match_profile,
        plan,
        profile_by_name,
    )
    from kktrain.hookspecs import hookimpl, hookspec
    from kktrain.phases import Phase
    from kktrain.task import SampleKey, Task
    from kktrain.trainer import StepRetry, Trainer, batch_size_of, split_batch

"""kktrain: a PyTorch trainer whose core is small and whose features are plugins.

The public API; plugins import only from here.
"""

from __future__ import annotations

__version__ = "0.1.0"

from kktrain.checkpoint import load_checkpoint
from kktrain.config import RunConfig
from kktrain.errors import CheckpointError, ConfigError, KKTrainError, PluginError, TrainingAborted
from kktrain.hardware import HardwareInfo, HardwareProfile, Plan, detect, load_profiles, match_profile, plan, profile_by_name
from kktrain.hookspecs import hookimpl, hookspec
from kktrain.phases import Phase
from kktrain.task import SampleKey, Task
from kktrain.trainer import StepRetry, Trainer, batch_size_of, split_batch

__all__ = [
    "CheckpointError",
    "ConfigError",
    "HardwareInfo",
    "HardwareProfile",
    "Plan",
    "KKTrainError",
    "Phase",
    "PluginError",
    "RunConfig",
    "SampleKey",
    "StepRetry",
    "Task",
    "Trainer",
    "TrainingAborted",
    "__version__",
    "batch_size_of",
    "detect",
    "hookimpl",
    "hookspec",
    "load_checkpoint",
    "load_profiles",
    "match_profile",
    "plan",
    "profile_by_name",
    "split_batch",
]

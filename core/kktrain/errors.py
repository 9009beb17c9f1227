"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class KKTrainError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""

    exit_code = 2


class ConfigError(KKTrainError):
    """A config value, key, file or flag is wrong."""


class PluginError(KKTrainError):
    """A plugin is unknown, fails to load or has bad options."""


class CheckpointError(KKTrainError):
    """A checkpoint is missing, corrupt or does not fit the model."""


class TrainingCrashed(KKTrainError):
    """The run died of an unhandled error; it left a checkpoint and a summary (:mod:`kktrain.crash`)."""

    exit_code = 1


class TrainingAborted(KKTrainError):
    """A guard stopped the run on purpose (too many rollbacks, NaN with policy=stop ...)."""

    exit_code = 3

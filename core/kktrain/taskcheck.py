"""Checks a task at set-up, before the run directory exists: one line naming all that is wrong.

A user's task fails in ways a traceback deep inside torch explains badly: a dataset without
``len``, an ``IterableDataset``, a loss that is a vector, metrics that are strings, a dataset whose
items do not fit the model. :func:`check_first_batch` runs one batch through ``loss`` (and one
validation batch through ``metrics``) in eval mode without gradients, with every RNG and the
model's mode put back, so a run that passes it trains exactly as it would have without it.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import torch

from kktrain.batch import to_device
from kktrain.data import sample_seed
from kktrain.errors import ConfigError
from kktrain.state import rng_state, set_rng_state
from kktrain.task import SampleKey, is_keyed

if TYPE_CHECKING:
    from kktrain.task import BoundTask
    from kktrain.trainer import Trainer


def check_dataset(task: BoundTask, dataset: Any, what: str) -> Any:
    """``dataset`` if it is a map-style dataset with a length, else a one-line ConfigError."""
    owner = f"task '{task.name}': {what}"
    if dataset is None:
        raise ConfigError(f"{owner} returned None: return a torch.utils.data.Dataset (TensorDataset, your own class, ...)")
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise ConfigError(
            f"{owner} is an IterableDataset: kktrain owns the data order (that is what makes a resume exact), so it "
            "needs a map-style dataset with __len__ and __getitem__(int); materialise it or index it yourself"
        )
    if not hasattr(dataset, "__getitem__") and not hasattr(dataset, "__getitems__"):
        raise ConfigError(f"{owner} is a {type(dataset).__name__} without __getitem__: return a map-style Dataset")
    try:
        size = len(dataset)
    except TypeError:
        raise ConfigError(f"{owner} is a {type(dataset).__name__} without __len__: give the dataset a length") from None
    if size == 0:
        raise ConfigError(f"{owner} is empty: it needs at least one sample")
    return dataset


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _first_items(dataset: Any, count: int, seed: int, knobs: Any) -> list[Any]:
    keys: list[Any] = list(range(min(count, len(dataset))))
    if is_keyed(dataset):
        keys = [SampleKey(i, sample_seed(seed, 0, i), dict(knobs)) for i in keys]
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(keys)
    return [dataset[k] for k in keys]


def check_first_batch(trainer: Trainer) -> None:
    """Run ``loss`` on the first training batch (and ``metrics`` on a validation batch)."""
    task, cfg = trainer.task, trainer.config
    model = trainer.model
    problems: list[str] = []
    saved_rng = rng_state()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                items = _first_items(trainer.data.dataset, cfg.batch_size, cfg.seed, trainer.state.knobs)
                batch = to_device(task.collate(items), trainer.device)
            except Exception as e:  # noqa: BLE001 - the user's data code, reported in one line
                raise ConfigError(
                    f"task '{task.name}': building the first training batch failed ({type(e).__name__}: {_short(e)}): "
                    "check train_dataset()'s items and collate()"
                ) from None
            try:
                loss = task.loss(model, batch)
            except Exception as e:  # noqa: BLE001
                raise ConfigError(
                    f"task '{task.name}': loss(model, batch) failed on the first batch ({type(e).__name__}: {_short(e)}): "
                    "check that train_dataset() returns what the model expects"
                ) from None
            if not isinstance(loss, torch.Tensor):
                problems.append(f"loss() returned {_describe(loss)}, not a tensor (return the loss tensor itself, never .item())")
            elif loss.numel() != 1 or loss.dim() > 1:
                problems.append(f"loss() returned {_describe(loss)}, not a scalar (reduce it, e.g. with .mean())")
            elif not loss.is_floating_point():
                problems.append(f"loss() returned a {loss.dtype} tensor: it must be floating point to back-propagate")
            metric_names: set[str] | None = None
            if task.has("metrics") and task.has("val_dataset") and not task.has("validate"):
                found, metric_names = _check_metrics(trainer)
                problems += found
    finally:
        model.train(was_training)
        set_rng_state(saved_rng)
    best = cfg.checkpoint.best_metric
    if best and not problems and not task.has("validate") and not _plugin_validates(trainer):
        produced = _produced_metrics(trainer, metric_names)
        if produced is not None and best not in produced:
            problems.append(
                f"checkpoint.best_metric = {best!r} is not a validation metric of this task "
                f"(it has {', '.join(sorted(produced)) or 'none'})"
            )
    if problems:
        raise ConfigError(f"task '{task.name}': " + "; ".join(problems))


def _plugin_validates(trainer: Trainer) -> bool:
    return any(i.plugin is not trainer.defaults for i in trainer.hook.validate.get_hookimpls())


def _produced_metrics(trainer: Trainer, metric_names: set[str] | None) -> set[str] | None:
    """The ``val/`` names the core's validation loop will log, when they can be known now."""
    task = trainer.task
    if not task.has("val_dataset"):
        return set()
    if not task.has("metrics"):
        return {"val/loss"}
    return metric_names


def _check_metrics(trainer: Trainer) -> tuple[list[str], set[str] | None]:
    task = trainer.task
    try:
        dataset = check_dataset(task, task.val_dataset(), "val_dataset()")
        items = _first_items(dataset, trainer.config.data.val_batch_size or trainer.config.batch_size, trainer.config.seed, {})
        batch = to_device(task.collate(items), trainer.device)
        values = task.metrics(trainer.model, batch)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"task '{task.name}': metrics(model, batch) failed on the first validation batch ({type(e).__name__}: "
            f"{_short(e)}): check val_dataset() and metrics()"
        ) from None
    if not isinstance(values, dict):
        return [f"metrics() returned {_describe(values)}, not a dict of name -> number"], None
    bad = []
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                bad.append(f"metrics()[{key!r}] is {_describe(value)}, not one number")
        elif not isinstance(value, numbers.Real) or isinstance(value, bool):
            bad.append(f"metrics()[{key!r}] is {_describe(value)}, not a number")
    names = {k if "/" in k and k.split("/", 1)[0].startswith("val") else f"val/{k}" for k in values}
    return bad, names


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 160 else text[:157] + "..."

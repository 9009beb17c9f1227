"""What a task is: your model, your data and your loss; everything else is optional.

A task is any object with three methods::

    class CNNTask:
        def build_model(self):            return SmallCNN()
        def train_dataset(self):          return TensorDataset(x, y)     # any map-style Dataset
        def loss(self, model, batch):     x, y = batch; return F.cross_entropy(model(x), y)

Optional, each with a default (:class:`BoundTask` supplies it, so the core never asks twice):

============================  =====================================================================
``name``                      the run directory's and the summary's name; default: the class name
                              without ``Task``, in kebab case (``CNNTask`` -> ``cnn``), or the
                              entry-point name
``collate(items)``            torch's ``default_collate``
``val_dataset()``             held-out data: the core runs the batched validation loop itself
``metrics(model, batch)``     ``{"acc": tensor or float, ...}`` per validation batch, averaged by
                              batch size; without it the validation metric is ``loss``
``validate(model, device)``   full control of validation (returns ``{"name": float}``); wins over
                              ``val_dataset``/``metrics``
``config_defaults()``         core config values this task recommends (``{"batch_size": 128}``)
``default_knobs()``,          knobs a curriculum may turn, and how the task applies them in the
``set_knobs(knobs)``          main process (loss weights); default: none
``checkpoint_blocks(model)``  the blocks worth activation checkpointing; default: none
``example_input()``           a model input for export (a tensor or a tuple of them); default: the
                              first training batch's inputs when ``batch`` is ``(inputs, target)``
============================  =====================================================================

A task is made by a *factory*: a callable named by ``--task module:factory`` or registered in the
entry-point group ``kktrain.tasks``; a class is a factory too. When the factory has an
``Options`` attribute (a pydantic model), the ``[task]`` table of the config and
``-o task.KEY=VALUE`` are validated against it and the factory is called with the model instance.

Data and exact resume
---------------------
The core owns the order of the data: an epoch is a permutation of ``range(len(dataset))`` drawn
from ``(seed, epoch)``, cut into batches (sharded by rank under torchrun); the position is
``(epoch, batch)``. A plain map-style dataset is asked for ``dataset[i]`` with an int, as a
DataLoader would: a resume lands on the exact next batch whenever items depend only on their
index (any number of workers), and also with random augmentation drawn from the global RNGs when
``data.workers = 0`` (those RNGs are in the checkpoint). A dataset that needs a per-sample seed or
the curriculum's knobs *in worker processes* opts in to :class:`SampleKey` by setting the class
attribute ``sample_keys = True`` (or subclassing :class:`KeyedDataset`): it is then asked for
``dataset[SampleKey(index, seed, knobs)]``; use ``key.seed`` for any randomness and it resumes
bit-exactly with any number of workers, and knob changes reach the workers with the keys. A
dataset may implement ``__getitems__(indices_or_keys)`` to build a whole batch at once.
An ``IterableDataset`` is refused: the core cannot own its order, so it could not resume exactly.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import torch

from kktrain.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import BaseModel

REQUIRED = ("build_model", "train_dataset", "loss")
OPTIONAL = ("collate", "val_dataset", "metrics", "validate", "config_defaults", "default_knobs", "set_knobs",
            "checkpoint_blocks", "example_input")


class SampleKey(NamedTuple):
    """One item the data loader asks a keyed dataset for (``sample_keys = True``)."""

    index: int  # type: ignore[assignment]  # a field named like tuple.index, kept for readability
    seed: int
    knobs: Mapping[str, Any]


class KeyedDataset(torch.utils.data.Dataset):
    """Base of a dataset indexed by :class:`SampleKey` (per-sample seed and knobs) instead of int."""

    sample_keys = True


@runtime_checkable
class Task(Protocol):
    """The three methods every task has (structural: no base class needed)."""

    def build_model(self) -> torch.nn.Module:
        """A freshly initialised model (the core seeds the global RNG before calling this)."""

    def train_dataset(self) -> torch.utils.data.Dataset:
        """The training data: a map-style dataset with ``len`` (indexed by int, or by SampleKey)."""

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Forward and loss for one (micro-)batch: a scalar tensor, never ``.item()``-ed here."""


def default_name(obj: Any) -> str:
    """``CNNTask`` -> ``cnn``, ``SudokuNetTask`` -> ``sudoku-net``, ``make_chess`` -> ``chess``."""
    raw = getattr(obj, "__name__", None) or type(obj).__name__
    raw = re.sub(r"(Task|_task)$", "", raw) or raw
    raw = re.sub(r"^(make|build|create)_", "", raw)
    kebab = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", raw).replace("_", "-").lower()
    return kebab.strip("-") or "task"


def is_keyed(dataset: Any) -> bool:
    """Whether the dataset asks for :class:`SampleKey` items (``sample_keys = True``)."""
    return bool(getattr(dataset, "sample_keys", False))


class BoundTask:
    """The user's task with every optional method filled in by its documented default.

    The core and plugins talk to this object (``trainer.task``); attributes it does not define
    come from the user's task (``trainer.task.options`` ...). ``task.wrapped`` is the original.
    """

    def __init__(self, task: Any, *, name: str | None = None, spec: str | None = None) -> None:
        if isinstance(task, BoundTask):
            task = task.wrapped
        self.wrapped: Any = task
        self.name: str = str(getattr(task, "name", None) or name or default_name(task))
        self.spec = spec
        """How to import the task's factory again (``latin``, ``mypkg.tasks:make``), or None."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.wrapped, attr)

    def has(self, method: str) -> bool:
        """Whether the user's task defines ``method`` itself."""
        return callable(getattr(self.wrapped, method, None))

    # the required three
    def build_model(self) -> torch.nn.Module:
        """The user's ``build_model()``."""
        return self.wrapped.build_model()

    def train_dataset(self) -> Any:
        """The user's ``train_dataset()``."""
        return self.wrapped.train_dataset()

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The user's ``loss(model, batch)``."""
        return self.wrapped.loss(model, batch)

    # the optional ones
    def collate(self, items: Any) -> Any:
        """The task's ``collate``, else torch's ``default_collate``."""
        if self.has("collate"):
            return self.wrapped.collate(items)
        return torch.utils.data.default_collate(items)

    def val_dataset(self) -> Any:
        """The task's held-out dataset, or None."""
        return self.wrapped.val_dataset() if self.has("val_dataset") else None

    def config_defaults(self) -> dict[str, Any]:
        """The task's recommended core config, or nothing."""
        return dict(self.wrapped.config_defaults()) if self.has("config_defaults") else {}

    def default_knobs(self) -> dict[str, Any]:
        """The task's knobs with their starting values, or none."""
        return dict(self.wrapped.default_knobs()) if self.has("default_knobs") else {}

    def set_knobs(self, knobs: Mapping[str, Any]) -> None:
        """Apply knobs in the main process (a no-op for a task without knobs)."""
        if self.has("set_knobs"):
            self.wrapped.set_knobs(knobs)

    def checkpoint_blocks(self, model: torch.nn.Module) -> Sequence[torch.nn.Module]:
        """The blocks worth activation checkpointing, or none."""
        return list(self.wrapped.checkpoint_blocks(model)) if self.has("checkpoint_blocks") else []

    def example_input(self) -> Any:
        """A model input for export, or None when the task cannot say."""
        return self.wrapped.example_input() if self.has("example_input") else None

    @property
    def validates(self) -> bool:
        """Whether this task has any validation (``validate`` or ``val_dataset``)."""
        return self.has("validate") or self.has("val_dataset")


def missing_methods(task: Any) -> list[str]:
    """The required methods ``task`` lacks (or has as non-callables)."""
    return [m for m in REQUIRED if not callable(getattr(task, m, None))]


# ---------------------------------------------------------------------------------------------
# Making a task from its spec
# ---------------------------------------------------------------------------------------------

TASK_GROUP = "kktrain.tasks"
_SPEC_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _current_directory_importable() -> None:
    """``--task mytask:make`` finds ``./mytask.py``, as ``python -m`` and uvicorn would.

    Only specs the user typed are imported (a checkpoint's or run directory's spec never is
    without the user naming it: :func:`kktrain.config.assemble`), so this adds no way in.
    """
    import os
    import sys

    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def resolve_task_factory(spec: str) -> Callable[..., Any]:
    """``latin`` (entry point in ``kktrain.tasks``) or ``package.module:factory``."""
    from kktrain.manager import installed_entry_points

    if ":" in spec:
        if not _SPEC_RE.match(spec):
            raise ConfigError(f"task '{spec}' is not NAME or module:factory: write it like mypkg.tasks:make_task")
        module_name, _, attr = spec.partition(":")
        _current_directory_importable()
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"task '{spec}': cannot import module '{module_name}' ({e}): check --task and PYTHONPATH") from None
        factory: Any = module
        for part in attr.split("."):
            factory = getattr(factory, part, None)
        if factory is None:
            raise ConfigError(f"task '{spec}': module '{module_name}' has no '{attr}': check the name after the colon")
        if not callable(factory):
            raise ConfigError(f"task '{spec}': '{attr}' is a {type(factory).__name__}, not a factory: name a function or class that returns the task")
        return factory
    eps = installed_entry_points(TASK_GROUP)
    if spec not in eps:
        import difflib

        close = difflib.get_close_matches(spec, list(eps), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        known = ", ".join(sorted(eps)) or "(none)"
        raise ConfigError(f"unknown task '{spec}': {hint}installed tasks are {known} (see `kktrain tasks`), or give module:factory")
    try:
        return eps[spec].load()
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"task '{spec}' failed to load ({type(e).__name__}: {e}): reinstall its distribution") from None


def make_task(spec: str, options: Mapping[str, Any]) -> tuple[BoundTask, BaseModel | None]:
    """Build a task from its spec and option table; check it has the three required methods."""
    from kktrain.config import validate_options
    from kktrain.manager import options_model

    factory = resolve_task_factory(spec)
    model = options_model(factory)
    opts = validate_options(model, options, f"task '{spec}'")
    try:
        task = factory(opts) if model is not None else factory()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"task '{spec}': its factory failed ({type(e).__name__}: {e}): check the task's options") from None
    check_task_object(task, f"task '{spec}'")
    # An entry point's name is the task's name; a module:factory task is named after its class.
    return BoundTask(task, name=spec if ":" not in spec else None, spec=spec), opts


def check_task_object(task: Any, owner: str) -> None:
    """One line naming every required method the task lacks."""
    if task is None or isinstance(task, (str, int, float, bool, bytes, list, dict, tuple)):
        raise ConfigError(f"{owner} is a {type(task).__name__}, not a task: the factory must return an object with build_model(), train_dataset() and loss(model, batch)")
    missing = missing_methods(task)
    if missing:
        raise ConfigError(
            f"{owner} ({type(task).__name__}) lacks {', '.join(f'{m}()' for m in missing)}: a task needs "
            "build_model(), train_dataset() and loss(model, batch); see docs/your-model.md"
        )


PYTHON_TASK = "<python>"
"""``config.task`` of a run whose task object cannot be imported again (see :func:`recorded_spec`)."""


def recorded_spec(task: Any) -> str:
    """What ``config.task`` records for a task object: an importable spec, or a marker that a
    resume from the command line cannot rebuild (``<python> __main__.CNNTask``)."""
    if isinstance(task, BoundTask) and task.spec:
        return task.spec
    inner = task.wrapped if isinstance(task, BoundTask) else task
    spec = importable_spec(inner)
    return spec if spec is not None else f"{PYTHON_TASK} {type(inner).__module__}.{type(inner).__qualname__}"


def importable_spec(task: Any) -> str | None:
    """``module:Class`` for a task object whose class can be imported again and built with no
    arguments (so ``kktrain run --resume`` can rebuild it), else None (defined in ``__main__``, a
    notebook, or needing arguments)."""
    import inspect

    cls = type(task)
    module = getattr(cls, "__module__", "")
    if not module or module == "__main__" or "<locals>" in cls.__qualname__:
        return None
    try:
        found = importlib.import_module(module)
        for part in cls.__qualname__.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    if found is not cls:
        return None
    try:
        needed = [p for p in inspect.signature(cls).parameters.values()
                  if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        return None
    return f"{module}:{cls.__qualname__}" if not needed else None

"""The Python API: ``kktrain.fit`` and ``kktrain.load_model`` (docs/python-api.md).

``fit`` goes through the same config assembly as ``kktrain run`` (:func:`kktrain.config.assemble`):
defaults < the task's defaults < a resumed run < ``config_file`` < ``KKTRAIN_*`` env < ``options``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kktrain.errors import CheckpointError, ConfigError


@dataclass
class FitResult:
    """What :func:`fit` returns: the summary, the trained model, where the run lives."""

    summary: dict[str, Any]
    model: torch.nn.Module
    run_dir: Path
    trainer: Any

    @property
    def status(self) -> str:
        """``completed``, ``stopped``, ``interrupted``, ``paused`` or ``aborted``."""
        return str(self.summary.get("status"))

    @property
    def metrics(self) -> dict[str, float]:
        """The last validation metrics (``val/...``)."""
        return dict(self.summary.get("final", {}))


class FunctionTask:
    """A task made of plain pieces: ``fit(model=..., train_dataset=..., loss_fn=...)``.

    ``model`` is a module (trained in place, its initial weights as given) or a zero-argument
    callable returning one. ``loss_fn(model, batch)`` or, when it takes two arguments that are not
    the model, ``loss_fn(outputs, target)`` for ``batch = (inputs, target)``. ``metrics(model,
    batch)`` the same way (``metrics(outputs, target)``).
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module | Callable[[], torch.nn.Module],
        train_dataset: Any,
        loss_fn: Callable[..., torch.Tensor],
        val_dataset: Any = None,
        metrics: Callable[..., Mapping[str, Any]] | None = None,
        collate: Callable[[Any], Any] | None = None,
        name: str | None = None,
    ) -> None:
        self._model = model
        self._train = train_dataset
        self._val = val_dataset
        self._loss = loss_fn
        self._metrics = metrics
        self._collate = collate
        inner = model if isinstance(model, torch.nn.Module) else None
        from kktrain.task import default_name

        self.name = name or (default_name(type(inner)) if inner is not None else "model")
        if val_dataset is None:
            self.val_dataset = None  # type: ignore[assignment]  # no validation: BoundTask sees none
        if metrics is None:
            self.metrics = None  # type: ignore[assignment]
        if collate is None:
            self.collate = None  # type: ignore[assignment]
        self._initial: dict[str, torch.Tensor] | None = None
        if inner is not None:  # every build starts from the weights the user handed in
            self._initial = {k: v.detach().clone() for k, v in inner.state_dict().items()}

    def build_model(self) -> torch.nn.Module:
        """The user's module (reset to the weights it came with), or a fresh one from the callable."""
        if isinstance(self._model, torch.nn.Module):
            if self._initial is not None:
                self._model.load_state_dict(self._initial)
            return self._model
        return self._model()

    def train_dataset(self) -> Any:
        """The training dataset as given."""
        return self._train

    def val_dataset(self) -> Any:
        """The validation dataset as given."""
        return self._val

    def collate(self, items: Any) -> Any:
        """The given collate function."""
        assert self._collate is not None
        return self._collate(items)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """``loss_fn(model, batch)`` or ``loss_fn(model(inputs), target)``."""
        return _call_on_batch(self._loss, model, batch)

    def metrics(self, model: torch.nn.Module, batch: Any) -> Mapping[str, Any]:
        """``metrics(model, batch)`` or ``metrics(model(inputs), target)``."""
        assert self._metrics is not None
        return _call_on_batch(self._metrics, model, batch)

    def example_input(self) -> Any:
        """The inputs of the first training sample, as a batch of one."""
        first = torch.utils.data.default_collate([self._train[0]])
        return first[0] if isinstance(first, (list, tuple)) else first


def _takes_outputs(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is ``f(outputs, target)`` (like torch's losses), not ``f(model, batch)``."""
    import inspect

    if isinstance(fn, torch.nn.Module):  # nn.CrossEntropyLoss() and friends
        return True
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return True
    return not (params and params[0] in ("model", "module", "net"))


def _call_on_batch(fn: Callable[..., Any], model: torch.nn.Module, batch: Any) -> Any:
    if not _takes_outputs(fn):
        return fn(model, batch)
    if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
        raise ConfigError(
            "loss_fn(outputs, target) needs batches of (inputs, target); for other batches write "
            "loss_fn(model, batch) (its first argument named model)"
        )
    inputs, target = batch
    return fn(model(inputs), target)


def fit(
    task: Any = None,
    *,
    model: torch.nn.Module | Callable[[], torch.nn.Module] | None = None,
    train_dataset: Any = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    val_dataset: Any = None,
    metrics: Callable[..., Mapping[str, Any]] | None = None,
    collate: Callable[[Any], Any] | None = None,
    plugins: Sequence[str | object] = (),
    options: Mapping[str, Any] | None = None,
    out: str | os.PathLike[str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    resume: str | None = None,
    quiet: bool = False,
) -> FitResult:
    """Train ``task`` (a task object, or a spec like ``"latin"`` / ``"mypkg.tasks:make"``), or a
    model and dataset with no task class at all; return the summary, the model and the run dir.

    ``plugins`` are names (``"ema"``) or plugin objects; ``options`` dotted keys as on the command
    line (``{"batch_size": 32, "ema.decay": 0.99, "optimizer.name": "sgd"}``). Bad input raises
    :class:`kktrain.ConfigError` (or another ``KKTrainError``) before anything is written.
    """
    from kktrain.config import assemble
    from kktrain.trainer import Trainer

    if model is not None or train_dataset is not None or loss_fn is not None:
        if task is not None:
            raise ConfigError("fit() takes a task or model/train_dataset/loss_fn, not both")
        missing = [n for n, v in (("model", model), ("train_dataset", train_dataset), ("loss_fn", loss_fn)) if v is None]
        if missing:
            raise ConfigError(f"fit(model=..., train_dataset=..., loss_fn=...) is missing {', '.join(missing)}")
        assert model is not None and loss_fn is not None
        task = FunctionTask(model=model, train_dataset=train_dataset, loss_fn=loss_fn, val_dataset=val_dataset,
                            metrics=metrics, collate=collate)
    elif val_dataset is not None or metrics is not None or collate is not None:
        raise ConfigError("val_dataset/metrics/collate go with model=... and train_dataset=...; a task object defines them itself")
    names = [p for p in plugins if isinstance(p, str)]
    objects = [p for p in plugins if not isinstance(p, str)]
    flags = {"out": str(out)} if out is not None else {}
    assembly = assemble(task=task, plugins=names, options=options, flags=flags, config_file=config_file,
                        resume=resume, instances=objects)
    trainer = Trainer.from_assembly(assembly, plugins=objects, resume=resume, quiet=quiet)
    trainer.setup()
    assembly.log_notes(trainer.log)
    summary = trainer.fit()
    assert trainer.run_dir is not None
    return FitResult(summary, trainer.model, trainer.run_dir, trainer)


# ---------------------------------------------------------------------------------------------
# Getting the model back
# ---------------------------------------------------------------------------------------------


def checkpoint_of(path: str | os.PathLike[str]) -> Path:
    """The checkpoint a run directory stands for (``final.pt`` or a sharded ``final/``, else the
    newest verified one); a sharded one loads consolidated (:func:`kktrain.load_checkpoint`)."""
    from kktrain import checkpoint as ckpt

    from kktrain import dcp

    p = Path(path)
    if p.is_file() or dcp.is_sharded(p):
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p} does not exist: give a run directory or a checkpoint file")
    directory = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    for final in (directory / "final.pt", directory / "final"):  # one file, or sharded (torchrun)
        if final.exists() and ckpt.verify(final)[0]:
            return final
    newest = ckpt.newest_valid(directory, lambda message: None)
    if newest is None:
        raise CheckpointError(f"{p} holds no verified checkpoint: give a run directory that has one, a .pt file or a sharded checkpoint directory")
    return newest


def weight_sets(payload: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The model weights a checkpoint holds: ``raw`` (the training weights), plus one set per
    plugin whose state has ``weights`` (a model state dict, like the ema plugin's average)."""
    sets = {"raw": dict(payload["model"])}
    for name, state in (payload.get("plugins") or {}).items():
        if isinstance(state, Mapping) and isinstance(state.get("weights"), Mapping) and state["weights"]:
            sets[name] = {**sets["raw"], **state["weights"]}
    return sets


def model_weights(payload: Mapping[str, Any], weights: str, source: str) -> dict[str, torch.Tensor]:
    """One of :func:`weight_sets`: ``raw``, a plugin's name (``ema``), or ``auto`` (a plugin's set
    when there is exactly one, else raw)."""
    sets = weight_sets(payload)
    if weights == "auto":
        plugin_sets = [k for k in sets if k != "raw"]
        return sets[plugin_sets[0]] if len(plugin_sets) == 1 else sets["raw"]
    if weights not in sets:
        have = ", ".join(sorted(sets))
        raise CheckpointError(f"{source} has no {weights!r} weights (it has: {have}): pick one of those, or 'auto'")
    return sets[weights]


def load_model(
    run: str | os.PathLike[str],
    *,
    weights: str = "auto",
    task: Any = None,
    device: str | torch.device = "cpu",
    model: torch.nn.Module | Callable[[], torch.nn.Module] | None = None,
) -> torch.nn.Module:
    """The trained model of a run directory (or a checkpoint file), in eval mode, ready to use.

    ``model``: a module (or a factory of one) to load the weights into instead of rebuilding it
    from the task, as for a ``kktrain.fit(model=..., train_dataset=..., loss_fn=...)`` run.

    The model is rebuilt from the run's saved task spec and options; ``weights`` = ``"raw"`` (the
    training weights), the name of a plugin that keeps its own weights (``"ema"``: the average)
    or ``"auto"`` (that plugin's weights when the run has them, else raw). kktrain imports code only when you name it: a run of a ``module:factory`` task needs
    ``task="module:factory"`` (or the task object) here, an installed task name does not.
    """
    if model is not None:
        from kktrain.checkpoint import check_model_fit, load_checkpoint

        path = checkpoint_of(run)
        payload = load_checkpoint(path)
        module = model if isinstance(model, torch.nn.Module) else model()
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"load_model(model=...): got a {type(module).__name__}, not a torch.nn.Module (or a function returning one)")
        state = model_weights(payload, weights, str(path))
        check_model_fit(module, state, str(path))
        module.load_state_dict(state)
        return module.to(device).eval()
    return load_task_and_model(run, weights=weights, task=task, device=device)[1]


def load_task_and_model(
    run: str | os.PathLike[str], *, weights: str = "auto", task: Any = None, device: str | torch.device = "cpu",
    options: Mapping[str, Any] | None = None,
) -> tuple[Any, torch.nn.Module]:
    """The run's task (rebuilt) and its trained model: :func:`load_model` with the task too.

    ``options``: task options to change from the saved ones (``{"tta": 4}``), for a task rebuilt
    from its name."""
    from kktrain.checkpoint import load_checkpoint

    path = checkpoint_of(run)
    return _task_and_model(path, load_checkpoint(path), weights=weights, task=task, device=device, options=options)


def _task_and_model(
    path: Path, payload: Mapping[str, Any], *, weights: str, task: Any, device: str | torch.device, options: Mapping[str, Any] | None,
) -> tuple[Any, torch.nn.Module]:
    """:func:`load_task_and_model` for a checkpoint already loaded."""
    from kktrain.checkpoint import check_model_fit
    from kktrain.task import PYTHON_TASK, BoundTask, make_task

    saved = str((payload.get("config") or {}).get("task", ""))
    saved_options = (payload.get("task") or {}).get("options") or {}
    changes = dict(options or {})
    if task is None:
        if saved.startswith(PYTHON_TASK):
            raise ConfigError(
                f"{path} was trained with a task given as a Python object ({saved.removeprefix(PYTHON_TASK).strip()}): "
                "pass that object (load_model(run, task=obj)), or for a kktrain.fit(model=...) run the model "
                "to load the weights into (load_model(run, model=MyModel()))"
            )
        if ":" in saved:
            raise ConfigError(
                f"{path} names the task '{saved}', and kktrain imports code only when you name it: "
                f"add --task {saved} (Python: task={saved!r})"
            )
        task = saved or "latin"
    if isinstance(task, torch.nn.Module) or (isinstance(task, type) and issubclass(task, torch.nn.Module)):
        raise ConfigError(f"task={getattr(task, '__name__', type(task).__name__)} is a model, not a task: pass it as model=... to load the weights into it")
    if not isinstance(task, str) and changes:
        raise ConfigError("task options can be changed only for a task rebuilt from its name: configure the task object you pass instead")
    bound = make_task(task, {**saved_options, **changes})[0] if isinstance(task, str) else BoundTask(task)
    model = bound.build_model()
    state = model_weights(payload, weights, str(path))
    check_model_fit(model, state, str(path))
    model.load_state_dict(state)
    return bound, model.to(device).eval()


def validate(
    run: str | os.PathLike[str], *, weights: str = "auto", task: Any = None, options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu", batch_size: int | None = None, on_start: Callable[[Path], None] | None = None,
) -> dict[str, float]:
    """Validate a run's trained model again, as the run does (``val/NAME`` metrics), without training.

    The task is rebuilt from the checkpoint (``task`` and ``weights`` as for :func:`load_model`);
    ``options`` changes task options first, e.g. validation-only ones (the Latin task's ``tta``,
    ``val_puzzles``, ``val_fill``). Runs ``task.validate(model, device)``, else the batched loop over
    ``task.val_dataset()`` (``task.metrics``, else the loss; ``batch_size`` defaults to the run's
    validation batch size), in eval mode under ``torch.inference_mode()``, with the caller's RNG
    state left as it was. ``val/time_s`` is the time it took. ``on_start(checkpoint)`` is called
    once the model is loaded, before validating (the CLI prints a line).
    """
    import time

    from kktrain.checkpoint import load_checkpoint
    from kktrain.defaults import loader_metrics
    from kktrain.taskcheck import check_dataset
    from kktrain.trainer import _is_prefixed

    dev = torch.device(device)
    path = checkpoint_of(run)
    payload = load_checkpoint(path)
    bound, model = _task_and_model(path, payload, weights=weights, task=task, device=dev, options=options)
    if not bound.validates:
        raise ConfigError("the run's task has no validation (neither validate(model, device) nor val_dataset()): nothing to measure")
    if on_start is not None:
        on_start(path)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []), torch.inference_mode():
        if bound.has("validate"):
            raw = dict(bound.validate(model, dev))
        else:
            if batch_size is None:
                saved = payload.get("config") or {}
                batch_size = int((saved.get("data") or {}).get("val_batch_size") or saved.get("batch_size") or 32)
            dataset = check_dataset(bound, bound.val_dataset(), "val_dataset()")
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=bound.collate)
            raw = loader_metrics(bound, model, loader, dev)
    metrics = {(k if _is_prefixed(k) else f"val/{k}"): float(v) for k, v in raw.items()}
    metrics["val/time_s"] = time.perf_counter() - t0
    return metrics

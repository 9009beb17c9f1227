"""The Trainer: builds a run from its config and plugins, owns the state, saves and restores it.

The loop itself lives in :mod:`kktrain.loop` and reads top to bottom; this module holds what the
loop and the plugins call: set-up, the data iterator, validation, checkpoints, snapshots, logs.
"""

from __future__ import annotations

import copy
import datetime as _dt
import gc
import importlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy
import torch
from pydantic import BaseModel, ValidationError

import kktrain
from kktrain import checkpoint as ckpt
from kktrain import defaults as core_defaults
from kktrain.config import RunConfig, normalise_key, to_toml_dict, validate_options
from kktrain.data import BatchPlan, KeyBatchSampler
from kktrain.errors import CheckpointError, ConfigError, KKTrainError, PluginError
from kktrain.log import make_console, make_logger, write_json_line
from kktrain.manager import (
    TASK_GROUP,
    build_plugin_manager,
    installed_entry_points,
    options_model,
    resolve_plugins,
    trace_to_stderr,
)
from kktrain.state import TrainState, rng_state, seed_everything, set_rng_state
from kktrain.task import Task

_HOT_HOOKS = (
    "forward_loss", "backward", "on_after_backward", "on_before_optimizer_step", "optimizer_step",
    "on_step", "on_step_exception", "on_log",
)


@dataclass(frozen=True)
class StepRetry:
    """Returned from ``on_step_exception``: retry the batch split into ``micro_batches`` pieces.

    ``sticky``: once the retry succeeds, start every later step with that split (it is part of the
    training state, so a resume keeps it).
    """

    micro_batches: int = 1
    reason: str = ""
    sticky: bool = False


def resolve_task_factory(spec: str) -> Callable[..., Task]:
    """``latin`` (entry point in ``kktrain.tasks``) or ``package.module:factory``."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"task '{spec}': cannot import module '{module_name}' ({e}): check --task and PYTHONPATH") from None
        factory = getattr(module, attr, None)
        if factory is None:
            raise ConfigError(f"task '{spec}': module '{module_name}' has no '{attr}': check the name after the colon")
        return factory
    eps = installed_entry_points(TASK_GROUP)
    if spec not in eps:
        known = ", ".join(sorted(eps)) or "(none)"
        raise ConfigError(f"unknown task '{spec}': installed tasks are {known}, or give module:factory")
    try:
        return eps[spec].load()
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"task '{spec}' failed to load ({type(e).__name__}: {e}): reinstall its distribution") from None


def make_task(spec: str, options: Mapping[str, Any]) -> tuple[Task, BaseModel | None]:
    """Build a task from its spec and option table."""
    factory = resolve_task_factory(spec)
    model = options_model(factory)
    opts = validate_options(model, options, f"task '{spec}'")
    task = factory(opts) if model is not None else factory()
    return task, opts


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an unavailable explicit device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available: use --device cpu or --device auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' requested but Apple MPS is not available: use --device cpu or --device auto")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def _to_device(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        out = [_to_device(v, device, non_blocking) for v in batch]
        return type(batch)(out) if not hasattr(batch, "_fields") else type(batch)(*out)
    return batch


def split_batch(batch: Any, pieces: int) -> list[Any]:
    """Split a batch (tensors, dicts, lists/tuples of them) along dim 0 into ``pieces`` parts."""
    if isinstance(batch, torch.Tensor):
        return list(torch.tensor_split(batch, pieces))
    if isinstance(batch, dict):
        parts = {k: split_batch(v, pieces) for k, v in batch.items()}
        return [{k: parts[k][i] for k in batch} for i in range(pieces)]
    if isinstance(batch, (list, tuple)):
        parts_l = [split_batch(v, pieces) for v in batch]
        rebuilt = [[p[i] for p in parts_l] for i in range(pieces)]
        if hasattr(batch, "_fields"):
            return [type(batch)(*r) for r in rebuilt]
        return [type(batch)(r) for r in rebuilt]
    return [batch] * pieces


def batch_size_of(batch: Any) -> int:
    """The leading dimension of the first tensor in a batch."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size_of(batch[0])
    return 1


class Trainer:
    """One training run: ``Trainer(config, plugins).fit()``.

    ``plugins`` are plugin names (looked up in the ``kktrain`` entry-point group, options from
    ``plugin_options``) or ready plugin instances; names and instances may be mixed.
    """

    def __init__(
        self,
        config: RunConfig,
        plugins: Sequence[str | object] = (),
        *,
        plugin_options: Mapping[str, Mapping[str, Any]] | None = None,
        task: Task | None = None,
        task_options: Mapping[str, Any] | None = None,
        user_set: frozenset[str] = frozenset(),
        config_sources: Mapping[str, str] | None = None,
        resume: str | None = None,
        quiet: bool = False,
        trace_hooks: bool | None = None,
        console: Any = None,
    ) -> None:
        self.config = config
        self.user_set = user_set
        self.config_sources = dict(config_sources or {})
        self.resume_from = resume
        self.quiet = quiet
        if trace_hooks is None:
            trace_hooks = os.environ.get("KKTRAIN_TRACE_HOOKS", "") not in ("", "0", "false")
        self.trace_hooks = trace_hooks
        self.console = console if console is not None else make_console(quiet)
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.is_main = self.rank == 0

        names = [p for p in plugins if isinstance(p, str)]
        names += [n for n in config.plugins if n not in names]
        self.plugins, self.plugin_options = resolve_plugins(names, plugin_options or {})
        for obj in plugins:
            if not isinstance(obj, str):
                name = getattr(obj, "name", None) or type(obj).__name__
                self.plugins[name] = obj
                self.plugin_options[name] = getattr(obj, "options", None)
        self.config.plugins = list(self.plugins)
        self._defaults = core_defaults.CoreDefaults()
        self.pm: pluggy.PluginManager = build_plugin_manager(
            self.plugins, self._defaults, trace=trace_to_stderr if trace_hooks else None
        )
        self.hook = self.pm.hook

        if task is None:
            task, self.task_options = make_task(config.task, task_options or {})
        else:
            self.task_options = getattr(task, "options", None)
        self.task: Task = task
        self.state = TrainState()
        self.state.knobs = dict(task.default_knobs())
        self.run_dir: Path | None = None
        self.model: torch.nn.Module
        self.optimizer: torch.optim.Optimizer
        self.scheduler: torch.optim.lr_scheduler.LRScheduler
        self.device: torch.device = torch.device("cpu")
        self.hw: Any = None
        self.total_steps = 0
        self.steps_per_epoch = 0
        self.log: Any = None
        self._log_file: Any = None
        self._metrics_file: Any = None
        self.ddp_model: torch.nn.parallel.DistributedDataParallel | None = None
        self._stop_reason: str | None = None
        self._interrupted = False
        self._restart_data = True
        self._data_iter: Iterator[Any] | None = None
        self._positions: Iterator[int] | None = None
        self._built = False

    # ------------------------------------------------------------------ set-up

    def setup(self) -> Trainer:
        """Detect hardware, build model, optimizer, scheduler and data; restore when resuming.

        Everything that can fail on bad input (paths, device, checkpoint, model fit) is checked
        before the run directory is created, so bad input leaves nothing on disk.
        """
        if self._built:
            return self
        self.log, self._log_file = make_logger(None, console=self.console, quiet=self.quiet, rank=self.rank)
        self._check_run_dir()
        payload, payload_path = self._locate_resume()
        self._hw_detect()
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.matmul_precision:
            torch.set_float32_matmul_precision(cfg.matmul_precision)
        self.device = resolve_device(cfg.device)
        self._init_distributed()

        seed_everything(cfg.seed)
        model = self.task.build_model().to(self.device)
        self.model = model
        self.hook.on_model_built(trainer=self, model=model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = self.hook.build_optimizer(trainer=self, params=params)
        self._params = params
        self._foreach: bool | None = None  # clip_grad_norm_ picks the fused path per device
        # What the forward runs through: the DDP wrapper under torchrun (it syncs the gradients).
        self.train_model: torch.nn.Module = model
        self.ddp_model = None
        if self.world_size > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(model)
            self.train_model = self.ddp_model

        self._build_data()
        self.steps_per_epoch = max(1, len(self.plan) // cfg.grad_accum)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch  # type: ignore[operator]
        self.scheduler = self._build_scheduler()
        self.task.set_knobs(self.state.knobs)

        if payload is not None:
            self.load_payload(payload, source=str(payload_path))
        self._create_run_dir()
        if payload is not None:
            self.log.info("resumed", path=str(payload_path), step=self.state.step, epoch=self.state.epoch,
                          batch_in_epoch=self.state.batch_in_epoch)
        self._plan_hot_path()
        self._built = True
        return self

    def _check_run_dir(self) -> None:
        cfg = self.config
        if cfg.out is None:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            cfg.out = str(Path(os.environ.get("KKTRAIN_RUNS_DIR", "runs")) / f"{Path(cfg.task.split(':')[-1]).name}-{stamp}")
        run_dir = Path(cfg.out)
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"output path {run_dir} is a file: give --out a directory path")
        for parent in run_dir.parents:
            if parent.exists() and not parent.is_dir():
                raise ConfigError(f"output path {run_dir} lies under {parent}, which is a file: give --out a directory path")
        ck = run_dir / "checkpoints"
        if self.resume_from is None and ck.is_dir() and any(ck.glob("*.pt")):
            raise ConfigError(
                f"run directory {run_dir} already holds checkpoints: continue it with --resume auto, "
                "or pick a new --out"
            )
        self.run_dir = run_dir
        self.checkpoint_dir = ck

    def _create_run_dir(self) -> None:
        run_dir = self.run_dir
        assert run_dir is not None
        if self.is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"cannot create output directory {run_dir} ({e.strerror}): choose a writable --out") from None
            self._log_file = open(run_dir / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            self.log._logger.attach(self._log_file)
            self._metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def _locate_resume(self) -> tuple[dict[str, Any] | None, Path | None]:
        spec = self.resume_from
        if spec is None:
            return None, None
        if spec == "auto":
            path = ckpt.newest_valid(self.checkpoint_dir, lambda m: self.log.warning("checkpoint_skipped", detail=m))
            if path is None:
                self.log.info("resume_auto_fresh", note=f"no checkpoint in {self.checkpoint_dir}; starting a new run")
                return None, None
        else:
            path = Path(spec)
        payload = ckpt.load_checkpoint(path)
        saved_task = payload.get("task", {}).get("name")
        if saved_task and saved_task != self.task.name:
            raise CheckpointError(f"checkpoint {path} is for task '{saved_task}', not '{self.task.name}': resume with --task {saved_task}")
        return payload, path

    def _hw_detect(self) -> None:
        try:
            from kktrain import hardware
        except ImportError:  # pragma: no cover - hardware.py is part of the package
            hardware = None
        if hardware is not None:
            self.hw = hardware.detect()
        # One call per implementing plugin, in call order: pluggy drops None results, so zipping
        # one call's results with the implementations credits changes to the wrong plugin.
        answers: list[tuple[str, Any]] = []
        for impl in reversed(self.hook.on_hw_detect.get_hookimpls()):
            others = [p for p in self.pm.get_plugins() if p is not impl.plugin]
            caller = self.pm.subset_hook_caller("on_hw_detect", remove_plugins=others)
            answers += [(impl.plugin_name, r) for r in caller(hw=self.hw, config=self.config, user_set=self.user_set)]
        applied: dict[str, Any] = {}
        for plugin_name, changes in answers:
            for key, value in (changes or {}).items():
                # user_set spells plugin options as plugins.NAME.key; hooks return NAME.key
                canonical = normalise_key(key, self.config.plugins)
                set_by_user = key in self.user_set or canonical in self.user_set
                if set_by_user or key in applied:
                    if set_by_user:
                        self.log.info("hw_profile_skipped", key=key, reason="set by user", plugin=plugin_name)
                    continue
                applied[key] = value
                self._apply_config_change(key, value, plugin_name)

    def _apply_config_change(self, key: str, value: Any, plugin_name: str) -> None:
        head, _, rest = key.partition(".")
        if head in self.plugin_options and rest:
            target: Any = self.plugin_options[head]
            if target is None:
                return
            attr = rest
        elif rest and head in installed_entry_points():
            return  # a recommendation for an installed plugin that is not enabled in this run
        elif head in type(self.config).model_fields:
            target = self.config
            parts = key.split(".")
            for part in parts[:-1]:
                target = getattr(target, part)
            attr = parts[-1]
        else:
            self.log.warning("config_change_ignored", key=key, plugin=plugin_name,
                             reason="neither a core key nor an installed plugin's option")
            return
        old = getattr(target, attr, None)
        try:
            setattr(target, attr, value)
        except ValidationError as e:
            first = e.errors()[0]
            raise PluginError(
                f"plugin '{plugin_name}' set {key} = {value!r}, which is invalid ({first['msg']}): "
                f"fix the plugin's recommendation or set {key} yourself"
            ) from None
        except (AttributeError, ValueError) as e:
            raise PluginError(f"plugin '{plugin_name}' set {key} = {value!r}, which is invalid ({e}): fix the plugin") from None
        if old != value:
            self.config_sources[key] = f"plugin {plugin_name}"
            self.log.info("config_changed", key=key, old=old, new=value, plugin=plugin_name)

    def _init_distributed(self) -> None:
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group(backend=backend)

    def _build_data(self) -> None:
        cfg = self.config
        dataset = self.task.train_dataset()
        self.plan = BatchPlan(
            len(dataset), cfg.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle, drop_last=cfg.data.drop_last,
            rank=self.rank, world_size=self.world_size,
        )
        if len(self.plan) < cfg.grad_accum:
            raise ConfigError(
                f"the training data has {len(dataset)} samples, fewer than one step of batch_size "
                f"{cfg.batch_size} x grad_accum {cfg.grad_accum}: lower batch_size"
            )
        self.batch_sampler = KeyBatchSampler(self.plan)
        workers = cfg.data.workers
        pin = cfg.data.pin_memory if cfg.data.pin_memory != "auto" else self.device.type == "cuda"
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs["persistent_workers"] = cfg.data.persistent_workers
            if cfg.data.prefetch_factor is not None:
                kwargs["prefetch_factor"] = cfg.data.prefetch_factor
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.batch_sampler, num_workers=workers, pin_memory=bool(pin),
            collate_fn=self.task.collate,
            # Its own generator: creating an iterator must not draw from the global RNG, or a
            # resume (which creates one more iterator) would shift dropout and everything after.
            generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=_worker_init if workers else None,
            **kwargs,
        )
        self._non_blocking = bool(pin)

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        s = self.config.schedule
        opt, total = self.optimizer, self.total_steps
        if s.name == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total, pct_start=s.pct_start
            )
        if s.name == "constant":
            return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=_Constant())
        warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup_ratio * total)
        warmup = min(warmup, max(total - 1, 0))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - warmup), eta_min=s.min_lr)
        if warmup == 0:
            return cosine
        linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
        return torch.optim.lr_scheduler.SequentialLR(opt, [linear, cosine], milestones=[warmup])

    def _plan_hot_path(self) -> None:
        """Decide once which per-step hooks anyone implements beyond the core defaults."""
        self.active: dict[str, bool] = {}
        for name in _HOT_HOOKS:
            impls = getattr(self.hook, name).get_hookimpls()
            self.active[name] = self.trace_hooks or any(i.plugin is not self._defaults for i in impls)

    # ------------------------------------------------------------------ data

    def set_knobs(self, knobs: Mapping[str, Any]) -> None:
        """Change task knobs (curriculum); the data loader restarts at the current position."""
        unknown = set(knobs) - set(self.task.default_knobs())
        if unknown:
            raise ConfigError(f"task '{self.task.name}' has no knob(s) {sorted(unknown)}: known knobs are {sorted(self.task.default_knobs())}")
        new = {**self.state.knobs, **knobs}
        if new != self.state.knobs:
            self.state.knobs = new
            self.task.set_knobs(new)
            self._restart_data = True

    def next_batch(self) -> tuple[int, Any] | None:
        """The next batch of the current epoch with its position, or ``None`` at the epoch's end."""
        if self._restart_data:
            st = self.state
            self.batch_sampler.epoch = st.epoch
            self.batch_sampler.start = st.batch_in_epoch
            self.batch_sampler.knobs = st.knobs
            skip = frozenset(b for e, b in st.skip_batches if e == st.epoch)
            self.batch_sampler.skip = skip
            self._positions = (b for b in range(st.batch_in_epoch, len(self.plan)) if b not in skip)
            self._data_iter = iter(self.loader)
            self._restart_data = False
        try:
            batch = next(self._data_iter)  # type: ignore[arg-type]
        except StopIteration:
            return None
        pos = next(self._positions)  # type: ignore[arg-type]
        if self.device.type == "cpu":  # the loader already yields CPU tensors
            return pos, batch
        return pos, _to_device(batch, self.device, self._non_blocking)

    # ------------------------------------------------------------------ plugin-facing API

    def request_stop(self, reason: str) -> None:
        """Stop after the current step (a checkpoint is written); ``reason`` goes to the summary."""
        if self._stop_reason is None:
            self._stop_reason = reason
            self.log_event("stop_requested", reason=reason)

    @property
    def stop_requested(self) -> bool:
        """Whether someone asked the run to stop."""
        return self._stop_reason is not None or self._interrupted

    def log_event(self, event: str, **fields: Any) -> None:
        """Log an event and remember it for the summary (stage changes, rollbacks, skips ...)."""
        record = {"event": event, "step": self.state.step, **fields}
        self.state.events.append(record)
        if self.log is not None:
            self.log.info(event, step=self.state.step, **fields)

    def log_metrics(self, record: dict[str, Any], kind: str = "train") -> None:
        """Write one record to ``metrics.jsonl`` (rank 0) after plugins saw it in ``on_log``."""
        record = {"step": self.state.step, "kind": kind, **record}
        if self.is_main and self.active.get("on_log", True):
            self.hook.on_log(trainer=self, record=record)
        if self._metrics_file is not None:
            write_json_line(self._metrics_file, record)

    def scale_lr(self, factor: float) -> None:
        """Multiply the learning rate, now and for the rest of the schedule."""
        for group in self.optimizer.param_groups:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if key in group and isinstance(group[key], float):
                    group[key] *= factor
        scheds = [self.scheduler, *getattr(self.scheduler, "_schedulers", [])]
        for s in scheds:
            if hasattr(s, "base_lrs"):
                s.base_lrs = [lr * factor for lr in s.base_lrs]
            if isinstance(s, torch.optim.lr_scheduler.CosineAnnealingLR):
                s.eta_min *= factor

    @property
    def lr(self) -> float:
        """The current learning rate of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ state, snapshots, checkpoints

    def state_payload(self, *, kind: str) -> dict[str, Any]:
        """Everything needed to continue exactly: the checkpoint's content."""
        plugin_states = {}
        for name, obj in self.plugins.items():
            if hasattr(obj, "state_dict"):
                plugin_states[name] = obj.state_dict()
        return {
            "format": ckpt.FORMAT,
            "version": ckpt.FORMAT_VERSION,
            "kind": kind,
            "step": self.state.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": self.state.state_dict(),
            "rng": rng_state(),
            "config": json.loads(json.dumps(self.config.model_dump(mode="json"))),
            "task": {"name": self.task.name, "options": self.task_options.model_dump(mode="json") if self.task_options is not None else {}},
            "plugin_options": {n: o.model_dump(mode="json") for n, o in self.plugin_options.items() if isinstance(o, BaseModel)},
            "plugins": plugin_states,
            "meta": {"kktrain": str(kktrain.__version__), "torch": str(torch.__version__), "time": time.time(),
                     "optimizer": _qualname(self.optimizer)},
        }

    def load_payload(self, payload: dict[str, Any], *, source: str, keep_plugins: Sequence[str] = ()) -> None:
        """Restore a payload from :meth:`state_payload` (checkpoint or snapshot)."""
        ckpt.check_model_fit(self.model, payload["model"], source)
        self.model.load_state_dict(payload["model"])
        saved_opt = payload.get("meta", {}).get("optimizer")
        if saved_opt and saved_opt != _qualname(self.optimizer):
            raise CheckpointError(
                f"checkpoint {source} was trained with optimizer {saved_opt}, this run builds "
                f"{_qualname(self.optimizer)}: enable the same optimizer plugins (e.g. --plugin optim8bit)"
            )
        try:
            self.optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {source}: optimizer state does not fit ({e}): resume with the same optimizer plugins") from None
        self.scheduler.load_state_dict(payload["scheduler"])
        # In place: the loop holds a reference to the state object, and a rollback restores mid-run.
        fresh = TrainState()
        fresh.load_state_dict(copy.deepcopy(payload["state"]))
        vars(self.state).update(vars(fresh))
        self.task.set_knobs(self.state.knobs)
        set_rng_state(payload["rng"])
        saved = payload.get("plugins", {})
        for name, obj in self.plugins.items():
            if name in keep_plugins or not hasattr(obj, "load_state_dict"):
                continue
            if name in saved:
                obj.load_state_dict(saved[name])
            else:
                self.log.info("plugin_state_missing", plugin=name, note="plugin was not enabled when the checkpoint was written; it starts fresh")
        self._restart_data = True

    def snapshot(self) -> dict[str, Any]:
        """An in-memory copy of the full state (for rollback); tensors are cloned."""
        return copy.deepcopy(self.state_payload(kind="snapshot"))

    def restore(self, snapshot: dict[str, Any], *, keep_plugins: Sequence[str] = (), skip_last_step: bool = False) -> None:
        """Go back to a :meth:`snapshot`; optionally never train on the last step's batches again.

        Model, optimizer, scheduler, RNG, data position, knobs and plugin state go back; the run's
        history (events, best metric, latest validation, skipped steps) and every batch skipped so
        far stay, since a snapshot older than an earlier rollback does not know that rollback.
        """
        history = {k: getattr(self.state, k) for k in TrainState.HISTORY}
        skipped = [list(p) for p in self.state.skip_batches]
        if skip_last_step:
            skipped += [list(p) for p in self._last_step_positions]
        self.load_payload(snapshot, source="snapshot", keep_plugins=keep_plugins)
        for key, value in history.items():
            setattr(self.state, key, value)
        for pos in skipped:
            if pos not in self.state.skip_batches:
                self.state.skip_batches.append(pos)
        self._restart_data = True

    _last_step_positions: list[list[int]] = []

    def save_checkpoint(self, kind: str = "step") -> Path | None:
        """Write a verified checkpoint of ``kind`` (rank 0), prune old ones, fire ``on_checkpoint``."""
        if not self.is_main:
            return None
        payload = self.state_payload(kind=kind)
        name = {"best": "best.pt", "final": "final.pt"}.get(kind, ckpt.step_name(self.state.step))
        try:
            ref = ckpt.write_checkpoint(self.checkpoint_dir, name, payload, step=self.state.step, kind=kind)
        except OSError as e:
            raise CheckpointError(
                f"writing checkpoint {self.checkpoint_dir / name} failed ({e.strerror or e}): free disk space or "
                "choose another --out; earlier checkpoints are intact"
            ) from None
        if kind not in ("best", "final"):
            ckpt.prune(self.checkpoint_dir, self.config.checkpoint.keep_last)
        self.log.info("checkpoint", path=str(ref.path), kind=kind, step=self.state.step)
        self.hook.on_checkpoint(trainer=self, path=str(ref.path), kind=kind)
        return ref.path

    # ------------------------------------------------------------------ validation and summary

    def run_validation(self) -> dict[str, float]:
        """Validate under a forked RNG (so the training trajectory is unchanged); fire the hooks."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=devices):
            raw = self.hook.validate(trainer=self)
        metrics = {(k if _is_prefixed(k) else f"val/{k}"): float(v) for k, v in raw.items()}
        metrics["val/time_s"] = time.perf_counter() - t0
        self.hook.on_validation_end(trainer=self, metrics=metrics)
        self.state.last_val = dict(metrics)
        self.state.last_val_step = self.state.step
        self.log_metrics(dict(metrics), kind="val")
        self._maybe_save_best(metrics)
        return metrics

    def _maybe_save_best(self, metrics: Mapping[str, float]) -> None:
        key = self.config.checkpoint.best_metric
        if not key:
            return
        if key not in metrics:
            if not getattr(self, "_warned_best", False):
                self.log.warning("best_metric_missing", metric=key, available=sorted(metrics)[:12])
                self._warned_best = True
            return
        value = metrics[key]
        best = self.state.best_value
        better = best is None or (value > best if self.config.checkpoint.best_mode == "max" else value < best)
        if better:
            self.state.best_value, self.state.best_step = value, self.state.step
            self.save_checkpoint("best")

    def close(self, *, sync: bool = True) -> None:
        """Close files and the process group.

        With ``sync`` (a normal end) the ranks first meet at a barrier: a rank that tears down
        its gloo/NCCL group while a peer is still writing the final checkpoint can abort the
        peer's communication threads (``terminate called without an active exception``). An
        aborted run skips the barrier, because the other ranks may not be coming.
        """
        for f in (self._metrics_file, self._log_file):
            if f is not None:
                f.close()
        self._metrics_file = self._log_file = None
        if self.ddp_model is not None:
            # DDP's reducer holds the process group; left alive it is torn down during
            # interpreter shutdown, where gloo's worker threads abort the process.
            self.train_model, self.ddp_model = self.model, None
            gc.collect()
        if self.world_size > 1 and torch.distributed.is_initialized():
            if sync:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    # ------------------------------------------------------------------ signals

    def install_signal_handlers(self) -> Callable[[], None]:
        """SIGTERM/SIGINT: finish the step, checkpoint, exit 0. A second SIGINT aborts at once."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum: int, frame: Any) -> None:
            if self._interrupted and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._interrupted = True
            self.log.warning("interrupt_received", signal=signal.Signals(signum).name, note="finishing the step, then checkpointing")

        for s in previous:
            signal.signal(s, handler)

        def undo() -> None:
            for s, h in previous.items():
                signal.signal(s, h)

        return undo

    def fit(self) -> dict[str, Any]:
        """Set up (if needed) and train; return the summary."""
        from kktrain.loop import run

        self.setup()
        return run(self)

    def write_config(self) -> None:
        """Save the effective config as TOML in the run directory."""
        import tomli_w

        if self.is_main and self.run_dir is not None:
            data = to_toml_dict(self.config, self.plugin_options, self.task_options)
            (self.run_dir / "config.toml").write_text(tomli_w.dumps(data))

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Save ``summary.json`` atomically."""
        if self.is_main and self.run_dir is not None:
            tmp = self.run_dir / ".summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2, default=str))
            os.replace(tmp, self.run_dir / "summary.json")


def _worker_init(worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C and SIGTERM to the main process, which shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _qualname(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_prefixed(key: str) -> bool:
    """``val/x`` and ``val_ema/x`` are already namespaced; ``acc`` and ``acc/n5`` get ``val/``."""
    head = key.split("/", 1)[0]
    return "/" in key and (head == "val" or head.startswith("val_"))


class _Constant:
    """LR multiplier 1.0 (a class, so the scheduler's state_dict stays plain)."""

    def __call__(self, step: int) -> float:
        return 1.0


__all__ = ["StepRetry", "Trainer", "KKTrainError", "split_batch", "batch_size_of", "make_task", "resolve_device"]

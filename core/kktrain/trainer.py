"""The Trainer: builds a run from its config and plugins, owns the state, and composes the parts.

The loop itself lives in :mod:`kktrain.loop` and reads top to bottom; this module holds what the
loop and the plugins call. The Trainer does little itself: the data order and position live in a
:class:`~kktrain.data.DataStream` (``trainer.data``), the checkpoint payload, snapshots and the
best checkpoint in a :class:`~kktrain.checkpointer.Checkpointer` (``trainer.checkpoints``), batch
helpers in :mod:`kktrain.batch`. Everything the loop and the CLI touch is public.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pluggy
import torch
from pydantic import BaseModel, ValidationError

from kktrain import defaults as core_defaults
from kktrain.checkpointer import Checkpointer
from kktrain.config import RunConfig, normalise_key, plugin_name, to_toml_dict
from kktrain.checkpoint import list_checkpoints, sweep
from kktrain.data import DataStream
from kktrain.distributed import Distributed, elastic_resume, env_world, run_id
from kktrain.errors import ConfigError, KKTrainError, PluginError
from kktrain.hookspecs import HOT_HOOKS, StepRetry
from kktrain.log import make_console, make_logger, write_json_line
from kktrain.meters import StepMeter
from kktrain.manager import (
    _dist_of,
    build_plugin_manager,
    installed_entry_points,
    options_model,
    resolve_plugins,
    trace_to_stderr,
)
from kktrain.runlock import RunLock
from kktrain.state import TrainState, seed_everything
from kktrain.task import BoundTask, Task, check_task_object, make_task, recorded_spec, resolve_task_factory


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



# Wakeup-fd numbers of second-Ctrl-C watchers that have been closed (see install_signal_handlers).
_CLOSED_WAKEUP_FDS: set[int] = set()


def _nonblocking(fd: int) -> bool:
    """Whether ``fd`` is open and non-blocking (what ``signal.set_wakeup_fd`` accepts)."""
    try:
        return not os.get_blocking(fd)
    except OSError:
        return False

class Trainer:
    """One training run: ``Trainer(config, plugins).fit()``.

    ``plugins`` are plugin names (looked up in the ``kktrain`` entry-point group, options from
    ``plugin_options``) or ready plugin instances; names and instances may be mixed.

    What plugins and the loop use: ``config``, ``state``, ``task``, ``model`` (the bare module;
    under FSDP the sharded root), ``train_model`` (what the forward runs through: the DDP wrapper
    under torchrun, the model under FSDP), ``optimizer``, ``scheduler``, ``params``, ``device``,
    ``hw``, ``data``, ``checkpoints``, ``distributed`` (the strategy: :mod:`kktrain.distributed`),
    ``hook``, ``log``, ``run_dir``, ``total_steps``; and the methods below.
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
        verbose: bool = False,
    ) -> None:
        self.config = config
        self.user_set = user_set
        self.config_sources = dict(config_sources or {})
        self.resume_from = elastic_resume(resume)  # a worker torchrun restarted continues its run
        self.quiet = quiet
        self.verbose = verbose
        """Echo routine info lines (checkpoints ...) on the console too, not only in log.jsonl."""
        self.progress: Any = None
        """The run's :class:`kktrain.progress.Progress` while the loop runs (validation reports to it)."""
        if trace_hooks is None:
            trace_hooks = os.environ.get("KKTRAIN_TRACE_HOOKS", "") not in ("", "0", "false")
        self.trace_hooks = trace_hooks
        self.console = console if console is not None else make_console(quiet)
        self.rank, self.world_size = env_world()
        self.is_main = self.rank == 0
        self.distributed = Distributed(config.distributed, rank=self.rank, world_size=self.world_size)
        """The strategy (``none``, ``ddp``, ``fsdp``) and what it owns; docs/distributed.md."""

        objects = {plugin_name(p): p for p in plugins if not isinstance(p, str)}
        names = [p for p in plugins if isinstance(p, str)]
        names += [n for n in config.plugins if n not in names]
        names = [n for n in names if n not in objects]  # a resume names its plugin objects too
        self.plugins, self.plugin_options = resolve_plugins(names, plugin_options or {})
        for name, obj in objects.items():
            self.plugins[name] = obj
            self.plugin_options[name] = getattr(obj, "options", None)
        self.config.plugins = list(self.plugins)
        self.defaults = core_defaults.CoreDefaults()
        self.pm: pluggy.PluginManager = build_plugin_manager(
            self.plugins, self.defaults, trace=trace_to_stderr if trace_hooks else None
        )
        self.hook = self.pm.hook

        self.task_options: BaseModel | None
        if task is None:
            task, self.task_options = make_task(config.task, task_options or {})
        else:
            check_task_object(task.wrapped if isinstance(task, BoundTask) else task, f"task {type(task).__name__}")
            opts = getattr(task, "options", None)
            self.task_options = opts if isinstance(opts, BaseModel) else None
        self.task: BoundTask = task if isinstance(task, BoundTask) else BoundTask(task)
        # What a resume needs to rebuild the task: an importable spec, or a marker that only
        # Python can (a task object defined in a notebook or in __main__).
        if self.task.spec is None:
            self.task.spec = recorded_spec(self.task)
        self.config.task = self.task.spec
        self.state = TrainState()
        self.state.knobs = dict(self.task.default_knobs())
        self.run_dir: Path | None = None
        self.lock = RunLock(Path(os.devnull))
        """The run directory's lock (:mod:`kktrain.runlock`), held from set-up to :meth:`close`."""
        self.model: torch.nn.Module
        self.train_model: torch.nn.Module
        self.optimizer: torch.optim.Optimizer
        self.scheduler: torch.optim.lr_scheduler.LRScheduler
        self.params: list[torch.nn.Parameter] = []
        self.data: DataStream
        self.checkpoints = Checkpointer(self)
        self.meter = StepMeter(self)
        """The training loss and gradient norm between log points (:mod:`kktrain.meters`)."""
        self.device: torch.device = torch.device("cpu")
        self._hw: Any = None
        self.total_steps = 0
        self.steps_per_epoch = 0
        self.log: Any = None
        self.active: dict[str, bool] = {}
        self.clip_foreach: bool | None = None  # clip_grad_norm_ picks the fused path per device
        self.stop_reason: str | None = None
        """Why a plugin asked the run to stop (:meth:`request_stop`), or ``None``."""
        self.interrupted = False
        """Whether SIGTERM/SIGINT arrived: the loop finishes the step and checkpoints."""
        self.interrupt_signal: str | None = None
        self._log_file: Any = None
        self._metrics_file: Any = None
        self._val_loader: torch.utils.data.DataLoader | None = None
        self.autograd_in_validation: list[str] = []
        """Why validation runs under no_grad rather than inference mode (:meth:`require_autograd_in_validation`)."""
        self._trust: str | None = None
        self.crash: Any = None
        """What :mod:`kktrain.crash` left on disk when the run died of an error (a ``CrashReport``)."""
        self.nonfinite_loss_step: int | None = None
        """The first log step whose mean loss was NaN or infinite (warned once; in the summary)."""
        self._built = False
        self.nothing_to_do = False
        """Resumed from a checkpoint at or past ``total_steps``: fit() says so and writes nothing."""
        self.resumed_from: str | None = None
        """The checkpoint this run resumed from, or None."""

    @classmethod
    def from_assembly(cls, assembly: Any, *, plugins: Sequence[str | object] = (), **kwargs: Any) -> Trainer:
        """A Trainer for an :class:`kktrain.config.Assembly` (what the CLI and ``kktrain.fit`` build)."""
        trainer = cls(
            assembly.config, plugins, plugin_options=assembly.plugin_tables, task=assembly.task,
            user_set=assembly.user_set, config_sources=assembly.sources, **kwargs,
        )
        trainer.task_options = assembly.task_options
        return trainer

    # ------------------------------------------------------------------ set-up

    def setup(self) -> Trainer:
        """Detect hardware, build model, optimizer, scheduler and data; restore when resuming.

        Everything that can fail on bad input (paths, device, checkpoint, model fit) is checked
        before the run directory is created, so bad input leaves nothing on disk.
        """
        if self._built:
            return self
        self.log, self._log_file = make_logger(None, console=self.console, quiet=self.quiet, rank=self.rank, verbose=self.verbose)
        try:
            self._setup()
        except BaseException:
            self.lock.release()  # bad input: the run directory is as it was
            raise
        return self

    def _setup(self) -> None:
        self._check_run_dir()
        payload, payload_path = self.checkpoints.locate_resume(self.resume_from)
        self.detect_hardware()
        cfg = self.config
        self._set_threads()
        if cfg.matmul_precision:
            torch.set_float32_matmul_precision(cfg.matmul_precision)
        self.device = resolve_device(cfg.device)
        self.distributed.init(self.device)

        seed_everything(cfg.seed)
        model = self.task.build_model()
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"task '{self.task.name}': build_model() returned a {type(model).__name__}, not a torch.nn.Module")
        model = model.to(self.device)
        self.model = model
        self.train_model = model

        from kktrain.taskcheck import check_dataset, check_first_batch

        dataset = check_dataset(self.task, self.task.train_dataset(), "train_dataset()")
        self.data = DataStream(
            dataset, batch_size=cfg.batch_size, seed=cfg.seed, data=cfg.data, collate=self.task.collate,
            device=self.device, rank=self.rank, world_size=self.world_size, default_collate=not self.task.has("collate"),
        )
        if len(self.data) < cfg.grad_accum:
            raise ConfigError(
                f"the training data has {len(self.data.dataset)} samples, fewer than one step of batch_size "
                f"{cfg.batch_size} x grad_accum {cfg.grad_accum}: lower batch_size"
            )
        self.task.set_knobs(self.state.knobs)
        # One batch through loss() (and metrics()) of the user's own model now, before plugins
        # change it (compile, checkpointing): a task that cannot train fails here in one line,
        # before the run directory exists. RNGs and the model's mode are left as they were.
        check_first_batch(self)

        self.hook.on_model_built(trainer=self, model=model)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(
                f"task '{self.task.name}': the model has no trainable parameters "
                f"({sum(1 for _ in model.parameters())} parameters, none with requires_grad): nothing to train"
            )
        # What the forward runs through: the DDP wrapper, or the FSDP-sharded model (whose
        # parameters are DTensor shards from now on: the optimizer is built over those).
        self.train_model = self.distributed.wrap(self, model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups = core_defaults.param_groups(self, self.params)
        self.optimizer = self.hook.build_optimizer(trainer=self, params=groups)
        self.log.info("optimizer", name=type(self.optimizer).__name__, lr=cfg.optimizer.lr, groups=[
            {"tensors": len(g["params"]), "weight_decay": g.get("weight_decay")} for g in self.optimizer.param_groups
        ])

        self.steps_per_epoch = max(1, len(self.data) // cfg.grad_accum)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch  # type: ignore[operator]
        self.scheduler = self._build_scheduler()
        self.state.world_size = self.world_size
        if self.checkpoints.sharded or cfg.checkpoint.async_:
            from kktrain.async_checkpoint import CheckpointWriter

            self.checkpoints.writer = CheckpointWriter(self, sharded=self.checkpoints.sharded, background=cfg.checkpoint.async_)

        if payload is not None:
            saved = payload.get("state") or {}
            self.checkpoints.load(payload, source=str(payload_path))
            # Resumed on another world size, an epoch has another number of steps: the run keeps
            # the length (and LR schedule) it was saved with, unless max_steps says otherwise.
            if saved.get("world_size", 1) != self.world_size and cfg.max_steps is None and saved.get("total_steps"):
                self.total_steps = int(saved["total_steps"])
            # A resume that changes the run's length (``--max-steps 50000`` after 15000) continues
            # the schedule of the new length from the current step, instead of the old cosine
            # running past its end and climbing back up.
            saved_total = int(saved.get("total_steps") or 0)
            # A new optimizer.lr on resume (-o optimizer.lr=...): the optimizer's state came with
            # the checkpoint's LR; scale its base LRs (a rollback's reduction carries over) and
            # follow the schedule at the new LR from the current step.
            saved_lr = ((payload.get("config") or {}).get("optimizer") or {}).get("lr")
            lr_changed = isinstance(saved_lr, (int, float)) and saved_lr > 0 and saved_lr != cfg.optimizer.lr
            if lr_changed:
                factor = cfg.optimizer.lr / float(saved_lr)  # type: ignore[arg-type]
                for group in self.optimizer.param_groups:
                    for key in ("initial_lr", "max_lr", "lr"):
                        if isinstance(group.get(key), float):
                            group[key] *= factor
                self.log.info("lr_changed", step=self.state.step, old_lr=saved_lr, lr=cfg.optimizer.lr)
            if (saved_total and saved_total != self.total_steps) or lr_changed:
                self.extend_schedule()
                self.log.info("schedule_extended", step=self.state.step, old_total_steps=saved_total,
                              total_steps=self.total_steps, lr=self.lr)
        self.state.total_steps = self.total_steps
        # Resuming a run that has nothing left to do: the loop says so and no file is touched.
        self.nothing_to_do = payload is not None and self.state.step >= self.total_steps and self._final_written(payload)
        self.resumed_from = str(payload_path) if payload is not None else None
        if self.nothing_to_do:
            self._built = True
            return
        branch = payload_path is not None and self._is_branch(payload_path)
        if branch:
            assert payload_path is not None
            self.state.parent = {"run_dir": str(payload_path.parent.parent), "checkpoint": str(payload_path),
                                 "step": self.state.step}
        self._create_run_dir(payload, payload_path)
        if branch:
            parent = self.state.parent or {}
            self.log_event("branched", parent_run=parent.get("run_dir"), checkpoint=parent.get("checkpoint"))
        if payload is not None:
            self.log.info("resumed", path=str(payload_path), step=self.state.step, epoch=self.state.epoch,
                          batch_in_epoch=self.state.batch_in_epoch)
        self._plan_hot_path()
        self._built = True

    def _set_threads(self) -> None:
        """``threads``, or torch's default capped at the cores this process may use (affinity,
        cgroup quota); a ``threads`` above them gets a warning (docs/config.md, threads)."""
        from kktrain.hardware import usable_cores

        cores = usable_cores()
        wanted = self.config.threads
        if wanted:
            torch.set_num_threads(wanted)
            if wanted > cores:
                self.log.warning("threads_exceed_cores", threads=wanted, usable_cores=cores,
                                 note=f"more threads than usable cores slows training: try -o threads={cores}")
        elif torch.get_num_threads() > cores:
            self.log.info("threads_capped", threads=cores, torch_default=torch.get_num_threads(), usable_cores=cores)
            torch.set_num_threads(cores)

    def _final_written(self, payload: Mapping[str, Any]) -> bool:
        """Whether the run's final checkpoint exists at the resumed step (the run completed)."""
        from kktrain.checkpoint import read_manifest

        if payload.get("kind") == "final":
            return True
        if self.run_dir is None:
            return False
        manifest = read_manifest(self.run_dir / "checkpoints" / "final.pt") or {}
        return bool(manifest.get("step") is not None and manifest["step"] >= self.state.step)

    def _check_run_dir(self) -> None:
        cfg = self.config
        if cfg.out is None:
            # Every worker of a torchrun job (and of its restarts) must pick the same directory.
            stamp = run_id() or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            cfg.out = str(Path(os.environ.get("KKTRAIN_RUNS_DIR", "runs")) / f"{self.task.name}-{stamp}")
        run_dir = Path(cfg.out)
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"output path {run_dir} is a file: give --out a directory path")
        for parent in run_dir.parents:
            if parent.exists() and not parent.is_dir():
                raise ConfigError(f"output path {run_dir} lies under {parent}, which is a file: give --out a directory path")
        ck = run_dir / "checkpoints"
        if self.resume_from is None and ck.is_dir() and list_checkpoints(ck):
            raise ConfigError(
                f"run directory {run_dir} already holds checkpoints: continue it with --resume auto, "
                "or pick a new --out"
            )
        self.run_dir = run_dir
        if self.resume_from not in (None, "auto") and self._is_branch(Path(self.resume_from)) and list_checkpoints(ck):
            raise ConfigError(
                f"run directory {run_dir} already holds checkpoints of its own: a branch from {self.resume_from} "
                "needs a new --out"
            )
        self.lock = RunLock(run_dir)
        if self.is_main and run_dir.is_dir():  # an existing run: nobody else may write it while we read it
            self.lock.acquire(lambda m: self.log.warning("run_lock_taken_over", detail=m))
            sweep(ck, lambda m: self.log.warning("checkpoint_restored", detail=m))

    def _is_branch(self, checkpoint: Path) -> bool:
        """Whether resuming from ``checkpoint`` starts a branch: it lies outside this run's directory."""
        assert self.run_dir is not None
        return checkpoint.resolve().parent != (self.run_dir / "checkpoints").resolve()

    def _create_run_dir(self, payload: Mapping[str, Any] | None = None, payload_path: Path | None = None) -> None:
        run_dir = self.run_dir
        assert run_dir is not None
        if self.is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"cannot create output directory {run_dir} ({e.strerror}): choose a writable --out") from None
            self.lock.acquire(lambda m: self.log.warning("run_lock_taken_over", detail=m))
            self._log_file = open(run_dir / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            write_json_line(self._log_file, self.run_metadata())  # each session's part starts with it
            self.log._logger.attach(self._log_file)
            dropped = self._trim_metrics(payload, payload_path) if payload is not None else 0
            self._metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            if payload is not None:
                self._write_record({"step": self.state.step, "kind": "resume", "time": round(time.time(), 3), "epoch": self.state.epoch,
                                    "checkpoint": str(payload_path), "dropped_records": dropped})

    def _trim_metrics(self, payload: Mapping[str, Any], payload_path: Path | None) -> int:
        """Drop the lines of ``metrics.jsonl`` written after the checkpoint a resume starts from
        (a crash leaves them; the resumed run writes them again). Returns how many were dropped.

        Only for a checkpoint of this run directory that counted its records; the file is
        rewritten atomically, so an interrupted trim loses nothing.
        """
        assert self.run_dir is not None
        path = self.run_dir / "metrics.jsonl"
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):  # a line cut short by the crash
            lines.pop()
        keep = (payload.get("state") or {}).get("metrics_records")
        ours = payload_path is not None and (self.run_dir / "checkpoints").resolve() in Path(payload_path).resolve().parents
        kept = lines[:keep] if (keep is not None and ours) else lines
        self.state.metrics_records = len(kept)
        if "".join(kept) == text:
            return 0
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
        dropped = len(lines) - len(kept)
        if dropped:
            self.log.info("metrics_trimmed", dropped=dropped, kept=len(kept),
                          note="records written after the checkpoint are written again by the resumed run")
        return dropped

    def versions(self) -> dict[str, Any]:
        """kktrain's, torch's, Python's and each enabled plugin's version."""
        import platform

        import kktrain

        eps = installed_entry_points()
        plugins = {}
        for name, obj in self.plugins.items():
            ep = eps.get(name)
            if ep is not None:
                dist, version = _dist_of(ep)
                plugins[name] = f"{dist} {version}"
            else:
                plugins[name] = f"{type(obj).__module__}.{type(obj).__qualname__}"
        return {"kktrain": kktrain.__version__, "torch": torch.__version__, "python": platform.python_version(),
                "plugins": plugins}

    def run_metadata(self) -> dict[str, Any]:
        """The first record of each session in ``log.jsonl``: versions, argv, host, threads, device."""
        import socket
        import sys

        from kktrain.hardware import usable_cores

        return {
            "event": "run_metadata", "level": "info", "rank": self.rank,
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z"),
            "versions": self.versions(), "argv": list(sys.argv), "host": socket.gethostname(), "pid": os.getpid(),
            "threads": torch.get_num_threads(), "usable_cores": usable_cores(), "device": str(self.device),
            "world_size": self.world_size, "task": self.config.task, "plugins": list(self.plugins),
            "resumed_from": getattr(self, "resumed_from", None),
        }

    def val_loader(self) -> torch.utils.data.DataLoader:
        """The loader of ``task.val_dataset()`` for the core's validation loop (built once)."""
        if getattr(self, "_val_loader", None) is None:
            from kktrain.taskcheck import check_dataset

            dataset = check_dataset(self.task, self.task.val_dataset(), "val_dataset()")
            cfg = self.config
            self._val_loader = torch.utils.data.DataLoader(
                dataset, batch_size=cfg.data.val_batch_size or cfg.batch_size, shuffle=False,
                collate_fn=self.task.collate, num_workers=0,
            )
        assert self._val_loader is not None
        return self._val_loader

    @property
    def can_validate(self) -> bool:
        """Whether anything validates: the task (``validate`` or ``val_dataset``) or a plugin."""
        impls = self.hook.validate.get_hookimpls()
        return self.task.validates or any(i.plugin is not self.defaults and not i.hookwrapper and not i.wrapper for i in impls)

    @property
    def checkpoint_dir(self) -> Path:
        """``RUN_DIR/checkpoints``."""
        return self.checkpoints.directory

    @property
    def hw(self) -> Any:
        """What :func:`kktrain.detect_hardware` found (detected on first use)."""
        if self._hw is None:
            from kktrain.hardware import detect

            self._hw = detect()
        return self._hw

    def detect_hardware(self) -> None:
        """Phase HW_DETECT: plugins see the hardware and may change the config.

        Only when a plugin implements ``on_hw_detect``: otherwise nothing is detected until
        someone reads :attr:`hw`.
        """
        impls = self.hook.on_hw_detect.get_hookimpls()
        if not impls:
            return
        # One call per implementing plugin, in call order: pluggy drops None results, so zipping
        # one call's results with the implementations credits changes to the wrong plugin.
        answers: list[tuple[str, Any]] = []
        for impl in reversed(impls):
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
        target: Any
        if head in self.plugin_options and rest:
            target = self.plugin_options[head]
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
            fields = getattr(type(target), "model_fields", {})
            attr = next((n for n, f in fields.items() if f.alias == attr), attr)  # checkpoint.async -> async_
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

    def extend_schedule(self) -> None:
        """Rebuild the LR schedule for ``total_steps`` and bring it to the current step.

        From here on the learning rate is the one a run planned with the new length from the start
        would have (its warmup, its cosine), with no restart: the steps are replayed on the
        scheduler alone, so the values match such a run bit for bit. The base learning rates are
        the optimizer's own (``initial_lr``, OneCycle's ``max_lr``), so :meth:`scale_lr` carries over.
        """
        import warnings

        base_key = "max_lr" if self.config.schedule.name == "onecycle" else "initial_lr"
        for group in self.optimizer.param_groups:
            if base_key in group:
                group["lr"] = group[base_key]
        self.scheduler = self._build_scheduler()
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": replaying on purpose
            warnings.simplefilter("ignore")
            for _ in range(min(self.state.step, self.total_steps)):
                self.scheduler.step()

    def _plan_hot_path(self) -> None:
        """Decide once which per-step hooks anyone implements beyond the core defaults."""
        self.active = {}
        for name in HOT_HOOKS:
            impls = getattr(self.hook, name).get_hookimpls()
            self.active[name] = self.trace_hooks or any(i.plugin is not self.defaults for i in impls)

    # ------------------------------------------------------------------ plugin-facing API

    @property
    def ddp_model(self) -> torch.nn.parallel.DistributedDataParallel | None:
        """The DDP wrapper under ``distributed.strategy = ddp``, else ``None``."""
        return self.distributed.ddp

    def request_mixed_precision(self, dtype: torch.dtype) -> bool:
        """Ask the distributed strategy to run forward and backward in ``dtype`` (call it in
        ``on_model_built``). ``True``: it does (FSDP's ``MixedPrecisionPolicy``, gradients reduced in
        float32), so do not autocast as well; ``False``: it does not, autocast yourself."""
        return self.distributed.request_mixed_precision(dtype)

    def require_autograd_in_validation(self, reason: str) -> None:
        """Run the core's validation under ``torch.no_grad()`` instead of ``torch.inference_mode()``.

        Call it at set-up (``on_model_built``, ``on_train_start``) when your plugin keeps tensors made
        during validation for later autograd use, or changes parameters in place there: tensors made
        under inference mode can never be saved for backward. ``reason`` names you in the log.
        """
        if reason not in self.autograd_in_validation:
            self.autograd_in_validation.append(reason)

    @property
    def validation_grad_mode(self) -> str:
        """``inference`` or ``no_grad``: ``config.val_grad_mode``, no_grad when a plugin required autograd."""
        return "no_grad" if self.autograd_in_validation else self.config.val_grad_mode

    def set_knobs(self, knobs: Mapping[str, Any]) -> None:
        """Change task knobs (curriculum); the data loader restarts at the current position."""
        unknown = set(knobs) - set(self.task.default_knobs())
        if unknown:
            raise ConfigError(f"task '{self.task.name}' has no knob(s) {sorted(unknown)}: known knobs are {sorted(self.task.default_knobs())}")
        new = {**self.state.knobs, **knobs}
        if new != self.state.knobs:
            self.state.knobs = new
            self.task.set_knobs(new)
            self.data.restart()

    def request_stop(self, reason: str) -> None:
        """Stop after the current step (a checkpoint is written); ``reason`` goes to the summary."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.log_event("stop_requested", reason=reason)

    @property
    def stop_requested(self) -> bool:
        """Whether someone asked the run to stop."""
        return self.stop_reason is not None or self.interrupted

    def log_event(self, event: str, **fields: Any) -> None:
        """Log an event and remember it for the summary (stage changes, rollbacks, skips ...)."""
        record = {"event": event, "step": self.state.step, **fields}
        self.state.events.append(record)
        if self.log is not None:
            self.log.info(event, step=self.state.step, **fields)

    def log_metrics(self, record: dict[str, Any], kind: str = "train") -> None:
        """Write one record to ``metrics.jsonl`` (rank 0) after plugins saw it in ``on_log``."""
        record = {"step": self.state.step, "kind": kind, "time": round(time.time(), 3), **record}
        if self.is_main and self.active.get("on_log", True):
            self.hook.on_log(trainer=self, record=record)
        self._write_record(record)

    def _write_record(self, record: dict[str, Any]) -> None:
        if self._metrics_file is not None:
            write_json_line(self._metrics_file, record)
            self.state.metrics_records += 1

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
        return self.checkpoints.payload(kind=kind)

    def load_payload(self, payload: Mapping[str, Any], *, source: str, keep_plugins: Sequence[str] = ()) -> None:
        """Restore a payload from :meth:`state_payload` (checkpoint or snapshot)."""
        self.checkpoints.load(payload, source=source, keep_plugins=keep_plugins)

    def snapshot(self) -> dict[str, Any]:
        """An in-memory copy of the full state (for rollback); tensors are cloned."""
        return self.checkpoints.snapshot()

    def restore(self, snapshot: Mapping[str, Any], *, keep_plugins: Sequence[str] = (), skip_last_step: bool = False) -> None:
        """Go back to a :meth:`snapshot`; optionally never train on the last step's batches again.

        Model, optimizer, scheduler, RNG, data position, knobs and plugin state go back; the run's
        history (events, best metric, latest validation, skipped steps) and every batch skipped so
        far stay, since a snapshot older than an earlier rollback does not know that rollback.
        """
        self.checkpoints.restore(snapshot, keep_plugins=keep_plugins, skip_last_step=skip_last_step)

    def save_checkpoint(self, kind: str = "step") -> Path | None:
        """Write a verified checkpoint of ``kind`` (rank 0), prune old ones, fire ``on_checkpoint``."""
        return self.checkpoints.save(kind)

    # ------------------------------------------------------------------ validation and summary

    def run_validation(self) -> dict[str, float]:
        """Validate under a forked RNG (so the training trajectory is unchanged); fire the hooks.

        A run where nothing validates (no ``validate``, no ``val_dataset``, no plugin) skips it.
        """
        if not self.can_validate:
            return {}
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        if self.progress is not None:
            self.progress.validation_started()
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=devices):
            raw = self.hook.validate(trainer=self)
        metrics = {(k if _is_prefixed(k) else f"val/{k}"): float(v) for k, v in raw.items()}
        metrics["val/time_s"] = time.perf_counter() - t0
        self.hook.on_validation_end(trainer=self, metrics=metrics)
        self.state.last_val = dict(metrics)
        self.state.last_val_step = self.state.step
        self.log_metrics(dict(metrics), kind="val")
        self.checkpoints.consider_best(metrics)
        if self.progress is not None:
            self.progress.validation_done(metrics)
        return metrics

    def close(self, *, sync: bool = True) -> None:
        """Close files and the process group.

        With ``sync`` (a normal end) the ranks first meet at a barrier: a rank that tears down
        its gloo/NCCL group while a peer is still writing the final checkpoint can abort the
        peer's communication threads (``terminate called without an active exception``). An
        aborted run skips the barrier, because the other ranks may not be coming.
        """
        writer = self.checkpoints.writer
        if writer is not None and writer.in_flight:  # a crash waits for the write in flight too (logs still open)
            try:
                writer.wait()
            except KKTrainError as e:
                if self.log is not None:
                    self.log.error("checkpoint_failed", detail=str(e))
        for f in (self._metrics_file, self._log_file):
            if f is not None:
                f.close()
        self._metrics_file = self._log_file = None
        data = getattr(self, "data", None)  # absent when set-up failed before the data was built
        if data is not None:
            data.close()
        if self.distributed.ddp is not None:
            self.train_model = self.model
        self.lock.release()
        self.distributed.close(sync=sync)

    # ------------------------------------------------------------------ signals

    def install_signal_handlers(self) -> Callable[[], None]:
        """SIGTERM/SIGINT: finish the step, checkpoint, exit 0. A second SIGINT aborts at once (exit 130).

        The second press is counted by a watcher thread on the interpreter's signal wakeup fd, which
        the C-level handler writes to on every delivery: it works however quickly the presses follow
        each other (Python runs its handler once for signals that arrive together) and while the main
        thread is inside a long torch call. Checkpoints are written atomically, so nothing is lost.
        """
        import socket
        import sys
        import threading

        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        watching = threading.Event()

        def handler(signum: int, frame: Any) -> None:
            if self.interrupted:
                if signum == signal.SIGINT and not watching.is_set():
                    raise KeyboardInterrupt  # no watcher thread: abort from here
                return  # the watcher thread handles a second SIGINT
            self.interrupted = True
            self.interrupt_signal = signal.Signals(signum).name
            self.log.warning("interrupt_received", signal=self.interrupt_signal,
                             note="finishing the step, then checkpointing; press Ctrl-C again to abort at once")

        for s in previous:
            signal.signal(s, handler)

        reader, writer = socket.socketpair()
        writer.setblocking(False)
        _CLOSED_WAKEUP_FDS.discard(writer.fileno())  # a number reused by this new socket
        try:
            old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError):  # pragma: no cover - no wakeup fd here: the handler alone
            reader.close()
            writer.close()
            old_fd = None
        done = threading.Event()

        def watch() -> None:
            presses = 0
            while not done.is_set():
                try:
                    data = reader.recv(64)
                except OSError:
                    return
                if not data:
                    return
                presses += data.count(bytes([signal.SIGINT]))
                if presses >= 2:
                    os.write(2, b"\naborted (second Ctrl-C): exit 130, no checkpoint of this step\n")
                    sys.stderr.flush()
                    os._exit(130)

        watcher = threading.Thread(target=watch, name="kktrain-second-ctrl-c", daemon=True)
        if old_fd is not None:
            watcher.start()
            watching.set()

        mine = writer.fileno()

        def undo() -> None:
            for s, h in previous.items():
                signal.signal(s, h)
            if old_fd is not None:
                # The previous fd may be another trainer's socket, closed since (runs ended out of
                # order, in one process): hand back only an fd that is still a non-blocking one.
                restore = old_fd if old_fd < 0 or (old_fd not in _CLOSED_WAKEUP_FDS and _nonblocking(old_fd)) else -1
                try:
                    signal.set_wakeup_fd(restore)
                except (ValueError, OSError):
                    signal.set_wakeup_fd(-1)
                done.set()
                try:  # wake the watcher from its recv so that it ends now, not at interpreter exit
                    writer.send(b"\0")
                except OSError:
                    pass
                watcher.join(timeout=1.0)
                _CLOSED_WAKEUP_FDS.add(mine)
                writer.close()
                reader.close()

        return undo

    def fit(self) -> dict[str, Any]:
        """Set up (if needed) and train; return the summary."""
        from kktrain.loop import run

        self.setup()
        return run(self)

    @property
    def trust_signature(self) -> str | None:
        """This machine's signature of the code the run names (see :mod:`kktrain.trust`), or None."""
        from kktrain import trust

        specs = trust.code_specs(self.config.task, self.config.plugins)
        if not specs:
            return None
        if getattr(self, "_trust", None) is None:
            self._trust = trust.sign(specs)
        return self._trust

    def write_config(self) -> None:
        """Save the effective config as TOML in the run directory (signed when it names code)."""
        import tomli_w

        if self.is_main and self.run_dir is not None:
            data = to_toml_dict(self.config, self.plugin_options, self.task_options)
            if self.trust_signature:
                data["trust"] = {"signature": self.trust_signature}
            (self.run_dir / "config.toml").write_text(tomli_w.dumps(data))

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Save ``summary.json`` atomically."""
        if self.is_main and self.run_dir is not None:
            tmp = self.run_dir / ".summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2, default=str))
            os.replace(tmp, self.run_dir / "summary.json")


def _is_prefixed(key: str) -> bool:
    """``val/x`` and ``val_ema/x`` are already namespaced; ``acc`` and ``acc/n5`` get ``val/``."""
    head = key.split("/", 1)[0]
    return "/" in key and (head == "val" or head.startswith("val_"))


class _Constant:
    """LR multiplier 1.0 (a class, so the scheduler's state_dict stays plain)."""

    def __call__(self, step: int) -> float:
        return 1.0


__all__ = ["Trainer", "make_task", "resolve_device", "resolve_task_factory"]

"""Run configuration: pydantic models and the layering defaults < task < file < env < flags.

Every value remembers where it came from (``kktrain config show``). Keys are dotted paths into
:class:`RunConfig` (``optimizer.lr``); ``NAME.key`` for an enabled plugin ``NAME`` goes to that
plugin's own options model; ``task.key`` goes to the task's options.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kktrain.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "KKTRAIN_"
# Environment variables that are switches of the CLI, not config keys.
_ENV_NOT_CONFIG = {"KKTRAIN_TRACE_HOOKS", "KKTRAIN_HW_PROFILES", "KKTRAIN_RUNS_DIR", "KKTRAIN_HOME"}


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field's type takes true/false (bool, a union or Literal with bools, Any)."""
    import typing

    if annotation is bool or annotation is Any:
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in args)
    return any(_accepts_bool(a) for a in args)


def _refuse_bool_numbers(cls: type[BaseModel], value: Any, info: Any) -> Any:
    # pydantic's lax mode reads true as 1: `-o batch_size=true` would train with batch size 1.
    if isinstance(value, bool) and info.field_name is not None:
        field = cls.model_fields.get(info.field_name)
        if field is not None and not _accepts_bool(field.annotation):
            raise ValueError(f"expected {_type_name(field.annotation)}, not {str(value).lower()}")
    return value


class _Strict(BaseModel):
    # Floats are finite everywhere (lr = inf, grad_clip = nan are mistakes, never settings).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    _no_bool_numbers = field_validator("*", mode="before")(classmethod(_refuse_bool_numbers))


class PluginOptions(BaseModel):
    """The base of every plugin's (and task's) options model.

    Unknown keys are an error, assignments are validated (a hardware profile's change too), and
    each field's attribute docstring is its help text (``kktrain plugins --verbose``, the docs)::

        class Options(PluginOptions):
            decay: float = Field(0.999, gt=0, lt=1)
            '''Weight of the old average per update.'''
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False)

    _no_bool_numbers = field_validator("*", mode="before")(classmethod(_refuse_bool_numbers))


MAX_SEED = 2**63 - 1
"""Seeds are what torch's generators take: 0 .. 2**63 - 1."""
MAX_STEPS = 10**9
"""The most steps (and ``stop_at_step``) a run may ask for: a billion steps is years of training;
more is a typo (``--max-steps 100000000000000000`` would run for ever)."""
MAX_EPOCHS = 10**6

OptimizerName = Literal["adamw", "adam", "sgd", "rmsprop", "adagrad"]


class OptimizerConfig(_Strict):
    """The optimizer: torch's own, by ``name``; ``impl`` picks fused/foreach kernels (auto: fastest).

    ``weight_decay`` defaults to 0.01 for adamw (decoupled) and 0 for the others (where it is an
    L2 term). ``no_decay`` leaves biases and normalisation weights (tensors of fewer than two
    dimensions) out of weight decay, as nanoGPT and timm do.
    """

    name: OptimizerName = "adamw"
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    weight_decay: float | None = Field(None, ge=0, allow_inf_nan=False)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0, allow_inf_nan=False)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    alpha: float = Field(0.99, gt=0, lt=1)
    no_decay: bool = False
    impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """``auto``: torch's fused kernel where it has one (adamw, adam, sgd, adagrad; CPU too), else foreach."""

    @property
    def effective_weight_decay(self) -> float:
        """``weight_decay``, or its default for ``name`` (0.01 for adamw, else 0) when unset."""
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.01 if self.name == "adamw" else 0.0

    @field_validator("betas")
    @classmethod
    def _betas_below_one(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("each beta must be in [0, 1), like (0.9, 0.999)")
        return value

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimizerConfig:
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise ValueError("nesterov needs optimizer.name = sgd and optimizer.momentum > 0")
        return self


class ScheduleConfig(_Strict):
    """LR schedule: linear warmup then cosine to ``min_lr``; OneCycle; or constant."""

    name: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    min_lr: float = Field(0.0, ge=0)
    pct_start: float = Field(0.3, gt=0, lt=1)


class CheckpointConfig(_Strict):
    """When and how many checkpoints to write; ``async`` writes them in the background."""

    # ``async`` is a Python keyword: the field is ``async_``, its key (TOML, -o, dumps) ``async``.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_by_name=True, serialize_by_alias=True)

    every_steps: int = Field(0, ge=0)
    at_epoch_end: bool = True
    keep_last: int = Field(3, ge=1)
    keep_every: int = Field(0, ge=0)
    """Milestones: step checkpoints whose step is a multiple of this are never pruned by
    ``keep_last`` (0: none). A multiple of ``every_steps``, so that milestones are written."""
    best_metric: str | None = None
    best_mode: Literal["auto", "max", "min"] = "auto"
    async_: bool = Field(False, alias="async")
    """Copy the state to CPU memory in the step and write, fsync, rename and verify it in a
    background thread (at most one write in flight); docs/checkpoints.md."""

    @model_validator(mode="after")
    def _milestones_are_written(self) -> CheckpointConfig:
        if self.keep_every and self.every_steps and self.keep_every % self.every_steps:
            raise ValueError(
                f"checkpoint.keep_every = {self.keep_every} is not a multiple of checkpoint.every_steps = "
                f"{self.every_steps}, so no milestone would be written: make it a multiple"
            )
        return self

    @property
    def resolved_best_mode(self) -> Literal["max", "min"]:
        """``auto``: min for a metric named like a loss or an error (loss, error, err, ppl,
        perplexity, mse, mae, rmse), else max."""
        if self.best_mode != "auto":
            return self.best_mode
        return "min" if smaller_is_better(self.best_metric or "") else "max"


_SMALLER_IS_BETTER = {"loss", "error", "err", "ppl", "perplexity", "mse", "mae", "rmse", "nll", "wer", "cer"}


def plugin_name(obj: object) -> str:
    """The name a plugin instance runs under: its ``name`` attribute, else its class name."""
    return str(getattr(obj, "name", None) or type(obj).__name__)


def smaller_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better, judging by the words of its name (loss,
    error, err, ppl, perplexity, mse, mae, rmse, nll, wer, cer)."""
    import re

    return bool(_SMALLER_IS_BETTER & set(re.split(r"[^a-z0-9]+", metric.lower())))


class DataConfig(_Strict):
    """Data-loader settings."""

    workers: int = Field(0, ge=0)
    pin_memory: bool | Literal["auto"] = "auto"
    persistent_workers: bool = True
    prefetch_factor: int | None = Field(None, ge=1)
    shuffle: bool = True
    drop_last: bool = True
    val_batch_size: int | None = Field(None, ge=1)
    """Batch size of the core's validation loop over ``task.val_dataset()`` (default: batch_size)."""


class DistributedConfig(_Strict):
    """Multi-process training under torchrun (docs/distributed.md)."""

    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    """``auto``: ddp under torchrun, none on one process; ``fsdp``: FSDP2 ``fully_shard`` per block of
    ``Task.checkpoint_blocks(model)`` and the root (parameters, gradients, optimizer state sharded)."""
    reshard_after_forward: bool = True
    """fsdp: free the gathered parameters after each block's forward (less memory, one more
    all-gather in backward); ``false`` keeps them until backward (ZeRO-2 like)."""


class RunConfig(_Strict):
    """Everything the core needs for a run; plugin and task options live beside it."""

    task: str = Field("latin", min_length=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS)
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    stop_at_step: int | None = Field(None, ge=1, le=MAX_STEPS)
    batch_size: int = Field(64, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    threads: int | None = Field(None, ge=1)
    matmul_precision: Literal["highest", "high", "medium"] | None = None
    log_every: int = Field(50, ge=1)
    val_every: int = Field(0, ge=0)
    val_schedule: list[tuple[float, int]] = Field(default_factory=list)
    """Validation intervals that change with progress: ``[[0.1, 100], [0.5, 300], [1.0, 500]]`` validates
    every 100 steps up to 10 % of the run, then every 300 up to 50 %, then every 500 (counted from the
    last validation); replaces ``val_every`` when given."""
    val_at_epoch_end: bool = True
    """Validate at each epoch's end (the run's last step always validates)."""
    val_grad_mode: Literal["inference", "no_grad"] = "inference"
    """The core's validation runs under ``torch.inference_mode()`` (faster), or ``torch.no_grad()``; a
    plugin that needs autograd-compatible tensors asks for no_grad with
    ``trainer.require_autograd_in_validation(reason)``."""
    out: str | None = Field(None, min_length=1)
    plugins: list[str] = Field(default_factory=list)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("grad_clip", mode="before")
    @classmethod
    def _zero_means_off(cls, value: Any) -> Any:
        # TOML and -o have no null: grad_clip = 0 (or "off", "none") switches clipping off.
        if value == 0 or (isinstance(value, str) and value.lower() in ("off", "none", "null")):
            return None
        return value

    @field_validator("val_schedule")
    @classmethod
    def _schedule_moves_forward(cls, value: list[tuple[float, int]]) -> list[tuple[float, int]]:
        ends = [end for end, _ in value]
        if any(not 0 < end <= 1 for end in ends) or ends != sorted(set(ends)):
            raise ValueError("each entry is [share of the run, interval], shares rising in (0, 1]: e.g. [[0.1, 100], [1.0, 500]]")
        if any(interval < 1 for _, interval in value):
            raise ValueError("each interval (the second number of an entry) must be at least 1 step")
        return value

    @model_validator(mode="after")
    def _length_is_known(self) -> RunConfig:
        if self.epochs is None and self.max_steps is None:
            self.__dict__["epochs"] = 1
        return self


def core_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> dict[str, Any]:
    """All dotted leaf keys of a config model, with their field info."""
    keys: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        key = field.alias or name  # checkpoint.async (field async_)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.update(core_keys(ann, f"{prefix}{key}."))
        else:
            keys[f"{prefix}{key}"] = field
    return keys


CORE_KEYS = core_keys()
CORE_SECTIONS = {k.split(".")[0] for k in CORE_KEYS if "." in k}


def parse_value(text: str) -> Any:
    """A ``-o`` value: TOML syntax when it parses (``3``, ``true``, ``[1, 2]``), else a string.

    A flat list of bare words, ``[STANDARD, NEGATIVE]``, is a list of strings (TOML would want
    quotes, which a shell strips unless they are quoted again).
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        inner = text.strip()
        if inner.startswith("[") and inner.endswith("]") and "[" not in inner[1:-1] and "]" not in inner[1:-1]:
            items = [item.strip() for item in inner[1:-1].split(",")]
            if all(items):
                return [parse_value(item) for item in items]
        return text


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML config file into flat dotted keys; ``[plugins.ema]`` becomes ``plugins.ema.*``."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist: check the path given to --config")
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory: give the path of a .toml file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML ({e}): fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text: give a TOML file") from None
    return _flatten(data)


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """``KKTRAIN_BATCH_SIZE=256`` -> ``batch_size``; ``__`` nests: ``KKTRAIN_OPTIMIZER__LR``."""
    out = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_CONFIG:
            continue
        key = name[len(ENV_PREFIX):].lower().replace("__", ".")
        out[key] = parse_value(value)
    return out


def env_names(environ: Mapping[str, str]) -> dict[str, str]:
    """The variable each key of :func:`read_env` came from: ``batch_size`` -> ``KKTRAIN_BATCH_SIZE``."""
    return {name[len(ENV_PREFIX):].lower().replace("__", "."): name for name in environ
            if name.startswith(ENV_PREFIX) and name not in _ENV_NOT_CONFIG}


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to a misspelt ``word`` (difflib), or None."""
    import difflib

    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.7)
    return close[0] if close else None


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``-o KEY=VALUE`` items."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"-o {item!r} is not KEY=VALUE: write it like -o batch_size=256")
        out[key] = parse_value(value.strip())
    return out


def _as_names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise ConfigError(f"plugins.enabled = {value!r}: expected a list of plugin names")


class Layered:
    """Flat dotted values with the source each came from; later layers win.

    Layers are kept raw until :meth:`resolve`, because whether ``ema.decay`` is a plugin option
    depends on the plugins enabled by all layers together.
    """

    def __init__(self) -> None:
        self._layers: list[tuple[dict[str, Any], str]] = []
        self.values: dict[str, Any] = {}
        self.sources: dict[str, str] = {}
        self.enabled: list[str] = []
        self.env_names: dict[str, str] = {}
        """The ``KKTRAIN_*`` variable behind each key whose source is ``env``."""
        self.ignored: dict[str, str] = {}
        """``KKTRAIN_*`` variables that are not config keys: ignored, with a debug note each."""

    def add(self, values: Mapping[str, Any], source: str) -> None:
        """Lay ``values`` over what is there, remembering ``source``."""
        self._layers.append((dict(values), source))
        self.resolve()

    def resolve(self) -> None:
        """Recompute values: enabled plugins are the union over layers, in order of mention."""
        enabled: list[str] = []
        for values, _ in self._layers:
            for key in ("plugins", "plugins.enabled"):
                if key in values:
                    enabled += [n for n in _as_names(values[key]) if n not in enabled]
        self.enabled = enabled
        self.values, self.sources = {}, {}
        for values, source in self._layers:
            for key, value in values.items():
                key = normalise_key(key, enabled)
                if key == "plugins.enabled":
                    continue
                self.values[key] = value
                self.sources[key] = source
        self.values["plugins.enabled"] = list(enabled)
        self.sources["plugins.enabled"] = ", ".join(
            s for v, s in self._layers if "plugins" in v or "plugins.enabled" in v
        ) or "default"

    def user_set(self) -> frozenset[str]:
        """Keys set by the user (file, env, flags), not by defaults or the task."""
        return frozenset(k for k, s in self.sources.items() if s not in ("default", "task", "task object"))


def normalise_key(key: str, enabled: Iterable[str] = ()) -> str:
    """Canonical dotted key: ``task.x`` -> ``task_options.x``, ``ema.x`` -> ``plugins.ema.x``."""
    key = key.strip()
    head, _, rest = key.partition(".")
    if key == "plugins":
        return "plugins.enabled"
    if head == "task" and rest:
        return f"task_options.{rest}"
    if head in ("plugins", "task_options"):
        return key
    core_head = head.replace("-", "_")
    if core_head in CORE_KEYS or core_head in CORE_SECTIONS:
        return f"{core_head}.{rest.replace('-', '_')}" if rest else core_head
    for name in enabled:
        if rest and head in (name, name.replace("-", "_")):
            return f"plugins.{name}.{rest}"
    return key


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def _describe_error(err: ValidationError, where: str, sources: Mapping[str, str]) -> str:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"])
    src = sources.get(loc)
    origin = f" (from {src})" if src else ""
    if e["type"] == "extra_forbidden":
        near = closest(loc, CORE_KEYS)
        fix = f"did you mean {near}?" if near else "check the spelling (see `kktrain config show`)"
        return f"unknown {where} key '{loc}'{origin}: {fix}"
    value = e.get("input")
    return f"{where} key '{loc}' = {value!r}{origin}: {e['msg']}"


def split_layers(layered: Layered) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """Separate core values, plugin option tables (by plugin name) and task options."""
    core: dict[str, Any] = {"plugins": list(layered.enabled)}
    plugins: dict[str, dict[str, Any]] = {}
    task: dict[str, Any] = {}
    for key, value in layered.values.items():
        head, _, rest = key.partition(".")
        if key == "plugins.enabled":
            continue
        if head == "task_options" and rest:
            task[rest] = value
        elif head == "plugins" and rest:
            name, _, sub = rest.partition(".")
            if not sub:
                raise ConfigError(f"plugins.{name} must be a table of options, like [plugins.{name}] key = value")
            plugins.setdefault(name, {})[sub] = value
        elif key in CORE_KEYS or head in CORE_SECTIONS:
            core[key] = value
        elif layered.sources.get(key) == "env":
            # The environment is shared with other tools and runs: a variable that is no key of
            # this run is noted (debug) and ignored, not fatal.
            name = layered.env_names.get(key, ENV_PREFIX + key.upper().replace(".", "__"))
            near = closest(key, CORE_KEYS)
            hint = f" (did you mean {ENV_PREFIX}{near.upper().replace('.', '__')}?)" if near else ""
            layered.ignored[name] = f"{name} is not a config key of this run{hint}: ignored"
        elif rest:
            near = closest(key, CORE_KEYS)
            if near:
                raise ConfigError(f"unknown config key '{key}' (from {layered.sources.get(key)}): did you mean {near}?")
            from kktrain.manager import installed_entry_points

            plugin = closest(head, installed_entry_points())
            if plugin == head:  # the key is right; the plugin is not enabled
                raise ConfigError(
                    f"'{key}' (from {layered.sources.get(key)}) is an option of the plugin {plugin}, which is not "
                    f"enabled: add --plugin {plugin}"
                )
            if plugin:
                raise ConfigError(
                    f"unknown key '{key}' (from {layered.sources.get(key)}): did you mean {plugin}.{rest}? "
                    f"(enable it with --plugin {plugin})"
                )
            raise ConfigError(
                f"unknown key '{key}' (from {layered.sources.get(key)}): '{head}' is neither a core "
                f"setting nor an enabled plugin; enable it with --plugin {head} or fix the key"
            )
        else:
            near = closest(key, CORE_KEYS)
            fix = f"did you mean {near}?" if near else "check the spelling (see `kktrain config show`)"
            raise ConfigError(f"unknown config key '{key}' (from {layered.sources.get(key)}): {fix}")
    return core, plugins, task


def build_run_config(layered: Layered) -> RunConfig:
    """Validate the core part of the layered values into a :class:`RunConfig`."""
    core, _, _ = split_layers(layered)
    try:
        return RunConfig.model_validate(_nest(core))
    except ValidationError as err:
        raise ConfigError(_describe_error(err, "config", layered.sources)) from None


def validate_options(model: type[BaseModel] | None, values: Mapping[str, Any], owner: str) -> BaseModel | None:
    """Validate a plugin's or task's option table; errors name the owner, key and expected type."""
    if model is None:
        if values:
            keys = ", ".join(sorted(values))
            raise ConfigError(f"{owner} takes no options, got: {keys}: remove them")
        return None
    for key, value in values.items():  # true/false for a number, in any task's or plugin's model
        field = model.model_fields.get(key)
        if isinstance(value, bool) and field is not None and not _accepts_bool(field.annotation):
            raise ConfigError(f"{owner} option '{key}' = {str(value).lower()} is invalid: expected {_type_name(field.annotation)}, not a boolean")
    try:
        return model.model_validate(_nest(values))
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            known = ", ".join(model.model_fields) or "(none)"
            near = closest(loc, model.model_fields)
            fix = f"did you mean {near}? (known options: {known})" if near else f"known options are {known}"
            raise ConfigError(f"{owner} has no option '{loc}': {fix}") from None
        if not e["loc"]:  # a check across options (a model validator): its message says what to do
            raise ConfigError(f"{owner} options are invalid: {e['msg'].removeprefix('Value error, ')}") from None
        field = model.model_fields.get(str(e["loc"][0]))
        expected = _type_name(field.annotation) if field is not None else "a valid value"
        raise ConfigError(
            f"{owner} option '{loc}' = {e.get('input')!r} is invalid ({e['msg']}): expected {expected}"
        ) from None


def _type_name(annotation: Any) -> str:
    name = getattr(annotation, "__name__", None)
    return name if name and not hasattr(annotation, "__args__") else str(annotation).replace("typing.", "")


def to_toml_dict(config: RunConfig, plugin_options: Mapping[str, BaseModel | None], task_options: BaseModel | None) -> dict[str, Any]:
    """The effective config as a TOML-ready dict (``None`` values dropped: TOML has no null)."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if v is not None}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj

    data = clean(config.model_dump(mode="json"))
    if task_options is not None:
        data["task_options"] = clean(task_options.model_dump(mode="json"))
    plugins: dict[str, Any] = {"enabled": data.pop("plugins")}
    for name, opts in plugin_options.items():
        if opts is not None:
            plugins[name] = clean(opts.model_dump(mode="json"))
    data["plugins"] = plugins
    return data


# ---------------------------------------------------------------------------------------------
# The one assembly: what `kktrain run`, `kktrain config show`, kktrain.fit and the test fixtures
# all go through
# ---------------------------------------------------------------------------------------------

# Keys whose change on resume makes the run differ from an uninterrupted one.
_EXACTNESS_KEYS = ("seed", "batch_size", "grad_accum", "max_steps", "epochs", "grad_clip", "data.shuffle", "data.drop_last")
_EXACTNESS_SECTIONS = ("optimizer.", "schedule.", "task_options.", "plugins.")
_NOT_CARRIED = ("out", "stop_at_step")


@dataclass
class Assembly:
    """A validated run configuration with everything the Trainer needs besides the plugins."""

    config: RunConfig
    layered: Layered
    plugin_tables: dict[str, dict[str, Any]]
    task: Any  # kktrain.task.BoundTask
    task_options: BaseModel | None
    notes: list[str] = field(default_factory=list)
    """Warnings to log once the run has a logger (resume changes that break exactness ...)."""

    @property
    def user_set(self) -> frozenset[str]:
        """Keys the user set (file, env, flags, options), not defaults, task or checkpoint."""
        return self.layered.user_set()

    @property
    def sources(self) -> dict[str, str]:
        """Where each value came from."""
        return dict(self.layered.sources)

    def log_notes(self, log: Any) -> None:
        """Log the notes: resume changes as warnings, ignored ``KKTRAIN_*`` variables as debug
        lines (a warning when one looks like a misspelt key)."""
        for note in self.notes:
            log.warning("resume_config", detail=note)
        for name, note in self.layered.ignored.items():
            (log.warning if "did you mean" in note else log.debug)("env_ignored", variable=name, detail=note)


def saved_run_layer(payload_config: Mapping[str, Any], task: Mapping[str, Any], plugin_options: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's (or a run directory's) config as flat keys, without where-to-write keys."""
    saved = dict(payload_config)
    for key in _NOT_CARRIED:
        saved.pop(key, None)
    values: dict[str, Any] = {"plugins.enabled": list(saved.pop("plugins", []))}
    for key, value in saved.items():
        if isinstance(value, dict):
            values.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            values[key] = value
    values.update({f"task_options.{k}": v for k, v in task.get("options", {}).items()})
    for name, options in plugin_options.items():
        values.update({f"plugins.{name}.{k}": v for k, v in options.items()})
    return values


@dataclass
class ResumedRun:
    """The run a resume continues: its config as flat keys, where it came from, what it names."""

    values: dict[str, Any]
    source: str
    task: str
    signature: str | None


def resume_layer(resume: str | None, out: str | None) -> ResumedRun | None:
    """The run a resume continues (its checkpoint's config, or its config.toml), or None.

    ``--resume auto`` on a directory with a verified checkpoint takes its config; without one but
    with the run's ``config.toml``, that file (the run restarts from step 0 with its own config);
    a directory that holds neither but is not empty is not a run: refused.
    """
    from kktrain.checkpoint import load_checkpoint, newest_loadable

    if resume is None:
        return None
    payload: Mapping[str, Any] | None = None
    if resume == "auto":
        if out is None:
            return None
        run_dir = Path(out)
        found = newest_loadable(run_dir / "checkpoints", lambda message: None)  # the trainer warns
        if found is not None:
            path, payload = found
        else:
            saved_toml = run_dir / "config.toml"
            if saved_toml.is_file():
                values = read_config_file(saved_toml)
                for key in _NOT_CARRIED:
                    values.pop(key, None)
                signature = values.pop("trust.signature", None)
                return ResumedRun(values, f"run config {saved_toml}", str(values.get("task", "latin")),
                                  signature if isinstance(signature, str) else None)
            if run_dir.is_dir() and any(run_dir.iterdir()):
                raise ConfigError(
                    f"--resume auto --out {run_dir}: the directory holds no checkpoint and no config.toml, so it is "
                    "not a kktrain run: give the run's directory, or a new --out without --resume"
                )
            return None
    else:
        path = Path(resume)
    if payload is None and path.is_dir():  # a sharded checkpoint: its state.pt holds the config
        from kktrain.dcp import read_state

        payload = read_state(path)
    elif payload is None:
        payload = load_checkpoint(path)
    task = payload.get("task") or {}
    config = payload.get("config") or {}
    if not isinstance(task, Mapping) or not isinstance(config, Mapping):
        raise ConfigError(f"checkpoint {path} holds no valid config: pick another checkpoint")
    layer = saved_run_layer(config, task, payload.get("plugin_options") or {})
    meta = payload.get("meta") if isinstance(payload.get("meta"), Mapping) else {}
    signature = meta.get("trust") if isinstance(meta, Mapping) else None
    return ResumedRun(layer, f"checkpoint {path.name}", str(config.get("task", task.get("name", "latin"))),
                      signature if isinstance(signature, str) else None)


def _trusted_task(saved: str, given: Any, source: str, signed: bool = False) -> None:
    """Refuse a resume whose saved task would be imported although the user did not name it.

    A run directory or a checkpoint may come from a stranger: kktrain imports code only when the
    user names it (``--task module:factory``), or when the run is the user's own: its record is
    signed with this machine's key (:mod:`kktrain.trust`). An installed entry-point name is a
    lookup, not an import of the file's choosing, so it is taken as is.
    """
    from kktrain.task import PYTHON_TASK, recorded_spec

    if given is None:
        if saved.startswith(PYTHON_TASK):
            raise ConfigError(
                f"{source} was trained with a task given as a Python object ({saved.removeprefix(PYTHON_TASK).strip()}), "
                "which the command line cannot rebuild: resume it from Python with kktrain.fit(task, resume='auto', out=...)"
            )
        if ":" in saved and not signed:
            raise ConfigError(
                f"{source} names the task '{saved}' and is not signed by this machine, and kktrain imports code "
                f"only when you name it: add --task {saved} to resume it (docs/checkpoints.md, trust)"
            )
        return
    spec = given if isinstance(given, str) else recorded_spec(given)
    if spec != saved:
        raise ConfigError(f"{source} is a run of task '{saved}', not '{spec}': resume it with --task {saved}, or start a new --out")


def _inexact_changes(layered: Layered, saved: Mapping[str, Any], source: str) -> list[str]:
    """What the user changed against the resumed run that breaks exactness."""
    changes = []
    for key, value in layered.values.items():
        if key in ("max_steps", "epochs"):  # a new length extends (or shortens) the run on purpose:
            continue  # the schedule follows it (Trainer.extend_schedule, logged as schedule_extended)
        relevant = key in _EXACTNESS_KEYS or key.startswith(_EXACTNESS_SECTIONS)
        if relevant and key in saved and layered.sources.get(key) != source and saved[key] != value:
            where = "the checkpoint" if source.startswith("checkpoint") else "the run's config"
            changes.append(
                f"resuming with {key} = {value!r} ({layered.sources.get(key)}) where {where} has "
                f"{saved[key]!r}: the run will not match an uninterrupted one"
            )
    return changes


def assemble(
    *,
    task: str | Any | None = None,
    plugins: Iterable[str] = (),
    options: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    resume: str | None = None,
    environ: Mapping[str, str] | None = None,
    instances: Iterable[object] = (),
) -> Assembly:
    """Layer defaults < task defaults < resumed run < config file < ``KKTRAIN_*`` env < flags <
    options, build the task, validate everything; bad input raises :class:`ConfigError`.

    ``task`` is a spec (``latin``, ``mypkg.tasks:make``) or a task object; ``options`` are dotted
    keys (``{"ema.decay": 0.99, "task.size": 9}``), ``overrides`` the same as ``KEY=VALUE`` text
    (``-o``), ``flags`` the CLI's own flags as dotted keys; ``instances`` are plugin objects
    given to the Trainer directly (their names need no installed entry point).
    """
    from kktrain.manager import installed_entry_points, not_installed
    from kktrain.task import BoundTask, check_task_object, make_task, recorded_spec

    from kktrain.distributed import elastic_resume

    environ = os.environ if environ is None else environ
    flags = dict(flags or {})
    resume = elastic_resume(resume)  # a worker torchrun restarted continues its run
    layered = Layered()
    resumed = resume_layer(resume, flags.get("out"))
    if resumed is not None:
        layered.add(resumed.values, resumed.source)
    if config_file is not None:
        layered.add(read_config_file(config_file), f"file {config_file}")
    layered.env_names = env_names(environ)
    layered.add(read_env(environ), "env")
    flag_values = {k: v for k, v in flags.items() if v is not None}
    names = list(plugins)
    if names:
        flag_values["plugins"] = names
    if isinstance(task, str):
        flag_values["task"] = task
    layered.add(flag_values, "flag")
    layered.add(parse_overrides(overrides), "-o")
    layered.add(dict(options or {}), "option")
    if resumed is not None:
        # The run's length is max_steps or epochs: one the user gives on resume replaces the
        # checkpoint's other one (``--epochs 6`` extends a run saved with ``max_steps = 60``).
        saved = layered._layers[0][0]
        later = {normalise_key(k, layered.enabled) for values, _ in layered._layers[1:] for k in values}
        for length, other in (("epochs", "max_steps"), ("max_steps", "epochs")):
            if length in later and other not in later and saved.get(other) is not None:
                saved.pop(other)
                layered.resolve()

    # The task: given as an object, named by the user, or (resuming) the run's own.
    if resumed is not None:
        from kktrain import trust

        # The task the user named: the argument, or --task / KKTRAIN_TASK / their config file.
        source = layered.sources.get("task")
        named = task if task is not None else layered.values.get("task") if source not in (None, "default", resumed.source) else None
        plugins_saved = [str(p) for p in resumed.values.get("plugins.enabled", [])]
        signed = trust.verify(trust.code_specs(resumed.task, plugins_saved), resumed.signature)
        _trusted_task(resumed.task, named, resumed.source, signed)
        for spec in plugins_saved:  # a module:Class plugin the run recorded: the same rule as its task
            if ":" in spec and not signed and spec not in names:
                raise ConfigError(
                    f"{resumed.source} names the plugin '{spec}' and is not signed by this machine, and kktrain "
                    f"imports code only when you name it: add --plugin {spec} to resume it (docs/checkpoints.md, trust)"
                )
    _, _, task_table = split_layers(layered)
    if task is not None and not isinstance(task, str):
        check_task_object(task, f"task {type(task).__name__}")
        task_obj = task if isinstance(task, BoundTask) else BoundTask(task)
        task_obj.spec = recorded_spec(task_obj)
        if task_table:
            keys = ", ".join(sorted(task_table))
            raise ConfigError(f"task options ({keys}) given for a task object: set them on the object itself")
        task_opts = getattr(task_obj.wrapped, "options", None)
        task_opts = task_opts if isinstance(task_opts, BaseModel) else None
        layered.add({"task": task_obj.spec}, "task object")
    else:
        task_obj, task_opts = make_task(str(layered.values.get("task", "latin")), task_table)

    # The task's recommended defaults go under everything the user said.
    user_set = layered.user_set()
    task_defaults = dict(task_obj.config_defaults())
    if "epochs" in user_set or "max_steps" in user_set:
        task_defaults.pop("epochs", None)
        task_defaults.pop("max_steps", None)
    layered._layers.insert(0, (task_defaults, "task"))
    layered.resolve()

    layered.env_names = {normalise_key(k, layered.enabled): v for k, v in layered.env_names.items()}
    config = build_run_config(layered)
    if config.val_schedule and config.val_every and {"val_every", "val_schedule"} <= layered.user_set():
        raise ConfigError(
            f"val_every = {config.val_every} and val_schedule are both set ({layered.sources['val_every']}, "
            f"{layered.sources['val_schedule']}): keep one (val_schedule replaces val_every)"
        )
    notes = _inexact_changes(layered, resumed.values, resumed.source) if resumed is not None else []
    if resumed is not None and resumed.source.startswith("run config"):
        notes.insert(0, f"no verified checkpoint in {flags.get('out')}: restarting that run's config ({resumed.source.removeprefix('run config ')}) from step 0")
    _, plugin_tables, _ = split_layers(layered)
    available = installed_entry_points()
    given = {plugin_name(obj) for obj in instances}
    for name in layered.enabled:
        if name not in available and name not in given and ":" not in name:
            raise not_installed(name, available)
    return Assembly(config, layered, plugin_tables, task_obj, task_opts, notes)

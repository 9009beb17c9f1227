"""Run configuration: pydantic models and the layering defaults < task < file < env < flags.

Every value remembers where it came from (``kktrain config show``). Keys are dotted paths into
:class:`RunConfig` (``optimizer.lr``); ``NAME.key`` for an enabled plugin ``NAME`` goes to that
plugin's own options model; ``task.key`` goes to the task's options.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
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
_ENV_NOT_CONFIG = {"KKTRAIN_TRACE_HOOKS", "KKTRAIN_HW_PROFILES", "KKTRAIN_RUNS_DIR"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PluginOptions(BaseModel):
    """The base of every plugin's (and task's) options model.

    Unknown keys are an error, assignments are validated (a hardware profile's change too), and
    each field's attribute docstring is its help text (``kktrain plugins --verbose``, the docs)::

        class Options(PluginOptions):
            decay: float = Field(0.999, gt=0, lt=1)
            '''Weight of the old average per update.'''
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class OptimizerConfig(_Strict):
    """AdamW settings; ``impl`` picks torch's fused/foreach kernels (auto: fastest available)."""

    name: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"


class ScheduleConfig(_Strict):
    """LR schedule: linear warmup then cosine to ``min_lr``; OneCycle; or constant."""

    name: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    min_lr: float = Field(0.0, ge=0)
    pct_start: float = Field(0.3, gt=0, lt=1)


class CheckpointConfig(_Strict):
    """When and how many checkpoints to write."""

    every_steps: int = Field(0, ge=0)
    at_epoch_end: bool = True
    keep_last: int = Field(3, ge=1)
    best_metric: str | None = None
    best_mode: Literal["max", "min"] = "max"


class DataConfig(_Strict):
    """Data-loader settings."""

    workers: int = Field(0, ge=0)
    pin_memory: bool | Literal["auto"] = "auto"
    persistent_workers: bool = True
    prefetch_factor: int | None = Field(None, ge=1)
    shuffle: bool = True
    drop_last: bool = True


class RunConfig(_Strict):
    """Everything the core needs for a run; plugin and task options live beside it."""

    task: str = "latin"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    epochs: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)
    stop_at_step: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    threads: int | None = Field(None, ge=1)
    matmul_precision: Literal["highest", "high", "medium"] | None = None
    log_every: int = Field(50, ge=1)
    val_every: int = Field(0, ge=0)
    out: str | None = None
    plugins: list[str] = Field(default_factory=list)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    data: DataConfig = Field(default_factory=DataConfig)

    @field_validator("grad_clip", mode="before")
    @classmethod
    def _zero_means_off(cls, value: Any) -> Any:
        # TOML and -o have no null: grad_clip = 0 (or "off", "none") switches clipping off.
        if value == 0 or (isinstance(value, str) and value.lower() in ("off", "none", "null")):
            return None
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
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.update(core_keys(ann, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = field
    return keys


CORE_KEYS = core_keys()
CORE_SECTIONS = {k.split(".")[0] for k in CORE_KEYS if "." in k}


def parse_value(text: str) -> Any:
    """A ``-o`` value: TOML syntax when it parses (``3``, ``true``, ``[1, 2]``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
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
        return frozenset(k for k, s in self.sources.items() if s not in ("default", "task"))


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
        return f"unknown {where} key '{loc}'{origin}: check the spelling (see `kktrain config show`)"
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
        elif rest:
            raise ConfigError(
                f"unknown key '{key}' (from {layered.sources.get(key)}): '{head}' is neither a core "
                f"setting nor an enabled plugin; enable it with --plugin {head} or fix the key"
            )
        else:
            raise ConfigError(
                f"unknown config key '{key}' (from {layered.sources.get(key)}): check the spelling "
                f"(see `kktrain config show`)"
            )
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
    try:
        return model.model_validate(_nest(values))
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            known = ", ".join(model.model_fields) or "(none)"
            raise ConfigError(f"{owner} has no option '{loc}': known options are {known}") from None
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

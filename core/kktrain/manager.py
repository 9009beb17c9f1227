"""Build the plugin manager: discover plugins by entry point, load only the selected ones.

pluggy's ``load_setuptools_entrypoints`` imports every installed plugin; opt-in means we import
only what ``--plugin`` names, so a broken or slow third-party plugin costs nothing unless used.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy
from pydantic import BaseModel

from kktrain import hookspecs
from kktrain.config import validate_options
from kktrain.errors import PluginError

GROUP = "kktrain"
TASK_GROUP = "kktrain.tasks"
COMMANDS_GROUP = "kktrain.commands"
"""Plugin classes that add CLI commands (``register_commands``): listed here too, so the command
line imports only them, not every installed plugin (and torch), to show ``kktrain --help``."""


@dataclass
class PluginInfo:
    """What ``kktrain plugins`` shows about one installed plugin."""

    name: str
    entry_point: EntryPoint
    distribution: str
    version: str
    description: str = ""
    hooks: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    option_details: list[dict[str, Any]] = field(default_factory=list)
    """Each option's name, default and help (the field's attribute docstring)."""
    error: str | None = None


def installed_entry_points(group: str = GROUP) -> dict[str, EntryPoint]:
    """All entry points of ``group``, by name (the first one wins on duplicates)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        found.setdefault(ep.name, ep)
    return found


def _dist_of(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"], dist.version


def load_plugin_class(name: str, ep: EntryPoint) -> Any:
    """Import a plugin's entry point; an import failure names the plugin and its distribution."""
    dist, version = _dist_of(ep)
    try:
        return ep.load()
    except Exception as e:  # noqa: BLE001 - any import-time failure is the plugin's
        raise PluginError(
            f"plugin '{name}' from distribution {dist} {version} failed to load "
            f"({type(e).__name__}: {e}): reinstall or upgrade {dist}, or run without --plugin {name}"
        ) from None


def implemented_hooks(obj: Any) -> list[str]:
    """Names of the hookspecs that ``obj`` (a plugin class or instance) implements."""
    names = set()
    for attr in dir(obj):
        if attr.startswith("_") or not hasattr(hookspecs, attr):
            continue
        member = getattr(obj, attr, None)
        if callable(member) and hasattr(member, f"{hookspecs.PROJECT}_impl"):
            names.add(attr)
    order = [n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, f"{hookspecs.PROJECT}_spec")]
    return sorted(names, key=lambda n: order.index(n) if n in order else 999)


def describe_installed() -> list[PluginInfo]:
    """Every installed plugin with distribution, version, description and hooks (imports each)."""
    infos = []
    for name, ep in sorted(installed_entry_points().items()):
        dist, version = _dist_of(ep)
        info = PluginInfo(name=name, entry_point=ep, distribution=dist, version=version)
        try:
            cls = load_plugin_class(name, ep)
        except PluginError as e:
            info.error = str(e)
        else:
            info.description = first_line(cls.__doc__)
            info.hooks = implemented_hooks(cls)
            opts = getattr(cls, "Options", None)
            info.options = list(opts.model_fields) if opts is not None else []
            info.option_details = option_details(opts)
        infos.append(info)
    return infos


def option_details(model: Any) -> list[dict[str, Any]]:
    """Name, default and help of each field of an options model (``[]`` for none)."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    out = []
    for name, f in model.model_fields.items():
        default = None if f.is_required() else f.get_default(call_default_factory=True)
        try:
            import json

            json.dumps(default)
        except (TypeError, ValueError):
            default = repr(default)
        out.append({"name": f.alias or name, "default": default, "help": " ".join((f.description or "").split())})
    return out


def first_line(doc: str | None) -> str:
    """The first line of a docstring, RST literals (````x````) shown as ```x```."""
    return (doc or "").strip().splitlines()[0].strip().replace("``", "`") if doc and doc.strip() else ""


def options_model(cls: Any) -> type[BaseModel] | None:
    """The plugin's pydantic options model, if it has one."""
    model = getattr(cls, "Options", None)
    if model is not None and not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise PluginError(f"plugin {getattr(cls, '__name__', cls)!r}: Options must be a pydantic BaseModel subclass")
    return model


def instantiate(name: str, cls: Any, option_values: Mapping[str, Any]) -> tuple[Any, BaseModel | None]:
    """Validate options and create the plugin instance."""
    model = options_model(cls)
    opts = validate_options(model, option_values, f"plugin '{name}'")
    obj = cls(opts) if model is not None else cls()
    return obj, opts


def load_plugin_spec(spec: str) -> Any:
    """``--plugin mymod:MyPlugin``: the class (or factory) named by an import path, for a plugin
    that is not packaged yet. Imported only because the user named it (a resume needs the user's
    own signed record, or the user naming it again: :func:`kktrain.config.assemble`)."""
    import importlib
    import re

    from kktrain.task import _current_directory_importable

    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", spec):
        raise PluginError(f"plugin '{spec}' is not NAME or module:Class: write it like mylogger:JsonLogger")
    module_name, _, attr = spec.partition(":")
    _current_directory_importable()
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginError(f"plugin '{spec}': cannot import module '{module_name}' ({e}): check --plugin and PYTHONPATH") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if obj is None or not callable(obj):
        raise PluginError(f"plugin '{spec}': module '{module_name}' has no class '{attr}': check the name after the colon")
    return obj


def not_installed(name: str, available: Iterable[str]) -> PluginError:
    """The error for ``--plugin NAME`` when no installed distribution provides ``NAME``."""
    import difflib

    known = sorted(available)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    listed = ", ".join(known) or "none"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):  # module:Class, a path: never imported
        return PluginError(
            f"plugin '{name}' is not a plugin name: plugins are enabled by the name of an installed entry point "
            f"(group kktrain), never imported from a module path; installed: {listed}"
        )
    return PluginError(
        f"plugin '{name}' is not installed: {hint}install its distribution (pip install kktrain-{name}) "
        f"or pick an installed one ({listed})"
    )


def installed_plugin_classes(warn: Callable[[str], None], group: str = GROUP) -> dict[str, Any]:
    """Every installed plugin's class in ``group``, by name; one that fails to import is skipped
    with a warning."""
    classes = {}
    for name, ep in sorted(installed_entry_points(group).items()):
        try:
            classes[name] = load_plugin_class(name, ep)
        except PluginError as e:
            warn(str(e))
    return classes


def collect_commands(classes: Mapping[str, Any], warn: Callable[[str], None]) -> dict[str, Any]:
    """The click commands that plugin ``classes`` add through ``register_commands``, by name.

    A class whose hook does not fit the contract or raises is skipped with a warning (tox's rule
    for inline plugins), so one broken plugin never breaks the command line.
    """
    import click

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name, cls in classes.items():
        if not hasattr(cls, "register_commands"):
            continue
        try:
            pm.register(cls, name=name)
        except (pluggy.PluginValidationError, ValueError) as e:
            warn(f"plugin '{name}': register_commands does not fit the hook contract ({e}); its commands are skipped")
    commands: dict[str, Any] = {}
    for impl in reversed(pm.hook.register_commands.get_hookimpls()):
        group = click.Group()
        others = [p for p in pm.get_plugins() if p is not impl.plugin]
        try:
            pm.subset_hook_caller("register_commands", remove_plugins=others)(cli=group)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break the CLI
            warn(f"plugin '{impl.plugin_name}' failed to register its commands ({type(e).__name__}: {e}); they are skipped")
            continue
        for cmd_name, cmd in group.commands.items():
            commands.setdefault(cmd_name, cmd)  # the first registered wins, like the hook order
    return commands


def collect_plugin_commands(warn: Callable[[str], None]) -> dict[str, Any]:
    """The commands installed plugins add: those whose class is listed in ``kktrain.commands``."""
    return collect_commands(installed_plugin_classes(warn, COMMANDS_GROUP), warn)


def resolve_plugins(
    names: Iterable[str], option_tables: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, Any], dict[str, BaseModel | None]]:
    """Instantiate the selected plugins by name; unknown names list what is installed."""
    available = installed_entry_points()
    names = list(dict.fromkeys(names))
    for table in option_tables:
        if table not in names:
            raise PluginError(
                f"options given for plugin '{table}', which is not enabled: add --plugin {table} "
                f"or remove its options"
            )
    instances: dict[str, Any] = {}
    options: dict[str, BaseModel | None] = {}
    for name in names:
        if ":" in name:  # module:Class, not installed (yet)
            cls = load_plugin_spec(name)
        elif name not in available:
            raise not_installed(name, available)
        else:
            cls = load_plugin_class(name, available[name])
        instances[name], options[name] = instantiate(name, cls, option_tables.get(name, {}))
    return instances, options


def build_plugin_manager(
    plugins: Mapping[str, Any],
    defaults: Any,
    *,
    trace: Callable[[str], None] | None = None,
) -> pluggy.PluginManager:
    """A fresh manager with the core defaults (trylast) and the given plugin instances."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(defaults, name="kktrain.defaults")
    for name, obj in plugins.items():
        try:
            pm.register(obj, name=name)
        except pluggy.PluginValidationError as e:
            raise PluginError(f"plugin '{name}' does not fit the hook contract: {e}") from None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"{e}: check the hook's name against `kktrain plugins` / docs/hooks.md") from None
    if trace is not None:
        _install_trace(pm, trace)
    return pm


def _install_trace(pm: pluggy.PluginManager, emit: Callable[[str], None]) -> None:
    def before(hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        shown = {k: _short(v) for k, v in kwargs.items() if k != "trainer"}
        emit(f"hook {hook_name}({', '.join(f'{k}={v}' for k, v in shown.items())}) -> [{', '.join(i.plugin_name for i in impls)}]")

    def after(outcome: Any, hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        return None

    pm.add_hookcall_monitoring(before, after)


def _short(value: Any) -> str:
    text = type(value).__name__ if hasattr(value, "shape") or hasattr(value, "parameters") else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def trace_to_stderr(line: str) -> None:
    """Default sink for ``--trace-hooks``."""
    print(line, file=sys.stderr, flush=True)

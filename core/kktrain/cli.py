"""The ``kktrain`` command line (click).

Every user error becomes one line on stderr and exit code 2, with nothing written to disk.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

import kktrain
from kktrain.errors import KKTrainError

_RUN_DOC = """Train a task (default: Latin-square completion, on the CPU, no downloads).

\b
Examples:
  kktrain run                                   # the default task, ~5 minutes on 2 cores
  kktrain run --plugin ema --plugin amp -o amp.dtype=bf16
  kktrain run --task mypkg.tasks:make_task -o task.size=9 -o batch_size=256
  kktrain run --resume auto                     # continue the newest run exactly

Values are layered: defaults < the task's defaults < --config FILE < KKTRAIN_* env < flags and -o.
See `kktrain config show` for the effective values and where each came from.
"""


def run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options shared by ``run`` and ``config show``."""
    options = [
        click.option("--task", "task", metavar="NAME|MODULE:FACTORY", help="Task to train: an installed task name (see `kktrain plugins`) or module:factory."),
        click.option("--plugin", "-p", "plugins", multiple=True, metavar="NAME", help="Enable a plugin (repeatable)."),
        click.option("-o", "--option", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Set a config value (repeatable): core keys (batch_size=256, optimizer.lr=3e-4), plugin keys (ema.decay=0.999), task keys (task.size_max=8)."),
        click.option("--config", "config_file", type=click.Path(dir_okay=True, path_type=Path), metavar="FILE.toml", help="TOML config file."),
        click.option("--out", "out", metavar="DIR", help="Run directory (default: runs/<task>-<timestamp>)."),
        click.option("--max-steps", type=int, metavar="N", help="Stop after N optimizer steps (sets the schedule's length)."),
        click.option("--epochs", type=int, metavar="N", help="Train N epochs (when --max-steps is not given)."),
        click.option("--seed", type=int, metavar="N", help="Random seed (data order, init, dropout)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), help="Device (auto: cuda, then mps, then cpu)."),
        click.option("--batch-size", type=int, metavar="N", help="Batch size per step (per process)."),
        click.option("--workers", type=int, metavar="N", help="Data-loader worker processes."),
    ]
    for opt in reversed(options):
        func = opt(func)
    return func


def _flag_values(**flags: Any) -> dict[str, Any]:
    mapping = {"task": "task", "out": "out", "max_steps": "max_steps", "epochs": "epochs", "seed": "seed",
               "device": "device", "batch_size": "batch_size", "workers": "data.workers"}
    return {mapping[k]: v for k, v in flags.items() if k in mapping and v is not None}


# Keys whose change on resume makes the run differ from an uninterrupted one.
_EXACTNESS_KEYS = ("seed", "batch_size", "grad_accum", "max_steps", "epochs", "grad_clip", "data.shuffle", "data.drop_last")
_EXACTNESS_SECTIONS = ("optimizer.", "schedule.", "task_options.", "plugins.")


def checkpoint_layer(resume: str | None, out: str | None) -> tuple[dict[str, Any], str] | None:
    """The config a checkpoint was trained with, as flat keys: a resume continues with it."""
    from kktrain.checkpoint import load_checkpoint, newest_valid

    if resume is None:
        return None
    if resume == "auto":
        if out is None:
            return None
        path = newest_valid(Path(out) / "checkpoints", lambda message: None)  # the trainer warns
        if path is None:
            return None
    else:
        path = Path(resume)
    payload = load_checkpoint(path)
    saved = dict(payload.get("config", {}))
    values: dict[str, Any] = {}
    for key in ("out", "stop_at_step"):
        saved.pop(key, None)
    values["plugins.enabled"] = list(saved.pop("plugins", []))
    for key, value in saved.items():
        if isinstance(value, dict):
            values.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            values[key] = value
    task = payload.get("task", {})
    values.update({f"task_options.{k}": v for k, v in task.get("options", {}).items()})
    for name, options in payload.get("plugin_options", {}).items():
        values.update({f"plugins.{name}.{k}": v for k, v in options.items()})
    return values, f"checkpoint {path.name}"


def _inexact_changes(layered: Any, saved: dict[str, Any], source: str) -> list[str]:
    """What the user changed against the resumed checkpoint that breaks exactness."""
    changes = []
    for key, value in layered.values.items():
        relevant = key in _EXACTNESS_KEYS or key.startswith(_EXACTNESS_SECTIONS)
        if relevant and key in saved and layered.sources.get(key) != source and saved[key] != value:
            changes.append(
                f"resuming with {key} = {value!r} ({layered.sources.get(key)}) where the checkpoint has "
                f"{saved[key]!r}: the run will not match an uninterrupted one"
            )
    return changes


def build(
    *, task: str | None, plugins: tuple[str, ...], overrides: tuple[str, ...], config_file: Path | None,
    resume: str | None = None, **flags: Any
) -> dict[str, Any]:
    """Layer defaults, task defaults, the resumed checkpoint's config, file, env and flags; validate."""
    from kktrain.config import Layered, build_run_config, parse_overrides, read_config_file, read_env, split_layers
    from kktrain.manager import installed_entry_points
    from kktrain.trainer import make_task

    layered = Layered()
    resumed = checkpoint_layer(resume, flags.get("out"))
    if resumed is not None:
        layered.add(*resumed)
    if config_file is not None:
        layered.add(read_config_file(config_file), f"file {config_file}")
    layered.add(read_env(os.environ), "env")
    flag_values = _flag_values(task=task, **flags)
    if plugins:
        flag_values["plugins"] = list(plugins)
    layered.add(flag_values, "flag")
    layered.add(parse_overrides(overrides), "-o")

    # The task's recommended defaults go under everything the user said.
    task_name = layered.values.get("task", "latin")
    _, _, task_table = split_layers(layered)
    task_obj, task_opts = make_task(str(task_name), task_table)
    user_set = layered.user_set()
    task_defaults = {k: v for k, v in task_obj.config_defaults().items()}
    if "epochs" in user_set or "max_steps" in user_set:
        task_defaults.pop("epochs", None)
        task_defaults.pop("max_steps", None)
    layered._layers.insert(0, (task_defaults, "task"))
    layered.resolve()

    config = build_run_config(layered)
    warnings = _inexact_changes(layered, *resumed) if resumed is not None else []
    _, plugin_tables, _ = split_layers(layered)
    available = installed_entry_points()
    for name in layered.enabled:
        if name not in available:
            from kktrain.manager import not_installed

            raise not_installed(name, available)
    return {"config": config, "layered": layered, "plugin_tables": plugin_tables, "task": task_obj,
            "task_options": task_opts, "user_set": layered.user_set(), "warnings": warnings}


# Commands that builtin plugin distributions add through ``register_commands``: only used to say
# what to install when one is asked for and no installed plugin provides it.
COMMAND_DISTRIBUTIONS = {"hw-report": "kktrain-vcache"}


class KKTrainGroup(click.Group):
    """The top-level group: core commands, plus those installed plugins add (``register_commands``).

    Plugin commands are collected only when a name is not a core command or the list of commands
    is shown, so ``kktrain run`` imports no plugin it was not asked to enable.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plugin_commands: dict[str, click.Command] | None = None

    def plugin_commands(self) -> dict[str, click.Command]:
        """Commands added by installed plugins (imports every installed plugin class once)."""
        if self._plugin_commands is None:
            from kktrain.manager import collect_plugin_commands

            self._plugin_commands = {
                name: cmd for name, cmd in collect_plugin_commands(warn=_warn).items() if name not in self.commands
            }
        return self._plugin_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.plugin_commands()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = self.commands.get(cmd_name)
        if command is not None:
            return command
        command = self.plugin_commands().get(cmd_name)
        if command is None and cmd_name in COMMAND_DISTRIBUTIONS:
            dist = COMMAND_DISTRIBUTIONS[cmd_name]
            raise KKTrainError(f"command '{cmd_name}' comes with the plugin distribution {dist}: pip install {dist}")
        return command


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


@click.group(cls=KKTrainGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(kktrain.__version__, prog_name="kktrain")
def cli() -> None:
    """kktrain: a PyTorch trainer with a small core and opt-in plugins.

    \b
    Start with `kktrain run` (trains the built-in Latin-square task on the CPU),
    list features with `kktrain plugins`, and check hardware with `kktrain hw-report`
    (from the kktrain-vcache plugin).
    Shell completion: eval "$(_KKTRAIN_COMPLETE=bash_source kktrain)" (zsh_source, fish_source).
    """


@cli.command(help=_RUN_DOC)
@run_options
@click.option("--resume", metavar="PATH|auto", help="Continue from a checkpoint file, or the newest valid one of the run directory (auto).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or info lines; warnings and errors only.")
@click.option("--trace-hooks", is_flag=True, help="Print every hook call (same as KKTRAIN_TRACE_HOOKS=1).")
@click.option("--stop-at-step", type=int, metavar="N", help="Stop at step N with a checkpoint, keeping the schedule of the full run.")
def run(resume: str | None, quiet: bool, trace_hooks: bool, stop_at_step: int | None, **kwargs: Any) -> None:
    """Train."""
    from kktrain.trainer import Trainer

    if resume == "auto" and kwargs.get("out") is None:
        kwargs["out"] = _newest_run_dir()
    built = build(resume=resume, **kwargs)
    config = built["config"]
    if stop_at_step is not None:
        config.stop_at_step = stop_at_step
    trainer = Trainer(
        config, plugin_options=built["plugin_tables"], task=built["task"], user_set=built["user_set"],
        config_sources=built["layered"].sources, resume=resume, quiet=quiet, trace_hooks=trace_hooks or None,
    )
    trainer.task_options = built["task_options"]
    trainer.setup()  # bad input fails here, before any warning about it is printed
    for warning in built["warnings"]:
        trainer.log.warning("resume_config_changed", detail=warning)
    summary = trainer.fit()
    if summary["status"] == "aborted":
        sys.exit(3)


def _newest_run_dir() -> str | None:
    runs = Path(os.environ.get("KKTRAIN_RUNS_DIR", "runs"))
    if not runs.is_dir():
        return None
    candidates = [d for d in runs.iterdir() if (d / "checkpoints").is_dir()]
    if not candidates:
        return None
    return str(max(candidates, key=lambda d: max((p.stat().st_mtime for p in (d / "checkpoints").iterdir()), default=0)))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List installed plugins: name, distribution and version, description, hooks."""
    from kktrain.manager import describe_installed

    infos = describe_installed()
    if as_json:
        click.echo(json.dumps([
            {"name": i.name, "distribution": i.distribution, "version": i.version, "description": i.description,
             "hooks": i.hooks, "options": i.options, "entry_point": i.entry_point.value, "error": i.error}
            for i in infos
        ], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="installed kktrain plugins (enable with --plugin NAME)")
    for col in ("name", "distribution", "description", "hooks"):
        table.add_column(col, overflow="fold")
    for i in infos:
        desc = i.description if i.error is None else f"[red]failed to load[/]: {i.error}"
        table.add_row(i.name, f"{i.distribution} {i.version}", desc, ", ".join(i.hooks))
    Console(soft_wrap=False).print(table)


@cli.group()
def config() -> None:
    """Inspect configuration."""


@config.command("show")
@run_options
@click.option("--toml", "as_toml", is_flag=True, help="Print the effective config as TOML (as saved in the run directory).")
def config_show(as_toml: bool, **kwargs: Any) -> None:
    """Print the effective config and where each value came from (default, task, file, env, flag)."""
    from kktrain.config import CORE_KEYS, to_toml_dict

    from kktrain.log import make_logger
    from kktrain.trainer import Trainer

    built = build(**kwargs)
    # The run's own HW_DETECT phase, so hardware-profile changes (vcache) show with their source.
    trainer = Trainer(built["config"], plugin_options=built["plugin_tables"], task=built["task"],
                      user_set=built["user_set"], config_sources=built["layered"].sources, quiet=True)
    trainer.log, _ = make_logger(None, console=trainer.console, quiet=True)
    trainer.detect_hardware()
    config_obj, plugin_options = trainer.config, trainer.plugin_options
    if as_toml:
        import tomli_w

        click.echo(tomli_w.dumps(to_toml_dict(config_obj, plugin_options, built["task_options"])), nl=False)
        return
    sources = trainer.config_sources
    rows: list[tuple[str, Any, str]] = []
    dumped = config_obj.model_dump(mode="json")
    for key in CORE_KEYS:
        node: Any = dumped
        for part in key.split("."):
            node = node[part]
        src_key = "plugins.enabled" if key == "plugins" else key
        rows.append((key, node, sources.get(src_key, "default")))
    if built["task_options"] is not None:
        for k, v in built["task_options"].model_dump(mode="json").items():
            rows.append((f"task.{k}", v, sources.get(f"task_options.{k}", "default")))
    for name, opts in plugin_options.items():
        if opts is not None:
            for k, v in opts.model_dump(mode="json").items():
                rows.append((f"{name}.{k}", v, sources.get(f"plugins.{name}.{k}", "default")))
    from rich.console import Console
    from rich.table import Table

    table = Table(title="effective config")
    table.add_column("key")
    table.add_column("value", overflow="fold")
    table.add_column("source")
    for key, value, src in rows:
        table.add_row(key, json.dumps(value), src)
    Console(soft_wrap=False, width=max(100, 0)).print(table)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line and exit code 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="kktrain", standalone_mode=False)
    except KKTrainError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        # click's own usage errors, in the same one-line form as ours.
        where = e.ctx.command_path if e.ctx is not None else "kktrain"
        click.echo(f"error: {e.format_message().rstrip('.')}; see `{where} --help`", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except BrokenPipeError:  # pragma: no cover - `kktrain plugins | head`
        sys.exit(0)
from kktrain.scaffold import new_plugin  # noqa: E402
cli.add_command(new_plugin)

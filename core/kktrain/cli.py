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
  torchrun --nproc-per-node=2 -m kktrain run --out runs/x -o distributed.strategy=fsdp

Values are layered: defaults < the task's defaults < --config FILE < KKTRAIN_* env < flags and -o.
See `kktrain config show` for the effective values and where each came from.

The final summary goes to stdout, progress and log lines to stderr. Ctrl-C finishes the step and
writes a checkpoint (exit 0); a second Ctrl-C aborts at once (exit 130).
"""


# ---------------------------------------------------------------------------------------------
# Shell completion (click's protocol: _KKTRAIN_COMPLETE=bash_complete, COMP_WORDS, COMP_CWORD)
# ---------------------------------------------------------------------------------------------


def _complete_plugins(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    from kktrain.manager import installed_entry_points

    return sorted(n for n in installed_entry_points() if n.startswith(incomplete))


def _complete_tasks(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    from kktrain.manager import installed_entry_points
    from kktrain.task import TASK_GROUP

    return sorted(n for n in installed_entry_points(TASK_GROUP) if n.startswith(incomplete))


def _complete_keys(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Config keys: core, the task's (``task.KEY``) and the enabled plugins' (``NAME.KEY``)."""
    if "=" in incomplete:
        return []
    from kktrain.config import CORE_KEYS
    from kktrain.manager import installed_entry_points, options_model

    keys = list(CORE_KEYS)
    try:
        from kktrain.task import resolve_task_factory

        model = options_model(resolve_task_factory(ctx.params.get("task") or "latin"))
        keys += [f"task.{k}" for k in (model.model_fields if model is not None else {})]
    except Exception:  # noqa: BLE001 - completion never fails loudly
        pass
    available = installed_entry_points()
    for name in ctx.params.get("plugins") or ():
        try:
            model = options_model(available[name].load())
        except Exception:  # noqa: BLE001
            continue
        keys += [f"{name}.{k}" for k in (model.model_fields if model is not None else {})]
    return [f"{k}=" for k in keys if k.startswith(incomplete)]


def _complete_resume(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """``auto`` and the run directories under ``$KKTRAIN_RUNS_DIR`` (default ``runs``)."""
    runs = Path(os.environ.get("KKTRAIN_RUNS_DIR", "runs"))
    dirs = sorted(str(d) for d in runs.iterdir() if (d / "checkpoints").is_dir()) if runs.is_dir() else []
    return [c for c in ["auto", *dirs] if c.startswith(incomplete)]


def run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options shared by ``run`` and ``config show``."""
    options = [
        click.option("--task", "task", metavar="NAME|MODULE:FACTORY", shell_complete=_complete_tasks, help="Task to train: an installed task name (list them with `kktrain tasks`) or module:factory (your own; the current directory is importable)."),
        click.option("--plugin", "-p", "plugins", multiple=True, metavar="NAME|MODULE:CLASS", shell_complete=_complete_plugins,
                     help="Enable a plugin (repeatable): an installed one (list them with `kktrain plugins`) or module:Class, not installed (the current directory is importable)."),
        click.option("-o", "--option", "overrides", multiple=True, metavar="KEY=VALUE", shell_complete=_complete_keys,
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


_FLAG_KEYS = {"out": "out", "max_steps": "max_steps", "epochs": "epochs", "seed": "seed", "device": "device",
              "batch_size": "batch_size", "workers": "data.workers", "stop_at_step": "stop_at_step"}


def build(
    *, task: str | None, plugins: tuple[str, ...], overrides: tuple[str, ...], config_file: Path | None,
    resume: str | None = None, **flags: Any
) -> Any:
    """The run's :class:`kktrain.config.Assembly` from the command line's options."""
    from kktrain.config import assemble

    dotted = {_FLAG_KEYS[k]: v for k, v in flags.items() if k in _FLAG_KEYS}
    return assemble(task=task, plugins=plugins, overrides=overrides, flags=dotted, config_file=config_file, resume=resume)


# Commands that builtin plugin distributions add through ``register_commands``: only used to say
# what to install when one is asked for and no installed plugin provides it.
COMMAND_DISTRIBUTIONS = {"hw-report": "kktrain-vcache"}


class _WholeSentences(click.Group):
    """A group whose command list shows each command's whole first sentence (wrapped), not
    click's 45-character cut."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is None or cmd.hidden:
                continue
            rows.append((name, cmd.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class KKTrainGroup(_WholeSentences):
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


@click.group(cls=KKTrainGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(kktrain.__version__, prog_name="kktrain")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """kktrain: a PyTorch trainer with a small core and opt-in plugins.

    \b
    Start with `kktrain run` (trains the built-in Latin-square task on the CPU),
    list features with `kktrain plugins`, and check hardware with `kktrain hw-report`
    (from the kktrain-vcache plugin).
    Shell completion: eval "$(_KKTRAIN_COMPLETE=bash_source kktrain)" (zsh_source, fish_source).
    """
    _help_without_command(ctx)


def _help_without_command(ctx: click.Context) -> None:
    """A group called without a command prints its help on stdout and exits 0."""
    if ctx.invoked_subcommand is None and not ctx.resilient_parsing:
        click.echo(ctx.get_help())
        ctx.exit(0)


@cli.command(help=_RUN_DOC)
@run_options
@click.option("--resume", metavar="PATH|RUN_DIR|auto", shell_complete=_complete_resume, help="Continue from a checkpoint file, a run directory (its newest valid checkpoint), or auto: the newest of --out, else of the newest run.")
@click.option("--quiet", "-q", is_flag=True, help="No start block, progress or validation lines: warnings, errors, the final status line and the run directory.")
@click.option("--verbose", "-v", is_flag=True, help="Also echo routine log lines (checkpoints, optimizer, config changes) on the console; log.jsonl always has them.")
@click.option("--trace-hooks", is_flag=True, help="Print every hook call (same as KKTRAIN_TRACE_HOOKS=1).")
@click.option("--stop-at-step", type=int, metavar="N", help="Stop at step N with a checkpoint, keeping the schedule of the full run.")
def run(resume: str | None, quiet: bool, verbose: bool, trace_hooks: bool, stop_at_step: int | None, **kwargs: Any) -> None:
    """Train."""
    from kktrain.trainer import Trainer

    resume = _resume_target(resume, kwargs)
    assembly = build(resume=resume, stop_at_step=stop_at_step, **kwargs)
    trainer = Trainer.from_assembly(assembly, resume=resume, quiet=quiet, verbose=verbose, trace_hooks=trace_hooks or None)
    trainer.setup()  # bad input fails here, before any warning about it is printed
    assembly.log_notes(trainer.log)
    try:
        summary = trainer.fit()
    except Exception:
        crash = getattr(trainer, "crash", None)
        if crash is None or crash.status != "crashed":
            raise
        from kktrain.errors import TrainingCrashed

        raise TrainingCrashed(crash.message()) from None
    if quiet and trainer.is_main and not summary.get("nothing_to_do"):
        from kktrain.progress import quiet_summary

        click.echo(quiet_summary(summary))
    if summary["status"] == "aborted":
        sys.exit(3)


def _resume_target(resume: str | None, kwargs: dict[str, Any]) -> str | None:
    """``--resume auto`` without ``--out``: the newest run; ``--resume RUN_DIR``: auto in that run."""
    if resume is not None and resume != "auto" and (Path(resume) / "checkpoints").is_dir():
        if kwargs.get("out") not in (None, resume):
            raise KKTrainError(f"--resume {resume} is a run directory and --out is {kwargs['out']}: give one of them")
        kwargs["out"], resume = resume, "auto"
    if resume == "auto" and kwargs.get("out") is None:
        kwargs["out"] = _newest_run_dir()
    return resume


@cli.command("resume", context_settings={"ignore_unknown_options": True})
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("run_args", nargs=-1, type=click.UNPROCESSED, metavar="[RUN OPTIONS]")
def resume_cmd(run_dir: Path, run_args: tuple[str, ...]) -> None:
    """Continue a run: the same as `kktrain run --resume auto --out RUN_DIR [RUN OPTIONS]`."""
    from kktrain.errors import ConfigError

    if "--out" in run_args or any(a.startswith("--out=") for a in run_args):
        raise ConfigError(f"kktrain resume {run_dir} writes to {run_dir}: drop --out (to branch into a new directory: kktrain run --resume CHECKPOINT --out NEW)")
    if not (run_dir / "checkpoints").is_dir() and not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no checkpoints, no config.toml): start one with kktrain run --out {run_dir}")
    with run.make_context("kktrain resume", ["--resume", "auto", "--out", str(run_dir), *run_args]) as ctx:
        run.invoke(ctx)


@cli.command()
@run_options
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True, help="Overfit check: training samples to memorise.")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="Overfit check: optimizer steps on them.")
@click.option("--factor", type=click.FloatRange(min=1.0), default=4.0, show_default=True, help="Overfit check: the loss must fall this many times.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def preflight(samples: int, steps: int, factor: float, as_json: bool, **kwargs: Any) -> None:
    """Check a run before training it: initial loss vs chance, gradient health, overfitting a tiny subset.

    Exit 0 when every check passes (or is skipped), 1 when one fails, each failure with a hint.
    Nothing is written to --out.
    """
    from kktrain.preflight import as_dicts, run_preflight

    results = run_preflight(build(**kwargs), samples=samples, steps=steps, factor=factor)
    if as_json:
        click.echo(json.dumps(as_dicts(results), indent=2))
    for r in results if not as_json else ():
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[r.ok]
        click.echo(f"{verdict}  {r.name}: {r.detail}")
        if r.hint and r.ok is not True:
            click.echo(f"      hint: {r.hint}")
    if any(r.ok is False for r in results):
        sys.exit(1)


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
@click.option("--verbose", "-v", is_flag=True, help="Each plugin's options with their defaults and help.")
def plugins(as_json: bool, verbose: bool) -> None:
    """List installed plugins: name, distribution and version, description, hooks, options (set them with -o NAME.KEY=VALUE)."""
    from kktrain.manager import describe_installed

    infos = describe_installed()
    if as_json:
        click.echo(json.dumps([
            {"name": i.name, "distribution": i.distribution, "version": i.version, "description": i.description,
             "hooks": i.hooks, "options": i.options, "option_details": i.option_details,
             "entry_point": i.entry_point.value, "error": i.error}
            for i in infos
        ], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=False, highlight=False)
    if verbose:
        import textwrap

        def say(text: str, indent: str) -> None:
            console.print(textwrap.fill(text, width=max(console.width, 40), initial_indent=indent,
                                        subsequent_indent=indent + "  "), markup=False)

        for i in infos:
            console.print(f"[bold]{i.name}[/]  {i.distribution} {i.version}")
            say(i.description if i.error is None else "failed to load: " + i.error, "  ")
            say(f"hooks: {', '.join(i.hooks) or '-'}", "  ")
            for o in i.option_details:
                say(f"-o {i.name}.{o['name']}={json.dumps(o['default'])}", "  ")
                if o["help"]:
                    say(o["help"], "      ")
            console.print()
        return
    table = Table(title="installed kktrain plugins (enable with --plugin NAME; options: kktrain plugins --verbose)")
    table.add_column("name", no_wrap=True)
    for col in ("distribution", "description", "hooks", "options"):
        table.add_column(col, overflow="fold")
    for i in infos:
        desc = i.description if i.error is None else f"[red]failed to load[/]: {i.error}"
        table.add_row(i.name, f"{i.distribution} {i.version}", desc, ", ".join(i.hooks), ", ".join(i.options))
    console.print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def tasks(as_json: bool) -> None:
    """List installed tasks (entry-point group kktrain.tasks): name, distribution, description."""
    from kktrain.manager import _dist_of, first_line, installed_entry_points
    from kktrain.task import TASK_GROUP

    rows = []
    for name, ep in sorted(installed_entry_points(TASK_GROUP).items()):
        dist, version = _dist_of(ep)
        try:
            doc = first_line(getattr(ep.load(), "__doc__", None))
        except Exception as e:  # noqa: BLE001 - a broken task is listed, not fatal
            doc = f"failed to load ({type(e).__name__}: {e})"
        rows.append({"name": name, "distribution": dist, "version": version, "entry_point": ep.value, "description": doc})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="installed kktrain tasks (train one with --task NAME; yours: --task module:factory)")
    for col in ("name", "distribution", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], f"{r['distribution']} {r['version']}", r["description"])
    Console(soft_wrap=False).print(table)


@cli.command("validate")
@click.argument("run_dir", metavar="RUN_DIR|CHECKPOINT", type=click.Path(path_type=Path))
@click.option("-o", "--option", "options", multiple=True, metavar="task.KEY=VALUE",
              help="Change a task option first (repeatable), e.g. -o task.tta=4 or -o task.val_fill=[0.3,0.5].")
@click.option("--weights", default="auto", show_default=True, metavar="auto|raw|PLUGIN",
              help="raw: the training weights; ema: the average kept by --plugin ema; auto: a plugin's weights when the run has them.")
@click.option("--task", "task", metavar="MODULE:FACTORY", help="The run's task, when it is not an installed task name (kktrain imports only what you name).")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "mps"]), help="Where to run the model.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
def validate_cmd(run_dir: Path, options: tuple[str, ...], weights: str, task: str | None, device: str, as_json: bool) -> None:
    """Validate a trained run again, without training: the run's val/* metrics, optionally with changed task options.

    \b
    Examples:
      kktrain validate runs/latin-9x9                    # the final (else newest) checkpoint
      kktrain validate runs/x/checkpoints/step_00002000.pt --weights raw
      kktrain validate runs/latin-9x9 -o task.tta=4      # test-time augmentation, measured
    """
    import json

    from kktrain.api import validate
    from kktrain.config import parse_overrides
    from kktrain.errors import ConfigError

    changes = {}
    for key, value in parse_overrides(options).items():
        if not key.startswith("task."):
            raise ConfigError(f"-o {key}: kktrain validate changes task options only (-o task.KEY=VALUE); the run's other settings are its own")
        changes[key.removeprefix("task.")] = value

    def started(checkpoint: Path) -> None:
        click.echo(f"validating {checkpoint} ({weights} weights) ...", err=True)

    metrics = validate(run_dir, weights=weights, task=task, options=changes, device=device, on_start=started)
    if as_json:
        click.echo(json.dumps(metrics, sort_keys=True))
        return
    width = max(len(k) for k in metrics)
    for key in sorted(metrics, key=lambda k: (k.count("/") > 1, k)):
        value = metrics[key]
        click.echo(f"{key:<{width}}  {value:.4f}" if key != "val/time_s" else f"{key:<{width}}  {value:.1f}")


@cli.command("export")
@click.argument("run_dir", metavar="RUN_DIR|CHECKPOINT", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript", "state_dict"]), default="onnx", show_default=True,
              help="onnx: torch's exporter, dynamic batch axis, checked in onnxruntime; torchscript: torch.jit.trace; state_dict: the weights.")
@click.option("--weights", default="auto", show_default=True, metavar="auto|raw|PLUGIN",
              help="raw: the training weights; ema: the average kept by --plugin ema; auto: a plugin's weights when the run has them.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, metavar="FILE", help="The file to write.")
@click.option("--task", "task", metavar="MODULE:FACTORY", help="The run's task, when it is not an installed task name (kktrain imports only what you name).")
def export_cmd(run_dir: Path, fmt: str, weights: str, out: Path, task: str | None) -> None:
    """Export a run's trained model (ONNX, TorchScript or a state dict), using Task.example_input()."""
    from kktrain.export import export_model

    result = export_model(run_dir, format=fmt, out=out, weights=weights, task=task)
    click.echo(f"exported {result.format} to {result.path}")
    for line in result.checked:
        click.echo(f"  checked: {line}")


@cli.group(cls=_WholeSentences, invoke_without_command=True)
@click.pass_context
def config(ctx: click.Context) -> None:
    """Inspect configuration: `kktrain config show` prints the effective values and their sources."""
    _help_without_command(ctx)


@config.command("show")
@run_options
@click.option("--resume", metavar="PATH|RUN_DIR|auto", shell_complete=_complete_resume, help="Show the config a resume from this checkpoint (or the newest of --out: auto) would use.")
@click.option("--stop-at-step", type=int, metavar="N", help="As for run: stop at step N.")
@click.option("--quiet", "-q", is_flag=True, hidden=True)
@click.option("--verbose", "-v", is_flag=True, hidden=True)
@click.option("--trace-hooks", is_flag=True, hidden=True)
@click.option("--toml", "as_toml", is_flag=True, help="Print the effective config as TOML (as saved in the run directory).")
def config_show(as_toml: bool, resume: str | None, stop_at_step: int | None, quiet: bool, verbose: bool,
                trace_hooks: bool, **kwargs: Any) -> None:
    """Print the effective config and where each value came from (default, task, file, env, flag).

    Takes every option `run` takes, so the same command line with `config show` in place of `run`
    shows what that run would use, `--resume` included; resolved values (the device, threads, a
    plugin's default such as the curriculum preset) are shown with what they resolve to.
    """
    from kktrain.config import CORE_KEYS, normalise_key, to_toml_dict

    from kktrain.log import make_logger
    from kktrain.trainer import Trainer, resolve_device

    resume = _resume_target(resume, kwargs)
    built = build(resume=resume, **kwargs)
    if stop_at_step is not None:
        built.config.stop_at_step = stop_at_step
    # The run's own HW_DETECT phase, so hardware-profile changes (vcache) show with their source.
    trainer = Trainer.from_assembly(built, quiet=True)
    trainer.log, _ = make_logger(None, console=trainer.console, quiet=True)
    trainer.detect_hardware()
    config_obj, plugin_options = trainer.config, trainer.plugin_options
    if as_toml:
        import tomli_w

        click.echo(tomli_w.dumps(to_toml_dict(config_obj, plugin_options, built.task_options)), nl=False)
        return
    sources = trainer.config_sources
    resolved: dict[str, str] = {"device": str(resolve_device(config_obj.device)), "threads": _threads_text(config_obj.threads)}
    rows: list[tuple[str, Any, str]] = []
    dumped = config_obj.model_dump(mode="json")
    for key in CORE_KEYS:
        node: Any = dumped
        for part in key.split("."):
            node = node[part]
        src_key = "plugins.enabled" if key == "plugins" else key
        if key == "optimizer.weight_decay" and node is None:  # unset: the optimizer's own default
            node = config_obj.optimizer.effective_weight_decay
        rows.append((key, node, sources.get(src_key, "default")))
    if built.task_options is not None:
        for k, v in built.task_options.model_dump(mode="json").items():
            rows.append((f"task.{k}", v, sources.get(f"task_options.{k}", "default")))
    for name, opts in plugin_options.items():
        if opts is not None:
            for k, v in opts.model_dump(mode="json").items():
                rows.append((f"{name}.{k}", v, sources.get(f"plugins.{name}.{k}", "default")))
        describe = getattr(trainer.plugins.get(name), "resolved_options", None)
        if callable(describe):  # a plugin's own word on what its unset options resolve to
            resolved.update({f"{name}.{k}": str(v) for k, v in describe().items()})
    from rich.console import Console
    from rich.table import Table

    table = Table(title="effective config" + (f" (resuming {resume})" if resume else ""), title_justify="left")
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold")
    env_names = built.layered.env_names
    shown = []
    for key, value, src in rows:
        if src == "env":
            canonical = "plugins.enabled" if key == "plugins" else normalise_key(key, built.layered.enabled)
            src = f"env {env_names.get(canonical, '')}".rstrip()
        text = json.dumps(value)
        if key in resolved and resolved[key] != str(value):
            text = f"{text} -> {resolved[key]}"
        shown.append((key, text, src))
    table.add_column("source", overflow="fold")
    for row in shown:
        table.add_row(*row)
    Console(soft_wrap=False, highlight=False).print(table)


def _threads_text(threads: int | None) -> str:
    """The threads a run would use: ``threads``, else torch's default capped at the usable cores."""
    import torch

    from kktrain.hardware import usable_cores

    cores = usable_cores()
    if threads:
        return f"{threads} (more than the {cores} usable cores)" if threads > cores else str(threads)
    return f"{min(torch.get_num_threads(), cores)} (of {cores} usable cores)"


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line and exit code 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="kktrain", standalone_mode=False)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Under torchrun, after the run has finished and closed its process group: leave
            # without interpreter teardown, where gloo's C++ threads can still abort the process
            # ("terminate called without an active exception", SIGABRT) after a completed run.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
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
from kktrain import viz  # noqa: E402

for _command in viz.commands(run_options, build):  # plot, compare, lr-find
    cli.add_command(_command)

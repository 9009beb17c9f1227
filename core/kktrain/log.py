"""structlog set-up: JSON lines to the run directory, readable lines on the console.

No global configuration: each run wraps its own logger, so library users and tests running
several trainers in one process do not step on each other.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any

import structlog
from rich.console import Console

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class _Sink:
    """The final "logger": writes the rendered JSON line to the run's log file."""

    def __init__(self, file: IO[str] | None) -> None:
        self.file = file
        self.pending: list[str] = []

    def attach(self, file: IO[str]) -> None:
        """Start writing to ``file``, first what was logged before it existed."""
        self.file = file
        for line in self.pending:
            file.write(line + "\n")
        self.pending = []
        file.flush()

    def msg(self, line: str) -> None:
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()
        else:
            self.pending.append(line)

    info = warning = error = debug = critical = msg


class _ConsoleEcho:
    """A processor that shows warnings and errors on the console always, info lines (routine:
    checkpoints, the optimizer, config changes) only with ``verbose``; the log file has them all."""

    def __init__(self, console: Console | None, quiet: bool, verbose: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self.verbose = verbose

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        level = _LEVELS.get(method, 20)
        if self.console is not None and (level >= 30 or (self.verbose and not self.quiet and level >= 20)):
            extras = " ".join(f"{k}={_fmt(v)}" for k, v in event_dict.items() if k not in ("event", "timestamp", "level", "rank"))
            tag = {30: "[yellow]warning[/]", 40: "[red]error[/]", 50: "[red]critical[/]"}.get(level, "[dim]info[/]")
            self.console.print(f"{tag} {event_dict.get('event')} {extras}".rstrip(), highlight=False, markup=True)
        return event_dict


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def make_logger(
    log_path: Path | None, *, console: Console | None, quiet: bool, rank: int = 0, verbose: bool = False
) -> tuple[structlog.BoundLogger, IO[str] | None]:
    """A bound logger writing JSON lines to ``log_path`` (rank 0 only) and echoing to ``console``."""
    file = open(log_path, "a", encoding="utf-8") if (log_path is not None and rank == 0) else None  # noqa: SIM115
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _ConsoleEcho(console if rank == 0 else None, quiet, verbose),
        structlog.processors.JSONRenderer(default=str),
    ]
    logger = structlog.wrap_logger(_Sink(file), processors=processors, wrapper_class=structlog.BoundLogger)
    return logger.bind(rank=rank), file


def make_console(quiet: bool) -> Console:
    """The console for progress, tables and echoed events (stderr keeps stdout clean for --json)."""
    return Console(stderr=True, quiet=False, highlight=False, soft_wrap=True) if not quiet else Console(stderr=True, highlight=False, soft_wrap=True)


def write_json_line(file: IO[str], record: dict[str, Any]) -> None:
    """Append one JSON object per line."""
    file.write(json.dumps(record, default=float) + "\n")
    file.flush()


def err_console() -> Console:
    """A console on stderr for one-off messages."""
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)

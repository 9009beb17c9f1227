"""The CLI as a person uses it: help, error hints, streams, what a run shows on the terminal.

The real ``kktrain`` console script in a subprocess; where the screen matters, a pseudo-terminal
80 columns wide (what a person sees in a terminal window).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.parametrize("args", [(), ("config",)])
def test_a_group_without_a_command_prints_its_help_and_exits_0(cli, args: tuple[str, ...]) -> None:
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: kktrain") and "Commands:" in proc.stdout
    assert "error" not in proc.stdout + proc.stderr
    assert proc.stdout.rstrip().splitlines()[-1].strip().split()[0] in ("show", "tasks")

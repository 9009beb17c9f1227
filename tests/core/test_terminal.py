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


@pytest.mark.parametrize(("args", "hint"), [
    (("-o", "batchsize=3"), "did you mean batch_size?"),
    (("-o", "optimizer.lrr=3"), "did you mean optimizer.lr?"),
    (("-o", "task.samles=3"), "did you mean samples?"),
    (("-p", "ema", "-o", "ema.decy=0.9"), "did you mean decay?"),
    (("-o", "emma.decay=0.9"), "did you mean ema.decay? (enable it with --plugin ema)"),
])
def test_a_misspelt_key_gets_did_you_mean(cli, tmp_path: Path, args: tuple[str, ...], hint: str) -> None:
    proc = cli("run", "--task", "tiny", "--out", str(tmp_path / "r"), *args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and hint in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


def test_a_kktrain_variable_that_is_no_key_is_ignored_with_a_note(cli, tmp_path: Path) -> None:
    env = {"KKTRAIN_HOME": str(tmp_path / "home"), "KKTRAIN_SOMETHING_ELSE": "1", "KKTRAIN_BATCHSIZE": "3",
           "KKTRAIN_LOG_EVERY": "2"}
    proc = cli("run", "--task", "tiny", "--max-steps", "2", "--out", str(tmp_path / "r"), "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "did you mean KKTRAIN_BATCH_SIZE?" in proc.stderr and "SOMETHING_ELSE" not in proc.stderr
    events = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    ignored = {e["variable"]: e["level"] for e in events if e["event"] == "env_ignored"}
    assert ignored == {"KKTRAIN_SOMETHING_ELSE": "debug", "KKTRAIN_BATCHSIZE": "warning"}
    shown = cli("config", "show", "--task", "tiny", env=env)
    assert shown.returncode == 0, shown.stderr
    assert any("log_every" in line and "KKTRAIN_LOG_EVERY" in line for line in shown.stdout.splitlines()), shown.stdout

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
    assert "..." not in proc.stdout[proc.stdout.index("Commands:"):] and proc.stdout.rstrip().endswith(".")


@pytest.mark.parametrize(("args", "hint"), [
    (("-o", "batchsize=3"), "did you mean batch_size?"),
    (("-o", "optimizer.lrr=3"), "did you mean optimizer.lr?"),
    (("-o", "task.samles=3"), "did you mean samples?"),
    (("-p", "ema", "-o", "ema.decy=0.9"), "did you mean decay?"),
    (("-o", "emma.decay=0.9"), "did you mean ema.decay? (enable it with --plugin ema)"),
    (("-o", "ema.decay=0.9"), "'ema.decay' (from -o) is an option of the plugin ema, which is not enabled: add --plugin ema"),
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
    rows = shown.stdout.split("│ log_every")[1].split("\n│ val_every")[0]  # the row, wrapped at 80 columns
    assert " ".join(line.split("│")[-2].strip() for line in rows.splitlines()).strip() == "env KKTRAIN_LOG_EVERY", rows


def test_a_run_shows_a_start_block_validation_lines_and_the_summary_on_stdout(cli, tmp_path: Path) -> None:
    """Progress, the start block and validation lines on stderr; the summary alone on stdout (so
    `kktrain run | tee` keeps it); routine lines (checkpoints) only in log.jsonl."""
    proc = cli("run", "--task", "tiny", "--max-steps", "20", "-o", "log_every=5", "-o", "val_every=10",
               "-o", "checkpoint.best_metric=val/acc", "-o", "checkpoint.every_steps=5", "--out", "r", check=True)
    err = proc.stderr
    block = err[err.index("kktrain "):].splitlines()[:7]
    assert [line.split()[0] for line in block[1:]] == ["task", "device", "batch", "plugins", "steps", "run"], err
    assert "tiny (" in block[1] and "parameters)" in block[1] and "thread" in block[2]
    assert block[3].split()[1:] == ["32,", "seed", "0"] and block[4].split()[1:] == ["none"]
    assert block[5].split()[1] == "20" and block[6].endswith(str((tmp_path / "r").resolve()))
    val_lines = [line for line in err.splitlines() if line.startswith("val @ step ")]
    assert [line.split()[3] for line in val_lines] == ["10:", "16:", "20:"], err
    assert "acc " in val_lines[0] and "loss " in val_lines[0] and "(best acc " in val_lines[0]
    assert "checkpoint" not in err and "info" not in err  # routine: log file only
    out = proc.stdout
    assert out.startswith("kktrain: completed after 20 steps") and "train/loss" in out and "val/acc" in out
    assert out.rstrip().endswith(f"run directory: {(tmp_path / 'r').resolve()}")
    assert "step 20/20" not in out and "val @" not in out
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert "checkpoint" in {e["event"] for e in log}

    verbose = cli("run", "--task", "tiny", "--max-steps", "5", "--out", "v", "--verbose", check=True)
    assert "checkpoint path=" in verbose.stderr
    quiet = cli("run", "--task", "tiny", "--max-steps", "5", "--out", "q", "--quiet", check=True)
    assert quiet.stderr == ""
    lines = quiet.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("kktrain: completed after 5 steps in "), quiet.stdout
    assert lines[1] == f"run directory: {(tmp_path / 'q').resolve()}"


def test_log_jsonl_starts_with_metadata_and_ends_with_the_end_event_summary_has_times_and_paths(cli, tmp_path: Path) -> None:
    import kktrain
    import torch

    cli("run", "--task", "tiny", "--max-steps", "6", "-p", "ema", "-o", "checkpoint.best_metric=val/loss",
        "--out", "r", "-q", check=True)
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    first, last = log[0], log[-1]
    assert first["event"] == "run_metadata"
    assert first["versions"]["kktrain"] == kktrain.__version__ and first["versions"]["torch"] == torch.__version__
    assert first["versions"]["plugins"]["ema"].startswith("kktrain-ema ")
    assert first["argv"][1:3] == ["run", "--task"] and first["host"] and first["threads"] >= 1 and first["device"] == "cpu"
    assert last["event"] == "run_end" and last["status"] == "completed" and last["steps"] == 6
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["started_at"] < summary["ended_at"] and summary["started_at"].endswith("Z")
    assert summary["versions"] == first["versions"]
    assert isinstance(summary["train_loss"], float) and summary["train_loss_step"] == 6
    assert Path(summary["checkpoints"]["final"]).name == "final.pt" and Path(summary["checkpoints"]["best"]).is_file()
    best = json.loads((tmp_path / "r" / "checkpoints" / "best.pt.json").read_text())
    assert best["metric"] == "val/loss" and best["value"] == summary["best"]["value"] and best["step"] == summary["best"]["step"]


def _start(tmp_path: Path, *args: str) -> "subprocess.Popen[str]":
    import os
    import subprocess

    from kkcli import KKTRAIN

    env = {**os.environ, "OMP_NUM_THREADS": "1", "KKTRAIN_RUNS_DIR": str(tmp_path / "runs")}
    env.pop("KKTRAIN_TRACE_HOOKS", None)
    return subprocess.Popen([KKTRAIN, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, what: str, proc: "subprocess.Popen[str]", timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and what in path.read_text():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{what!r} never appeared in {path}")


def test_an_interrupted_run_shows_the_latest_train_loss_and_the_last_validation(tmp_path: Path) -> None:
    import signal

    proc = _start(tmp_path, "run", "--task", "tiny", "--max-steps", "1000000", "-o", "log_every=1000000",
                  "-o", "val_every=20", "--out", "r")
    _wait_for(tmp_path / "r" / "metrics.jsonl", '"kind": "val"', proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stop_reason"].startswith("interrupted by SIGINT at step ")
    assert summary["train_loss"] is not None and summary["train_loss_step"] == summary["steps"]
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert summary["val_step"] == [r["step"] for r in records if r["kind"] == "val"][-1]
    assert out.startswith(f"kktrain: interrupted after {summary['steps']} steps") and "(interrupted by SIGINT" in out
    assert f"@ step {summary['steps']}" in out and f"step {summary['val_step']}" in out and "val/acc" in out, out
    assert "resume with" in err.lower()


HEAVY_PLUGIN = '''
import torch
from kktrain import hookimpl


class Heavy:
    """From step 3 on, each step ends in one long torch call (the GIL released, no bytecode run)."""

    @hookimpl
    def on_step(self, trainer, loss):
        if trainer.state.step >= 3:
            open(str(trainer.run_dir) + ".inside", "w").close()
            a = torch.randn(2500, 2500)
            for _ in range(6):
                a = torch.mm(a, a).clamp_(-1, 1)
'''


def test_a_second_ctrl_c_aborts_at_once_with_exit_130(tmp_path: Path) -> None:
    """Both presses land inside one long torch call: Python would run its handler once, after the
    call, and the run would finish the step gracefully; the watcher thread counts both and exits."""
    import signal
    import time

    (tmp_path / "heavy.py").write_text(HEAVY_PLUGIN)
    proc = _start(tmp_path, "run", "--task", "tiny", "--max-steps", "1000000", "-p", "heavy:Heavy", "--out", "r")
    deadline = time.monotonic() + 120
    while not (tmp_path / "r.inside").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    time.sleep(0.05)  # inside the long call
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)  # a person's quick double press
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "aborted (second Ctrl-C)" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "summary.json").exists()  # aborted, not finished gracefully


def test_resuming_a_completed_run_says_so_and_changes_nothing(cli, tmp_path: Path) -> None:
    from kkcli import tree_state

    cli("run", "--task", "tiny", "--max-steps", "6", "--out", "r", "-q", check=True)
    before = tree_state(tmp_path / "r")
    again = cli("run", "--resume", "auto", "--out", "r")
    assert again.returncode == 0, again.stderr
    assert "already completed 6 of 6 steps: nothing to do" in again.stderr
    assert tree_state(tmp_path / "r") == before
    longer = cli("run", "--resume", "auto", "--out", "r", "--max-steps", "8", "-q", check=True)
    assert "completed after 8 steps" in longer.stdout


def test_config_show_takes_every_run_option_fits_80_columns_and_shows_resolved_values(cli, tmp_path: Path) -> None:
    from kktrain.cli import cli as group

    run_opts = {p.name for p in group.commands["run"].params}
    show_opts = {p.name for p in group.commands["config"].commands["show"].params}  # type: ignore[attr-defined]
    assert run_opts <= show_opts, run_opts - show_opts

    shown = cli("config", "show", "--task", "tiny", "-p", "curriculum", "-o", "threads=1", env={"COLUMNS": "80"})
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    # Absolute paths are printed whole (to be copied), however long tmp_path is (xdist adds to it).
    wide = [line for line in lines if len(line) > 80 and str(tmp_path) not in line]
    assert not wide, wide
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in lines if line.count("│") == 4}
    assert rows["device"] == '"auto" -> cpu' and rows["threads"] == "1"
    assert rows["curriculum.preset"] == "null -> latin (the default)"

    cli("run", "--task", "tiny", "--max-steps", "4", "-o", "seed=7", "--out", "r", "-q", check=True)
    resumed = cli("config", "show", "--resume", "auto", "--out", "r", "--quiet", "--stop-at-step", "3", env={"COLUMNS": "80"})
    assert resumed.returncode == 0, resumed.stderr
    rows = {line.split("│")[1].strip(): (line.split("│")[2].strip(), line.split("│")[3].strip())
            for line in resumed.stdout.splitlines() if line.count("│") == 4 and line.split("│")[1].strip()}
    assert rows["seed"][0] == "7" and rows["seed"][1].startswith("checkpoint") and rows["stop_at_step"][0] == "3"


PLUGIN_FILE = '''
from kktrain import hookimpl


class Counter:
    """Counts steps into a file next to the run (a plugin that is not packaged)."""

    @hookimpl
    def on_step(self, trainer, loss):
        with open(str(trainer.run_dir) + ".steps", "a") as f:
            f.write(f"{trainer.state.step}\\n")
'''


def test_plugin_module_class_loads_an_uninstalled_plugin_and_a_resume_finds_it_under_the_trust_rule(cli, tmp_path: Path) -> None:
    (tmp_path / "counter.py").write_text(PLUGIN_FILE)
    home = {"KKTRAIN_HOME": str(tmp_path / "home")}
    cli("run", "--task", "tiny", "--max-steps", "8", "--stop-at-step", "4", "-p", "counter:Counter", "--out", "r", "-q",
        env=home, check=True)
    assert (tmp_path / "r.steps").read_text().split() == ["1", "2", "3", "4"]
    # A stranger's key (a run from elsewhere): the recorded module:Class is not imported unless named.
    stranger = cli("run", "--resume", "auto", "--out", "r", "-q", env={"KKTRAIN_HOME": str(tmp_path / "other")})
    assert stranger.returncode == 2 and "add --plugin counter:Counter" in stranger.stderr
    assert len(stranger.stderr.strip().splitlines()) == 1
    assert (tmp_path / "r.steps").read_text().split() == ["1", "2", "3", "4"]
    # The user's own (signed) run: the resume finds the plugin again by itself.
    cli("run", "--resume", "auto", "--out", "r", "-q", env=home, check=True)
    assert (tmp_path / "r.steps").read_text().split() == [str(i) for i in range(1, 9)]
    bad = cli("run", "--task", "tiny", "-p", "counter:Nope", "--out", "x")
    assert bad.returncode == 2 and "has no class 'Nope'" in bad.stderr and not (tmp_path / "x").exists()


def _complete(cli, words: list[str], env: dict[str, str] | None = None) -> list[str]:
    """What bash completion offers for the last word (click's bash_complete protocol)."""
    proc = cli(env={"_KKTRAIN_COMPLETE": "bash_complete", "COMP_WORDS": " ".join(["kktrain", *words]),
                    "COMP_CWORD": str(len(words)), **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return [line.partition(",")[2] for line in proc.stdout.splitlines() if line.startswith("plain,")]


def test_shell_completion_of_plugins_tasks_keys_and_runs(cli, tmp_path: Path) -> None:
    assert {"ema", "early-stopping"} <= set(_complete(cli, ["run", "--plugin", "e"]))
    assert _complete(cli, ["run", "--task", "ti"]) == ["tiny"]
    keys = _complete(cli, ["run", "--task", "tiny", "-o", "opt"])
    assert "optimizer.lr=" in keys and all(k.startswith("opt") for k in keys)
    assert "task.hidden=" in _complete(cli, ["run", "--task", "tiny", "-o", "task."])
    assert _complete(cli, ["config", "show", "-p", "ema", "-o", "ema.de"]) == ["ema.decay="]
    assert _complete(cli, ["run", "-o", "ema.de"]) == []  # not enabled: not its keys
    (tmp_path / "runs" / "tiny-1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "notarun").mkdir()
    assert _complete(cli, ["run", "--resume", ""]) == ["auto", str(tmp_path / "runs" / "tiny-1")]


def test_plugins_shows_each_plugins_options(cli) -> None:
    table = cli("plugins", env={"COLUMNS": "200"}, check=True).stdout
    ema_row = next(line for line in table.splitlines() if line.startswith("│ ema "))
    assert "decay" in ema_row.split("│")[5]
    verbose = cli("plugins", "--verbose", env={"COLUMNS": "80"}, check=True).stdout
    block = verbose[verbose.index("\nema "):].split("\n\n")[0]
    assert "-o ema.decay=0.999" in block and "Weight of the old average" in block, block
    assert max(len(line) for line in verbose.splitlines()) <= 80
    details = {i["name"]: i["option_details"] for i in json.loads(cli("plugins", "--json", check=True).stdout)}
    assert {"name": "decay", "default": 0.999} == {k: v for k, v in details["ema"][0].items() if k != "help"}


def test_the_command_list_shows_whole_first_sentences(cli) -> None:
    out = cli("--help", env={"COLUMNS": "80"}, check=True).stdout
    commands = " ".join(out[out.index("Commands:"):].split())
    assert "..." not in commands
    assert "Train a task (default: Latin-square completion, on the CPU, no downloads)." in commands
    assert "List installed tasks (entry-point group kktrain.tasks): name, distribution, description." in commands


def _documented_options(section: str) -> set[str]:
    import re

    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-[a-z])(?![\w-])", section)) - {"--help", "-h"}


def test_docs_cli_md_and_every_help_agree_on_the_options() -> None:
    """Each command's section of docs/cli.md names exactly the options click knows for it."""
    import re

    import click

    from kktrain.cli import cli as group

    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    found = re.findall(r"^## `kktrain ([a-z-]+(?: [a-z-]+)*?)((?: [A-Z\[].*?)?)`(.*?)(?=^## |\Z)", text, re.S | re.M)
    sections = {path: header + body for path, header, body in found}
    ctx = click.Context(group)
    checked = []
    for path, section in sections.items():
        words = path.split()
        cmd: click.Command | None = group
        for w in words:
            cmd = cmd.get_command(ctx, w) if isinstance(cmd, click.Group) else None  # type: ignore[union-attr]
        if cmd is None:
            continue
        known = {o for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}
        known -= {"--help", "-h"}
        documented = _documented_options(section.split("```")[0])
        if "every option of\n`kktrain run`" in section or "every option of `kktrain run`" in section:
            documented |= _documented_options(sections["run"])
        assert known - documented == set(), f"kktrain {path}: undocumented in docs/cli.md: {sorted(known - documented)}"
        if cmd.context_settings.get("ignore_unknown_options"):  # `kktrain resume`: run options pass through to run
            documented &= known
        assert documented - known == set(), f"kktrain {path}: docs/cli.md names options it lacks: {sorted(documented - known)}"
        checked.append(path)
    assert {"run", "plugins", "tasks", "config show", "export", "new-plugin"} <= set(checked), checked


def test_usable_cores_reads_affinity_and_the_cgroup_quota(tmp_path: Path) -> None:
    import os

    from kktrain.hardware import cgroup_cpu_quota, usable_cores

    affinity = len(os.sched_getaffinity(0))
    cg = tmp_path / "sys" / "fs" / "cgroup"
    cg.mkdir(parents=True)
    assert cgroup_cpu_quota(tmp_path) is None and usable_cores(tmp_path) == affinity  # v1 files absent
    (cg / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None and usable_cores(tmp_path) == affinity
    (cg / "cpu.max").write_text("50000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 0.5 and usable_cores(tmp_path) == 1
    (cg / "cpu.max").unlink()
    (cg / "cpu").mkdir()
    (cg / "cpu" / "cpu.cfs_quota_us").write_text("100000")
    (cg / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_quota(tmp_path) == 1.0 and usable_cores(tmp_path) == 1


def test_more_threads_than_usable_cores_is_warned(cli, tmp_path: Path) -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    proc = cli("run", "--task", "tiny", "--max-steps", "2", "-o", f"threads={cores + 3}", "--out", "r", "-q", check=True)
    assert "threads_exceed_cores" in proc.stderr and f"try -o threads={cores}" in proc.stderr
    ok = cli("run", "--task", "tiny", "--max-steps", "2", "-o", "threads=1", "--out", "r1", "-q", check=True)
    assert ok.stderr == ""
    meta = json.loads((tmp_path / "r1" / "log.jsonl").read_text().splitlines()[0])
    assert meta["threads"] == 1 and meta["usable_cores"] >= 1


SLOW_PLUGIN = '''
import time
from kktrain import hookimpl


class Slow:
    """Makes each step take 20 ms and each validation 0.6 s, so a screen shows them."""

    @hookimpl
    def on_step(self, trainer, loss):
        time.sleep(0.02)

    @hookimpl
    def validate(self, trainer):
        time.sleep(0.6)
        return None
'''


def _screen_run(tmp_path: Path, *args: str, columns: int = 80) -> str:
    """Run kktrain on a pseudo-terminal ``columns`` wide; everything it drew, escapes removed."""
    import fcntl
    import os
    import re
    import struct
    import subprocess
    import termios

    from kkcli import KKTRAIN

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": str(columns), "TERM": "xterm-256color"}
    for k in ("KKTRAIN_TRACE_HOOKS", "NO_COLOR", "CI"):
        env.pop(k, None)
    proc = subprocess.Popen([KKTRAIN, *args], cwd=tmp_path, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    text = b"".join(chunks).decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]", "", text)
    return text.replace("\r\n", "\n")


def test_on_a_terminal_the_bar_shows_rate_loss_and_a_consistent_eta_from_the_first_steps(tmp_path: Path) -> None:
    import re

    (tmp_path / "slow.py").write_text(SLOW_PLUGIN)
    screen = _screen_run(tmp_path, "run", "--task", "tiny", "--max-steps", "60", "-o", "log_every=60",
                         "-o", "val_every=30", "-p", "slow:Slow", "--out", "r")
    frames = [f for f in re.split(r"[\r\n]", screen) if re.match(r"\s*(train|validating\.\.\.) .*\d+/60", f)]
    assert frames, screen
    early = [f for f in frames if int(re.search(r"(\d+)/60", f).group(1)) < 60]
    assert early, frames  # frames before the first (and only) log point at step 60
    for frame in early[1:]:
        step = int(re.search(r"(\d+)/60", frame).group(1))
        rate = re.search(r"([\d.]+) steps/s", frame)
        loss = re.search(r"loss ([\d.]+)", frame)
        eta = re.search(r"eta (\d+):(\d\d)", frame)
        assert rate and float(rate.group(1)) > 0 and loss and eta, frame
        eta_s = int(eta.group(1)) * 60 + int(eta.group(2))
        assert abs(eta_s - (60 - step) / float(rate.group(1))) <= 1.0, frame  # the ETA of the rate shown
    assert any(f.lstrip().startswith("validating...") for f in frames), frames
    assert "val @ step 30: loss " in screen and "val @ step 60: loss " in screen
    lines = screen.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("kktrain 0.")))
    assert [line.split()[0] for line in lines[start + 1:start + 7]] == ["task", "device", "batch", "plugins", "steps", "run"]
    assert "completed after 60 steps" in screen and "│ train/loss" in screen
    # Absolute paths are printed whole (to be copied), however long tmp_path is (xdist adds to it).
    wide = [line for line in lines if len(line) > 80 and str(tmp_path) not in line]
    assert not wide, wide

"""Real crashes: SIGKILL mid-run and SIGTERM, then resume to the bit-identical result."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from kkcli import KKTRAIN, kk
from kktrain.testing import compare_payloads

# Long enough to be killed mid-run (tiny task with workers: a few hundred steps per second).
ARGS = ["run", "--task", "tiny", "-q", "--max-steps", "600", "-o", "data.workers=2", "-o", "task.dropout=0.1",
        "-o", "task.samples=4096", "-o", "checkpoint.every_steps=20", "-o", "checkpoint.keep_last=2"]


def _final(run_dir: Path) -> dict:
    from kktrain import load_checkpoint

    return load_checkpoint(run_dir / "checkpoints" / "final.pt")


def _start(tmp_path: Path, out: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([KKTRAIN, *ARGS, "--out", out], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen[str], min_count: int = 1, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list((run_dir / "checkpoints").glob("step_*.pt.json")) if (run_dir / "checkpoints").exists() else []
        if len(found) >= min_count:
            return
        assert proc.poll() is None, f"run ended before a checkpoint: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path: Path) -> None:
    kk(*ARGS, "--out", "whole", cwd=tmp_path, check=True)
    proc = _start(tmp_path, "killed")
    _wait_for_checkpoint(tmp_path / "killed", proc, min_count=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "checkpoints" / "final.pt").exists(), "killed too late to test anything"
    resumed = kk(*ARGS[:1], *ARGS[1:], "--out", "killed", "--resume", "auto", cwd=tmp_path, check=True)
    assert "Traceback" not in resumed.stderr
    diffs = compare_payloads(_final(tmp_path / "whole"), _final(tmp_path / "killed"))
    assert not diffs, diffs


def test_sigterm_checkpoints_exits_0_and_says_how_to_resume(tmp_path: Path) -> None:
    proc = _start(tmp_path, "termed")
    _wait_for_checkpoint(tmp_path / "termed", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "--resume auto" in err
    payload = torch.load(max((tmp_path / "termed" / "checkpoints").glob("step_*.pt")), weights_only=True)
    # An interrupt at a step that was just checkpointed keeps that checkpoint instead of rewriting it.
    assert payload["kind"] == "interrupt" or f"interrupted at step {payload['step']}" in err, (payload["kind"], err)
    kk(*ARGS, "--out", "termed", "--resume", "auto", cwd=tmp_path, check=True)
    kk(*ARGS, "--out", "whole", cwd=tmp_path, check=True)
    assert not compare_payloads(_final(tmp_path / "whole"), _final(tmp_path / "termed"))


def test_resume_auto_skips_a_corrupt_newest_checkpoint(tmp_path: Path) -> None:
    args = ["run", "--task", "tiny", "-q", "--max-steps", "40", "-o", "checkpoint.every_steps=10", "--out", "r"]
    kk(*args, "--stop-at-step", "30", cwd=tmp_path, check=True)
    ck = tmp_path / "r" / "checkpoints"
    newest = ck / "step_00000030.pt"
    data = bytearray(newest.read_bytes())
    data[-100] ^= 0x01
    newest.write_bytes(bytes(data))
    proc = kk(*args, "--resume", "auto", cwd=tmp_path, check=True)
    assert "skipping checkpoint step_00000030.pt" in proc.stderr and "checksum" in proc.stderr
    log = (tmp_path / "r" / "log.jsonl").read_text()
    assert '"resumed"' in log and "step_00000020.pt" in log


ALL_PLUGINS_TOML = """
[plugins]
enabled = ["amp", "ema", "curriculum", "grad-checkpoint", "optim8bit", "compile", "early-stopping", "memory-monitor"]

[plugins.amp]
dtype = "bf16"

[plugins.ema]
decay = 0.99

[plugins.curriculum]
stages = [{until_step = 150, knobs = {noise = 0.0}}, {knobs = {noise = 0.3, loss_weight = 2.0}}]

[plugins.compile]
backend = "eager"

[plugins.early-stopping]
monitor = "val_ema/loss"
patience = 1000
"""


def test_sigkill_with_every_training_plugin_enabled_resumes_exactly(tmp_path: Path) -> None:
    """amp (bf16) + ema + curriculum + grad-checkpoint + optim8bit + compile + early-stopping +
    memory-monitor, killed with SIGKILL after a checkpoint, resumed: bit-identical to the whole run."""
    (tmp_path / "all.toml").write_text(ALL_PLUGINS_TOML)
    args = [*ARGS, "--config", "all.toml", "-o", "val_every=50"]
    kk(*args, "--out", "whole", cwd=tmp_path, check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([KKTRAIN, *args, "--out", "killed"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_checkpoint(tmp_path / "killed", proc, min_count=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "killed" / "checkpoints" / "final.pt").exists(), "killed too late to test anything"
    kk(*args, "--out", "killed", "--resume", "auto", cwd=tmp_path, check=True)
    whole, resumed = _final(tmp_path / "whole"), _final(tmp_path / "killed")
    assert set(whole["plugins"]) >= {"amp", "ema", "curriculum", "optim8bit", "early-stopping"}
    assert not compare_payloads(whole, resumed), compare_payloads(whole, resumed)
    import json

    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["curriculum"]["final_stage"]["index"] == 1


def test_resume_without_flags_continues_with_the_checkpoints_config(tmp_path: Path) -> None:
    """Core, task and plugin options and the enabled plugins come from the checkpoint."""
    args = ["--task", "tiny", "-q", "--max-steps", "20", "-o", "batch_size=16", "-o", "optimizer.lr=0.05",
            "-o", "task.hidden=24", "--plugin", "ema", "-o", "ema.decay=0.9"]
    kk("run", *args, "--out", "whole", cwd=tmp_path, check=True)
    kk("run", *args, "--out", "cut", "--stop-at-step", "10", cwd=tmp_path, check=True)
    resumed = kk("run", "--resume", "auto", "--out", "cut", cwd=tmp_path, check=True)
    warnings = [line for line in resumed.stderr.splitlines() if "warning" in line and "grad_clipping_often" not in line]
    assert not warnings, warnings  # lr 0.05 clips often (a true warning); nothing about the config
    assert not compare_payloads(_final(tmp_path / "whole"), _final(tmp_path / "cut"))
    changed = kk("run", "--resume", "auto", "--out", "cut", "-q", "--max-steps", "30", "--seed", "3", cwd=tmp_path, check=True)
    assert "resuming with seed = 3 (flag) where the checkpoint has 0" in changed.stderr
    assert "max_steps" not in changed.stderr  # a new length extends the run on purpose: no warning

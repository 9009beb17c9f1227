"""A run end to end: run directory contents, metrics, summary, accumulation, hot path, tracing."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from kktrain import Trainer, hookimpl
from kktrain.testing import compare_payloads


def test_run_directory_holds_config_metrics_log_checkpoints_summary(cli, tmp_path: Path) -> None:
    proc = cli("run", "--task", "tiny", "--out", "r", "--max-steps", "40", "-o", "log_every=5", "-o", "val_every=10",
               "-o", "checkpoint.best_metric=val/acc", check=True)
    run = tmp_path / "r"
    config = tomllib.loads((run / "config.toml").read_text())
    assert config["max_steps"] == 40 and config["task"] == "tiny" and config["checkpoint"]["best_metric"] == "val/acc"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    assert all({"train/loss", "train/lr", "train/steps_per_s"} <= set(r) for r in train)
    assert [r["step"] for r in val][:4] == [10, 16, 20, 30] and "val/acc" in val[0]
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"train_start", "checkpoint"} <= {e["event"] for e in log}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40
    assert summary["best"]["metric"] == "val/acc" and summary["best"]["value"] == max(r["val/acc"] for r in val)
    names = sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    assert "final.pt" in names and "best.pt" in names
    assert len([n for n in names if n.startswith("step_")]) <= 3  # keep_last
    # Not a terminal: plain progress lines on stderr, the summary table on stdout.
    assert "step 40/40" in proc.stderr and "val/acc" in proc.stdout


def test_grad_accum_equals_a_bigger_batch(kktrain_run) -> None:
    """Two micro-batches of 16 give the same update as one batch of 32 (up to float rounding)."""
    a = kktrain_run(steps=6, batch_size=32, grad_clip=None, **{"data.shuffle": False})
    b = kktrain_run(steps=6, batch_size=16, grad_accum=2, grad_clip=None, **{"data.shuffle": False})
    pa, pb = a.final_payload()["model"], b.final_payload()["model"]
    assert all(torch.allclose(pa[k], pb[k], atol=1e-6) for k in pa)
    c = kktrain_run(steps=6, batch_size=16, grad_clip=None, **{"data.shuffle": False})
    assert not all(torch.allclose(pa[k], c.final_payload()["model"][k], atol=1e-6) for k in pa)


def test_unimplemented_hooks_are_never_called(kktrain_run, hook_recorder) -> None:
    """With no plugins, the per-step hooks are not called through pluggy at all."""
    kktrain_run(steps=8, recorder=hook_recorder)
    per_step = {"forward_loss", "backward", "on_after_backward", "on_before_optimizer_step", "optimizer_step",
                "on_step", "on_step_exception", "on_log"}
    assert not per_step & set(hook_recorder.names), sorted(per_step & set(hook_recorder.names))
    assert hook_recorder.names.count("on_epoch_start") >= 1


def test_an_implemented_step_hook_is_called_every_step(kktrain_run, hook_recorder) -> None:
    class Counter:
        name = "counter"
        steps: list[int] = []

        @hookimpl
        def on_step(self, trainer, loss):
            self.steps.append(trainer.state.step)

    counter = Counter()
    kktrain_run(plugins=[counter], steps=7, recorder=hook_recorder)
    assert counter.steps == list(range(1, 8))
    assert hook_recorder.names.count("on_step") == 7


def test_trace_hooks_prints_every_hook_call(cli) -> None:
    proc = cli("run", "--task", "tiny", "-q", "--out", "t", "--max-steps", "3", "--trace-hooks", check=True)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hook ")]
    assert sum("forward_loss" in ln for ln in lines) == 3
    assert any(ln.startswith("hook on_train_start") for ln in lines)
    env = cli("run", "--task", "tiny", "-q", "--out", "t2", "--max-steps", "2", env={"KKTRAIN_TRACE_HOOKS": "1"}, check=True)
    assert "hook on_step" in env.stderr


def test_onecycle_and_constant_schedules(kktrain_run) -> None:
    one = kktrain_run(steps=10, **{"schedule.name": "onecycle"})
    lrs = [r["train/lr"] for r in one.metrics if r["kind"] == "train"]
    assert lrs and lrs[-1] < 1e-3  # annealed far below max_lr 0.01
    const = kktrain_run(steps=10, **{"schedule.name": "constant"})
    assert {r["train/lr"] for r in const.metrics if r["kind"] == "train"} == {0.01}


def test_warmup_then_cosine_to_min_lr(kktrain_run) -> None:
    out = kktrain_run(steps=20, log_every=1, **{"schedule.warmup_steps": 5, "schedule.min_lr": 0.001})
    lrs = [r["train/lr"] for r in out.metrics if r["kind"] == "train"]
    assert lrs[:5] == sorted(lrs[:5]) and max(lrs) == pytest.approx(0.01)
    assert lrs[-1] == pytest.approx(0.001) and lrs[5:] == sorted(lrs[5:], reverse=True)


def test_python_api_trainer_config_plugins(tmp_path: Path) -> None:
    from kktrain import RunConfig

    cfg = RunConfig(task="tiny", max_steps=5, out=str(tmp_path / "api"))
    summary = Trainer(cfg, quiet=True).fit()
    assert summary["status"] == "completed" and summary["steps"] == 5


def test_knob_change_reaches_worker_processes(kktrain_run) -> None:
    """set_knobs mid-run: the next batches, built in worker processes, see the new noise."""

    class Probe:
        name = "probe"

        def __init__(self):
            self.inputs: list[torch.Tensor] = []

        @hookimpl(tryfirst=True)
        def forward_loss(self, trainer, batch):
            self.inputs.append(batch[0].clone())

        @hookimpl
        def on_step(self, trainer, loss):
            if trainer.state.step == 3:
                trainer.set_knobs({"noise": 5.0})

    probe = Probe()
    kktrain_run(plugins=[probe], steps=6, **{"data.workers": 2, "data.shuffle": False})
    quiet = torch.stack([x.abs().mean() for x in probe.inputs[:3]])
    noisy = torch.stack([x.abs().mean() for x in probe.inputs[3:]])
    assert noisy.min() > 3 * quiet.max()


def test_resume_with_knob_change_mid_epoch_is_exact(assert_resume_equivalent) -> None:
    def plugins():
        class Knob:
            name = "knob"

            @hookimpl
            def on_step(self, trainer, loss):
                if trainer.state.step == 4:
                    trainer.set_knobs({"noise": 0.5, "loss_weight": 2.0})

        return [Knob()]

    assert_resume_equivalent(plugins=plugins, steps=12, cut=6, options={"data.workers": 2})
    assert_resume_equivalent(plugins=plugins, steps=12, cut=3, options={"data.workers": 2})


def test_plugins_json_lists_builtins_with_hooks(cli) -> None:
    proc = cli("plugins", "--json", check=True)
    infos = {p["name"]: p for p in json.loads(proc.stdout)}
    assert {"amp", "ema", "curriculum", "nan-guard", "spike-rollback", "vcache"} <= set(infos)
    for name, info in infos.items():
        if name in {"amp", "ema", "curriculum", "nan-guard", "spike-rollback", "vcache"}:
            assert info["distribution"] == f"kktrain-{name}", info  # each builtin is its own distribution
        assert info["version"]
    loaded = [i for i in infos.values() if i["error"] is None]
    assert loaded and all(i["hooks"] and i["description"] for i in loaded)


def test_version_and_help(cli) -> None:
    import kktrain

    assert kktrain.__version__ in cli("--version", check=True).stdout
    for cmd in (["run"], ["plugins"], ["config", "show"], ["hw-report"]):  # hw-report: from kktrain-vcache
        out = cli(*cmd, "--help", check=True).stdout
        assert "Usage:" in out and "--help" in out
    assert "--resume" in cli("run", "--help").stdout


def test_shell_completion_script(cli) -> None:
    proc = cli(env={"_KKTRAIN_COMPLETE": "bash_source"})
    assert "_kktrain_completion" in proc.stdout


DDP_SCRIPT = """
import json, os, sys, torch
from kktrain import RunConfig, Trainer, hookimpl

class Gather:
    name = "gather"
    @hookimpl
    def on_train_end(self, trainer, summary):
        flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        out = [torch.zeros_like(flat) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(out, flat)
        if trainer.rank == 0:
            same = all(torch.equal(out[0], o) for o in out[1:])
            with open(sys.argv[2], "w") as f:
                json.dump({"same": same, "ranks": len(out)}, f)

cfg = RunConfig(task="tiny", max_steps=6, out=sys.argv[1], grad_accum=2)
Trainer(cfg, [Gather()], quiet=True).fit()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun test uses the gloo backend on Linux")
def test_torchrun_two_processes_train_one_model_and_write_once(tmp_path: Path) -> None:
    """Under torchrun (DDP, gloo on CPU): gradients are synced (both ranks end with identical
    weights, with accumulation's no_sync), the data is sharded, and rank 0 alone writes."""
    import subprocess

    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node=2", str(script), str(tmp_path / "ddp"), str(tmp_path / "check.json")],
        capture_output=True, text=True, timeout=240, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads((tmp_path / "check.json").read_text())
    assert check == {"same": True, "ranks": 2}
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["status"] == "completed"
    assert '"rank": 1' not in (tmp_path / "ddp" / "log.jsonl").read_text()

"""mps-guard: out-of-memory retry in smaller micro-batches (any device), the MPS memory limit and cache.

OOM errors come from the ``fault_injector`` fixture: ``oom_at=[3], oom_above=8`` raises
``torch.OutOfMemoryError`` at step 3 while a micro-batch holds more than 8 samples, like a real OOM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kktrain import ConfigError, PluginError, TrainingAborted

HAS_MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()




def _events(out, name: str) -> list[dict]:
    return [e for e in out.summary["events"] if e["event"] == name]


def test_options_defaults_and_strictness(kktrain_run):
    from kktrain_mps_guard import MpsGuardPlugin

    o = MpsGuardPlugin.Options()
    assert (o.memory_limit_gb, o.max_retries, o.remember_split, o.empty_cache_every) == (14.0, 3, True, 0)
    with pytest.raises((ConfigError, PluginError), match="mps-guard.*no option 'max_retry'"):
        kktrain_run(plugins=["mps-guard"], options={"mps-guard.max_retry": 2}, steps=1)
    for key, value in (("memory_limit_gb", -1), ("max_retries", "many"), ("empty_cache_above", 0), ("check_every", 0)):
        with pytest.raises(ConfigError, match=f"mps-guard.*'{key}'"):
            kktrain_run(plugins=["mps-guard"], options={f"mps-guard.{key}": value}, steps=1)


def test_is_out_of_memory_recognises_cuda_and_mps_errors_only():
    from kktrain_mps_guard import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 13.9 GB, other allocations: 0 bytes)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_oom_retry_splits_until_it_fits_and_keeps_the_effective_batch(kktrain_run, fault_injector):
    inj = fault_injector(oom_at=[3], oom_above=8)
    out = kktrain_run(plugins=["mps-guard", inj], steps=6)  # batch_size 32
    out.assert_success()
    assert inj.injected == [("oom", 3), ("oom", 3)]  # 32 samples, then 2 x 16; 4 x 8 fits
    retries = _events(out, "oom_retry")
    assert [(e["at_step"], e["micro_batches"], e["micro_batch_size"]) for e in retries] == [(3, 2, 16), (3, 4, 8)]
    assert [e["micro_batches"] for e in _events(out, "step_retry")] == [2, 4]
    assert [e["micro_batches"] for e in _events(out, "oom_recovered")] == [4]
    assert out.summary["mps-guard"] | {"device": None} == {"device": None, "ooms": 2, "retries": 2, "split": 4}
    # Same effective batch: equal to a run without the OOM up to summation order.
    plain = kktrain_run(plugins=["mps-guard"], steps=6)
    a, b = out.final_payload()["model"], plain.final_payload()["model"]
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def test_the_working_split_is_remembered(kktrain_run, fault_injector):
    out = kktrain_run(plugins=["mps-guard", fault_injector(oom_at=[3, 5], oom_above=8)], steps=6)
    out.assert_success()
    # The split is sticky: from step 4 on every step runs in 4 micro-batches, so step 5 never OOMs.
    assert [(e["at_step"], e["micro_batches"]) for e in _events(out, "oom_retry")] == [(3, 2), (3, 4)]
    assert out.final_payload()["state"]["micro_split"] == 4
    forget = kktrain_run(plugins=["mps-guard", fault_injector(oom_at=[3, 5], oom_above=8)],
                         options={"mps-guard.remember_split": False}, steps=6)
    assert [(e["at_step"], e["micro_batches"]) for e in _events(forget, "oom_retry")] == [(3, 2), (3, 4), (5, 2), (5, 4)]


def test_oom_past_the_bound_aborts_with_one_clear_line(kktrain_run, fault_injector):
    out = kktrain_run(plugins=["mps-guard", fault_injector(oom_at=[3], oom_above=8)],
                      options={"mps-guard.max_retries": 1}, steps=6, raise_errors=False)
    assert isinstance(out.error, TrainingAborted) and out.error.exit_code == 3
    message = str(out.error)
    assert message.startswith("mps-guard: out of memory at step 3 on cpu with micro-batches of 16 samples after 1 retries")
    assert "lower batch_size" in message and "\n" not in message
    assert isinstance(out.error.__cause__, torch.OutOfMemoryError)
    assert [e["event"] for e in out.trainer.state.events if e["event"].startswith("oom")] == ["oom_retry", "oom_give_up"]
    summary = json.loads((out.run_dir / "summary.json").read_text())
    assert summary["status"] == "aborted" and summary["stop_reason"] == message


def test_oom_that_cannot_split_further_aborts(kktrain_run, fault_injector):
    out = kktrain_run(plugins=["mps-guard", fault_injector(oom_at=[2], oom_above=0)], steps=3, batch_size=4,
                      options={"mps-guard.max_retries": 10}, raise_errors=False)
    assert isinstance(out.error, TrainingAborted)
    assert "micro-batches of 1 samples after 2 retries" in str(out.error)


def test_other_errors_are_not_handled(kktrain_run):
    out = kktrain_run(plugins=["mps-guard"], steps=1)
    plugin = out.trainer.plugins["mps-guard"]
    assert plugin.on_step_exception(trainer=out.trainer, error=RuntimeError("shapes do not match"), attempt=0) is None
    assert plugin.ooms == 0


def test_resume_is_bit_exact_with_a_remembered_split(assert_resume_equivalent, fault_injector):
    whole, resumed = assert_resume_equivalent(
        plugins=lambda: ["mps-guard", fault_injector(oom_at=[3, 8], oom_above=8)], steps=10, cut=5,
        task_options={"dropout": 0.2},
    )
    # Step 3 (before the cut) needed 2 then 4; the resumed run keeps the split, so step 8 never OOMs.
    assert [(e["at_step"], e["micro_batches"]) for e in _events(resumed, "oom_retry")] == [(3, 2), (3, 4)]
    assert resumed.final_payload()["state"]["micro_split"] == 4


def test_works_with_nan_guard_and_spike_rollback(kktrain_run, fault_injector):
    inj = fault_injector(oom_at=[4], oom_above=8, nan_at=[9], spike_at={13: 20.0})
    out = kktrain_run(plugins=["mps-guard", "nan-guard", "spike-rollback", inj],
                      options={"spike-rollback.snapshot_every": 5, "spike-rollback.warmup_steps": 5}, steps=16)
    out.assert_success()
    assert out.summary["mps-guard"]["split"] == 4
    assert out.summary["nan-guard"]["skipped"] == 1
    assert out.summary["spike-rollback"]["rollback_steps"] == [13]


@pytest.mark.skipif(not HAS_MPS, reason="needs Apple MPS")
def test_mps_memory_limit_and_cache_emptying(kktrain_run):
    out = kktrain_run(plugins=["mps-guard"], options={"mps-guard.memory_limit_gb": 2.0, "mps-guard.empty_cache_every": 2},
                      steps=4, device="mps")
    out.assert_success()
    (limit,) = _events(out, "mps_memory_limit")
    assert limit["limit_gb"] == pytest.approx(2.0)
    assert [e["step"] for e in _events(out, "mps_cache_emptied")] == [2, 4]
    assert out.summary["mps-guard"]["memory_limit_gb"] == pytest.approx(2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_oom_retry(kktrain_run, fault_injector):
    out = kktrain_run(plugins=["mps-guard", fault_injector(oom_at=[2], oom_above=8)], steps=3, device="cuda")
    out.assert_success()
    assert out.summary["mps-guard"]["device"] == "cuda" and out.summary["mps-guard"]["split"] == 4


def test_cli_run_and_bad_option(tmp_path):
    import kktrain_mps_guard

    exe = Path(sys.executable).parent / "kktrain"
    paths = [str(Path(kktrain_mps_guard.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "KKTRAIN_RUNS_DIR": str(tmp_path)}
    ok = subprocess.run([str(exe), "run", "--quiet", "--task", "tiny", "--device", "cpu", "--plugin", "mps-guard",
                         "-o", "mps-guard.max_retries=2", "--max-steps", "4", "--out", str(tmp_path / "ok")],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    section = json.loads((tmp_path / "ok" / "summary.json").read_text())["mps-guard"]
    assert section == {"device": "cpu", "ooms": 0, "retries": 0, "split": 1}
    bad = subprocess.run([str(exe), "run", "--task", "tiny", "--plugin", "mps-guard", "-o", "mps-guard.max_retries=-1",
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "mps-guard" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


def test_latin_task_oom_is_retried_in_smaller_pieces_with_the_same_effective_batch(kktrain_run, fault_injector):
    """The done-when of the issue on the default task: an OOM while a micro-batch holds more than 4
    puzzles; the step is retried as 4 x 4 puzzles and the run completes."""
    latin = {"task": "latin", "batch_size": 16, "log_every": 4, "val_every": 0, "checkpoint.every_steps": 0,
             "task_options": {"d_model": 16, "layers": 1, "heads": 2, "size_min": 4, "size_max": 4,
                              "fill_min": 0.5, "fill_max": 0.5, "samples_per_epoch": 512, "val_sizes": [4], "val_puzzles": 8}}
    inj = fault_injector(oom_at=[3], oom_above=4)
    out = kktrain_run(plugins=["mps-guard", inj], steps=8, **latin)
    out.assert_success()
    assert [(e["at_step"], e["micro_batches"], e["micro_batch_size"]) for e in _events(out, "oom_retry")] == [(3, 2, 8), (3, 4, 4)]
    assert out.final_payload()["state"]["micro_split"] == 4
    # One size and one fill ratio: every puzzle has the same number of hidden cells, so the
    # per-puzzle weighting of the pieces gives the same loss as the whole batch.
    plain = kktrain_run(plugins=["mps-guard"], steps=8, **latin)
    a, b = out.final_payload()["model"], plain.final_payload()["model"]
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)

"""compile: the model is really compiled, nothing else changes; eager fallback at set-up, step and validation.

The mechanics are tested with small registered dynamo backends (an eager-numerics counting one and
deliberately broken ones); the real inductor run is in test_compile_inductor.py (marked slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo

from kktrain import ConfigError, PluginError, hookimpl
from kktrain.testing import compare_payloads

GRAPHS = {"train": 0, "eval": 0}


def kktrain_test_counting(gm, example_inputs):
    """Counts the graphs dynamo hands over and runs them as they are (eager numerics)."""
    GRAPHS["train" if torch.is_grad_enabled() else "eval"] += 1
    return gm.forward


def kktrain_test_broken(gm, example_inputs):
    """A backend that always fails, like a missing C++ compiler would."""
    raise RuntimeError("backend broken on purpose")


def kktrain_test_broken_eval(gm, example_inputs):
    """Compiles training graphs, fails on the no-grad graph that validation needs."""
    if not torch.is_grad_enabled():
        raise RuntimeError("no eval graphs on purpose")
    return gm.forward


for _fn in (kktrain_test_counting, kktrain_test_broken, kktrain_test_broken_eval):
    if _fn.__name__ not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(_fn)


@pytest.fixture(autouse=True)
def _fresh_counts():
    GRAPHS.update(train=0, eval=0)


def _events(out, name):
    return [e for e in out.summary["events"] if e["event"] == name]


def _same_training(a, b):
    return not compare_payloads(a.final_payload(), b.final_payload(), parts=("model", "optimizer", "scheduler"))


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compile.level": 3}, "has no option 'level'"),
        ({"compile.mode": "fastest"}, "option 'mode'"),
        ({"compile.fullgraph": "yes"}, "option 'fullgraph'"),
        ({"compile.cpp_wrapper": 1}, "option 'cpp_wrapper'"),
        ({"compile.backend": ""}, "option 'backend'"),
    ],
)
def test_options_reject_unknown_keys_and_wrong_types(kktrain_run, options, message):
    with pytest.raises(ConfigError, match=message):
        kktrain_run(plugins=["compile"], options=options, steps=2)


# ------------------------------------------------------------------ compiled


def test_model_is_compiled_and_nothing_else_changes(kktrain_run):
    out = kktrain_run(plugins=["compile"], options={"compile.backend": "kktrain_test_counting"}, steps=12,
                      task_options={"dropout": 0.2})
    plain = kktrain_run(steps=12, task_options={"dropout": 0.2})
    assert GRAPHS["train"] >= 1 and GRAPHS["eval"] >= 1, "dynamo must hand graphs to the backend"
    assert out.summary["compile"] == {"backend": "kktrain_test_counting", "mode": "default", "status": "compiled"}
    assert "forward" in out.trainer.model.__dict__
    assert list(out.final_payload()["model"]) == list(plain.final_payload()["model"]), "state-dict keys unchanged"
    assert _same_training(out, plain)
    assert not _events(out, "compile_fallback")


# ------------------------------------------------------------------ fallback


def test_invalid_backend_falls_back_at_set_up(kktrain_run):
    out = kktrain_run(plugins=["compile"], options={"compile.backend": "no_such_backend"}, steps=8)
    plain = kktrain_run(steps=8)
    out.assert_success()
    (event,) = _events(out, "compile_fallback")
    assert event["where"] == "set-up" and "no_such_backend" in event["reason"]
    assert out.summary["compile"]["status"] == "eager (fallback)"
    assert _same_training(out, plain)


def test_failure_at_the_first_forward_falls_back_and_retries_the_step(kktrain_run):
    out = kktrain_run(plugins=["compile"], options={"compile.backend": "kktrain_test_broken"}, steps=8,
                      task_options={"dropout": 0.2})
    plain = kktrain_run(steps=8, task_options={"dropout": 0.2})
    out.assert_success()
    (event,) = _events(out, "compile_fallback")
    assert event["where"] == "step 1" and "broken on purpose" in event["reason"]
    assert _events(out, "step_retry")[0]["micro_batches"] == 1
    assert "forward" not in out.trainer.model.__dict__, "the eager forward is back"
    assert _same_training(out, plain)


def test_failure_in_validation_falls_back_and_validates(kktrain_run):
    out = kktrain_run(plugins=["compile"], options={"compile.backend": "kktrain_test_broken_eval"}, steps=8, val_every=4)
    plain = kktrain_run(steps=8, val_every=4)
    out.assert_success()
    (event,) = _events(out, "compile_fallback")
    assert event["where"] == "validation"
    vals = [r for r in out.metrics if r["kind"] == "val"]
    assert len(vals) == 2 and vals[0]["val/loss"] == [r for r in plain.metrics if r["kind"] == "val"][0]["val/loss"]


def test_fallback_off_stops_with_one_line(kktrain_run):
    with pytest.raises(PluginError, match=r"compile \(backend no_such_backend\) failed at set-up.*fallback=true"):
        kktrain_run(plugins=["compile"], options={"compile.backend": "no_such_backend", "compile.fallback": False}, steps=2)


# ------------------------------------------------------------------ with the others, resume


def test_with_amp_ema_and_grad_checkpoint(kktrain_run):
    plugins = ["amp", "ema", "grad-checkpoint", "compile"]
    opts = {"compile.backend": "kktrain_test_counting", "amp.dtype": "bf16", "ema.decay": 0.9}
    out = kktrain_run(plugins=plugins, options=opts, steps=12)
    eager = kktrain_run(plugins=plugins[:-1], options={k: v for k, v in opts.items() if not k.startswith("compile")}, steps=12)
    out.assert_success()
    assert GRAPHS["train"] >= 1 and out.summary["compile"]["status"] == "compiled"
    assert {"val/loss", "val_ema/loss"} <= set(out.summary["final"])
    assert out.summary["grad-checkpoint"]["blocks"] == 3 and out.summary["amp"]["dtype"] == "bf16"
    assert _same_training(out, eager)


def test_resume_is_exact(assert_resume_equivalent):
    assert_resume_equivalent(plugins=["compile", "amp", "ema"], steps=10, cut=4,
                             options={"compile.backend": "kktrain_test_counting", "amp.dtype": "bf16"})


# ------------------------------------------------------------------ the CLI


def test_cli_run_with_compile(tmp_path):
    exe = Path(sys.executable).parent / "kktrain"
    out = tmp_path / "cli"
    done = subprocess.run(
        [str(exe), "run", "--task", "tiny", "--out", str(out), "--max-steps", "6", "-q", "--plugin", "compile",
         "-o", "compile.backend=aot_eager", "-o", "compile.dynamic=false"],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compile"]["status"] == "compiled" and summary["compile"]["backend"] == "aot_eager"

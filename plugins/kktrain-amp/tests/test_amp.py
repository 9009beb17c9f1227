"""amp: autocast bf16/fp16 on CPU, the CPU GradScaler, skip counting, unscale-before-clip, resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kktrain import ConfigError, hookimpl
from kktrain.testing import compare_payloads
from kktrain_amp import autocast_problem, cpu_has_native_bf16, dtype_candidates


class Recorder:
    """Records the model's output dtype in training forwards, grad norms and parameters per step."""

    name = "amp-recorder"

    def __init__(self) -> None:
        self.train_dtypes: list[torch.dtype] = []
        self.grad_norms: list[float] = []
        self.params: dict[int, list[torch.Tensor]] = {}
        self.model: torch.nn.Module | None = None

    @hookimpl(trylast=True)
    def on_model_built(self, trainer, model):
        self.model = model

        def hook(module, inputs, output):
            if torch.is_grad_enabled():
                self.train_dtypes.append(output.dtype)

        model.register_forward_hook(hook)

    @hookimpl
    def on_before_optimizer_step(self, trainer, loss, grad_norm):
        self.grad_norms.append(float(grad_norm))

    @hookimpl
    def on_step(self, trainer, loss):
        self.params[trainer.state.step] = [p.detach().clone() for p in trainer.model.parameters()]


def _train_losses(out) -> list[float]:
    return [r["train/loss"] for r in out.metrics if r["kind"] == "train"]


def _events(out, name: str) -> list[dict]:
    return [e for e in out.summary["events"] if e["event"] == name]


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"amp.precision": "bf16"}, "has no option 'precision'"),
        ({"amp.dtype": "fp8"}, "option 'dtype'"),
        ({"amp.init_scale": "big"}, "option 'init_scale'"),
        ({"amp.warn_halvings": 0}, "option 'warn_halvings'"),
        ({"amp.growth_interval": 2.5}, "option 'growth_interval'"),
    ],
)
def test_options_reject_unknown_keys_and_wrong_types(kktrain_run, options, message):
    with pytest.raises(ConfigError, match=message):
        kktrain_run(plugins=["amp"], options=options, steps=2)


def test_dtype_candidates_and_probe():
    assert dtype_candidates("bf16", "cuda") == ["bf16", "fp16", "fp32"]
    assert dtype_candidates("fp16", "cpu") == ["fp16", "bf16", "fp32"]
    assert dtype_candidates("auto", "mps") == ["fp16", "bf16", "fp32"]
    assert dtype_candidates("auto", "cpu", cpu_bf16=True) == ["bf16", "fp32"]
    assert dtype_candidates("auto", "cpu", cpu_bf16=False) == ["fp32"]
    assert dtype_candidates("auto", "cuda") == ["bf16", "fp16", "fp32"]
    assert dtype_candidates("fp32", "cuda") == ["fp32"]
    assert autocast_problem(torch.device("cpu"), "bf16") is None
    assert autocast_problem(torch.device("cpu"), "fp16") is None  # includes a CPU GradScaler round trip
    assert "no autocast" in autocast_problem(torch.device("meta"), "bf16")


# ------------------------------------------------------------------ training


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_trains_on_cpu(kktrain_run, dtype, torch_dtype):
    rec = Recorder()
    out = kktrain_run(plugins=["amp", rec], options={"amp.dtype": dtype}, steps=40)
    out.assert_success()
    assert set(rec.train_dtypes) == {torch_dtype}, "forward must run under autocast"
    losses = _train_losses(out)
    assert losses[-1] < 0.8 * losses[0]
    section = out.summary["amp"]
    assert section["dtype"] == dtype and section["grad_scaler"] is (dtype == "fp16")
    assert _events(out, "amp")[0]["dtype"] == dtype
    if dtype == "fp16":
        train = [r for r in out.metrics if r["kind"] == "train"]
        assert all("amp/scale" in r and "amp/skipped_steps" in r for r in train)


def test_fp32_is_a_logged_no_op(kktrain_run):
    rec = Recorder()
    amp = kktrain_run(plugins=["amp", rec], options={"amp.dtype": "fp32"}, steps=10)
    plain = kktrain_run(steps=10)
    assert set(rec.train_dtypes) == {torch.float32}
    assert _events(amp, "amp")[0]["dtype"] == "fp32"
    assert amp.summary["amp"] == {"dtype": "fp32", "requested": "fp32", "device": "cpu", "grad_scaler": False}
    assert not compare_payloads(amp.final_payload(), plain.final_payload(), parts=("model", "optimizer"))


def test_auto_on_cpu_needs_native_bf16(kktrain_run):
    out = kktrain_run(plugins=["amp"], steps=4)
    native = cpu_has_native_bf16()
    assert out.summary["amp"]["dtype"] == ("bf16" if native else "fp32") and out.summary["amp"]["requested"] == "auto"
    (event,) = _events(out, "amp")
    assert ("note" in event) is (not native)


# ------------------------------------------------------------------ the fp16 GradScaler


def test_inf_step_is_skipped_and_counted(kktrain_run, fault_injector):
    inj, rec = fault_injector(inf_at=[5]), Recorder()
    out = kktrain_run(plugins=["amp", inj, rec], options={"amp.dtype": "fp16", "amp.init_scale": 1024.0}, steps=10)
    out.assert_success()
    assert inj.injected == [("inf", 5)]
    for a, b in zip(rec.params[4], rec.params[5]):
        assert torch.equal(a, b), "the scaler must skip the optimizer step with inf gradients"
    assert any(not torch.equal(a, b) for a, b in zip(rec.params[5], rec.params[6]))
    section = out.summary["amp"]
    assert section["skipped_steps"] == 1 and section["calibration_skips"] == 0
    assert section["scale"] == 512.0
    last = [r for r in out.metrics if r["kind"] == "train"][-1]
    assert last["amp/skipped_steps"] == 1 and last["amp/scale"] == 512.0
    assert not _events(out, "amp_scale_falling")


def test_rapidly_falling_scale_is_warned_about(kktrain_run, fault_injector):
    inj = fault_injector(inf_at=[3, 4, 5, 6])
    out = kktrain_run(plugins=["amp", inj], options={"amp.dtype": "fp16", "amp.init_scale": 1024.0}, steps=10)
    warned = _events(out, "amp_scale_falling")
    assert len(warned) == 1 and warned[0]["halvings"] == 4 and warned[0]["scale"] == 64.0
    assert out.summary["amp"]["skipped_steps"] == 4 and out.summary["amp"]["scale_warnings"] == 1


def test_initial_calibration_is_not_a_warning(kktrain_run, recwarn):
    out = kktrain_run(plugins=["amp"], options={"amp.dtype": "fp16", "amp.init_scale": 2.0**40}, steps=20)
    section = out.summary["amp"]
    assert section["skipped_steps"] >= 3, "a 2**40 scale overflows fp16 until it has come down"
    assert section["calibration_skips"] == section["skipped_steps"]
    assert not _events(out, "amp_scale_falling")
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)], "torch's scheduler-order warning leaked"
    out.assert_success()


def test_gradients_are_unscaled_before_clipping(kktrain_run):
    """grad_norm seen after clipping's measurement is the true one, whatever the loss scale."""
    opts = {"amp.dtype": "fp16", "amp.growth_interval": 10_000}
    big, one, ref = Recorder(), Recorder(), Recorder()
    kktrain_run(plugins=["amp", big], options={**opts, "amp.init_scale": 1024.0}, steps=3)
    kktrain_run(plugins=["amp", one], options={**opts, "amp.init_scale": 1.0}, steps=3)
    kktrain_run(plugins=[ref], steps=3)  # fp32, no scaler: the unscaled reference
    for a, b, r in zip(big.grad_norms, one.grad_norms, ref.grad_norms):
        assert math.isclose(a, b, rel_tol=1e-3), (a, b)
        assert math.isclose(a, r, rel_tol=0.05), (a, r)


# ------------------------------------------------------------------ resume


def test_resume_is_exact_bf16(assert_resume_equivalent):
    assert_resume_equivalent(plugins=["amp"], options={"amp.dtype": "bf16"}, steps=12, cut=5, task_options={"dropout": 0.2})


def test_resume_is_exact_fp16_with_scaler_state(assert_resume_equivalent, fault_injector):
    whole, _ = assert_resume_equivalent(
        plugins=lambda: ["amp", fault_injector(inf_at=[3, 9])],
        options={"amp.dtype": "fp16", "amp.init_scale": 256.0, "amp.growth_interval": 2},
        steps=12, cut=6,
    )
    state = whole.final_payload()["plugins"]["amp"]
    assert state["skipped_steps"] == 2 and state["scaler"]["scale"] != 256.0


# ------------------------------------------------------------------ CUDA (skipped without a GPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cuda_autocast(kktrain_run, dtype):
    out = kktrain_run(plugins=["amp"], options={"amp.dtype": dtype, "device": "cuda"}, steps=20)
    out.assert_success()
    chosen = out.summary["amp"]["dtype"]
    if dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        assert chosen == "fp16" and "bf16" in out.summary["amp"]["fallback_reason"]
    else:
        assert chosen == dtype


# ------------------------------------------------------------------ the CLI


def test_cli_run_with_amp(tmp_path):
    exe = Path(sys.executable).parent / "kktrain"
    out = tmp_path / "cli"
    done = subprocess.run(
        [str(exe), "run", "--task", "tiny", "--out", str(out), "--max-steps", "12", "-q",
         "--plugin", "amp", "-o", "amp.dtype=fp16", "-o", "amp.init_scale=512.0"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["amp"]["dtype"] == "fp16" and summary["amp"]["grad_scaler"] is True
    bad = subprocess.run(
        [str(exe), "run", "--task", "tiny", "--out", str(tmp_path / "bad"), "--plugin", "amp", "-o", "amp.dtype=fp8"],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2
    assert "amp" in bad.stderr and "dtype" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(cpu_has_native_bf16(), reason="this CPU computes in bf16 natively; the slowness warning is for CPUs without")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_16_bit_on_a_cpu_without_native_bf16_warns_it_is_slower(kktrain_run, dtype):
    """It runs as asked (no fallback), but the user is told it is slower than fp32 and how to get fp32."""
    out = kktrain_run(plugins=["amp"], options={"amp.dtype": dtype}, steps=2)
    records = [json.loads(line) for line in (out.run_dir / "log.jsonl").read_text().splitlines()]
    warned = [r for r in records if r["event"] == "amp_cpu_emulated"]
    assert len(warned) == 1 and warned[0]["level"] == "warning" and warned[0]["dtype"] == dtype
    assert "amp.dtype=auto" in warned[0]["note"]
    assert out.summary["amp"]["dtype"] == dtype and "fallback_reason" not in out.summary["amp"]


def test_auto_on_cpu_does_not_warn_about_emulation(kktrain_run):
    out = kktrain_run(plugins=["amp"], options={"amp.dtype": "auto"}, steps=2)
    assert "amp_cpu_emulated" not in (out.run_dir / "log.jsonl").read_text()

"""optim8bit: bitsandbytes AdamW8bit on this machine's CPU, uint8 states, exact resume, options."""

from __future__ import annotations

import pytest
import torch

from kktrain import ConfigError, PluginError

pytest.importorskip("bitsandbytes", reason="optim8bit's 8-bit path needs bitsandbytes (extra 'bnb')")

# hidden=64: weights of 8x64, 64x64 and 64x4 elements; biases stay under any min_8bit_size used here.
WIDE = {"hidden": 64}


def test_unknown_option_is_rejected(kktrain_run):
    with pytest.raises(ConfigError) as err:
        kktrain_run(plugins=["optim8bit"], options={"optim8bit.min_size": 3}, steps=1)
    msg = str(err.value)
    assert "plugin 'optim8bit' has no option 'min_size'" in msg and "min_8bit_size" in msg and "\n" not in msg


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("min_8bit_size", "big", "expected int"),
    ("percentile_clipping", 0, "expected int"),
    ("on_unavailable", "ignore", "'fallback'"),
])
def test_wrong_values_name_the_expected_type(kktrain_run, key, value, expected):
    with pytest.raises(ConfigError) as err:
        kktrain_run(plugins=["optim8bit"], options={f"optim8bit.{key}": value}, steps=1)
    msg = str(err.value)
    assert f"plugin 'optim8bit' option '{key}'" in msg and expected in msg and "\n" not in msg


def test_states_are_uint8_in_the_checkpoint_and_it_trains(kktrain_run):
    out = kktrain_run(plugins=["optim8bit"], options={"optim8bit.min_8bit_size": 256, "log_every": 1}, task_options=WIDE, steps=16)
    section = out.summary["optim8bit"]
    assert section["impl"] == "bitsandbytes" and section["fallback_reason"] is None
    assert section["params_8bit_states"] == 3 and section["params_32bit_states"] == 3
    assert section["state_mb"] < 0.4 * section["adamw_fp32_state_mb"]
    payload = out.final_payload()
    params = list(out.trainer.model.parameters())
    for i, p in enumerate(params):
        quant = payload["optimizer"]["state"][i]["__bnb_optimizer_quant_state__"]
        want = torch.uint8 if p.numel() >= 256 else torch.float32
        assert quant["state1"].dtype == want and quant["state2"].dtype == want, (i, tuple(p.shape))
        assert quant["state1"].shape == p.shape
        if want is torch.uint8:
            assert quant["absmax1"].numel() == -(-p.numel() // 256) and quant["state2"].any()
    losses = [r["train/loss"] for r in out.metrics if r["kind"] == "train"]
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])


def test_it_is_really_a_different_optimizer_from_torch_adamw(kktrain_run):
    eight = kktrain_run(plugins=["optim8bit"], options={"optim8bit.min_8bit_size": 256}, task_options=WIDE, steps=12)
    plain = kktrain_run(task_options=WIDE, steps=12)
    a, b = eight.final_payload()["model"], plain.final_payload()["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # ... and close to it: the same AdamW hyper-parameters, quantized moments
    assert abs(eight.summary["final"]["val/loss"] - plain.summary["final"]["val/loss"]) < 0.1
    assert "exp_avg" in plain.final_payload()["optimizer"]["state"][0]


def test_resume_is_bit_exact_with_8bit_states(assert_resume_equivalent):
    whole, resumed = assert_resume_equivalent(
        plugins=["optim8bit"], steps=12, cut=5, options={"optim8bit.min_8bit_size": 256}, task_options={**WIDE, "dropout": 0.1},
    )
    state = resumed.final_payload()["optimizer"]["state"][2]["__bnb_optimizer_quant_state__"]  # the 64x64 weight
    assert state["state1"].dtype == torch.uint8
    assert resumed.summary["optim8bit"]["impl"] == "bitsandbytes"


def test_option_this_bitsandbytes_lacks_is_an_error_not_ignored(kktrain_run, tmp_path):
    import inspect

    import bitsandbytes as bnb

    if "percentile_clipping" in inspect.signature(bnb.optim.AdamW8bit.__init__).parameters:
        pytest.skip(f"bitsandbytes {bnb.__version__} still has percentile_clipping")
    out = tmp_path / "never"
    with pytest.raises(PluginError) as err:
        kktrain_run(plugins=["optim8bit"], options={"optim8bit.percentile_clipping": 95}, steps=1, out=out)
    msg = str(err.value)
    assert f"bitsandbytes {bnb.__version__}'s AdamW8bit has no percentile_clipping" in msg and "\n" not in msg
    assert not out.exists()
    # the value that means "as this version does anyway" is accepted
    ok = kktrain_run(plugins=["optim8bit"], options={"optim8bit.percentile_clipping": 100, "optim8bit.block_wise": True}, steps=2)
    assert ok.summary["optim8bit"]["impl"] == "bitsandbytes"


def test_probe_reports_uint8_capability_on_cpu():
    from kktrain_optim8bit import probe_bitsandbytes

    for dtype in (torch.float32, torch.bfloat16):
        module, reason = probe_bitsandbytes(torch.device("cpu"), dtype)
        assert module is not None and reason is None, reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_states_are_uint8(kktrain_run):
    out = kktrain_run(plugins=["optim8bit"], options={"optim8bit.min_8bit_size": 256, "device": "cuda"}, task_options=WIDE, steps=4)
    assert out.summary["optim8bit"]["impl"] == "bitsandbytes"
    quant = out.final_payload()["optimizer"]["state"][2]["__bnb_optimizer_quant_state__"]
    assert quant["state1"].dtype == torch.uint8

"""nan-guard with policy=rollback hands a non-finite step to spike-rollback through on_anomaly."""

from __future__ import annotations

import pytest
import torch

# A rollback restores the state mid-run; should the loop ever lose track of it, fail, don't hang.
pytestmark = pytest.mark.timeout(120)

OPTS = {"nan-guard.policy": "rollback", "spike-rollback.snapshot_every": 5, "spike-rollback.warmup_steps": 5}




def test_nonfinite_step_is_vetoed_and_rolled_back(kktrain_run, fault_injector, hook_recorder):
    out = kktrain_run(plugins=["nan-guard", "spike-rollback", fault_injector(nan_at=[8])], options=OPTS, steps=12,
                      recorder=hook_recorder, **{"schedule.name": "constant", "optimizer.lr": 0.01})
    out.assert_success()
    (call,) = hook_recorder.of("on_anomaly")
    assert call.kwargs["kind"] == "nonfinite" and call.kwargs["detail"]["step"] == 8
    assert call.kwargs["detail"]["first_module"] == "loss"
    guard, rollback = out.summary["nan-guard"], out.summary["spike-rollback"]
    assert (guard["nonfinite_steps"], guard["rollbacks"], guard["skipped"]) == (1, 1, 0)  # counters survive the restore
    assert rollback["history"][0] | {"loss": None, "lr": None} == {
        "step": 8, "to_step": 5, "kind": "nonfinite", "loss": None, "lr": None, "source": "memory"}
    assert out.trainer.lr == pytest.approx(0.005)
    assert out.summary["skipped_steps"] == 1  # the vetoed step, counted once
    assert out.final_payload()["state"]["skip_batches"] == [[0, 7]]
    assert all(bool(torch.isfinite(v).all()) for v in out.final_payload()["model"].values())
    assert (out.run_dir / "checkpoints" / "nan_report_step_8.json").exists()


@pytest.mark.parametrize("cut", [6, 9], ids=["cut-before-nan", "cut-after-rollback"])
def test_resume_is_bit_exact_with_both(assert_resume_equivalent, fault_injector, cut):
    whole, _ = assert_resume_equivalent(
        plugins=lambda: ["nan-guard", "spike-rollback", fault_injector(nan_at=[8])], options=OPTS, steps=12, cut=cut,
        task_options={"dropout": 0.2},
    )
    assert whole.summary["spike-rollback"]["rollback_steps"] == [8]

"""Exact resume through the pytest plugin's own fixtures (the check every plugin must pass)."""

import pytest


def test_resume_equivalent_plain(assert_resume_equivalent):
    assert_resume_equivalent(steps=40, cut=21, task_options={"dropout": 0.2})


def test_resume_equivalent_with_workers_and_accum(assert_resume_equivalent):
    assert_resume_equivalent(steps=30, cut=13, options={"data.workers": 2, "grad_accum": 2}, task_options={"dropout": 0.2})


def test_resume_mismatch_is_detected(kktrain_run, tmp_path):
    """The comparison can fail: a different seed must give a different result."""
    from kktrain.testing import compare_payloads

    a = kktrain_run(steps=10)
    b = kktrain_run(steps=10, seed=1)
    assert compare_payloads(a.final_payload(), b.final_payload())


def test_fault_injector_nan_reaches_the_loss(kktrain_run, fault_injector):
    inj = fault_injector(nan_at=[3])
    out = kktrain_run(plugins=[inj], steps=5)
    assert inj.injected == [("nan", 3)]
    assert out.summary["status"] == "completed"

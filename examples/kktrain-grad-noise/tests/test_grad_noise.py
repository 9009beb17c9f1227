"""Tests of the grad-noise plugin, written only with kktrain's pytest fixtures.

The fixtures come from kktrain's pytest plugin (entry point ``pytest11``), so there is no
conftest.py: installing kktrain is enough. The plugin is used by its entry-point name, exactly
as ``kktrain run --plugin grad-noise`` does, so these tests pass only when the distribution is
installed.
"""

from __future__ import annotations

import math

import pytest
import torch

from kktrain import ConfigError

PLUGIN = "grad-noise"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _models_equal(a, b) -> bool:
    pa, pb = a.final_payload()["model"], b.final_payload()["model"]
    return all(torch.equal(pa[k], pb[k]) for k in pa)


def test_unknown_option_is_an_error_naming_the_plugin(kktrain_run):
    with pytest.raises(ConfigError, match=r"plugin 'grad-noise' has no option 'etaa'"):
        kktrain_run(plugins=[PLUGIN], options={"grad-noise.etaa": 0.1}, steps=2)


def test_invalid_option_value_is_an_error(kktrain_run):
    with pytest.raises(ConfigError, match=r"grad-noise.*eta"):
        kktrain_run(plugins=[PLUGIN], options={"grad-noise.eta": -1.0}, steps=2)


def test_noise_follows_the_annealing_schedule(kktrain_run):
    eta, gamma = 0.2, 0.55
    out = kktrain_run(plugins=[PLUGIN], options={"grad-noise.eta": eta, "grad-noise.gamma": gamma}, steps=8, log_every=1)
    out.assert_success()
    train = [r for r in out.metrics if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    for record in train:
        t = record["step"] - 1  # the record after step s carries the noise of step s (0-based s - 1)
        assert record["grad_noise/std"] == pytest.approx(math.sqrt(eta / (1 + t) ** gamma), rel=1e-12)
    section = out.summary[PLUGIN]
    assert section["steps_noised"] == 8
    assert section["final_std"] == pytest.approx(math.sqrt(eta / 8**gamma))
    assert any(e["event"] == "grad_noise_start" for e in out.summary["events"])


def test_noise_changes_training_and_eta_zero_does_not(kktrain_run):
    plain = kktrain_run(steps=6)
    noisy = kktrain_run(plugins=[PLUGIN], options={"grad-noise.eta": 0.5}, steps=6)
    off = kktrain_run(plugins=[PLUGIN], options={"grad-noise.eta": 0.0}, steps=6)
    assert not _models_equal(plain, noisy), "noise of variance 0.5 left the weights unchanged"
    assert _models_equal(plain, off), "eta=0 must leave training bit-identical"


def test_noise_is_applied_once_per_optimizer_step_after_backward(kktrain_run, hook_recorder):
    kktrain_run(plugins=[PLUGIN], steps=5, grad_accum=2, recorder=hook_recorder)
    calls = hook_recorder.of("on_after_backward")
    assert len(calls) == 5
    assert all(c.plugins == [PLUGIN] for c in calls)


def test_seed_option_picks_the_noise(kktrain_run):
    a = kktrain_run(plugins=[PLUGIN], options={"grad-noise.eta": 0.5, "grad-noise.seed": 1}, steps=4)
    b = kktrain_run(plugins=[PLUGIN], options={"grad-noise.eta": 0.5, "grad-noise.seed": 1}, steps=4)
    c = kktrain_run(plugins=[PLUGIN], options={"grad-noise.eta": 0.5, "grad-noise.seed": 2}, steps=4)
    assert _models_equal(a, b)
    assert not _models_equal(a, c)


def test_state_is_in_the_checkpoint(kktrain_run):
    out = kktrain_run(plugins=[PLUGIN], options={"grad-noise.eta": 0.1}, steps=6)
    state = out.final_payload()["plugins"][PLUGIN]
    assert state["steps_noised"] == 6
    assert isinstance(state["rng"], torch.Tensor) and state["rng"].dtype == torch.uint8


def test_resume_is_exact(assert_resume_equivalent):
    # The noise of steps 6..12 must come from the restored generator, not a re-seeded one.
    assert_resume_equivalent(plugins=[PLUGIN], options={"grad-noise.eta": 0.1}, steps=12, cut=5, task_options={"dropout": 0.1})


def test_plugin_contract(plugin_contract):
    plugin_contract(PLUGIN)

"""compile with the real inductor backend on the CPU (needs a C++ compiler; slow on a cold cache)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from kktrain import hookimpl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor on CPU needs a C++ compiler"),
]


class Profile:
    """Recommends compile.* keys at on_hw_detect, the way a hardware profile (via vcache) does."""

    name = "profile"

    @hookimpl
    def on_hw_detect(self, hw, config, user_set):
        return {"compile.cpp_wrapper": True, "compile.onednn": False}


class Look:
    """What oneDNN's global switch is while training runs."""

    name = "look"

    def __init__(self) -> None:
        self.mkldnn: bool | None = None

    @hookimpl
    def on_train_start(self, trainer):
        self.mkldnn = torch.backends.mkldnn.enabled


def _check(out, eager, graphs_before):
    out.assert_success()
    assert out.summary["compile"]["status"] == "compiled", out.summary["compile"]
    assert counters["stats"]["unique_graphs"] > graphs_before, "inductor compiled nothing"
    assert not [e for e in out.summary["events"] if e["event"] == "compile_fallback"]
    assert math.isclose(out.summary["final"]["val/loss"], eager.summary["final"]["val/loss"], rel_tol=1e-3)


def test_inductor_trains_on_cpu(kktrain_run):
    graphs = counters["stats"]["unique_graphs"]
    out = kktrain_run(plugins=["compile"], steps=12)
    _check(out, kktrain_run(steps=12), graphs)


def test_hardware_profile_flags_reach_inductor(kktrain_run):
    graphs, was = counters["stats"]["unique_graphs"], torch.backends.mkldnn.enabled
    look = Look()
    out = kktrain_run(plugins=["compile", Profile(), look], steps=12)
    _check(out, kktrain_run(steps=12), graphs)
    (event,) = [e for e in out.summary["events"] if e["event"] == "compile"]
    assert event["cpp_wrapper"] is True and event["onednn"] is False
    assert look.mkldnn is False and torch.backends.mkldnn.enabled is was, "the global switch is restored at the end"

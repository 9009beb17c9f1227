"""`kktrain preflight`: each check fails for the right reason on a task broken on purpose."""

from __future__ import annotations

import json

import pytest

from kkcli import kk

BROKEN = '''
import torch
from kktrain.tasks.tiny import TinyTask


class Detached(TinyTask):
    """The head's output is detached: no gradient reaches any parameter."""

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x).detach(), y)


class NoGradFirstLayer(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.no_grad():  # a layer cut out of the graph: it never learns
            h = self.net[0](x)
        return self.net[1:](h)


class FrozenLayer(TinyTask):
    def build_model(self):
        return NoGradFirstLayer(super().build_model())


class BadInit(TinyTask):
    """The output layer's weights 50x too large: confidently wrong at step 0."""

    def build_model(self):
        model = super().build_model()
        with torch.no_grad():
            model[-1].weight.mul_(50.0)
        return model


class ZeroInit(TinyTask):
    """Both layers zero-initialised: the first gets an all-zero gradient."""

    def build_model(self):
        model = super().build_model()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return model


class Frozen(TinyTask):
    """A frozen layer on purpose (requires_grad False): noted, not a failure."""

    def build_model(self):
        model = super().build_model()
        model[0].requires_grad_(False)
        return model
'''


@pytest.fixture
def project(tmp_path):
    (tmp_path / "broken.py").write_text(BROKEN)
    return tmp_path


def preflight(project, *args):
    proc = kk("preflight", "--json", *args, cwd=project)
    results = {r["name"]: r for r in json.loads(proc.stdout)} if proc.stdout.strip().startswith("[") else {}
    return proc, results


def test_a_healthy_task_passes_every_check(project):
    proc, results = preflight(project, "--task", "tiny")
    assert proc.returncode == 0, proc.stderr
    assert [r["ok"] for r in results.values()] == [True, True, True]
    assert [r["verdict"] for r in results.values()] == ["PASS", "PASS", "PASS"]
    assert "vs chance 1.3863" in results["initial_loss"]["detail"]  # ln 4: the task's num_classes()
    assert not (project / "runs").exists()  # nothing written


def test_detached_head_fails_the_gradient_check(project):
    proc, results = preflight(project, "--task", "broken:Detached")
    assert proc.returncode == 1
    assert results["gradients"]["ok"] is False and "detached graph" in results["gradients"]["hint"]
    assert results["overfit"]["ok"] is None  # skipped: nothing to train
    assert results["initial_loss"]["ok"] is True


def test_a_layer_cut_from_the_graph_has_no_gradient(project):
    proc, results = preflight(project, "--task", "broken:FrozenLayer")
    assert proc.returncode == 1
    g = results["gradients"]
    assert g["ok"] is False and "no gradient: net.0.weight, net.0.bias" in g["detail"]
    assert "torch.no_grad() block" in g["hint"]


def test_bad_init_fails_the_initial_loss_check(project):
    proc, results = preflight(project, "--task", "broken:BadInit")
    assert proc.returncode == 1
    assert results["initial_loss"]["ok"] is False and "bad init" in results["initial_loss"]["hint"]
    assert results["gradients"]["ok"] is True


def test_zero_init_gives_all_zero_gradients(project):
    proc, results = preflight(project, "--task", "broken:ZeroInit")
    assert proc.returncode == 1
    g = results["gradients"]
    assert g["ok"] is False and "all-zero gradient: 0.weight" in g["detail"] and "bad init" in g["hint"]


def test_lr_too_low_fails_the_overfit_check_with_text_report(project):
    proc = kk("preflight", "--task", "tiny", "-o", "optimizer.lr=1e-7", cwd=project)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("PASS  initial_loss") and lines[1].startswith("PASS  gradients")
    assert lines[2].startswith("FAIL  overfit") and "LR too low (optimizer.lr = 1e-07" in lines[3]


def test_a_layer_frozen_on_purpose_is_noted_not_failed(project):
    proc, results = preflight(project, "--task", "broken:Frozen")
    assert proc.returncode == 0, proc.stdout
    assert "2 frozen by requires_grad=False: 0.weight, 0.bias" in results["gradients"]["detail"]


def test_bad_run_options_are_exit_2(project):
    proc = kk("preflight", "--task", "tiny", "-o", "nosuch=1", cwd=project)
    assert proc.returncode == 2 and "unknown config key 'nosuch'" in proc.stderr and "Traceback" not in proc.stderr

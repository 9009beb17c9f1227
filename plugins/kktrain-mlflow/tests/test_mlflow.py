"""mlflow: against a local file store (no server): parameters, metrics per step, artifacts, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

RUN: dict[str, Any] = {"batch_size": 16, "log_every": 2, "val_every": 4, "task_options": {"samples": 128}}


def _client(store: Path) -> Any:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.as_uri())


def test_params_metrics_summary_and_final_checkpoint(kktrain_run, tmp_path: Path):
    store = tmp_path / "store"
    out = kktrain_run(plugins=["mlflow"], steps=10, options={"mlflow.tracking_uri": store.as_uri(), "mlflow.experiment": "exp"}, **RUN)
    out.assert_success()
    section = out.summary["mlflow"]
    client = _client(store)
    run = client.get_run(section["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == out.run_dir.name
    assert client.get_experiment(run.info.experiment_id).name == "exp"
    params = run.data.params
    assert params["batch_size"] == "16" and params["log_every"] == "2" and params["task"] == "tiny"
    assert params["task.samples"] == "128" and params["plugins.mlflow.experiment"] == "exp"
    for kind, name, key in (("train", "train/loss", "train/loss"), ("train", "train/grad_norm", "train/grad_norm"),
                            ("val", "val/acc", "val/acc"), ("epoch", "epoch_train/loss", "train/loss")):
        expected = [(r["step"], r[key]) for r in out.metrics if r["kind"] == kind]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert history == [(s, pytest.approx(v, rel=1e-12)) for s, v in expected]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"summary.json", "checkpoints/final.pt", "checkpoints/final.pt.json"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text())["steps"] == 10
    assert json.loads((out.run_dir / "mlflow_run.json").read_text())["run_id"] == run.info.run_id


def test_nested_metric_names_fit_the_file_store(tmp_path: Path):
    from kktrain_mlflow import metric_name

    assert metric_name("val/loss/n5") == "val/loss.n5" and metric_name("train/loss") == "train/loss"
    assert metric_name("val/loss", "epoch") == "epoch_val/loss" and metric_name("amp/scale") == "amp/scale"


def test_metrics_with_breakdowns_are_all_logged(kktrain_run, tmp_path: Path):
    """The Latin task logs val/loss and val/loss/n4 ...: both land, as val/loss and val/loss.n4."""
    store = tmp_path / "store"
    out = kktrain_run(plugins=["mlflow"], task="latin", steps=2, val_every=2, log_every=2, batch_size=8,
                      options={"mlflow.tracking_uri": store.as_uri()},
                      task_options={"size_max": 5, "val_sizes": [4, 5], "val_puzzles": 4, "samples_per_epoch": 64,
                                    "d_model": 16, "layers": 1, "heads": 2})
    out.assert_success()
    (val,) = [r for r in out.metrics if r["kind"] == "val"]
    nested = [k for k in val if k.count("/") == 2]
    assert nested, "the test needs metrics with a breakdown"
    logged = _client(store).get_run(out.summary["mlflow"]["run_id"]).data.metrics
    for key in nested + ["val/loss"]:
        assert logged[key.replace("/", ".").replace(".", "/", 1)] == pytest.approx(val[key])


def test_default_store_is_beside_the_run_directory(kktrain_run, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = kktrain_run(plugins=["mlflow"], steps=2, **RUN)
    assert out.summary["mlflow"]["tracking_uri"] == (out.run_dir.resolve().parent / "mlruns").as_uri()
    assert (out.run_dir.parent / "mlruns").is_dir()


_CRASHING_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from kktrain import hookimpl
    from kktrain.testing import run_tiny

    class Killer:
        name = "killer"
        def __init__(self, at):
            self.at = at
        @hookimpl
        def on_step(self, trainer, loss):
            if trainer.state.step == self.at:
                os.kill(os.getpid(), signal.SIGKILL)

    out, store, kill_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    run_tiny(out.parent, plugins=["mlflow", Killer(kill_at)], steps=12, out=out, resume="auto" if kill_at == 0 else None,
             batch_size=16, log_every=1, task_options={"samples": 128}, options={"mlflow.tracking_uri": store},
             **{"checkpoint.every_steps": 5})
    """
)


def test_resume_after_kill_continues_the_run_without_duplicate_steps(tmp_path: Path):
    script = tmp_path / "run.py"
    script.write_text(_CRASHING_RUN)
    store, run_dir = tmp_path / "store", tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(kill_at: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), str(run_dir), store.as_uri(), str(kill_at)],
                              env=env, capture_output=True, text=True, timeout=180)

    crashed = run(9)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    client = _client(store)
    assert max(m.step for m in client.get_metric_history(run_id, "train/loss")) == 8  # past the checkpoint at 5
    resumed = run(0)
    assert resumed.returncode == 0, resumed.stderr
    runs = client.search_runs([client.get_run(run_id).info.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id], "the resume continues the same MLflow run"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, 13)), steps
    assert client.get_run(run_id).info.status == "FINISHED"


def test_contract(plugin_contract):
    plugin_contract("mlflow")

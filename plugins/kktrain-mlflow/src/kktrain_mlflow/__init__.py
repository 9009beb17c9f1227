"""mlflow: the run's parameters, metrics per step, summary and final checkpoint in MLflow.

    kktrain run --plugin mlflow                                   # store: file:runs/mlruns
    kktrain run --plugin mlflow -o mlflow.tracking_uri=http://mlflow.internal:5000
    mlflow ui --backend-store-uri runs/mlruns                     # look at it

Parameters are the run's config (core keys, ``task.*``, ``plugins.NAME.*``); every metrics record
is logged at its step (epoch records as ``epoch_train/loss`` ...; see :func:`metric_name`); at the end the summary goes in as
``summary.json`` and the final checkpoint as an artifact. The MLflow run's id is kept in
``RUN_DIR/mlflow_run.json``: a resume continues the same MLflow run. MLflow cannot delete metric
points, so points a crashed process logged after the checkpoint stay, and the resumed run does
not log those steps again: each (metric, step) is logged once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kktrain import PluginOptions, hookimpl

if TYPE_CHECKING:
    from kktrain import Trainer

__all__ = ["MlflowPlugin", "flat_config", "metric_name"]

BOOKKEEPING = ("step", "kind", "time", "epoch")
RUN_FILE = "mlflow_run.json"
_END_STATUS = {"completed": "FINISHED", "stopped": "FINISHED", "aborted": "FAILED"}


def metric_name(key: str, kind: str | None = None) -> str:
    """The MLflow name of a record's key: the first ``/`` kept, later ones as ``.``; epoch records
    prefixed ``epoch_`` (``val/loss/n5`` -> ``val/loss.n5``, epoch ``train/loss`` -> ``epoch_train/loss``).

    MLflow's file store keeps a metric as a file under its name's path, so ``val/loss`` and
    ``val/loss/n5`` cannot both exist there.
    """
    head, sep, rest = key.partition("/")
    name = head + sep + rest.replace("/", ".")
    return f"epoch_{name}" if kind == "epoch" else name


def flat_config(trainer: Trainer) -> dict[str, str]:
    """The run's config (core, task and plugin options) as flat ``a.b`` keys, values as strings."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = node if isinstance(node, str) else json.dumps(node, default=str)

    walk("", trainer.config.model_dump(mode="json"))
    task_options = getattr(trainer, "task_options", None)
    if task_options is not None:
        walk("task", task_options.model_dump(mode="json"))
    for name, options in trainer.plugin_options.items():
        if options is not None:
            walk(f"plugins.{name}", options.model_dump(mode="json"))
    return flat


class MlflowPlugin:
    """MLflow tracking: config as parameters, metrics per step, summary and final checkpoint as artifacts."""

    class Options(PluginOptions):
        """``-o mlflow.KEY=VALUE`` / ``[plugins.mlflow]``."""

        tracking_uri: str | None = None
        """Where to log; unset: ``MLFLOW_TRACKING_URI``, else a file store ``mlruns/`` beside the run directory."""
        experiment: str | None = None
        """Experiment name; unset: the task's name."""
        run_name: str | None = None
        """MLflow run name; unset: the run directory's name."""
        log_checkpoint: bool = True
        """Log the final checkpoint (``final.pt`` and its manifest) as an artifact."""

    def __init__(self, options: MlflowPlugin.Options | None = None) -> None:
        self.options = options or self.Options()
        self.client: Any = None
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self.experiment_id: str | None = None
        self._logged: dict[str, int] = {}  # metric -> last step already in the store (a resume's)

    def _resolve_uri(self, trainer: Trainer) -> str:
        assert trainer.run_dir is not None
        uri = self.options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (trainer.run_dir.resolve().parent / "mlruns").as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 asks file stores to opt in; a local store is what this plugin defaults to.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return uri

    @hookimpl
    def on_train_start(self, trainer: Trainer) -> None:
        """Start (or, on a resume, continue) the MLflow run and log the parameters (rank 0)."""
        if not trainer.is_main or trainer.run_dir is None:
            return
        from mlflow.tracking import MlflowClient

        self.tracking_uri = self._resolve_uri(trainer)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        saved = self._saved_run(trainer)
        if saved is not None and trainer.state.step > 0:
            self.run_id, self.experiment_id = saved["run_id"], saved["experiment_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            for key in self.client.get_run(self.run_id).data.metrics:
                history = self.client.get_metric_history(self.run_id, key)
                self._logged[key] = max((m.step for m in history), default=-1)
            return
        name = self.options.experiment or trainer.task.name
        experiment = self.client.get_experiment_by_name(name)
        self.experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(name)
        run = self.client.create_run(self.experiment_id, run_name=self.options.run_name or trainer.run_dir.name,
                                     tags={"kktrain.run_dir": str(trainer.run_dir)})
        self.run_id = run.info.run_id
        (trainer.run_dir / RUN_FILE).write_text(json.dumps(
            {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "experiment_id": self.experiment_id}))
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flat_config(trainer).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _saved_run(self, trainer: Trainer) -> dict[str, str] | None:
        assert trainer.run_dir is not None
        path = trainer.run_dir / RUN_FILE
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return saved if saved.get("tracking_uri") == self.tracking_uri and saved.get("run_id") else None

    @hookimpl
    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Each numeric value of the record as a metric at the record's step."""
        if self.client is None:
            return
        from mlflow.entities import Metric

        step, kind = int(record["step"]), record.get("kind")
        stamp = int(1000 * float(record.get("time", time.time())))
        named = [(metric_name(key, kind), float(value)) for key, value in record.items()
                 if key not in BOOKKEEPING and isinstance(value, (int, float)) and not isinstance(value, bool)]
        metrics = [Metric(name, value, stamp, step) for name, value in named if step > self._logged.get(name, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    @hookimpl
    def on_checkpoint(self, trainer: Trainer, path: str, kind: str) -> None:
        """The final checkpoint (and its manifest) as artifacts under ``checkpoints/``."""
        if self.client is None or kind != "final" or not self.options.log_checkpoint:
            return
        target = Path(path)
        if target.is_dir():  # a sharded checkpoint
            self.client.log_artifacts(self.run_id, str(target), artifact_path=f"checkpoints/{target.name}")
            return
        self.client.log_artifact(self.run_id, str(target), artifact_path="checkpoints")
        manifest = Path(f"{target}.json")
        if manifest.is_file():
            self.client.log_artifact(self.run_id, str(manifest), artifact_path="checkpoints")

    @hookimpl(trylast=True)
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """The summary (with the other plugins' sections) as ``summary.json``; end the MLflow run."""
        if self.client is None:
            return
        summary["mlflow"] = {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "run_id": self.run_id}
        self.client.log_text(self.run_id, json.dumps(summary, indent=2, default=str), "summary.json")
        self.client.set_terminated(self.run_id, status=_END_STATUS.get(str(summary.get("status")), "KILLED"))
        self.client = None

"""A user's task that cannot train: one line naming what is wrong, before anything is written.

Each case runs through the real command line (exit 2, one line on stderr, no traceback, the
directory tree unchanged) and through the Python API (``kktrain.fit`` raises ``ConfigError``,
nothing on disk).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import kktrain
from kktrain import KKTrainError

from kkcli import kk, tree_state

TASKS = Path(__file__).resolve().parent / "tasks"

CASES = {
    # name: (task, extra CLI args / options, message fragment)
    "missing loss": ("NoLoss", {}, "lacks loss()"),
    "missing everything": ("Empty", {}, "lacks build_model(), train_dataset(), loss()"),
    "factory returns a string": ("not_a_task", {}, "is a str, not a task"),
    "non-scalar loss": ("VectorLoss", {}, "loss() returned a tensor of shape (64,), not a scalar"),
    "loss is a float": ("FloatLoss", {}, "loss() returned a float, not a tensor"),
    "data of the wrong shape": ("WrongShape", {}, "loss(model, batch) failed on the first batch"),
    "model without parameters": ("NoParameters", {}, "the model has no trainable parameters"),
    "build_model returns a string": ("NotAModule", {}, "build_model() returned a str, not a torch.nn.Module"),
    "metrics are strings": ("StringMetrics", {}, "metrics()['acc'] is a str, not a number"),
    "metrics are vectors": ("VectorMetrics", {}, "metrics()['acc'] is a tensor of shape (16,), not one number"),
    "iterable dataset": ("IterableData", {}, "is an IterableDataset"),
    "dataset without len": ("LenlessData", {}, "without __len__"),
    "dataset is None": ("NoneData", {}, "train_dataset() returned None"),
    "empty dataset": ("EmptyData", {}, "train_dataset() is empty"),
    "unknown optimizer": ("Points", {"optimizer.name": "lion"}, "optimizer.name"),
    "nesterov without momentum": ("Points", {"optimizer.name": "sgd", "optimizer.nesterov": True}, "nesterov needs"),
    "fused rmsprop": ("Points", {"optimizer.name": "rmsprop", "optimizer.impl": "fused"}, "no fused rmsprop"),
    "betas of one": ("Points", {"optimizer.betas": [1.0, 0.999]}, "each beta must be in [0, 1)"),
    "best metric no validation produces": ("Points", {"checkpoint.best_metric": "val/f1"}, "'val/f1' is not a validation metric"),
    "best metric without validation": ("Minimal", {"checkpoint.best_metric": "val/acc"}, "is not a validation metric of this task (it has none)"),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad_task")
    (root / "keep.txt").write_text("nothing here may change\n")
    return root


def _value(v: object) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return str(v)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_task_on_the_command_line(workdir: Path, case: str) -> None:
    task, options, message = CASES[case]
    before = tree_state(workdir)
    args = ["run", "--task", f"user_tasks:{task}", "--out", "run", "-q"]
    for key, value in options.items():
        args += ["-o", f"{key}={_value(value)}"]
    proc = kk(*args, cwd=workdir, env={"PYTHONPATH": str(TASKS)})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert tree_state(workdir) == before and not (workdir / "run").exists()


# In Python a string is a task spec, so a factory returning one is a command-line case only.
PYTHON_CASES = sorted(c for c in CASES if c != "factory returns a string")


@pytest.mark.parametrize("case", PYTHON_CASES)
def test_bad_task_from_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    monkeypatch.syspath_prepend(str(TASKS))
    import user_tasks

    task, options, message = CASES[case]
    with pytest.raises(KKTrainError) as err:
        kktrain.fit(getattr(user_tasks, task)(), options=options, out=tmp_path / "run", quiet=True)
    assert "\n" not in str(err.value)
    assert message in str(err.value), str(err.value)
    assert not (tmp_path / "run").exists()


def test_fit_arguments_that_do_not_go_together(tmp_path: Path) -> None:
    import torch

    with pytest.raises(kktrain.ConfigError, match="missing train_dataset, loss_fn"):
        kktrain.fit(model=torch.nn.Linear(2, 2), out=tmp_path / "x")
    with pytest.raises(kktrain.ConfigError, match="not both"):
        kktrain.fit("tiny", model=torch.nn.Linear(2, 2), train_dataset=[], loss_fn=print, out=tmp_path / "x")
    with pytest.raises(kktrain.ConfigError, match="task options .* given for a task object"):
        kktrain.fit(_tiny_object(), options={"task.hidden": 3}, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _tiny_object():
    from kktrain.tasks.tiny import make_task

    return make_task()

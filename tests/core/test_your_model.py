"""Your model, your data: an ordinary model and Dataset train from the CLI and from Python.

The tasks are plain user code in ``tasks/user_tasks.py`` (no kktrain class in them): a TensorDataset,
int indices, default collate, the core's own validation loop over ``val_dataset`` + ``metrics``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kktrain
from kktrain import ConfigError, load_checkpoint
from kktrain.testing import compare_payloads

from kkcli import kk

TASKS = Path(__file__).resolve().parent / "tasks"
ENV = {"PYTHONPATH": str(TASKS)}


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TASKS))


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_a_tensordataset_task_trains_from_the_cli(tmp_path: Path) -> None:
    proc = kk("run", "--task", "user_tasks:Points", "-q", "--out", "pts", cwd=tmp_path, env=ENV, check=True)
    summary = _summary(tmp_path / "pts")
    assert summary["status"] == "completed" and summary["steps"] == 30, proc.stderr
    assert {"val/loss", "val/acc"} <= set(summary["final"])
    assert summary["final"]["val/acc"] > 0.5  # learned something in 30 steps (4 classes: chance 0.25)
    config = (tmp_path / "pts" / "config.toml").read_text()
    assert 'task = "user_tasks:Points"' in config


def test_default_run_directory_is_named_after_the_task(tmp_path: Path) -> None:
    kk("run", "--task", "user_tasks:Points", "-q", "--max-steps", "2", cwd=tmp_path, env=ENV, check=True)
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("points-"), run.name


def test_only_the_three_required_methods_are_needed(tmp_path: Path) -> None:
    from user_tasks import Minimal

    result = kktrain.fit(Minimal(), options={"max_steps": 6, "batch_size": 16}, out=tmp_path / "m", quiet=True)
    assert result.status == "completed" and result.summary["steps"] == 6
    assert result.metrics == {}  # no validation data: nothing validated, nothing faked
    assert isinstance(result.model, torch.nn.Linear)
    assert result.trainer.task.name == "minimal"


def test_validation_loop_weights_batches_by_size(tmp_path: Path) -> None:
    # 100 held-out samples in batches of 16: the last batch has 4; the mean must be per sample.
    from user_tasks import Points

    task = Points()
    result = kktrain.fit(task, options={"max_steps": 5, "data.val_batch_size": 16}, out=tmp_path / "v", quiet=True)
    model = result.model.eval()
    x, y = task.val_dataset().tensors
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()
    assert result.metrics["val/acc"] == pytest.approx(expected, abs=1e-6)


def test_python_api_layers_like_the_cli(tmp_path: Path) -> None:
    from user_tasks import Points

    (tmp_path / "c.toml").write_text("seed = 3\n[optimizer]\nlr = 0.02\n")
    os.environ["KKTRAIN_LOG_EVERY"] = "3"
    try:
        result = kktrain.fit(Points(), plugins=["ema"], options={"batch_size": 32, "ema.decay": 0.9},
                             config_file=tmp_path / "c.toml", out=tmp_path / "api", quiet=True)
    finally:
        del os.environ["KKTRAIN_LOG_EVERY"]
    cfg = result.trainer.config
    # task defaults (max_steps 30) < file (seed, lr) < env (log_every) < options (batch_size, ema.decay)
    assert (cfg.max_steps, cfg.seed, cfg.optimizer.lr, cfg.log_every, cfg.batch_size) == (30, 3, 0.02, 3, 32)
    assert result.trainer.plugin_options["ema"].decay == 0.9
    sources = result.trainer.config_sources
    assert (sources["max_steps"], sources["seed"], sources["log_every"], sources["batch_size"]) == ("task", "file " + str(tmp_path / "c.toml"), "env", "option")
    assert any(k.startswith("val_ema/") for k in result.metrics)


def test_fit_with_no_task_class(tmp_path: Path) -> None:
    from user_tasks import points

    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    result = kktrain.fit(
        model=model, train_dataset=points(256), val_dataset=points(64, 1), loss_fn=F.cross_entropy,
        metrics=lambda logits, y: {"acc": (logits.argmax(1) == y).float().mean()},
        options={"max_steps": 20, "batch_size": 16, "optimizer.lr": 0.02}, out=tmp_path / "fn", quiet=True,
    )
    assert result.status == "completed" and "val/acc" in result.metrics
    assert result.model is model  # the user's own module, trained in place
    assert result.trainer.config.task.startswith("<python>")  # not rebuildable from the CLI: recorded so
    # The weights come back into a fresh copy of the user's model (no task object to rebuild it).
    def fresh() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    loaded = kktrain.load_model(result.run_dir, model=fresh)
    assert not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ConfigError, match=r"load_model\(run, model=MyModel\(\)\)"):
        kktrain.load_model(result.run_dir)
    with pytest.raises(ConfigError, match="is a model, not a task: pass it as model="):
        kktrain.load_model(result.run_dir, task=fresh())
    with pytest.raises(kktrain.CheckpointError, match="is for another model"):
        kktrain.load_model(result.run_dir, model=torch.nn.Linear(4, 4))


def test_a_python_run_resumes_from_python_exactly(tmp_path: Path) -> None:
    from user_tasks import Points

    whole = kktrain.fit(Points(), options={"max_steps": 20}, out=tmp_path / "whole", quiet=True)
    kktrain.fit(Points(), options={"max_steps": 20, "stop_at_step": 8}, out=tmp_path / "cut", quiet=True)
    resumed = kktrain.fit(Points(), resume="auto", out=tmp_path / "cut", quiet=True)
    assert resumed.summary["steps"] == 20
    a = load_checkpoint(whole.run_dir / "checkpoints" / "final.pt")
    b = load_checkpoint(resumed.run_dir / "checkpoints" / "final.pt")
    assert not compare_payloads(a, b)


def test_a_python_run_of_an_importable_task_resumes_from_the_cli(tmp_path: Path) -> None:
    # The run records user_tasks:Points (importable, no arguments) and signs it with this machine's
    # key, so `kktrain run --resume auto --out DIR` rebuilds it without being told the task again.
    from user_tasks import Points

    env = {**ENV, "KKTRAIN_HOME": str(tmp_path / "home")}
    os.environ["KKTRAIN_HOME"] = env["KKTRAIN_HOME"]
    try:
        whole = kktrain.fit(Points(), options={"max_steps": 20}, out=tmp_path / "whole", quiet=True)
        kktrain.fit(Points(), options={"max_steps": 20, "stop_at_step": 8}, out=tmp_path / "cut", quiet=True)
    finally:
        del os.environ["KKTRAIN_HOME"]
    assert whole.trainer.config.task == "user_tasks:Points"
    kk("run", "--resume", "auto", "--out", "cut", "-q", cwd=tmp_path, env=env, check=True)
    assert not compare_payloads(load_checkpoint(whole.run_dir / "checkpoints" / "final.pt"),
                                load_checkpoint(tmp_path / "cut" / "checkpoints" / "final.pt"))
    # Another machine's key (a downloaded run): the recorded task is not imported unless named.
    stranger = kk("run", "--resume", "auto", "--out", "cut", "-q", "--max-steps", "30", cwd=tmp_path,
                  env={**ENV, "KKTRAIN_HOME": str(tmp_path / "stranger")})
    assert stranger.returncode == 2 and "add --task user_tasks:Points" in stranger.stderr, stranger.stderr
    named = kk("run", "--resume", "auto", "--out", "cut", "-q", "--max-steps", "30", "--task", "user_tasks:Points",
               cwd=tmp_path, env={**ENV, "KKTRAIN_HOME": str(tmp_path / "stranger")})
    assert named.returncode == 0, named.stderr


def test_a_notebook_task_says_how_to_resume_it(tmp_path: Path) -> None:
    class InNotebook:  # defined inside a function: not importable, like a notebook cell's class
        def build_model(self):
            return torch.nn.Linear(4, 4)

        def train_dataset(self):
            from user_tasks import points

            return points(64)

        def loss(self, model, batch):
            return F.cross_entropy(model(batch[0]), batch[1])

    kktrain.fit(InNotebook(), options={"max_steps": 4, "batch_size": 16}, out=tmp_path / "nb", quiet=True)
    proc = kk("run", "--resume", "auto", "--out", "nb", cwd=tmp_path)
    assert proc.returncode == 2 and "resume it from Python" in proc.stderr, proc.stderr
    resumed = kktrain.fit(InNotebook(), options={"max_steps": 6}, resume="auto", out=tmp_path / "nb", quiet=True)
    assert resumed.summary["steps"] == 6


def test_plain_and_keyed_datasets_resume_exactly_mid_epoch_with_workers(assert_resume_equivalent) -> None:
    # An ordinary int-indexed dataset and a SampleKey one, with 2 data-loader workers, dropout on.
    assert_resume_equivalent(task="user_tasks:Points", steps=24, cut=7, options={"data.workers": 2})
    assert_resume_equivalent(task="user_tasks:Knobbed", steps=24, cut=7, options={"data.workers": 2})


def test_keyed_datasets_get_sample_keys_and_plain_ones_ints(tmp_path: Path) -> None:
    from kktrain.data import DataStream
    from kktrain.config import DataConfig
    from user_tasks import NoisyPoints, points

    for dataset, kind in ((points(32), int), (NoisyPoints(points(32)), kktrain.SampleKey)):
        stream = DataStream(dataset, batch_size=8, seed=0, data=DataConfig(), collate=lambda items: items,
                            device=torch.device("cpu"))
        assert all(isinstance(k, kind) for k in next(iter(stream.sampler)))


def test_load_model_gives_back_ema_or_raw_weights(tmp_path: Path) -> None:
    from user_tasks import Points

    result = kktrain.fit(Points(), plugins=["ema"], options={"max_steps": 10, "ema.decay": 0.5}, out=tmp_path / "r", quiet=True)
    raw = kktrain.load_model(tmp_path / "r", weights="raw", task="user_tasks:Points")
    ema = kktrain.load_model(tmp_path / "r", weights="ema", task=Points())
    auto = kktrain.load_model(tmp_path / "r", task="user_tasks:Points")
    assert not raw.training and not ema.training
    for k, v in result.model.state_dict().items():
        assert torch.equal(raw.state_dict()[k], v)
    assert any(not torch.equal(ema.state_dict()[k], v) for k, v in raw.state_dict().items())
    assert all(torch.equal(auto.state_dict()[k], v) for k, v in ema.state_dict().items())  # auto: EMA when present
    with pytest.raises(ConfigError, match="imports code only when you name it"):
        kktrain.load_model(tmp_path / "r")
    with pytest.raises(kktrain.CheckpointError, match="no 'swa' weights"):
        kktrain.load_model(tmp_path / "r", weights="swa", task=Points())


@pytest.mark.parametrize(("name", "extra", "cls"), [
    ("adamw", {}, torch.optim.AdamW), ("adam", {}, torch.optim.Adam),
    ("sgd", {"optimizer.momentum": 0.9, "optimizer.nesterov": True}, torch.optim.SGD),
    ("rmsprop", {"optimizer.momentum": 0.5}, torch.optim.RMSprop), ("adagrad", {}, torch.optim.Adagrad),
])
def test_optimizers_by_name(kktrain_run, name, extra, cls) -> None:
    out = kktrain_run(options={"optimizer.name": name, "optimizer.lr": 0.01, **extra}, steps=8)
    opt = out.trainer.optimizer
    assert type(opt) is cls
    assert opt.defaults["weight_decay"] == (0.01 if name == "adamw" else 0.0)
    if name == "sgd":
        assert (opt.defaults["momentum"], opt.defaults["nesterov"]) == (0.9, True)
    # torch's fused kernel where it has one (the CPU included), else the multi-tensor one.
    assert (opt.defaults.get("fused") is True) if name != "rmsprop" else (opt.defaults.get("foreach") is True)


def test_optimizer_resume_is_exact_for_sgd(assert_resume_equivalent) -> None:
    assert_resume_equivalent(steps=12, cut=5, options={"optimizer.name": "sgd", "optimizer.momentum": 0.9})


def test_no_decay_groups_leave_biases_and_norms_out(kktrain_run) -> None:
    out = kktrain_run(options={"optimizer.no_decay": True, "optimizer.weight_decay": 0.1}, steps=4)
    groups = out.trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim < 2 for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == len(out.trainer.params)
    events = [json.loads(line) for line in (out.run_dir / "log.jsonl").read_text().splitlines()]
    logged = next(e for e in events if e["event"] == "optimizer")
    assert logged["groups"] == [{"tensors": len(groups[0]["params"]), "weight_decay": 0.1},
                                {"tensors": len(groups[1]["params"]), "weight_decay": 0.0}]


def test_best_mode_follows_the_metric(kktrain_run) -> None:
    low = kktrain_run(options={"checkpoint.best_metric": "val/loss", "val_every": 5}, steps=20)
    losses = [r["val/loss"] for r in low.metrics if r["kind"] == "val"]
    assert low.summary["best"]["mode"] == "min" and low.summary["best"]["value"] == min(losses)
    high = kktrain_run(options={"checkpoint.best_metric": "val/acc", "val_every": 5}, steps=20)
    accs = [r["val/acc"] for r in high.metrics if r["kind"] == "val"]
    assert high.summary["best"]["mode"] == "max" and high.summary["best"]["value"] == max(accs)
    assert kktrain.smaller_is_better("val_ema/ppl") and not kktrain.smaller_is_better("val/valid_iter")


def test_kktrain_tasks_lists_installed_tasks(tmp_path: Path) -> None:
    listed = {t["name"]: t for t in json.loads(kk("tasks", "--json", cwd=tmp_path, check=True).stdout)}
    assert {"latin", "tiny"} <= set(listed)
    assert listed["latin"]["distribution"] == "kktrain" and listed["latin"]["entry_point"] == "kktrain.tasks.latin:make_task"
    assert "kktrain tasks" in kk("run", "--help", cwd=tmp_path, check=True).stdout


def test_resume_auto_on_a_run_without_checkpoint_restarts_its_own_config(tmp_path: Path) -> None:
    kk("run", "--task", "tiny", "-q", "--max-steps", "4", "--out", "r", "-o", "batch_size=8", cwd=tmp_path, check=True)
    for f in (tmp_path / "r" / "checkpoints").iterdir():
        f.unlink()
    proc = kk("run", "--resume", "auto", "--out", "r", "-q", cwd=tmp_path, check=True)
    assert "restarting that run's config" in proc.stderr  # said on stderr even with --quiet
    summary = _summary(tmp_path / "r")
    assert summary["steps"] == 4 and "tiny" in (tmp_path / "r" / "config.toml").read_text()
    assert 'batch_size = 8' in (tmp_path / "r" / "config.toml").read_text()  # its own config, not the defaults

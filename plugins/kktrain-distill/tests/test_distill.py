"""distill: a teacher from a run, the loss, a learnable temperature (no_grad, not inference_mode), resume."""

from __future__ import annotations

import math

import pytest
import torch

from kktrain import ConfigError
from kktrain_distill import DistillPlugin, kl_term, teacher_logits

TEACHER = {"hidden": 32, "layers": 3}
STUDENT = {"hidden": 8}


@pytest.fixture
def teacher_run(kktrain_run, tmp_path):
    out = kktrain_run(steps=30, task_options=TEACHER, out=tmp_path / "teacher")
    out.assert_success()
    return out.run_dir


def test_kl_term_is_torchs_kl_times_t_squared_and_ignores_impossible_classes():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    T = 2.0
    want = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                                      log_target=True, reduction="batchmean") * T * T
    assert torch.allclose(kl_term(s, t, T), want)
    # A class both models rule out (-inf, as the Latin task's symbols beyond the grid's size): no nan.
    s[:, 3] = t[:, 3] = float("-inf")
    assert torch.isfinite(kl_term(s, t, T))
    assert torch.allclose(kl_term(s, t, T), kl_term(s[:, :3], t[:, :3], T))


def test_student_learns_from_a_teacher_run(kktrain_run, teacher_run):
    opts = {"distill.teacher": str(teacher_run), "distill.alpha": 0.7, "log_every": 5}
    out = kktrain_run(plugins=["distill"], steps=20, task_options=STUDENT, options=opts)
    out.assert_success()
    train = [m for m in out.metrics if m["kind"] == "train"]
    assert all("distill/kl" in m and math.isfinite(m["distill/kl"]) for m in train)
    assert train[-1]["distill/kl"] < train[0]["distill/kl"]  # the student moves towards the teacher
    assert out.summary["distill"]["teacher"] == str(teacher_run) and out.summary["distill"]["steps"] == 20
    teacher = out.trainer.plugins["distill"].teacher
    assert sum(p.numel() for p in teacher.parameters()) > sum(p.numel() for p in out.trainer.model.parameters())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    plain = kktrain_run(steps=20, task_options=STUDENT, options={"log_every": 5})
    assert plain.final_payload()["model"]["0.weight"].ne(out.final_payload()["model"]["0.weight"]).any()


def test_learnable_temperature_trains_and_needs_no_grad_not_inference_mode(kktrain_run, teacher_run):
    opts = {"distill.teacher": str(teacher_run), "distill.learn_temperature": True, "optimizer.lr": 0.05,
            "distill.temperature": 2.0, "log_every": 5}
    out = kktrain_run(plugins=["distill"], steps=20, task_options=STUDENT, options=opts)
    out.assert_success()
    plugin: DistillPlugin = out.trainer.plugins["distill"]
    assert any(plugin.log_temperature is p for g in out.trainer.optimizer.param_groups for p in g["params"])
    assert out.summary["distill"]["temperature"] != pytest.approx(2.0, abs=1e-4)  # T moved
    # The plugin's own teacher path (no_grad) gives T a gradient ...
    tr = out.trainer
    x, y = tr.task.train_dataset().x[:16], tr.task.train_dataset().y[:16]
    batch = (x, y)
    student = tr.model(x)
    kl_term(student, teacher_logits(plugin.teacher, tr, batch), plugin.temperature).backward()
    assert plugin.log_temperature.grad is not None and plugin.log_temperature.grad.abs() > 0
    # ... and the same step with the teacher under inference_mode cannot back-propagate into T.
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        kl_term(tr.model(x), teacher_logits(plugin.teacher, tr, batch, grad_mode=torch.inference_mode),
                plugin.temperature).backward()


def test_learnable_temperature_resumes_exactly(assert_resume_equivalent, tmp_path):
    opts = {"distill.learn_temperature": True, "distill.teacher": "copy", "optimizer.lr": 0.05}
    whole, resumed = assert_resume_equivalent(plugins=["distill"], steps=12, cut=5, options=opts)
    assert whole.final_payload()["plugins"]["distill"]["log_temperature"] != math.log(2.0)


def test_temperature_is_clamped_to_its_range(kktrain_run):
    opts = {"distill.learn_temperature": True, "optimizer.lr": 5.0, "distill.temperature": 1.0,
            "distill.temperature_min": 0.9, "distill.temperature_max": 1.1, "grad_clip": 0}
    out = kktrain_run(plugins=["distill"], steps=5, options=opts)
    assert 0.9 - 1e-6 <= out.summary["distill"]["temperature"] <= 1.1 + 1e-6  # float32


def test_distill_on_the_latin_task_masks_impossible_symbols(kktrain_run):
    small = {"batch_size": 8, "task.samples_per_epoch": 64, "task.val_puzzles": 2, "log_every": 1}
    out = kktrain_run(task="latin", plugins=["distill"], steps=3, options={**small, "distill.teacher": "copy"})
    out.assert_success()
    assert all(math.isfinite(m["train/loss"]) and math.isfinite(m["distill/kl"]) for m in out.metrics if m["kind"] == "train")


def test_bad_teacher_and_a_task_without_logits_are_one_line_errors(kktrain_run, tmp_path):
    with pytest.raises(ConfigError, match="neither a run directory, a checkpoint nor module:factory"):
        kktrain_run(plugins=["distill"], steps=1, options={"distill.teacher": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="cannot be imported"):
        kktrain_run(plugins=["distill"], steps=1, options={"distill.teacher": "no_such_module_xyz:make"})
    with pytest.raises(ConfigError, match="outside"):
        kktrain_run(plugins=["distill"], steps=1, options={"distill.temperature": 20.0})

    from kktrain import RunConfig, Trainer
    from kktrain.tasks.tiny import TinyTask

    class NoLogits(TinyTask):
        distill_logits = None  # type: ignore[assignment]

    with pytest.raises(ConfigError, match="has no distill_logits"):
        Trainer(RunConfig(task="tiny", max_steps=1, out=str(tmp_path / "x")), ["distill"], task=NoLogits(), quiet=True).fit()


CACHE_TASK = {"samples": 96, "hidden": 8}  # 6 steps per epoch at batch 16


def test_cached_teacher_logits_are_reused_from_the_second_epoch(kktrain_run, teacher_run, tmp_path):
    opts = {"distill.teacher": str(teacher_run), "batch_size": 16, "checkpoint.at_epoch_end": False}
    live = kktrain_run(plugins=["distill"], steps=12, task_options=CACHE_TASK, options=opts)
    cached = kktrain_run(plugins=["distill"], steps=12, task_options=CACHE_TASK, options={**opts, "distill.cache": True},
                         out=tmp_path / "cached")
    assert cached.summary["distill"]["cache"] == {"hits": 6, "misses": 6, "filled": 96}
    assert (tmp_path / "cached" / "distill_cache.pt").is_file()
    a, b = live.final_payload()["model"], cached.final_payload()["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the same teacher logits, from disk
    # A resumed (here: extended) run reads the file: every batch of the next epoch is a hit.
    more = kktrain_run(plugins=["distill"], steps=18, task_options=CACHE_TASK, options={**opts, "distill.cache": True},
                       out=tmp_path / "cached", resume="auto")
    assert more.summary["distill"]["cache"]["hits"] == 6 and more.summary["distill"]["cache"]["misses"] == 0


def test_cache_is_refused_when_samples_change_with_the_seed(kktrain_run, tmp_path):
    small = {"batch_size": 8, "task.samples_per_epoch": 64, "task.val_puzzles": 2}
    with pytest.raises(ConfigError, match="needs samples that are the same for an index in every epoch") as err:
        kktrain_run(task="latin", plugins=["distill"], steps=2, options={**small, "distill.cache": True})
    assert "\n" not in str(err.value)

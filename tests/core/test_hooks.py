"""One ``test_hook_<name>`` per hook: it fires at the documented moment, with the documented
arguments, and its return value has the documented effect (docs/hooks.md).

Every test trains the tiny task for real through the ``kktrain_run`` fixture, with small test
plugins defined here and passed as instances. ``tests/core/test_hooks_contract.py`` checks that
no hook lacks its test.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from kktrain import PluginError, RunConfig, StepRetry, TrainingAborted, hookimpl, load_checkpoint

# 64 samples in batches of 16: 4 steps per epoch.
SMALL = {"samples": 64}




# ---------------------------------------------------------------------------------------------
# small helpers and test plugins
# ---------------------------------------------------------------------------------------------


def clone_model(trainer: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def read_jsonl(path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class InitialModel:
    """Remembers the model as it is when training starts."""

    name = "initial-model"

    @hookimpl
    def on_train_start(self, trainer):
        self.weights = clone_model(trainer)


class LossSpy:
    """Wraps forward_loss and keeps every micro-batch loss with the epoch it belongs to."""

    name = "loss-spy"

    def __init__(self) -> None:
        self.losses: list[tuple[int, torch.Tensor]] = []

    @hookimpl(wrapper=True)
    def forward_loss(self, trainer, batch):
        loss = yield
        self.losses.append((trainer.state.epoch, loss.detach().clone()))
        return loss


# ---------------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------------


class Recommends:
    """Returns config updates from on_hw_detect."""

    def __init__(self, name: str, changes: dict[str, Any] | None) -> None:
        self.name, self.changes, self.seen = name, changes, []

    @hookimpl
    def on_hw_detect(self, hw, config, user_set):
        self.seen.append({"hw": hw, "config": config.model_copy(deep=True), "user_set": user_set})
        return self.changes


class RecommendsFirst(Recommends):
    @hookimpl(tryfirst=True)
    def on_hw_detect(self, hw, config, user_set):
        return super().on_hw_detect(hw, config, user_set)


def test_hook_on_hw_detect(kktrain_run, hook_recorder):
    rec = Recommends("recommends", {"batch_size": 8, "log_every": 3, "optimizer.lr": 0.05})
    out = kktrain_run(plugins=[rec], steps=6, batch_size=16, recorder=hook_recorder)
    # Fires first, once, before anything is built; config is the validated RunConfig.
    names = hook_recorder.names
    assert names[0] == "on_hw_detect" and names.index("on_model_built") > max(i for i, n in enumerate(names) if n == "on_hw_detect")
    (seen,) = rec.seen  # each implementation is called once
    assert seen["hw"] is not None
    assert isinstance(seen["config"], RunConfig)
    assert (seen["config"].batch_size, seen["config"].log_every) == (16, 10)
    assert "batch_size" in seen["user_set"] and "log_every" not in seen["user_set"]
    # The returned dict changes the config, except keys the user set.
    cfg = out.trainer.config
    assert (cfg.batch_size, cfg.log_every, cfg.optimizer.lr) == (16, 3, 0.05)
    assert [r["step"] for r in out.metrics if r["kind"] == "train"] == [3, 6]
    log = read_jsonl(out.run_dir / "log.jsonl")
    changed = {e["key"]: e for e in log if e["event"] == "config_changed"}
    assert changed["log_every"]["plugin"] == "recommends" and changed["log_every"]["new"] == 3
    assert any(e["event"] == "hw_profile_skipped" and e["key"] == "batch_size" for e in log)


def test_hook_on_hw_detect_first_called_wins_and_changes_name_their_plugin(kktrain_run):
    # tryfirst insists: its value wins over a plain implementation's.
    first = RecommendsFirst("first", {"log_every": 2})
    late = Recommends("late", {"log_every": 5, "val_every": 3})
    quiet = RecommendsFirst("quiet", None)  # returns None: must not shift who gets the credit
    out = kktrain_run(plugins=[quiet, late, first], steps=6)
    assert (out.trainer.config.log_every, out.trainer.config.val_every) == (2, 3)
    credit = {e["key"]: e["plugin"] for e in read_jsonl(out.run_dir / "log.jsonl") if e["event"] == "config_changed"}
    assert credit == {"log_every": "first", "val_every": "late"}


def test_hook_on_hw_detect_invalid_value_is_an_error_naming_the_plugin(kktrain_run):
    with pytest.raises(PluginError, match=r"plugin 'bad-profile' set batch_size = 0"):
        kktrain_run(plugins=[Recommends("bad-profile", {"batch_size": 0})], steps=2)


class Freezer:
    """Freezes the first layer in on_model_built."""

    name = "freezer"

    @hookimpl
    def on_model_built(self, trainer, model):
        self.had_optimizer = hasattr(trainer, "optimizer")
        self.is_trainer_model = model is trainer.model
        self.device = next(model.parameters()).device
        for p in model[0].parameters():
            p.requires_grad_(False)
        self.frozen = {k: v.clone() for k, v in model[0].state_dict().items()}


def test_hook_on_model_built(kktrain_run, hook_recorder):
    freezer, initial = Freezer(), InitialModel()
    hook_recorder.fire_all = True
    out = kktrain_run(plugins=[freezer, initial], steps=4, recorder=hook_recorder)
    names = hook_recorder.names
    assert names.index("on_hw_detect") < names.index("on_model_built") < names.index("build_optimizer")
    assert freezer.is_trainer_model and not freezer.had_optimizer
    assert freezer.device == out.trainer.device
    # The optimizer is built from what is still trainable after the hook.
    assert len(out.trainer.optimizer.param_groups[0]["params"]) == len(list(out.trainer.model.parameters())) - 2
    final = out.final_payload()["model"]
    assert torch.equal(final["0.weight"], freezer.frozen["weight"]) and torch.equal(final["0.bias"], freezer.frozen["bias"])
    assert not torch.equal(final["2.weight"], initial.weights["2.weight"])


class Sgd:
    name = "sgd"

    @hookimpl
    def build_optimizer(self, trainer, params):
        self.params = params
        self.model_params = [p for p in trainer.model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=0.05)


class Declines:
    name = "declines"
    called = False

    @hookimpl(tryfirst=True)
    def build_optimizer(self, trainer, params):
        self.called = True
        return None


def test_hook_build_optimizer(kktrain_run):
    sgd, declines = Sgd(), Declines()
    out = kktrain_run(plugins=[sgd, declines], steps=3)
    tr = out.trainer
    assert declines.called, "an implementation returning None is asked first (tryfirst) and passes"
    assert type(tr.optimizer) is torch.optim.SGD, "the first non-None result replaces the default AdamW"
    assert len(sgd.params) == len(sgd.model_params) and all(a is b for a, b in zip(sgd.params, sgd.model_params))
    assert tr.scheduler.optimizer is tr.optimizer, "the core builds the LR scheduler on the returned optimizer"
    assert out.final_payload()["optimizer"]["param_groups"][0].get("momentum") == 0
    plain = kktrain_run(steps=1)
    assert type(plain.trainer.optimizer) is torch.optim.AdamW


class Starter:
    """Keeps a counter in its state; records on_train_start and load_state_dict."""

    name = "starter"

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.count = 0

    @hookimpl
    def on_train_start(self, trainer):
        self.events.append(("start", trainer.state.step, self.count, isinstance(trainer.scheduler, torch.optim.lr_scheduler.LRScheduler)))

    @hookimpl
    def on_step(self, trainer, loss):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.events.append(("load", state["count"]))
        self.count = state["count"]


def test_hook_on_train_start(kktrain_run, hook_recorder, tmp_path):
    out_dir = tmp_path / "resumable"
    first = Starter()
    kktrain_run(plugins=[first], steps=8, stop_at_step=4, out=out_dir, recorder=hook_recorder)
    assert first.events == [("start", 0, 0, True)]
    names = hook_recorder.names
    assert names.index("build_optimizer") < names.index("on_train_start") < names.index("on_epoch_start")
    # On a resume: the checkpoint's step, and plugin state already restored.
    again = Starter()
    out = kktrain_run(plugins=[again], steps=8, resume="auto", out=out_dir)
    assert again.events == [("load", 4), ("start", 4, 4, True)]
    assert out.summary["steps"] == 8 and again.count == 8


class Knobs:
    """Turns the loss off from epoch 1 (a curriculum in miniature)."""

    name = "knobs"

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    @hookimpl
    def on_epoch_start(self, trainer, epoch):
        self.calls.append((epoch, trainer.state.step, trainer.state.batch_in_epoch))
        if epoch == 1:
            trainer.set_knobs({"loss_weight": 0.0})


def test_hook_on_epoch_start(kktrain_run, hook_recorder, tmp_path):
    knobs, spy = Knobs(), LossSpy()
    out = kktrain_run(plugins=[knobs, spy], steps=8, batch_size=16, task_options=SMALL, recorder=hook_recorder)
    assert knobs.calls == [(0, 0, 0), (1, 4, 0)]
    # Knobs set in on_epoch_start apply from the epoch's first batch on.
    assert [e for e, _ in spy.losses] == [0] * 4 + [1] * 4
    assert all(loss.item() > 0 for e, loss in spy.losses if e == 0)
    assert all(loss.item() == 0 for e, loss in spy.losses if e == 1)
    assert out.trainer.state.knobs["loss_weight"] == 0.0
    names = hook_recorder.names
    starts = [i for i, n in enumerate(names) if n == "on_epoch_start"]
    assert all(names[i + 1] == "forward_loss" for i in starts), "on_epoch_start comes right before the epoch's first forward"
    # A resume fires it for the epoch it lands in, mid-epoch.
    cut = tmp_path / "cut"
    kktrain_run(plugins=[Knobs()], steps=8, batch_size=16, task_options=SMALL, stop_at_step=6, out=cut)
    resumed = Knobs()
    kktrain_run(plugins=[resumed], steps=8, batch_size=16, task_options=SMALL, resume="auto", out=cut)
    assert resumed.calls == [(1, 6, 2)]


# ---------------------------------------------------------------------------------------------
# one optimizer step
# ---------------------------------------------------------------------------------------------


class Doubler:
    """Wraps forward_loss: sees the loss and returns it doubled."""

    name = "doubler"

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.returned: list[torch.Tensor] = []

    @hookimpl(wrapper=True)
    def forward_loss(self, trainer, batch):
        loss = yield
        self.seen.append({"requires_grad": loss.requires_grad, "shape": tuple(loss.shape), "batch": len(batch[0])})
        doubled = loss * 2
        self.returned.append(doubled.detach().clone())
        return doubled


class StepLoss:
    """Records the loss and grad_norm handed to on_before_optimizer_step."""

    name = "step-loss"

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, Any]] = []

    @hookimpl
    def on_before_optimizer_step(self, trainer, loss, grad_norm):
        self.seen.append((loss, grad_norm))


class ZeroLoss:
    """Replaces forward_loss with a loss that has zero gradients."""

    name = "zero-loss"

    @hookimpl
    def forward_loss(self, trainer, batch):
        return trainer.task.loss(trainer.model, batch) * 0.0


def test_hook_forward_loss(kktrain_run):
    doubler, step_loss = Doubler(), StepLoss()
    kktrain_run(plugins=[doubler, step_loss], steps=3, batch_size=16)
    assert doubler.seen == [{"requires_grad": True, "shape": (), "batch": 16}] * 3
    # What the wrapper returns is the loss the rest of the step uses.
    assert len(step_loss.seen) == 3
    for (loss, _), doubled in zip(step_loss.seen, doubler.returned):
        assert not loss.requires_grad and torch.equal(loss, doubled)
    # firstresult: a returned loss replaces the default forward+loss (zero gradients: no learning).
    initial = InitialModel()
    out = kktrain_run(plugins=[ZeroLoss(), initial], steps=3, **{"optimizer.weight_decay": 0.0})
    assert same_tensors(out.final_payload()["model"], initial.weights)


class BackwardSpy:
    name = "backward-spy"

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    @hookimpl
    def backward(self, trainer, loss):
        self.losses.append(loss.detach().clone())
        return None  # the default still runs


class NoBackward:
    name = "no-backward"

    @hookimpl
    def backward(self, trainer, loss):
        return True  # claims the job and does nothing: no gradients


def test_hook_backward(kktrain_run):
    spy, back = LossSpy(), BackwardSpy()
    kktrain_run(plugins=[spy, back], steps=3, grad_accum=2)
    # Once per micro-batch, with the loss already divided for gradient accumulation.
    assert len(back.losses) == len(spy.losses) == 6
    for (_, forward), backward in zip(spy.losses, back.losses):
        assert torch.equal(backward, forward * 0.5)
    # firstresult: returning True replaces loss.backward().
    initial = InitialModel()
    out = kktrain_run(plugins=[NoBackward(), initial], steps=3)
    assert same_tensors(out.final_payload()["model"], initial.weights)
    assert out.summary["steps"] == 3


class GradProbe:
    """Measures the gradients in on_after_backward and again before the optimizer step."""

    name = "grad-probe"

    def __init__(self, zero: bool = False) -> None:
        self.zero = zero
        self.after: list[tuple[int, torch.Tensor]] = []
        self.before: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.forwards = 0

    @hookimpl(wrapper=True)
    def forward_loss(self, trainer, batch):
        self.forwards += 1
        return (yield)

    @hookimpl
    def on_after_backward(self, trainer):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        self.after.append((self.forwards, torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        if self.zero:
            torch._foreach_zero_(grads)

    @hookimpl
    def on_before_optimizer_step(self, trainer, loss, grad_norm):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        now = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        self.before.append((grad_norm, now))


def test_hook_on_after_backward(kktrain_run):
    probe = GradProbe()
    kktrain_run(plugins=[probe], steps=3, grad_accum=2, grad_clip=0.01)
    # Once per optimizer step, after all micro-batches; gradients are complete and not clipped yet.
    assert [n for n, _ in probe.after] == [2, 4, 6]
    for (_, unclipped), (grad_norm, clipped) in zip(probe.after, probe.before):
        assert torch.allclose(unclipped, grad_norm, rtol=1e-5)
        assert unclipped > 0.02 and clipped <= 0.01 * (1 + 1e-5)
    # Changing the gradients here changes the step: zeroed gradients, no learning.
    initial = InitialModel()
    out = kktrain_run(plugins=[GradProbe(zero=True), initial], steps=3, **{"optimizer.weight_decay": 0.0})
    assert same_tensors(out.final_payload()["model"], initial.weights)


class Veto:
    """Vetoes the optimizer step on chosen calls; checks that every step starts with no gradients."""

    name = "veto"

    def __init__(self, veto_calls: set[int]) -> None:
        self.veto_calls = veto_calls
        self.calls: list[dict[str, Any]] = []
        self.grads_none_at_start: list[bool] = []

    @hookimpl(tryfirst=True)
    def forward_loss(self, trainer, batch):
        self.grads_none_at_start.append(all(p.grad is None for p in trainer.model.parameters()))

    @hookimpl
    def on_before_optimizer_step(self, trainer, loss, grad_norm):
        self.calls.append({"step": trainer.state.step, "loss": loss, "grad_norm": grad_norm, "model": clone_model(trainer)})
        return False if len(self.calls) in self.veto_calls else True


def test_hook_on_before_optimizer_step(kktrain_run):
    veto, spy = Veto({2, 3}), LossSpy()
    out = kktrain_run(plugins=[veto, spy], steps=5)
    # Any False vetoes (the True of the same plugin on other calls does not matter): no optimizer
    # or scheduler step, gradients zeroed, state.step not advanced, counted as skipped.
    assert [c["step"] for c in veto.calls] == [0, 1, 1, 1, 2, 3, 4]
    assert out.summary["skipped_steps"] == 2 and out.summary["steps"] == 5
    assert same_tensors(veto.calls[1]["model"], veto.calls[2]["model"])
    assert same_tensors(veto.calls[2]["model"], veto.calls[3]["model"])
    assert not same_tensors(veto.calls[3]["model"], veto.calls[4]["model"])
    assert all(veto.grads_none_at_start)
    payload = out.final_payload()
    assert payload["optimizer"]["state"][0]["step"].item() == 5
    assert payload["scheduler"]["last_epoch"] == 5
    # loss: the step's detached loss; grad_norm: the pre-clip norm (a tensor), None without clipping.
    for call, (_, forward) in zip(veto.calls, spy.losses):
        assert not call["loss"].requires_grad and torch.equal(call["loss"], forward)
        assert isinstance(call["grad_norm"], torch.Tensor) and call["grad_norm"].ndim == 0
    no_clip = Veto(set())
    kktrain_run(plugins=[no_clip], steps=2, grad_clip=None)
    assert [c["grad_norm"] for c in no_clip.calls] == [None, None]


def test_hook_on_before_optimizer_step_any_false_vetoes(kktrain_run):
    out = kktrain_run(plugins=[Veto({1}), StepLoss()], steps=2)
    assert out.summary["skipped_steps"] == 1


class OptStep:
    """optimizer_step: records the step counter; optionally claims the step without stepping."""

    def __init__(self, name: str, skip: bool) -> None:
        self.name, self.skip = name, skip
        self.steps: list[int] = []
        self.lrs: list[float] = []

    @hookimpl
    def optimizer_step(self, trainer):
        self.steps.append(trainer.state.step)
        self.lrs.append(trainer.lr)
        return True if self.skip else None


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_hook_optimizer_step(kktrain_run, hook_recorder):
    spy = OptStep("opt-spy", skip=False)
    initial = InitialModel()
    hook_recorder.fire_all = True  # record the neighbours too, which nobody else implements
    out = kktrain_run(plugins=[spy, initial], steps=4, recorder=hook_recorder)
    assert spy.steps == [0, 1, 2, 3], "fires before state.step counts the step"
    assert not same_tensors(out.final_payload()["model"], initial.weights), "returning None lets the default step"
    names = hook_recorder.names
    i = names.index("optimizer_step")
    assert names[i - 1] == "on_before_optimizer_step" and names[i + 1] == "on_step"
    # firstresult: returning True replaces optimizer.step(); the core still steps the scheduler.
    frozen, initial = OptStep("frozen", skip=True), InitialModel()
    out = kktrain_run(plugins=[frozen, initial], steps=4)
    assert same_tensors(out.final_payload()["model"], initial.weights)
    assert out.final_payload()["scheduler"]["last_epoch"] == 4
    assert frozen.lrs[0] != frozen.lrs[-1], "the LR schedule advanced although the optimizer did not step"


class StepWatch:
    name = "step-watch"

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.seen: list[tuple[int, torch.Tensor]] = []

    @hookimpl
    def on_step(self, trainer, loss):
        self.seen.append((trainer.state.step, loss))
        if trainer.state.step == self.stop_at:
            trainer.request_stop("enough")


def test_hook_on_step(kktrain_run):
    watch, step_loss = StepWatch(), StepLoss()
    kktrain_run(plugins=[watch, step_loss], steps=4)
    assert [s for s, _ in watch.seen] == [1, 2, 3, 4], "state.step already counts the step"
    for (_, loss), (before_loss, _) in zip(watch.seen, step_loss.seen):
        assert loss is before_loss and not loss.requires_grad
    # A vetoed step does not fire on_step.
    vetoed = StepWatch()
    kktrain_run(plugins=[vetoed, Veto({1})], steps=2)
    assert [s for s, _ in vetoed.seen] == [1, 2]
    # request_stop from on_step ends the run after this step, with a final checkpoint.
    stopper = StepWatch(stop_at=3)
    out = kktrain_run(plugins=[stopper], steps=10)
    assert (out.summary["status"], out.summary["steps"], out.summary["stop_reason"]) == ("stopped", 3, "enough")
    assert (out.run_dir / "checkpoints" / "final.pt").exists()


class Retry:
    """Retries a failing step split into more micro-batches, up to ``max_attempts`` times."""

    name = "retry"

    def __init__(self, max_attempts: int = 1) -> None:
        self.max_attempts = max_attempts
        self.calls: list[tuple[str, int, int]] = []

    @hookimpl
    def on_step_exception(self, trainer, error, attempt):
        self.calls.append((type(error).__name__, attempt, trainer.state.step))
        if isinstance(error, torch.OutOfMemoryError) and attempt < self.max_attempts:
            return StepRetry(micro_batches=2 ** (attempt + 1), reason="oom")
        return None


def test_hook_on_step_exception(kktrain_run, fault_injector):
    inject, retry = fault_injector(oom_at=[3], oom_above=8), Retry()
    out = kktrain_run(plugins=[inject, retry], steps=5, batch_size=16)
    assert retry.calls == [("OutOfMemoryError", 0, 2)]
    assert inject.injected == [("oom", 3)]
    assert out.summary["steps"] == 5 and out.summary["status"] == "completed"
    (event,) = [e for e in out.summary["events"] if e["event"] == "step_retry"]
    assert (event["attempt"], event["micro_batches"], event["reason"]) == (1, 2, "oom")
    # The retried step, split in two halves, computes the same step as the unsplit one.
    plain = kktrain_run(steps=5, batch_size=16)
    a, b = out.final_payload()["model"], plain.final_payload()["model"]
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_hook_on_step_exception_counts_attempts_then_lets_the_error_through(kktrain_run, fault_injector):
    inject, retry = fault_injector(oom_at=[2], oom_above=0), Retry(max_attempts=2)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        kktrain_run(plugins=[inject, retry], steps=3, batch_size=16)
    assert retry.calls == [("OutOfMemoryError", 0, 1), ("OutOfMemoryError", 1, 1), ("OutOfMemoryError", 2, 1)]


class Guard:
    """A guard that reports an anomaly at one step and keeps the answer."""

    name = "guard"

    def __init__(self, at: int) -> None:
        self.at = at
        self.answers: list[Any] = []

    @hookimpl
    def on_step(self, trainer, loss):
        if trainer.state.step == self.at:
            detail = {"step": trainer.state.step, "loss": float(loss)}
            self.answers.append(trainer.hook.on_anomaly(trainer=trainer, kind="spike", detail=detail))


class Handler:
    def __init__(self, name: str, answer: bool | None) -> None:
        self.name, self.answer = name, answer
        self.calls: list[tuple[str, dict]] = []

    @hookimpl
    def on_anomaly(self, trainer, kind, detail):
        self.calls.append((kind, detail))
        return self.answer


class FirstHandler(Handler):
    @hookimpl(tryfirst=True)
    def on_anomaly(self, trainer, kind, detail):
        return super().on_anomaly(trainer, kind, detail)


class LastHandler(Handler):
    @hookimpl(trylast=True)
    def on_anomaly(self, trainer, kind, detail):
        return super().on_anomaly(trainer, kind, detail)


def test_hook_on_anomaly(kktrain_run, hook_recorder):
    guard = Guard(at=3)
    early, handler, late = FirstHandler("early", None), Handler("handler", True), LastHandler("late", True)
    kktrain_run(plugins=[guard, early, handler, late], steps=4, recorder=hook_recorder)
    # firstresult: the first True answers; None passes on; later implementations are not asked.
    assert guard.answers == [True]
    assert [k for k, _ in early.calls] == ["spike"] and [k for k, _ in handler.calls] == ["spike"]
    assert late.calls == []
    kind, detail = handler.calls[0]
    assert detail["step"] == 3 and math.isfinite(detail["loss"])
    # The core never fires it itself; the guard's call appears right after its on_step.
    names = hook_recorder.names
    assert names.count("on_anomaly") == 1
    assert names[names.index("on_anomaly") - 1] == "on_step"
    # Nobody answering means nobody handled it.
    lonely = Guard(at=2)
    kktrain_run(plugins=[lonely], steps=2)
    assert lonely.answers == [None]


# ---------------------------------------------------------------------------------------------
# validation, epochs, checkpoints, logs, the end
# ---------------------------------------------------------------------------------------------


class AddsMetric:
    name = "adds-metric"

    def __init__(self) -> None:
        self.training_mode_inside: list[bool] = []

    @hookimpl(wrapper=True)
    def validate(self, trainer):
        result = yield
        self.training_mode_inside.append(trainer.model.training)
        return {**result, "extra": 1.5}


class ReplacesValidation:
    name = "replaces-validation"

    @hookimpl
    def validate(self, trainer):
        return {"custom": 0.25}


class DrawsRandom:
    """A validate wrapper that consumes the global RNG (it must not change training)."""

    name = "draws-random"

    @hookimpl(wrapper=True)
    def validate(self, trainer):
        torch.rand(1000)
        return (yield)


def test_hook_validate(kktrain_run):
    adds = AddsMetric()
    out = kktrain_run(plugins=[adds], steps=6, val_every=3)
    val = [r for r in out.metrics if r["kind"] == "val"]
    assert [r["step"] for r in val] == [3, 6], "every val_every steps; not again at the end of the same step"
    assert all(r["val/extra"] == 1.5 and "val/acc" in r for r in val), "the wrapper changes the metrics"
    assert out.summary["final"]["val/extra"] == 1.5
    assert adds.training_mode_inside == [True, True], "the model is back in train mode after the default"
    # firstresult: a returned dict replaces the task's validation.
    out = kktrain_run(plugins=[ReplacesValidation()], steps=2)
    assert set(out.summary["final"]) == {"val/custom", "val/time_s"} and out.summary["final"]["val/custom"] == 0.25
    # The global RNG is forked around validation: the training trajectory does not change.
    opts = {"steps": 6, "val_every": 2, "task_options": {"dropout": 0.3}}
    plain = kktrain_run(**opts)
    drawing = kktrain_run(plugins=[DrawsRandom()], **opts)
    assert same_tensors(plain.final_payload()["model"], drawing.final_payload()["model"])


class ValWatch:
    name = "val-watch"

    def __init__(self, stop: bool = False) -> None:
        self.stop = stop
        self.seen: list[tuple[int, dict[str, float]]] = []

    @hookimpl
    def on_validation_end(self, trainer, metrics):
        self.seen.append((trainer.state.step, dict(metrics)))
        metrics["val/acc_pct"] = metrics["val/acc"] * 100
        if self.stop:
            trainer.request_stop("good enough")


def test_hook_on_validation_end(kktrain_run):
    watch = ValWatch()
    out = kktrain_run(plugins=[watch], steps=4, val_every=2)
    assert [s for s, _ in watch.seen] == [2, 4]
    assert all({"val/loss", "val/acc", "val/time_s"} <= set(m) for _, m in watch.seen)
    val = [r for r in out.metrics if r["kind"] == "val"]
    assert [r["val/acc_pct"] for r in val] == [m["val/acc"] * 100 for _, m in watch.seen], "added entries are logged"
    assert out.summary["final"]["val/acc_pct"] == watch.seen[-1][1]["val/acc"] * 100
    # request_stop here stops the run after this step.
    out = kktrain_run(plugins=[ValWatch(stop=True)], steps=10, val_every=3)
    assert (out.summary["status"], out.summary["steps"], out.summary["stop_reason"]) == ("stopped", 3, "good enough")


class EpochWatch:
    name = "epoch-watch"

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, dict[str, float]]] = []

    @hookimpl
    def on_epoch(self, trainer, epoch, metrics):
        self.seen.append((epoch, trainer.state.step, dict(metrics)))
        metrics["epoch/custom"] = float(epoch + 10)


def test_hook_on_epoch(kktrain_run, hook_recorder):
    watch, spy = EpochWatch(), LossSpy()
    hook_recorder.fire_all = True
    out = kktrain_run(plugins=[watch, spy], steps=8, batch_size=16, task_options=SMALL, recorder=hook_recorder)
    # Each finished epoch fires once, after its end-of-epoch validation; the last one too.
    assert [(e, s) for e, s, _ in watch.seen] == [(0, 4), (1, 8)], "on_epoch must fire for every finished epoch"
    for epoch, _, metrics in watch.seen:
        losses = torch.stack([loss for e, loss in spy.losses if e == epoch])
        assert metrics["train/loss"] == pytest.approx(losses.mean().item(), rel=1e-6)
        assert metrics["train/epoch_time_s"] > 0 and "val/acc" in metrics
    names = hook_recorder.names
    i = names.index("on_epoch")
    assert names[i - 3 : i] == ["validate", "on_validation_end", "on_log"]
    epochs = [r for r in out.metrics if r["kind"] == "epoch"]
    assert [r["epoch/custom"] for r in epochs] == [10.0, 11.0], "entries added in on_epoch are logged"


class CheckpointWatch:
    name = "checkpoint-watch"

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str, int, str]] = []

    @hookimpl
    def on_checkpoint(self, trainer, path, kind):
        payload = load_checkpoint(path)  # written and verified already
        self.seen.append((kind, trainer.state.step, payload["kind"], payload["step"], path))


def test_hook_on_checkpoint(kktrain_run):
    watch = CheckpointWatch()
    opts = {"checkpoint.every_steps": 3, "checkpoint.best_metric": "val/acc", "val_every": 2}
    out = kktrain_run(plugins=[watch], steps=8, batch_size=16, task_options=SMALL, **opts)
    for kind, step, saved_kind, saved_step, path in watch.seen:
        assert (saved_kind, saved_step) == (kind, step)
        assert isinstance(path, str) and path.startswith(str(out.run_dir / "checkpoints"))
    kinds = [(k, s) for k, s, *_ in watch.seen]
    assert [x for x in kinds if x[0] == "step"] == [("step", 3), ("step", 6)]
    assert ("epoch", 4) in kinds and kinds[-1] == ("final", 8)
    assert kinds[0] == ("best", 2), "the first validation is the best so far"
    assert {k for k, _ in kinds} == {"step", "epoch", "best", "final"}


class LogWatch:
    name = "log-watch"

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    @hookimpl
    def on_log(self, trainer, record):
        self.records.append(record)
        record["custom/double_step"] = record["step"] * 2


def test_hook_on_log(kktrain_run):
    watch = LogWatch()
    out = kktrain_run(plugins=[watch], steps=8, batch_size=16, task_options=SMALL, log_every=2)
    written = out.metrics
    assert len(written) == len(watch.records) > 0
    assert written == [json.loads(json.dumps(r)) for r in watch.records], "the record the hook saw is the line written"
    assert all(r["custom/double_step"] == 2 * r["step"] for r in written), "entries added in on_log are written"
    assert {r["kind"] for r in written} >= {"train", "val", "epoch"}
    train = [r for r in written if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert all({"train/loss", "train/lr", "epoch", "train/steps_per_s", "train/samples_per_s", "time"} <= set(r) for r in train)


class Summarizer:
    name = "summarizer"

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    @hookimpl
    def on_train_end(self, trainer, summary):
        self.seen.append({"status": summary["status"], "final_exists": (trainer.checkpoint_dir / "final.pt").exists(),
                          "keys": set(summary)})
        summary["summarizer"] = {"steps_seen": summary["steps"]}


def test_hook_on_train_end(kktrain_run, tmp_path):
    s = Summarizer()
    out = kktrain_run(plugins=[s], steps=3)
    (seen,) = s.seen
    assert seen["status"] == "completed" and seen["final_exists"], "fires after the final checkpoint"
    assert {"status", "steps", "final", "best", "events"} <= seen["keys"]
    assert out.summary["summarizer"] == {"steps_seen": 3}
    assert json.loads((out.run_dir / "summary.json").read_text())["summarizer"] == {"steps_seen": 3}
    # It fires however training ends: stopped early, paused at --stop-at-step, aborted by a guard.
    stopped = Summarizer()
    kktrain_run(plugins=[stopped, StepWatch(stop_at=2)], steps=5)
    paused = Summarizer()
    kktrain_run(plugins=[paused], steps=5, stop_at_step=2)
    aborted = Summarizer()
    with pytest.raises(TrainingAborted, match="guard gave up"):
        kktrain_run(plugins=[aborted, Aborter()], steps=5)
    assert [x["status"] for x in stopped.seen + paused.seen + aborted.seen] == ["stopped", "paused", "aborted"]


class Aborter:
    name = "aborter"

    @hookimpl
    def on_step(self, trainer, loss):
        if trainer.state.step == 2:
            raise TrainingAborted("guard gave up at step 2: lower the learning rate")


# ---------------------------------------------------------------------------------------------
# register_commands: the command line, before any run
# ---------------------------------------------------------------------------------------------


class AddsCommand:
    """Adds `kktrain hello` (and tries to take `run`, which the core keeps)."""

    @staticmethod
    @hookimpl
    def register_commands(cli):
        import click

        @cli.command("hello")
        @click.option("--name", default="world")
        def hello(name):
            """Say hello."""
            click.echo(f"hello {name}")

        @cli.command("run")
        def not_the_real_run():
            """Must never replace the core's run."""


class BrokenCommands:
    """Its register_commands raises."""

    @staticmethod
    @hookimpl
    def register_commands(cli):
        raise RuntimeError("boom")


def test_hook_register_commands():
    from click.testing import CliRunner

    from kktrain.cli import KKTrainGroup, cli
    from kktrain.manager import collect_commands

    warnings: list[str] = []
    commands = collect_commands({"adds": AddsCommand, "broken": BrokenCommands, "plain": InitialModel}, warnings.append)
    assert sorted(commands) == ["hello", "run"]
    assert warnings == ["plugin 'broken' failed to register its commands (RuntimeError: boom); they are skipped"]
    # In the real group: the plugin command is there, the core's `run` wins over the plugin's.
    group = KKTrainGroup(commands=dict(cli.commands))
    group._plugin_commands = {k: v for k, v in commands.items() if k not in group.commands}
    result = CliRunner().invoke(group, ["hello", "--name", "kk"])
    assert result.exit_code == 0 and result.output == "hello kk\n"
    assert group.get_command(None, "run") is cli.commands["run"]  # type: ignore[arg-type]
    assert "hello" in group.list_commands(None)  # type: ignore[arg-type]


def test_hook_register_commands_from_an_installed_plugin(tmp_path):
    # vcache is installed in the dev environment: its hw-report shows in the help and runs.
    from kkcli import kk

    help_text = kk("--help", cwd=tmp_path, check=True).stdout
    assert "hw-report" in help_text and "run" in help_text
    report = json.loads(kk("hw-report", "--json", cwd=tmp_path, check=True).stdout)
    assert report["match"]["cpu_profile"]["name"]

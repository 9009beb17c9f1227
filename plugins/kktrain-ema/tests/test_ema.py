"""ema: the multi-tensor average, validation with swapped weights, naming, best, resume, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kktrain import ConfigError, hookimpl
from kktrain.tasks.tiny import make_task
from kktrain.testing import compare_payloads


class WeightsWatch:
    """Keeps the live weights after each step and checks them after each validation."""

    name = "weights-watch"

    def __init__(self) -> None:
        self.after_step: dict[int, list[torch.Tensor]] = {}
        self.seen_in_validation: list[list[torch.Tensor]] = []
        self.restored: list[bool] = []

    @hookimpl
    def on_step(self, trainer, loss):
        self.after_step[trainer.state.step] = [p.detach().clone() for p in trainer.model.parameters()]

    @hookimpl(trylast=True, wrapper=True)
    def validate(self, trainer):
        # Innermost wrapper: sees exactly the weights the core's validation runs with.
        self.seen_in_validation.append([p.detach().clone() for p in trainer.model.parameters()])
        return (yield)

    @hookimpl
    def on_validation_end(self, trainer, metrics):
        before = self.after_step[trainer.state.step]
        self.restored.append(all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters())))


def _ema_weights(out) -> dict[str, torch.Tensor]:
    return out.final_payload()["plugins"]["ema"]["weights"]


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ema.beta": 0.9}, "has no option 'beta'"),
        ({"ema.decay": 1.5}, "option 'decay'"),
        ({"ema.decay": "high"}, "option 'decay'"),
        ({"ema.every": 0}, "option 'every'"),
        ({"ema.validate_with": "average"}, "option 'validate_with'"),
        ({"ema.warmup": "yes"}, "option 'warmup'"),
    ],
)
def test_options_reject_unknown_keys_and_wrong_types(kktrain_run, options, message):
    with pytest.raises(ConfigError, match=message):
        kktrain_run(plugins=["ema"], options=options, steps=2)


# ------------------------------------------------------------------ the average


@pytest.mark.parametrize(("every", "warmup"), [(1, True), (3, False)])
def test_average_follows_the_formula(kktrain_run, every, warmup):
    watch = WeightsWatch()
    decay, steps = 0.9, 12
    out = kktrain_run(plugins=["ema", watch], options={"ema.decay": decay, "ema.every": every, "ema.warmup": warmup}, steps=steps)
    model = make_task().build_model()
    names = [n for n, _ in model.named_parameters()]
    # Reference, one tensor at a time: start from the initial weights (step 0) ...
    torch.manual_seed(0)
    initial = [p.detach().clone() for p in make_task().build_model().parameters()]
    expected = initial
    n = 0
    for step in range(1, steps + 1):
        if step % every:
            continue
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        expected = [torch.lerp(e, p, 1 - d) for e, p in zip(expected, watch.after_step[step])]
        n += 1
    got = _ema_weights(out)
    assert out.final_payload()["plugins"]["ema"]["updates"] == n == steps // every
    for name, e in zip(names, expected):
        torch.testing.assert_close(got[name], e, rtol=1e-6, atol=1e-7)
    raw = out.final_payload()["model"]
    assert any(not torch.equal(got[name], raw[name]) for name in names)


def test_ema_leaves_training_unchanged(kktrain_run):
    ema = kktrain_run(plugins=["ema"], steps=15, val_every=5, task_options={"dropout": 0.2})
    plain = kktrain_run(steps=15, val_every=5, task_options={"dropout": 0.2})
    assert not compare_payloads(ema.final_payload(), plain.final_payload(), parts=("model", "optimizer", "scheduler"))
    # val/* keep meaning the training weights: the plain run's metrics, unchanged.
    for key in ("val/loss", "val/acc"):
        assert ema.summary["final"][key] == plain.summary["final"][key]


# ------------------------------------------------------------------ validation


def test_validation_uses_the_average_and_restores_weights_bit_exactly(kktrain_run):
    watch = WeightsWatch()
    out = kktrain_run(plugins=["ema", watch], options={"ema.decay": 0.8}, steps=12, val_every=4)
    assert watch.restored == [True, True, True], "training weights must come back bit for bit"
    # Each validation runs twice: the average first (val_ema/*), then the training weights (val/*).
    assert len(watch.seen_in_validation) == 6
    ema_final, raw_final = watch.seen_in_validation[-2], watch.seen_in_validation[-1]
    weights = _ema_weights(out)
    names = [n for n, _ in out.trainer.model.named_parameters()]
    assert all(torch.equal(weights[n], t) for n, t in zip(names, ema_final))
    assert all(torch.equal(a, b) for a, b in zip(raw_final, watch.after_step[12]))
    # val_ema/* is what the task reports for the averaged weights.
    task, model = make_task(), make_task().build_model()
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        direct = task.validate(model, torch.device("cpu"))
    assert out.summary["final"]["val_ema/loss"] == direct["loss"]
    assert out.summary["final"]["val_ema/loss"] != out.summary["final"]["val/loss"]


@pytest.mark.parametrize("mode", ["ema", "raw"])
def test_validate_with_one_set_of_weights(kktrain_run, mode):
    watch = WeightsWatch()
    out = kktrain_run(plugins=["ema", watch], options={"ema.validate_with": mode, "ema.decay": 0.8}, steps=8)
    final = out.summary["final"]
    prefixes = {k.split("/")[0] for k in final if not k.endswith("time_s")}
    assert prefixes == ({"val_ema"} if mode == "ema" else {"val"})
    assert len(watch.seen_in_validation) == 1
    uses_average = all(torch.equal(_ema_weights(out)[n], t)
                       for (n, _), t in zip(out.trainer.model.named_parameters(), watch.seen_in_validation[0]))
    assert uses_average is (mode == "ema")
    section = out.summary["ema"]
    assert (section["ema_metrics"] != {}) is (mode == "ema") and (section["raw_metrics"] != {}) is (mode == "raw")


def test_summary_shows_both(kktrain_run):
    out = kktrain_run(plugins=["ema"], options={"ema.decay": 0.8}, steps=8)
    section = out.summary["ema"]
    assert section["updates"] == 8
    assert section["ema loss"] == out.summary["final"]["val_ema/loss"]
    assert section["raw loss"] == out.summary["final"]["val/loss"]
    assert set(section["ema_metrics"]) == {"val_ema/loss", "val_ema/acc"}
    assert set(section["raw_metrics"]) == {"val/loss", "val/acc"}


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("metric", ["val_ema/loss", "val/loss"])
def test_best_checkpoint_by_ema_or_raw_metric(kktrain_run, metric):
    out = kktrain_run(plugins=["ema"], options={"ema.decay": 0.8, "checkpoint.best_metric": metric,
                                                "checkpoint.best_mode": "min"}, steps=12, val_every=3)
    vals = [r for r in out.metrics if r["kind"] == "val"]
    best = min(vals, key=lambda r: r[metric])
    assert out.summary["best"]["value"] == best[metric] and out.summary["best"]["step"] == best["step"]
    from kktrain import load_checkpoint

    payload = load_checkpoint(out.run_dir / "checkpoints" / "best.pt")
    assert payload["step"] == best["step"] and set(payload["plugins"]["ema"]["weights"]) == set(payload["model"])


def test_resume_is_exact(assert_resume_equivalent):
    assert_resume_equivalent(plugins=["ema"], options={"ema.every": 2, "ema.decay": 0.9}, steps=14, cut=7,
                             val_every=3, task_options={"dropout": 0.2})


def test_checkpoint_without_ema_state_starts_fresh(kktrain_run, tmp_path):
    out = tmp_path / "switch"
    kktrain_run(steps=12, stop_at_step=6, out=out)
    resumed = kktrain_run(plugins=["ema"], steps=12, resume="auto", out=out)
    resumed.assert_success()
    assert resumed.final_payload()["plugins"]["ema"]["updates"] == 6


# ------------------------------------------------------------------ the CLI


def test_cli_run_with_ema(tmp_path):
    exe = Path(sys.executable).parent / "kktrain"
    out = tmp_path / "cli"
    done = subprocess.run(
        [str(exe), "run", "--task", "tiny", "--out", str(out), "--max-steps", "12", "--plugin", "ema",
         "-o", "ema.decay=0.8", "-o", "checkpoint.best_metric=val_ema/acc"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert {"val/acc", "val_ema/acc"} <= set(summary["final"])
    assert summary["best"]["metric"] == "val_ema/acc" and summary["best"]["value"] is not None
    table = done.stdout + done.stderr  # the summary table (rich prints it on stderr)
    assert "ema: ema acc" in table and "ema: raw acc" in table and "val_ema/acc" in table

"""Preflight (seed 003 section 9): three checks before a long run, each with a verdict and a hint.

1. **initial loss** against chance: a classification model that knows nothing predicts uniformly,
   so its loss is ln(C). The task says what chance is: ``chance_loss(batch)`` (a number), or
   ``num_classes()`` (then chance is ln C). Passes when the loss of the untrained model on the first
   batch is within :data:`INIT_RANGE` times chance.
2. **gradient health** after the first backward: every trainable parameter must get a gradient
   that is present, finite and not all zero (:func:`gradient_health`, also nan-guard's first-step
   check: one implementation).
3. **overfit a tiny subset**: ``samples`` training samples, ``steps`` optimizer steps at the run's
   learning rate (no schedule); the loss on them (eval mode) must fall by ``factor``.

``kktrain preflight [run options]`` runs them in a temporary run directory (nothing is written to
``--out``) and exits 1 when a check fails.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kktrain.trainer import Trainer

INIT_RANGE = (0.5, 1.5)
"""The untrained model's loss must lie within these multiples of chance (ln C)."""
OVERFIT_SAMPLES, OVERFIT_STEPS, OVERFIT_FACTOR = 8, 100, 4.0
"""Defaults of the overfit check: 8 samples, 100 steps, the loss must fall to a quarter."""


@dataclass
class CheckResult:
    """One check: ``ok`` is True (pass), False (fail) or None (skipped), with what was seen and a hint."""

    name: str
    ok: bool | None
    detail: str
    hint: str | None = None


def gradient_health(named_parameters: Sequence[tuple[str, torch.nn.Parameter]]) -> dict[str, list[str]]:
    """After a backward: the names of parameters with no gradient, an all-zero one, a non-finite one.

    One host sync over all gradients (``torch._foreach_norm``); under FSDP the shards' squared norms
    are summed over the ranks first. Returns ``{"no_grad": [...], "zero_grad": [...], "nonfinite_grad": [...]}``.
    """
    missing = [n for n, p in named_parameters if p.grad is None]
    present = [(n, p.grad) for n, p in named_parameters if p.grad is not None]
    zero: list[str] = []
    nonfinite: list[str] = []
    if present:
        local = [g.to_local() if hasattr(g, "to_local") else g for _, g in present]
        squares = torch.stack(torch._foreach_norm(local)).double() ** 2
        if hasattr(present[0][1], "to_local"):  # FSDP shards: sum over the ranks
            torch.distributed.all_reduce(squares)
        norms = squares.sqrt().tolist()
        nonfinite = [n for (n, _), v in zip(present, norms, strict=True) if not math.isfinite(v)]
        zero = [n for (n, _), v in zip(present, norms, strict=True) if v == 0.0]
    return {"no_grad": missing, "zero_grad": zero, "nonfinite_grad": nonfinite}


def chance_loss(trainer: Trainer, batch: Any) -> float | None:
    """The loss of uniform predictions on ``batch``, as the task says (``chance_loss``/``num_classes``), or None."""
    task = trainer.task
    if task.has("chance_loss"):
        return float(task.wrapped.chance_loss(batch))
    if task.has("num_classes"):
        return math.log(int(task.wrapped.num_classes()))
    return None


def _names(items: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def check_initial_loss(trainer: Trainer, batch: Any) -> CheckResult:
    """The untrained model's loss on ``batch`` (eval mode) against chance."""
    model = trainer.model
    model.eval()
    with torch.no_grad():
        loss = float(trainer.task.loss(trainer.train_model, batch))
    model.train()
    chance = chance_loss(trainer, batch)
    if not math.isfinite(loss):
        return CheckResult("initial_loss", False, f"the untrained model's loss is {loss}",
                           "bad init or a log(0) in the loss: run with --plugin nan-guard to find the module")
    if chance is None:
        return CheckResult("initial_loss", None, f"loss {loss:.4f}; the task does not say what chance is",
                           "give the task num_classes() (or chance_loss(batch)) to compare the loss with ln(C)")
    ratio = loss / chance if chance > 0 else math.inf
    detail = f"loss {loss:.4f} vs chance {chance:.4f} (x{ratio:.2f}; expected x{INIT_RANGE[0]}-x{INIT_RANGE[1]})"
    if ratio > INIT_RANGE[1]:
        return CheckResult("initial_loss", False, detail,
                           "bad init: the untrained model is confidently wrong; initialise the output layer small (or zero) "
                           "and check the weights' scale (e.g. std 0.02, or torch's defaults)")
    if ratio < INIT_RANGE[0]:
        return CheckResult("initial_loss", False, detail,
                           "below chance before training: the targets may leak into the inputs, or the loss is not a mean "
                           "(check its reduction and what the model sees)")
    return CheckResult("initial_loss", True, detail)


def check_gradients(trainer: Trainer, batch: Any) -> CheckResult:
    """One forward and backward on ``batch``; every trainable parameter must get a useful gradient."""
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = trainer.task.loss(trainer.train_model, batch)
    frozen = [n for n, p in trainer.model.named_parameters() if not p.requires_grad]
    note = f"; {len(frozen)} frozen by requires_grad=False: {_names(frozen)}" if frozen else ""
    if not loss.requires_grad:
        return CheckResult("gradients", False, f"the loss does not depend on any trainable parameter{note}",
                           "detached graph: a .detach(), .item(), .numpy(), torch.no_grad() or argmax between the "
                           "parameters and the loss; return the loss tensor as computed")
    loss.backward()
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    health = gradient_health(named)
    trainer.optimizer.zero_grad(set_to_none=True)
    problems, hints = [], []
    if health["no_grad"]:
        problems.append(f"no gradient: {_names(health['no_grad'])}")
        hints.append("no gradient reaches these parameters: a .detach() or torch.no_grad() block after them in the "
                     "forward, or a layer the forward never uses (remove it, or freeze it with requires_grad_(False))")
    if health["zero_grad"]:
        problems.append(f"all-zero gradient: {_names(health['zero_grad'])}")
        hints.append("bad init: zero-initialised weights that multiply each other, a dead ReLU or a saturated activation")
    if health["nonfinite_grad"]:
        problems.append(f"non-finite gradient: {_names(health['nonfinite_grad'])}")
        hints.append("an overflow at step 0 (log(0), a division by zero, huge weights): run with --plugin nan-guard")
    if problems:
        return CheckResult("gradients", False, f"{len(named)} trainable tensors; " + "; ".join(problems) + note, "; ".join(hints))
    return CheckResult("gradients", True, f"all {len(named)} trainable tensors get a finite, non-zero gradient{note}")


def check_overfit(trainer: Trainer, *, samples: int, steps: int, factor: float) -> CheckResult:
    """Train ``steps`` steps on the first ``samples`` samples; the loss on them must fall by ``factor``."""
    from kktrain.batch import to_device
    from kktrain.taskcheck import _first_items

    cfg, task = trainer.config, trainer.task
    items = _first_items(trainer.data.dataset, samples, cfg.seed, trainer.state.knobs)
    batch = to_device(task.collate(items), trainer.device)
    model = trainer.model

    def subset_loss() -> float:
        model.eval()
        with torch.no_grad():
            value = float(task.loss(trainer.train_model, batch))
        model.train()
        return value

    for group in trainer.optimizer.param_groups:  # the run's learning rate, without warmup or decay
        group["lr"] = group.get("initial_lr", group["lr"])
    start = subset_loss()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = task.loss(trainer.train_model, batch)
        if not loss.requires_grad:
            return CheckResult("overfit", False, "the loss has no gradient (see the gradients check)", None)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainer.params, cfg.grad_clip)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    end = subset_loss()
    took = time.perf_counter() - t0
    detail = (f"{samples} samples, {steps} steps at lr {trainer.lr:g}: loss {start:.4f} -> {end:.4f} "
              f"(needs <= {start / factor:.4f}, a {factor:g}x fall; {took:.1f} s)")
    if not math.isfinite(end):
        return CheckResult("overfit", False, detail, "the loss diverged: lower optimizer.lr, or check the init")
    if end > start / factor:
        return CheckResult("overfit", False, detail,
                           f"the model cannot memorise {samples} samples: LR too low (optimizer.lr = {cfg.optimizer.lr:g}; "
                           "try 10x), a model too small, or targets that do not follow from the inputs")
    return CheckResult("overfit", True, detail)


def run_preflight(assembly: Any, *, samples: int = OVERFIT_SAMPLES, steps: int = OVERFIT_STEPS,
                  factor: float = OVERFIT_FACTOR) -> list[CheckResult]:
    """Build the run (in a temporary directory) and run the three checks in order."""
    from kktrain.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="kktrain-preflight-") as tmp:
        assembly.config.out = str(Path(tmp) / "run")
        trainer = Trainer.from_assembly(assembly, quiet=True)
        try:
            trainer.setup()
            micro = trainer.data.next_step(trainer.state, 1)
            assert micro is not None, "the training data has less than one batch"
            batch = micro[0]
            results = [check_initial_loss(trainer, batch), check_gradients(trainer, batch)]
            if results[1].ok is False and "does not depend" in results[1].detail:
                results.append(CheckResult("overfit", None, "skipped: the loss has no gradient (see gradients)"))
            else:
                results.append(check_overfit(trainer, samples=samples, steps=steps, factor=factor))
        finally:
            trainer.close()
    return results


def as_dicts(results: Sequence[CheckResult]) -> list[dict[str, Any]]:
    """The results as plain dicts (``--json``)."""
    return [{**asdict(r), "verdict": {True: "PASS", False: "FAIL", None: "SKIP"}[r.ok]} for r in results]

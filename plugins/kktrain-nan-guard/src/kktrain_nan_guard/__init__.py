"""nan-guard: a finite-loss and finite-gradient check every step; skip, stop or roll back.

    kktrain run --plugin nan-guard                                   # skip non-finite steps
    kktrain run --plugin nan-guard -o nan-guard.policy=stop          # abort with a report (exit 3)
    kktrain run --plugin nan-guard --plugin spike-rollback -o nan-guard.policy=rollback

Every step, one fused check ``isfinite(loss + grad_norm)`` (the total gradient norm the core
computes for clipping, or ``torch.nn.utils.get_total_norm`` over the gradients when clipping is
off) costs one host sync. On the first non-finite step a diagnosis pass re-runs forward and
backward on the same batch with hooks on every module and names the first module whose output
(or gradient) is not finite; the report is logged and written to
``checkpoints/nan_report_step_N.json``. See docs/plugins/nan-guard.md.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from kktrain import ConfigError, PluginOptions, TrainingAborted, gradient_health, hookimpl

if TYPE_CHECKING:
    from kktrain import Trainer

__all__ = ["NanGuardPlugin"]

NAME = "nan-guard"
_LIST_MAX = 20  # names listed per category in logs and reports


class NanGuardOptions(PluginOptions):
    """``-o nan-guard.KEY=VALUE`` / ``[plugins.nan-guard]``."""

    policy: Literal["skip", "stop", "rollback"] = "skip"
    """What to do with a non-finite step: drop it, abort the run, or hand over to spike-rollback."""
    diagnose: bool = True
    """On the first non-finite step, re-run it with module hooks and write a report naming the culprit."""
    check_first_step: bool = True
    """After the first backward, warn about parameters with no, zero or non-finite gradient."""
    max_consecutive: int = Field(10, ge=1)
    """policy=skip: abort after this many non-finite steps in a row (the model does not recover)."""


def _num(value: float) -> float | str:
    """A float for JSON: non-finite values as strings ("nan", "inf")."""
    return value if math.isfinite(value) else str(value)


def _float_tensors(value: Any) -> Iterator[torch.Tensor]:
    """The floating-point tensors in a module output or gradient tuple (nested containers too);
    of an FSDP ``DTensor``, this rank's shard."""
    if isinstance(value, torch.Tensor):
        if hasattr(value, "to_local"):
            value = value.to_local()
        if value.is_floating_point() or value.is_complex():
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _float_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _float_tensors(v)


def _has_nan(value: Any) -> bool:
    return any(bool(torch.isnan(t).any()) for t in _float_tensors(value))


def _has_inf(value: Any) -> bool:
    return any(bool(torch.isinf(t).any()) for t in _float_tensors(value))


def _has_nonfinite(value: Any) -> bool:
    return any(not bool(torch.isfinite(t).all()) for t in _float_tensors(value))


class NanGuardPlugin:
    """Checks that loss and gradients are finite every step; skips, stops or rolls back, and names the first bad module."""

    Options = NanGuardOptions
    name = NAME

    def __init__(self, options: NanGuardOptions | None = None) -> None:
        self.options = options or NanGuardOptions()
        self.nonfinite_steps = 0
        self.skipped = 0
        self.rollbacks = 0
        self.consecutive = 0
        self.health_checked = False
        self.first: dict[str, Any] = {}  # step, tensor, module and report file of the first non-finite step
        self.health: dict[str, list[str]] = {}
        self._params: list[torch.nn.Parameter] = []
        self._names: list[str] = []
        self._batches: list[Any] = []
        self._diagnosing = False

    # ------------------------------------------------------------------ set-up

    @hookimpl
    def on_model_built(self, trainer: Trainer, model: torch.nn.Module) -> None:
        """policy=rollback needs a plugin that handles ``on_anomaly``; say so before anything is on disk."""
        if self.options.policy != "rollback":
            return
        handlers = [i.plugin_name for i in trainer.hook.on_anomaly.get_hookimpls() if i.plugin is not self]
        if not handlers:
            raise ConfigError(
                "nan-guard: policy=rollback needs --plugin spike-rollback (a plugin that handles on_anomaly): "
                "add it, or use -o nan-guard.policy=skip"
            )

    @hookimpl
    def on_train_start(self, trainer: Trainer) -> None:
        """Remember the trainable parameters (once: the hot path must not walk the model)."""
        named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]

    # ------------------------------------------------------------------ hot path

    @hookimpl(wrapper=True)
    def forward_loss(self, trainer: Trainer, batch: Any) -> Any:
        """Keep a reference (no copy) to the step's batches until the first diagnosis needs them."""
        if self.options.diagnose and not self.first and not self._diagnosing:
            self._batches.append(batch)
        return (yield)

    @hookimpl(trylast=True)
    def on_after_backward(self, trainer: Trainer) -> None:
        """First step only: gradient health (after AMP's unscale, before clipping)."""
        if self.options.check_first_step and not self.health_checked and trainer.state.step == 0:
            self._check_health(trainer)

    @hookimpl(tryfirst=True)
    def on_before_optimizer_step(self, trainer: Trainer, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool | None:
        """One fused finiteness check of loss and gradient norm; act on the policy when it fails."""
        batches, self._batches = self._batches, []
        if grad_norm is None:
            grads = [p.grad for p in self._params if p.grad is not None]
            if grads and hasattr(grads[0], "full_tensor"):  # FSDP: the shards' norm, reduced over the ranks
                grad_norm = torch.nn.utils.get_total_norm(grads).full_tensor()  # type: ignore[attr-defined]
            else:  # one multi-tensor kernel (get_total_norm's generic path is slower on a small model)
                grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros((), device=loss.device)
        if bool(torch.isfinite(loss + grad_norm)):  # the one host sync per step
            self.consecutive = 0
            return None
        return self._on_nonfinite(trainer, float(loss), float(grad_norm), batches)

    # ------------------------------------------------------------------ a non-finite step

    def _on_nonfinite(self, trainer: Trainer, loss: float, grad_norm: float, batches: list[Any]) -> bool:
        step = trainer.state.step + 1  # the step being computed (1-based)
        self.nonfinite_steps += 1
        self.consecutive += 1
        what = "loss" if not math.isfinite(loss) else "gradients"
        if not self.first:
            report = self._report(trainer, step, loss, grad_norm, batches)
            self.first = {k: report[k] for k in ("step", "tensor", "module")}
            self.first["report"] = self._write_report(trainer, report)
        where = self._where()
        detail = {"step": step, "loss": loss, "grad_norm": grad_norm, "nonfinite": what,
                  "first_module": self.first.get("module"), "report": self.first.get("report")}
        policy = self.options.policy
        if policy == "stop":
            message = (
                f"nan-guard: non-finite {what} at step {step}{where}; stopped by policy=stop: lower optimizer.lr, "
                "set grad_clip, or use -o nan-guard.policy=skip"
            )
            trainer.log_event("nan_stop", at_step=step, loss=_num(loss), grad_norm=_num(grad_norm), nonfinite=what)
            trainer.request_stop(message)
            raise TrainingAborted(message)
        if policy == "rollback":
            mine = self.state_dict()  # our counters are history: keep them across the rollback
            handled = trainer.hook.on_anomaly(trainer=trainer, kind="nonfinite", detail=detail)
            self.load_state_dict(mine)
            if not handled:
                raise TrainingAborted(
                    f"nan-guard: non-finite {what} at step {step} and no plugin rolled back (on_anomaly unanswered): "
                    "enable --plugin spike-rollback or use -o nan-guard.policy=skip"
                )
            self.rollbacks += 1
            trainer.log_event("nan_rollback", at_step=step, loss=_num(loss), grad_norm=_num(grad_norm), nonfinite=what)
            return False
        if self.consecutive > self.options.max_consecutive:
            message = (
                f"nan-guard: {self.consecutive} non-finite steps in a row (the last at step {step}){where}: the run does "
                "not recover; lower optimizer.lr, or use -o nan-guard.policy=rollback with --plugin spike-rollback"
            )
            trainer.request_stop(message)
            raise TrainingAborted(message)
        self.skipped += 1
        trainer.log_event("nan_skipped", at_step=step, loss=_num(loss), grad_norm=_num(grad_norm), nonfinite=what)
        return False

    def _where(self) -> str:
        first = self.first
        if not first.get("module"):
            return ""
        return f" (first non-finite at step {first['step']}: {first['tensor']} of '{first['module']}', report {first['report']})"

    # ------------------------------------------------------------------ diagnosis

    def _report(self, trainer: Trainer, step: int, loss: float, grad_norm: float, batches: list[Any]) -> dict[str, Any]:
        report: dict[str, Any] = {
            "step": step, "loss": _num(loss), "grad_norm": _num(grad_norm), "policy": self.options.policy,
            "tensor": None, "module": None, "module_type": None, "reproduced": None,
            "first_inf_output": None, "nonfinite_param_grads": [], "note": "",
        }
        if not self.options.diagnose or not batches:
            report["note"] = "diagnosis off (nan-guard.diagnose=false)" if not self.options.diagnose else "no batch captured"
            trainer.log.warning("nan_guard_nonfinite", at_step=step, loss=loss, grad_norm=grad_norm)
            return report
        try:
            found = self._rerun(trainer, batches, backward_hooks=True)
        except RuntimeError as e:  # full backward hooks refuse in-place ops on a hooked output
            found = self._rerun(trainer, batches, backward_hooks=False)
            found["note"] = f"backward hooks unavailable ({str(e).splitlines()[0][:120]}); forward checked only. "
        report.update(found)
        modules = dict(trainer.model.named_modules())
        if report["module"] is None and not math.isfinite(loss):
            # Every module output was finite, so the loss computation after the model (or a
            # forward_loss wrapper, like the fault injector) made it non-finite.
            report.update(tensor="output", module="loss", module_type="loss")
            report["note"] += "all module outputs were finite; the loss itself is not"
            report["note"] += "" if report["reproduced"] else " (not reproduced on re-run: transient, or injected after the model)"
        elif report["module"] is None:
            report["note"] += "non-finite gradients did not reproduce on re-run"
        elif report["module"] in modules or report["module"] == "model":
            target = modules.get(report["module"], trainer.model)
            report["module_type"] = type(target).__name__
        log = {k: report[k] for k in ("tensor", "module", "module_type", "first_inf_output", "reproduced")}
        trainer.log.warning("nan_guard_nonfinite", at_step=step, loss=loss, grad_norm=grad_norm, **log,
                            nonfinite_param_grads=report["nonfinite_param_grads"][:_LIST_MAX])
        return report

    def _rerun(self, trainer: Trainer, batches: list[Any], *, backward_hooks: bool) -> dict[str, Any]:
        """Forward (and backward) on ``batches`` with hooks on every module; the first offenders."""
        model = trainer.model
        names = {m: (n or "model") for n, m in model.named_modules()}
        nan_out: list[str] = []
        inf_out: list[str] = []
        bad_grad: list[str] = []

        def on_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not nan_out and _has_nan(output):
                nan_out.append(names[module])
            elif not inf_out and _has_inf(output):
                inf_out.append(names[module])

        def on_backward(module: torch.nn.Module, grad_input: Any, grad_output: Any) -> None:
            if not bad_grad and _has_nonfinite(grad_input):
                bad_grad.append(names[module])

        handles = []
        saved_grads = [p.grad for p in self._params]
        devices = [trainer.device.index or 0] if trainer.device.type == "cuda" else []
        self._diagnosing = True
        try:
            for module in names:
                handles.append(module.register_forward_hook(on_forward))
                if backward_hooks:
                    handles.append(module.register_full_backward_hook(on_backward))
            for p in self._params:
                p.grad = None
            # The diagnosis must not move the training RNG (dropout): a resume stays exact. The
            # first module's full backward hook warns that its input needs no grad: expected here.
            with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses = [trainer.hook.forward_loss(trainer=trainer, batch=b) for b in batches]
                total = torch.stack([x.float() for x in losses]).sum() / len(losses)
                loss_finite = not _has_nonfinite(total)
                if not nan_out and loss_finite and total.requires_grad:
                    total.backward()
            grads_bad = [n for n, p in zip(self._names, self._params, strict=True)
                         if p.grad is not None and _has_nonfinite(p.grad)]
        finally:
            for h in handles:
                h.remove()
            for p, g in zip(self._params, saved_grads, strict=True):
                p.grad = g
            self._diagnosing = False
        found: dict[str, Any] = {"first_inf_output": inf_out[0] if inf_out else None, "nonfinite_param_grads": grads_bad}
        if nan_out:
            found.update(tensor="output", module=nan_out[0], reproduced=True)
        elif not loss_finite:
            found.update(reproduced=True)  # the loss is the first non-finite value (named by the caller)
        elif bad_grad:
            found.update(tensor="grad", module=bad_grad[0], reproduced=True)
        elif grads_bad:
            owner = grads_bad[0].rpartition(".")[0] or "model"
            found.update(tensor="grad", module=owner, reproduced=True)
        else:
            found.update(reproduced=False)
        return found

    def _write_report(self, trainer: Trainer, report: dict[str, Any]) -> str:
        """``checkpoints/nan_report_step_N.json`` (rank 0); returns the file name."""
        name = f"nan_report_step_{report['step']}.json"
        if trainer.is_main:
            directory = Path(trainer.checkpoint_dir)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        return name

    # ------------------------------------------------------------------ first-step gradient health

    def _check_health(self, trainer: Trainer) -> None:
        """Parameters with no gradient, a zero gradient or a non-finite one (seed 003 §9); runs once."""
        self.health_checked = True
        # The one implementation, shared with `kktrain preflight` (kktrain.gradient_health).
        health = gradient_health(list(zip(self._names, self._params, strict=True)))
        missing, zero, nonfinite = health["no_grad"], health["zero_grad"], health["nonfinite_grad"]
        self.health = {"no_grad": missing, "zero_grad": zero, "nonfinite_grad": nonfinite}
        if missing or zero or nonfinite:
            trainer.log.warning(
                "nan_guard_grad_health", no_grad=missing[:_LIST_MAX], zero_grad=zero[:_LIST_MAX],
                nonfinite_grad=nonfinite[:_LIST_MAX], counts=[len(missing), len(zero), len(nonfinite)],
                note="after the first backward: parameters listed get no useful gradient",
            )
        else:
            trainer.log.info("nan_guard_grad_health", ok=True, parameters=len(self._params))

    # ------------------------------------------------------------------ state and summary

    def state_dict(self) -> dict[str, Any]:
        """Counters and the first non-finite step (plain values)."""
        return {
            "nonfinite_steps": self.nonfinite_steps, "skipped": self.skipped, "rollbacks": self.rollbacks,
            "consecutive": self.consecutive, "health_checked": self.health_checked, "first": dict(self.first),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.skipped = int(state["skipped"])
        self.rollbacks = int(state["rollbacks"])
        self.consecutive = int(state["consecutive"])
        self.health_checked = bool(state["health_checked"])
        self.first = dict(state["first"])

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """``summary["nan-guard"]``: policy, counts, the first non-finite step and its report."""
        section: dict[str, Any] = {
            "policy": self.options.policy, "nonfinite_steps": self.nonfinite_steps, "skipped": self.skipped,
            "rollbacks": self.rollbacks,
        }
        if self.first:
            section.update(first_step=self.first["step"], first_tensor=self.first["tensor"], first_module=self.first["module"],
                           report=str(Path(trainer.checkpoint_dir) / self.first["report"]))
        if self.health:
            section["grad_health"] = {k: v[:_LIST_MAX] for k, v in self.health.items()}
        summary[NAME] = section

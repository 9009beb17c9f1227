"""The training loop. Read it top to bottom; ``kktrain.phases`` has the same story in pseudocode.

Hooks that no enabled plugin implements are skipped via ``trainer.active`` (decided once at
set-up), and the replaceable ones fall back to a direct call of the core default: with no plugins,
a step is forward, backward, clip, optimizer step, scheduler step, zero_grad — nothing else, and no
host-device sync except every ``log_every`` steps to log the loss.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from kktrain import defaults
from kktrain.batch import batch_size_of, split_batch
from kktrain.errors import TrainingAborted
from kktrain.progress import Progress

if TYPE_CHECKING:
    from kktrain.trainer import Trainer


def run(tr: Trainer) -> dict[str, Any]:
    """Train until ``total_steps``, a stop request or an interrupt; return the summary."""
    cfg, st = tr.config, tr.state
    if tr.nothing_to_do:
        return _nothing_to_do(tr)
    started_at = _now_iso()
    tr.write_config()
    undo_signals = tr.install_signal_handlers()
    try:  # until the loop's own try: a plugin failing in on_train_start must not leave the handlers behind
        tr.hook.on_train_start(trainer=tr)
        tr.log.info("train_start", total_steps=tr.total_steps, steps_per_epoch=tr.steps_per_epoch, device=str(tr.device),
                    plugins=list(tr.plugins), run_dir=str(tr.run_dir), val_grad_mode=tr.validation_grad_mode,
                    autograd_in_validation=tr.autograd_in_validation or None)
        stop_at = min(tr.total_steps, cfg.stop_at_step or tr.total_steps)
        progress = Progress(tr, total=tr.total_steps, start=st.step)
        progress.print_start(resumed_from=tr.resumed_from)
        tr.progress = progress
        train_loss: tuple[float, int] | None = None  # the latest logged mean train loss, and its step
        t_log, step_log = time.perf_counter(), st.step
        t_start = time.perf_counter()
        epoch_started, t_epoch = False, time.perf_counter()
        status = "completed"
        background = tr.checkpoints.writer if cfg.checkpoint.async_ else None
        validation_due = validation_plan(tr)
    except BaseException:
        undo_signals()
        raise
    try:
        with progress:
            while st.step < stop_at and not tr.stop_requested:
                if not epoch_started:
                    tr.hook.on_epoch_start(trainer=tr, epoch=st.epoch)
                    epoch_started, t_epoch = True, time.perf_counter()

                micro_batches = tr.data.next_step(st, cfg.grad_accum)
                if micro_batches is None:  # the epoch is over
                    _end_epoch(tr, time.perf_counter() - t_epoch)
                    epoch_started = False
                    continue

                loss = train_step(tr, micro_batches)
                if background is not None and background.in_flight:
                    background.poll()  # a finished write fires on_checkpoint; a failed one raises here
                if loss is None:
                    continue

                # Log points depend on the step only (not on --stop-at-step): a paused run writes
                # the records a crash there would have left, and its resume the rest.
                if st.step % cfg.log_every == 0 or st.step == tr.total_steps:
                    now = time.perf_counter()
                    means = tr.meter.interval()  # the one sync per log interval
                    mean_loss = means.get("train/loss", 0.0)
                    if not math.isfinite(mean_loss) and tr.nonfinite_loss_step is None:
                        tr.nonfinite_loss_step = st.step
                        tr.log.warning("loss_not_finite", step=st.step, loss=mean_loss,
                                       note="training diverged; lower optimizer.lr, or enable --plugin nan-guard")
                    rate = (st.step - step_log) / max(now - t_log, 1e-9)
                    tr.log_metrics({"epoch": st.epoch, **means, "train/lr": tr.lr, "train/steps_per_s": rate,
                                    "train/samples_per_s": rate * cfg.batch_size * cfg.grad_accum * tr.world_size})
                    progress.update_loss(means.get("train/loss", float("nan")), rate)
                    if "train/loss" in means:
                        train_loss = (means["train/loss"], st.step)
                    t_log, step_log = now, st.step
                progress.advance(st.step, tr.meter.losses)

                if validation_due(st.step):
                    tr.run_validation()
                if cfg.checkpoint.every_steps and st.step % cfg.checkpoint.every_steps == 0:
                    if not (cfg.checkpoint.at_epoch_end and tr.data.epoch_exhausted(st, cfg.grad_accum)):  # the epoch's end writes one
                        tr.save_checkpoint("step")

        running = tr.meter.running_loss()  # steps since the last log point (an interrupt, a stop)
        if running is not None:
            train_loss = (running, st.step)
        if tr.interrupted:
            status = "interrupted"
            tr.stop_reason = tr.stop_reason or f"interrupted by {tr.interrupt_signal or 'a signal'} at step {st.step}"
            path = tr.save_checkpoint("interrupt")
            tr.console.print(
                f"[yellow]interrupted at step {st.step}[/]; checkpoint {path}. Resume with: "
                f"kktrain run --resume auto --out {tr.run_dir}", highlight=False,
            )
        elif tr.stop_reason is not None:
            status = "stopped"
            _finish(tr)
        elif st.step < tr.total_steps:
            status = "paused"
            tr.stop_reason = f"stop_at_step {cfg.stop_at_step}"
            tr.save_checkpoint("step")
            tr.log.info("stopped_at_step", step=st.step, note=f"resume with --resume auto --out {tr.run_dir}")
            if progress.enabled:
                tr.console.print(f"paused at step {st.step}; resume with: kktrain run --resume {tr.run_dir}",
                                 highlight=False, markup=False)
        else:
            if tr.data.epoch_exhausted(st, cfg.grad_accum):  # the last step closed an epoch
                _end_epoch(tr, time.perf_counter() - t_epoch)
            _finish(tr)
    except TrainingAborted as abort:
        # A guard stopped the run on purpose: leave a summary saying why, then exit non-zero.
        summary = _summary(tr, "aborted", time.perf_counter() - t_start, started_at, train_loss)
        summary["stop_reason"] = str(abort)
        tr.hook.on_train_end(trainer=tr, summary=summary)
        tr.write_summary(summary)
        _log_end(tr, summary)
        tr.close(sync=False)
        raise
    except (Exception, KeyboardInterrupt) as error:  # a crash: kktrain.crash leaves the run resumable
        from kktrain.crash import leave_resumable

        leave_resumable(tr, error, _summary(tr, "crashed", time.perf_counter() - t_start, started_at, train_loss))
        tr.close(sync=False)
        raise
    finally:
        undo_signals()
        tr.progress = None

    elapsed = time.perf_counter() - t_start
    summary = _summary(tr, status, elapsed, started_at, train_loss)
    tr.hook.on_train_end(trainer=tr, summary=summary)
    tr.write_summary(summary)
    _log_end(tr, summary)
    progress.print_summary(summary)
    tr.close()
    return summary


def _now_iso() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _log_end(tr: Trainer, summary: dict[str, Any]) -> None:
    """The last record of the session in ``log.jsonl``."""
    tr.log.info("run_end", status=summary["status"], stop_reason=summary.get("stop_reason"), steps=summary["steps"],
                total_steps=summary["total_steps"], time_s=summary["time_s"], train_loss=summary.get("train_loss"))


def _nothing_to_do(tr: Trainer) -> dict[str, Any]:
    """A resume of a completed run: say so, touch nothing, return the run's summary."""
    import json

    st = tr.state
    if tr.is_main:
        tr.console.print(
            f"run {tr.run_dir} already completed {st.step} of {tr.total_steps} steps: nothing to do, nothing changed "
            "(train longer with a larger --max-steps, or start a new run with another --out)",
            highlight=False, markup=False,
        )
    path = tr.run_dir / "summary.json" if tr.run_dir is not None else None
    try:
        summary: dict[str, Any] = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        summary = {}
    summary.setdefault("status", "completed")
    summary["nothing_to_do"] = True
    tr.close(sync=True)
    return summary


def validation_plan(tr: Trainer) -> Callable[[int], bool]:
    """When the loop validates: ``val_schedule`` (intervals by share of the run, counted from the
    last validation), else every ``val_every`` steps, else never (epoch ends and the end aside)."""
    cfg, st = tr.config, tr.state
    if cfg.val_schedule:
        plan = [(round(end * tr.total_steps), interval) for end, interval in cfg.val_schedule]

        def due(step: int) -> bool:
            interval = next((i for end, i in plan if step <= end), plan[-1][1])
            return step - (st.last_val_step or 0) >= interval

        return due
    every = cfg.val_every
    if every:
        return lambda step: step % every == 0
    return lambda step: False


def train_step(tr: Trainer, micro_batches: list[Any]) -> torch.Tensor | None:
    """One optimizer step over ``micro_batches``; returns the detached loss, or None if vetoed."""
    active, st = tr.active, tr.state
    pieces, attempt, sticky = st.micro_split, 0, False
    while True:
        try:
            loss = _forward_backward(tr, micro_batches, pieces)
            if sticky:
                st.micro_split = pieces
            break
        except Exception as error:  # noqa: BLE001 - handed to plugins, re-raised if none retries
            if not active["on_step_exception"]:
                raise
            retry = tr.hook.on_step_exception(trainer=tr, error=error, attempt=attempt)
            if retry is None:
                raise
            tr.optimizer.zero_grad(set_to_none=True)
            pieces, attempt, sticky = max(1, retry.micro_batches), attempt + 1, retry.sticky
            tr.log_event("step_retry", attempt=attempt, micro_batches=pieces, reason=retry.reason or type(error).__name__)

    if active["on_after_backward"]:
        tr.hook.on_after_backward(trainer=tr)
    grad_norm = None
    if tr.config.grad_clip is not None:
        grad_norm = tr.distributed.clip_grad_norm(tr.params, tr.config.grad_clip, tr.clip_foreach)
    if active["on_before_optimizer_step"]:
        verdicts = tr.hook.on_before_optimizer_step(trainer=tr, loss=loss, grad_norm=grad_norm)
        if any(v is False for v in verdicts):
            tr.optimizer.zero_grad(set_to_none=True)
            st.skipped_steps += 1
            return None
    if active["optimizer_step"]:
        tr.hook.optimizer_step(trainer=tr)
    else:
        tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    st.step += 1
    tr.meter.add(loss, grad_norm)
    if active["on_step"]:
        tr.hook.on_step(trainer=tr, loss=loss)
    return loss


def _forward_backward(tr: Trainer, micro_batches: list[Any], pieces: int) -> torch.Tensor:
    """Forward+loss and backward for each micro-batch (split in ``pieces`` after an OOM)."""
    active = tr.active
    forward = tr.hook.forward_loss if active["forward_loss"] else None
    backward = tr.hook.backward if active["backward"] else None
    accum = len(micro_batches)
    if accum == 1 and pieces == 1:  # the common case, kept short: it runs every step
        batch = micro_batches[0]
        loss = forward(trainer=tr, batch=batch) if forward else tr.task.loss(tr.train_model, batch)
        if backward:
            backward(trainer=tr, loss=loss)
        else:
            loss.backward()
        return loss.detach()
    total: torch.Tensor | None = None
    parts: list[tuple[Any, float]] = []
    for batch in micro_batches:
        if pieces == 1:
            parts.append((batch, 1.0 / accum))
        else:
            n = batch_size_of(batch)
            parts += [(p, batch_size_of(p) / n / accum) for p in split_batch(batch, pieces) if batch_size_of(p) > 0]
    dist = tr.distributed if tr.distributed.controls_sync else None
    for i, (batch, weight) in enumerate(parts):
        # Gradients are synced across processes on the last micro-batch only (DDP no_sync, FSDP
        # without reduce-scatter or resharding in between).
        with contextlib.nullcontext() if dist is None else dist.micro_batch(i == len(parts) - 1):
            loss = forward(trainer=tr, batch=batch) if forward else defaults.default_forward_loss(tr, batch)
            scaled = loss if weight == 1.0 else loss * weight
            if backward:
                backward(trainer=tr, loss=scaled)
            else:
                scaled.backward()
        detached = scaled.detach()
        total = detached if total is None else total + detached
    assert total is not None
    return total


def _end_epoch(tr: Trainer, epoch_time: float) -> None:
    """Validate, fire ``on_epoch``, move to the next epoch and checkpoint there."""
    st = tr.state
    if tr.config.val_at_epoch_end and st.last_val_step != st.step:
        tr.run_validation()
    metrics: dict[str, float] = {**tr.meter.epoch(), "train/epoch_time_s": epoch_time}
    metrics.update(st.last_val)
    tr.hook.on_epoch(trainer=tr, epoch=st.epoch, metrics=metrics)
    tr.log_metrics({"epoch": st.epoch, **metrics}, kind="epoch")
    st.epoch += 1
    st.batch_in_epoch = 0
    st.sample_offset = 0
    tr.data.restart()
    if tr.config.checkpoint.at_epoch_end:
        tr.save_checkpoint("epoch")


def _finish(tr: Trainer) -> None:
    if tr.state.last_val_step != tr.state.step:
        tr.run_validation()
    tr.save_checkpoint("final")


def _summary(tr: Trainer, status: str, elapsed: float, started_at: str | None = None,
             train_loss: tuple[float, int] | None = None) -> dict[str, Any]:
    st, cfg = tr.state, tr.config
    checkpoints: dict[str, str] = {}
    if tr.run_dir is not None:
        from kktrain.checkpoint import list_checkpoints

        ck = tr.run_dir / "checkpoints"
        rolling = [p for p in list_checkpoints(ck) if p.name not in ("best.pt", "final.pt")] if ck.is_dir() else []
        for name, path in (("final", ck / "final.pt"), ("best", ck / "best.pt"), ("latest", rolling[0] if rolling else None)):
            if path is not None and path.exists():
                checkpoints[name] = str(path.resolve())
    return {
        "status": status,
        "stop_reason": tr.stop_reason,
        "steps": st.step,
        "total_steps": tr.total_steps,
        "epoch": st.epoch,
        "skipped_steps": st.skipped_steps,
        "time_s": elapsed,
        "started_at": started_at,
        "ended_at": _now_iso(),
        "versions": tr.versions(),
        "train_loss": train_loss[0] if train_loss else None,
        "train_loss_step": train_loss[1] if train_loss else None,
        "val_step": st.last_val_step if st.last_val else None,
        "checkpoints": checkpoints,
        "final": dict(st.last_val),
        "best": {"metric": cfg.checkpoint.best_metric, "value": st.best_value, "step": st.best_step,
                 "mode": cfg.checkpoint.resolved_best_mode},
        "events": [e for e in st.events if e.get("event") != "checkpoint"],
        "plugins": list(tr.plugins),
        "run_dir": str(tr.run_dir),
        "parent": st.parent,
        "device": str(tr.device),
        "loss_not_finite_at": tr.nonfinite_loss_step,
    }

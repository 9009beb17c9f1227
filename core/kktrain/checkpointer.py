"""The run's checkpoints: what goes into one, writing, loading, snapshots and the best checkpoint.

:mod:`kktrain.checkpoint` knows files (atomic writes, manifests, verification); this module knows
the run: which objects make up the state, in which order they are restored, and when a
validation result makes a new ``best.pt``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel

import kktrain
from kktrain import checkpoint as ckpt
from kktrain import dcp
from kktrain.errors import CheckpointError
from kktrain.state import TrainState, rng_state, set_rng_state

if TYPE_CHECKING:
    from kktrain.async_checkpoint import CheckpointWriter
    from kktrain.trainer import Trainer


def qualname(obj: object) -> str:
    """``module.Class`` of an object's type (how a checkpoint names its optimizer)."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


_IMMUTABLE = (int, float, str, bool, bytes, type(None))


def _clone(obj: Any) -> Any:
    """A deep copy of plain containers and tensors (tensors cloned, detached)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj) if not hasattr(obj, "_fields") else type(obj)(*(_clone(v) for v in obj))
    if isinstance(obj, _IMMUTABLE):
        return obj
    return copy.deepcopy(obj)


def write_failure(path: Path, error: BaseException) -> str:
    """One line for a checkpoint write that failed (a full disk, a file-size limit, a read-only directory)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    reason = getattr(error, "strerror", None) or (lines[0][:160] if lines else type(error).__name__)
    if "unexpected pos" in reason or "inline_container" in reason or "file write failed" in reason:
        reason = "the file could not be written completely: the disk is full or a file-size limit was reached"
    return (f"writing checkpoint {path} failed ({reason}): free disk space or choose another --out; "
            "earlier checkpoints are intact")


class Checkpointer:
    """Builds and restores the run's payload, writes checkpoints, tracks the best one."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self._warned_best = False
        self.writer: CheckpointWriter | None = None
        """Writes sharded (torchrun) and background (``checkpoint.async``) checkpoints; set at set-up."""

    @property
    def sharded(self) -> bool:
        """Whether checkpoints are sharded DCP directories (under torchrun) rather than single files."""
        return self.trainer.world_size > 1

    @property
    def directory(self) -> Path:
        """``RUN_DIR/checkpoints``."""
        assert self.trainer.run_dir is not None
        return self.trainer.run_dir / "checkpoints"

    # -------------------------------------------------------------- the payload

    def payload(self, *, kind: str) -> dict[str, Any]:
        """Everything needed to continue exactly: the checkpoint's content."""
        tr = self.trainer
        tr.meter.fold()  # the interval's and epoch's loss sums go into the state
        plugin_states = {name: obj.state_dict() for name, obj in tr.plugins.items() if hasattr(obj, "state_dict")}
        return {
            "format": ckpt.FORMAT,
            "version": ckpt.FORMAT_VERSION,
            "kind": kind,
            "step": tr.state.step,
            "model": tr.model.state_dict(),
            "optimizer": tr.optimizer.state_dict(),
            "scheduler": tr.scheduler.state_dict(),
            "state": tr.state.state_dict(),
            "rng": rng_state(),
            "config": json.loads(json.dumps(tr.config.model_dump(mode="json"))),
            "task": {"name": tr.task.name,
                     "options": tr.task_options.model_dump(mode="json") if tr.task_options is not None else {}},
            "plugin_options": {n: o.model_dump(mode="json") for n, o in tr.plugin_options.items() if isinstance(o, BaseModel)},
            "plugins": plugin_states,
            "meta": {"kktrain": str(kktrain.__version__), "torch": str(torch.__version__), "time": time.time(),
                     "optimizer": qualname(tr.optimizer), "trust": tr.trust_signature},
        }

    def load(self, payload: Mapping[str, Any], *, source: str, keep_plugins: Sequence[str] = ()) -> None:
        """Restore a payload from :meth:`payload` (a checkpoint or a snapshot)."""
        tr = self.trainer
        if payload.get("sharded"):  # a sharded checkpoint's tensors are still on disk: kktrain.dcp
            payload = dcp.load_sharded(tr, payload)
        ckpt.check_model_fit(tr.model, payload["model"], source)
        tr.model.load_state_dict(payload["model"])
        saved_opt = payload.get("meta", {}).get("optimizer")
        if saved_opt and saved_opt != qualname(tr.optimizer):
            raise CheckpointError(
                f"checkpoint {source} was trained with optimizer {saved_opt}, this run builds "
                f"{qualname(tr.optimizer)}: enable the same optimizer plugins (e.g. --plugin optim8bit)"
            )
        try:
            tr.optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {source}: optimizer state does not fit ({e}): resume with the same optimizer plugins") from None
        try:
            tr.scheduler.load_state_dict(payload["scheduler"])
        except (KeyError, ValueError, TypeError, IndexError) as e:
            # A run resumed with another length may get a schedule of another shape (a warmup of
            # 5 % of 32 steps where 5 % of 16 had none): the trainer rebuilds it for the new length
            # (Trainer.extend_schedule); with the same length the state must fit.
            saved_total = int((payload.get("state") or {}).get("total_steps") or 0)
            if not saved_total or saved_total == tr.total_steps:
                raise CheckpointError(f"checkpoint {source}: LR scheduler state does not fit ({e}): resume with the same schedule") from None
        # In place: the loop holds a reference to the state object, and a rollback restores mid-run.
        fresh = TrainState()
        fresh.load_state_dict(copy.deepcopy(payload["state"]))
        vars(tr.state).update(vars(fresh))
        tr.meter.drop_pending()  # steps after the payload's were undone
        dropped = tr.data.rebase(tr.state)  # saved under another world size: same sample, re-sharded
        if dropped:
            tr.log.warning("skip_batches_dropped", positions=dropped[:8],
                           note="batches a rollback excluded in this epoch cannot be re-counted on another world size")
        tr.task.set_knobs(tr.state.knobs)
        set_rng_state(payload["rng"])
        saved = payload.get("plugins", {})
        for name, obj in tr.plugins.items():
            if name in keep_plugins or not hasattr(obj, "load_state_dict"):
                continue
            if name in saved:
                obj.load_state_dict(saved[name])
            else:
                tr.log.info("plugin_state_missing", plugin=name,
                            note="plugin was not enabled when the checkpoint was written; it starts fresh")
        tr.data.restart()

    # -------------------------------------------------------------- snapshots (rollback)

    def snapshot(self) -> dict[str, Any]:
        """An in-memory copy of what :meth:`restore` puts back; tensors are cloned.

        Lighter than a checkpoint's payload: no config, task or run history (a restore keeps the
        current history), and tensors are cloned directly instead of through ``copy.deepcopy``
        (whose per-object bookkeeping cost a Latin step 2.6 % with a snapshot every step).
        """
        tr = self.trainer
        tr.meter.fold()
        state = tr.state.state_dict()
        for key in TrainState.HISTORY:
            state[key] = copy.copy(getattr(TrainState(), key))
        plugin_states = {name: obj.state_dict() for name, obj in tr.plugins.items() if hasattr(obj, "state_dict")}
        return _clone({
            "format": ckpt.FORMAT, "version": ckpt.FORMAT_VERSION, "kind": "snapshot", "step": tr.state.step,
            "model": tr.model.state_dict(), "optimizer": tr.optimizer.state_dict(), "scheduler": tr.scheduler.state_dict(),
            "state": state, "rng": rng_state(), "plugins": plugin_states, "meta": {"optimizer": qualname(tr.optimizer)},
        })

    def restore(self, snapshot: Mapping[str, Any], *, keep_plugins: Sequence[str] = (), skip_last_step: bool = False) -> None:
        """Go back to a :meth:`snapshot`; optionally never train on the last step's batches again."""
        st = self.trainer.state
        history = {k: getattr(st, k) for k in TrainState.HISTORY}
        skipped = [list(p) for p in st.skip_batches]
        if skip_last_step:
            skipped += [list(p) for p in self.trainer.data.last_positions]
        self.load(snapshot, source="snapshot", keep_plugins=keep_plugins)
        for key, value in history.items():
            setattr(st, key, value)
        for pos in skipped:
            if pos not in st.skip_batches:
                st.skip_batches.append(pos)
        self.trainer.data.restart()

    # -------------------------------------------------------------- files

    def save(self, kind: str = "step") -> Path | None:
        """Write a verified checkpoint of ``kind`` (rank 0), prune old ones, fire ``on_checkpoint``."""
        tr = self.trainer
        name = {"best": "best.pt", "final": "final.pt"}.get(kind, ckpt.step_name(tr.state.step))
        if kind == "interrupt":
            tr.data.close()  # the workers are done; one dying now must not break the checkpoint
        if kind in ("interrupt", "step", "crash") and not self.sharded and tr.is_main:
            if kind in ("interrupt", "crash") and self.writer is not None:
                self.writer.wait()  # the epoch's checkpoint of this very step may be in flight
            existing = self.directory / name
            if ckpt.read_step(existing) == tr.state.step and ckpt.verify(existing)[0]:
                # This step is already on disk (an epoch's end, then SIGTERM): rewriting it could only risk it.
                tr.log.info("checkpoint_exists", path=str(existing), kind=kind, step=tr.state.step)
                return existing
        if self.writer is not None:  # sharded or background: kktrain.async_checkpoint
            return self.writer.save(kind)
        if not tr.is_main:
            return None
        payload = self.payload(kind=kind)
        try:
            ref = ckpt.write_checkpoint(self.directory, name, payload, step=tr.state.step, kind=kind, extra=self._manifest_extra(kind))
        except (OSError, RuntimeError) as e:  # a full disk in torch.save is a RuntimeError (inline_container.cc)
            raise CheckpointError(write_failure(self.directory / name, e)) from None
        if kind not in ("best", "final"):
            ckpt.prune(self.directory, tr.config.checkpoint.keep_last, tr.config.checkpoint.keep_every)
        tr.log.info("checkpoint", path=str(ref.path), kind=kind, step=tr.state.step)
        tr.hook.on_checkpoint(trainer=tr, path=str(ref.path), kind=kind)
        return ref.path

    def _manifest_extra(self, kind: str) -> dict[str, Any] | None:
        """What a best checkpoint's manifest adds: the metric, its value and the mode."""
        tr = self.trainer
        if kind != "best":
            return None
        ck = tr.config.checkpoint
        return {"metric": ck.best_metric, "value": tr.state.best_value, "mode": ck.resolved_best_mode}

    def locate_resume(self, spec: str | None) -> tuple[dict[str, Any] | None, Path | None]:
        """The payload to resume from (``auto``: the newest verified checkpoint), or ``(None, None)``."""
        tr = self.trainer
        if spec is None:
            return None, None
        if spec == "auto":
            found = ckpt.newest_loadable(self.directory, lambda m: tr.log.warning("checkpoint_skipped", detail=m))
            if found is None:
                tr.log.info("resume_auto_fresh", note=f"no checkpoint in {self.directory}; starting a new run")
                return None, None
            path, payload = found
        else:
            path = Path(spec)
            # A sharded checkpoint: only its state.pt now; the tensors load once the model is sharded.
            payload = dcp.read_state(path) if dcp.is_sharded(path) else ckpt.load_checkpoint(path)
        saved_task = payload.get("task", {}).get("name")
        if saved_task and saved_task != tr.task.name:
            raise CheckpointError(f"checkpoint {path} is for task '{saved_task}', not '{tr.task.name}': resume with --task {saved_task}")
        return payload, path

    # -------------------------------------------------------------- best

    def consider_best(self, metrics: Mapping[str, float]) -> None:
        """Save ``best.pt`` when ``checkpoint.best_metric`` improved."""
        tr = self.trainer
        key = tr.config.checkpoint.best_metric
        if not key:
            return
        if key not in metrics:
            if not self._warned_best:
                tr.log.warning("best_metric_missing", metric=key, available=sorted(metrics)[:12])
                self._warned_best = True
            return
        value = metrics[key]
        best = tr.state.best_value
        better = best is None or (value > best if tr.config.checkpoint.resolved_best_mode == "max" else value < best)
        if better:
            tr.state.best_value, tr.state.best_step = value, tr.state.step
            self.save("best")

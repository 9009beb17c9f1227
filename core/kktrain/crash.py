"""What a run leaves behind when it dies of an unhandled exception: a resumable directory.

The loop hands every exception it does not handle itself to :func:`leave_resumable`, which

- puts the data position back where the failing step began (a step that did not finish never
  happened: the model, optimizer and scheduler are still those of the last finished step),
- writes a checkpoint of that state (``kind = "crash"``, the rolling name of its step; skipped when
  that step is already on disk, and not tried at all when the failure *was* a checkpoint write),
- writes ``summary.json`` with ``status = "crashed"`` (``"failed"`` for a user-fixable error such
  as a full disk, ``"interrupted"`` for a second Ctrl-C) and the error, and the traceback to
  ``log.jsonl``,
- and sets ``trainer.crash``, from which the CLI prints one line with the resume command.

The exception itself propagates unchanged, so Python callers of :func:`kktrain.fit` see it as it was.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kktrain.errors import KKTrainError

if TYPE_CHECKING:
    from kktrain.trainer import Trainer


@dataclass
class CrashReport:
    """What :func:`leave_resumable` did, for the one line the CLI prints."""

    status: str
    step: int
    error: str
    checkpoint: Path | None
    checkpoint_note: str
    run_dir: Path | None

    def message(self) -> str:
        """One line: what failed, what is on disk, how to resume."""
        where = f"; traceback in {self.run_dir / 'log.jsonl'}" if self.run_dir is not None and self.status == "crashed" else ""
        saved = f"checkpoint {self.checkpoint}" if self.checkpoint is not None else self.checkpoint_note
        resume = f"kktrain run --resume auto --out {self.run_dir}" if self.run_dir is not None else "kktrain run --resume auto"
        return f"training {self.status} at step {self.step} ({self.error}); {saved}{where}; fix the cause, then resume with: {resume}"


def describe(error: BaseException) -> str:
    """``Type: first line`` of an exception, at most 200 characters."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text[:200]


def rewind_unfinished_step(tr: Trainer) -> bool:
    """Put the data position back to where a step that did not finish began; True if it did."""
    start = getattr(tr.data, "step_start", None) if hasattr(tr, "data") else None
    st = tr.state
    if start is None or start[0] != st.step:
        return False
    _, st.epoch, st.batch_in_epoch, st.sample_offset = start
    tr.optimizer.zero_grad(set_to_none=True)
    return True


def leave_resumable(tr: Trainer, error: BaseException, summary: dict[str, Any]) -> CrashReport:
    """Checkpoint the last consistent state, write the summary and log; see the module docstring."""
    user_error = isinstance(error, KKTrainError)
    interrupted = isinstance(error, KeyboardInterrupt)
    status = "interrupted" if interrupted else "failed" if user_error else "crashed"
    detail = str(error).splitlines()[0][:300] if user_error and str(error) else describe(error)
    path: Path | None = None
    note = "no new checkpoint"
    from kktrain.errors import CheckpointError

    if isinstance(error, CheckpointError):
        note = "no new checkpoint (writing one failed); earlier checkpoints are intact"
    elif interrupted:
        note = "no new checkpoint (stopped at once)"
    else:
        try:
            if tr.checkpoints.writer is not None:
                tr.checkpoints.writer.wait()  # a background write in flight first
            rewind_unfinished_step(tr)
            tr.data.close()  # the workers are not needed for the checkpoint, and must not disturb it
            path = tr.checkpoints.save("crash")
        except BaseException as e:  # noqa: BLE001 - the original error is what gets reported
            note = f"no crash checkpoint ({describe(e)}); the newest earlier one is intact"
            path = None
    summary = {**summary, "status": status, "error": detail, "checkpoint": str(path) if path else None}
    _log_traceback(tr, error, status)
    try:
        tr.hook.on_train_end(trainer=tr, summary=summary)
    except Exception as e:  # noqa: BLE001
        _log_traceback(tr, e, "on_train_end_failed")
    try:
        tr.write_summary(summary)
    except OSError as e:
        note += f"; summary.json not written ({e.strerror or e})"
    report = CrashReport(status, tr.state.step, detail, path, note, tr.run_dir)
    tr.crash = report
    return report


def _log_traceback(tr: Trainer, error: BaseException, event: str) -> None:
    """The traceback goes to log.jsonl only: the console gets the one line."""
    from kktrain.log import write_json_line

    log_file = getattr(tr, "_log_file", None)
    if log_file is None:
        return
    record = {"event": event, "level": "error", "step": tr.state.step, "error": describe(error),
              "traceback": "".join(traceback.format_exception(error))}
    try:
        write_json_line(log_file, record)
    except (OSError, ValueError):
        pass

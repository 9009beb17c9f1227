"""Writing checkpoints that are sharded (under torchrun) or asynchronous (``checkpoint.async``).

With ``checkpoint.async = true`` the step only copies the training state into CPU buffers (kept
from one checkpoint to the next, so no allocation after the first); a background thread writes,
fsyncs, renames and verifies it (one file, or the sharded commit of :mod:`kktrain.dcp` on a gloo
group of its own). At most one write is in flight: the next checkpoint first waits for it. A
write that failed is reported at the next step (:meth:`CheckpointWriter.poll`) as a
:class:`~kktrain.errors.CheckpointError`; it never leaves a trusted file behind, because nothing
is renamed into place or gets a manifest before it is complete. The end of the run, SIGTERM's
``interrupt`` checkpoint and a crash (``Trainer.close``; the thread is not a daemon, so the
interpreter waits for it too) wait for the write in flight. ``on_checkpoint`` fires on the main
thread once the write is verified.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kktrain import checkpoint as ckpt
from kktrain import dcp
from kktrain.errors import CheckpointError

if TYPE_CHECKING:
    from kktrain.trainer import Trainer


def _failure(path: Path, error: BaseException) -> str:
    if isinstance(error, CheckpointError):
        return str(error)
    from kktrain.checkpointer import write_failure

    return write_failure(path, error)


class Stager:
    """Copies a state (nested containers of tensors) into CPU buffers it keeps between calls."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def __call__(self, obj: Any, path: tuple[Any, ...] = ()) -> Any:
        """``obj`` with every tensor replaced by a CPU copy (``DTensor``: a copy of its local shard)."""
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path)
        if isinstance(obj, Mapping):
            return {k: self(v, (*path, k)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self(v, (*path, i)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(self(v, (*path, i)) for i, v in enumerate(obj))
        return copy.deepcopy(obj)

    def _tensor(self, t: torch.Tensor, path: tuple[Any, ...]) -> torch.Tensor:
        src = t.detach()
        local = src.to_local() if hasattr(src, "to_local") else src
        buf = self.buffers.get(path)
        if buf is None or buf.shape != local.shape or buf.dtype != local.dtype:
            pin = local.device.type == "cuda"
            buf = torch.empty(local.shape, dtype=local.dtype, pin_memory=pin)
            self.buffers[path] = buf
        buf.copy_(local, non_blocking=buf.is_pinned())
        if hasattr(src, "to_local"):
            from torch.distributed.tensor import DTensor

            assert isinstance(src, DTensor)
            return DTensor.from_local(buf, src.device_mesh, src.placements, run_check=False, shape=src.shape,
                                      stride=src.stride())
        return buf


class _Job:
    """One background write: runs ``write`` in a non-daemon thread, keeps its error."""

    def __init__(self, kind: str, step: int, path: Path, write: Callable[[], None]) -> None:
        self.kind, self.step, self.path = kind, step, path
        self.error: str | None = None
        self.started = time.perf_counter()
        self.seconds = 0.0
        self._write = write
        self.thread = threading.Thread(target=self._run, name=f"kktrain-checkpoint-{step}", daemon=False)

    def _run(self) -> None:
        try:
            self._write()
        except BaseException as e:  # noqa: BLE001 - reported on the main thread
            self.error = _failure(self.path, e)
        self.seconds = time.perf_counter() - self.started


class CheckpointWriter:
    """Writes the run's checkpoints when they are sharded (torchrun) or written in the background."""

    def __init__(self, trainer: Trainer, *, sharded: bool, background: bool) -> None:
        self.trainer = trainer
        self.sharded = sharded
        self.background = background
        self.stalls: list[float] = []
        """Seconds each checkpoint held the training loop (waiting for the previous write included)."""
        self.write_seconds: list[float] = []
        """Seconds each write took (in the background when ``background``)."""
        self._job: _Job | None = None
        self._stage = Stager()
        self._group: Any = trainer.distributed.checkpoint_group() if sharded and background else None

    @property
    def in_flight(self) -> bool:
        """Whether a background write has not been reaped yet (running, or done and not yet reported)."""
        return self._job is not None

    @property
    def busy(self) -> bool:
        """Whether a background write is running right now."""
        return self._job is not None and self._job.thread.is_alive()

    def save(self, kind: str) -> Path | None:
        """Write a checkpoint of ``kind``; with ``background``, hand it to the writer thread."""
        tr = self.trainer
        t0 = time.perf_counter()
        self.wait()
        directory = tr.checkpoints.directory
        step = tr.state.step
        if self.sharded:
            parts = dcp.prepare(tr, kind)
            path = directory / parts.name
            rank, world = tr.rank, tr.world_size
            if self.background:
                parts.dcp_state = self._stage(parts.dcp_state, ("dcp",))
                parts.rank_state = self._stage(parts.rank_state, ("rank",))
                parts.main_state = self._stage(parts.main_state, ("main",))
            group = self._group

            def write() -> None:
                dcp.commit(parts, directory, rank=rank, world_size=world, group=group)
                if self.background and rank == 0:
                    ok, reason = dcp.verify(path)
                    if not ok:
                        raise CheckpointError(f"checkpoint {path} failed verification after writing: {reason}")
        else:
            if not tr.is_main:
                return None
            payload = tr.checkpoints.payload(kind=kind)
            name = {"best": "best.pt", "final": "final.pt"}.get(kind, ckpt.step_name(step))
            path = directory / name
            if self.background:
                payload = self._stage(payload, ("payload",))
            extra = tr.checkpoints._manifest_extra(kind)

            def write() -> None:
                ref = ckpt.write_checkpoint(directory, name, payload, step=step, kind=kind, extra=extra)
                ok, reason = ckpt.verify(ref.path)
                if not ok:
                    raise CheckpointError(f"checkpoint {ref.path} failed verification after writing: {reason}")

        job = _Job(kind, step, path, write)
        if not self.background:
            job._run()
            self.stalls.append(time.perf_counter() - t0)
            self._reap(job)
            return path
        if torch.cuda.is_available() and tr.device.type == "cuda":
            torch.cuda.current_stream(tr.device).synchronize()  # the pinned copies are complete
        self._job = job
        job.thread.start()
        self.stalls.append(time.perf_counter() - t0)
        if kind in ("final", "interrupt"):  # the last checkpoint of the run: nothing to overlap with
            self.wait()
        return path

    def poll(self) -> None:
        """Reap a finished background write (log it, fire ``on_checkpoint``); raise if it failed."""
        job = self._job
        if job is not None and not job.thread.is_alive():
            self._job = None
            self._reap(job)

    def wait(self) -> None:
        """Wait for the write in flight and reap it."""
        job = self._job
        if job is not None:
            job.thread.join()
            self._job = None
            self._reap(job)

    def _reap(self, job: _Job) -> None:
        tr = self.trainer
        self.write_seconds.append(job.seconds)
        if job.error is not None:
            tr.log.error("checkpoint_failed", path=str(job.path), kind=job.kind, step=job.step, detail=job.error)
            raise CheckpointError(job.error)
        if not tr.is_main:
            return
        if job.kind not in ("best", "final"):
            ckpt.prune(tr.checkpoints.directory, tr.config.checkpoint.keep_last, tr.config.checkpoint.keep_every)
        tr.log.info("checkpoint", path=str(job.path), kind=job.kind, step=job.step,
                    **({"background_s": round(job.seconds, 4)} if self.background else {}))
        tr.hook.on_checkpoint(trainer=tr, path=str(job.path), kind=job.kind)

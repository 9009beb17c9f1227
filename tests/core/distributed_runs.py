"""Runs for the torchrun tests (tests/core/test_distributed.py), and the plugins they use.

``torchrun --standalone --nproc-per-node=N distributed_runs.py SPEC.json`` trains the runs listed
in the spec one after the other, in the same processes (each Trainer joins and leaves its own
process group), and rank 0 writes what it saw to the spec's ``results`` file. Imported by the
tests, the same plugins run in the test process (one process, no torchrun).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from kktrain import ConfigError, hookimpl
from kktrain.testing import FaultInjector, run_tiny

COMMON: dict[str, Any] = {
    "batch_size": 16, "grad_accum": 2, "grad_clip": 0.5, "log_every": 1, "checkpoint.every_steps": 3,
}
TASK = {"samples": 256, "dropout": 0.1}
STEPS = 12


def full_state(trainer: Any) -> dict[str, Any]:
    """Model and optimizer as full CPU tensors keyed by parameter name (every rank calls it)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if dist.is_initialized():
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
        model, optimizer = get_state_dict(trainer.model, trainer.optimizer, options=options)
    else:
        model, optimizer = get_state_dict(trainer.model, trainer.optimizer)
    return {"model": model, "optimizer": optimizer}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


class Dump:
    """Saves the full model, optimizer and EMA weights at the start (after a resume) and the end of
    a run, and whether every rank holds the same full parameters (rank 0 writes)."""

    name = "dump"

    def __init__(self, start: str | None = None, end: str | None = None) -> None:
        self.start, self.end = start, end

    @hookimpl
    def on_train_start(self, trainer: Any) -> None:
        """After a resume: the state as loaded."""
        if self.start:
            self._dump(trainer, self.start)

    @hookimpl
    def on_train_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        """The trained state."""
        if self.end:
            self._dump(trainer, self.end)

    def _dump(self, trainer: Any, path: str) -> None:
        import torch.distributed as dist

        state = full_state(trainer)
        flat = torch.cat([_full(p).flatten().double() for p in trainer.model.parameters()])
        same = True
        if dist.is_initialized():
            every = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(every, flat)
            same = all(torch.equal(every[0], other) for other in every[1:])
        ema = trainer.plugins.get("ema")
        weights = {k: _full(v).cpu() for k, v in ema.state_dict()["weights"].items()} if ema is not None else {}
        if trainer.is_main:
            torch.save({**state, "ema": weights, "same_on_ranks": same, "state": trainer.state.state_dict(),
                        "param_types": sorted({type(p).__name__ for p in trainer.model.parameters()})}, path)


class Killer:
    """SIGKILLs rank ``rank`` while it builds the checkpoint of step ``at_step``, on torchrun's first attempt only."""

    name = "killer"

    def __init__(self, at_step: int, rank: int) -> None:
        self.at_step, self.rank = at_step, rank
        self._trainer: Any = None

    @hookimpl
    def on_train_start(self, trainer: Any) -> None:
        """Remember the trainer (its step and rank decide the kill)."""
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        """Nothing to keep; the kill happens here, in the middle of a checkpoint."""
        tr = self._trainer
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if tr is not None and first_attempt and tr.state.step == self.at_step and tr.rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing was kept."""


def make_plugins(spec: dict[str, Any]) -> list[Any]:
    """The run's plugins: names, plus the test plugins the spec asks for."""
    plugins: list[Any] = list(spec.get("plugins", []))
    if spec.get("dump_start") or spec.get("dump_end"):
        plugins.append(Dump(spec.get("dump_start"), spec.get("dump_end")))
    if "kill" in spec:
        plugins.append(Killer(**spec["kill"]))
    if "nan_at" in spec:
        plugins.append(FaultInjector(nan_at=spec["nan_at"]))
    return plugins


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """One run of the spec; returns its summary (or the error it was expected to raise)."""
    options = {**COMMON, **spec.get("options", {})}
    try:
        out = run_tiny(Path(spec["out"]).parent, plugins=make_plugins(spec), options=options, steps=spec.get("steps", STEPS),
                       task_options={**TASK, **spec.get("task_options", {})}, resume=spec.get("resume"),
                       stop_at_step=spec.get("stop_at_step"), out=Path(spec["out"]))
    except ConfigError as e:
        return {"error": str(e)}
    return {"summary": out.summary}


def main() -> None:
    """Train every run of the spec file given as the first argument."""
    torch.set_num_threads(1)
    spec = json.loads(Path(sys.argv[1]).read_text())
    results = [run(r) for r in spec["runs"]]
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["results"]).write_text(json.dumps(results, default=str))
    # As kktrain's CLI does under torchrun: no interpreter teardown after the runs are closed
    # (gloo's threads can abort it with SIGABRT after everything finished).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

"""Step time and per-process memory of ``distributed.strategy`` ddp vs fsdp, 2 processes, gloo, CPU.

Launches itself under ``torchrun --standalone --nproc-per-node=N``. In the same processes (one
process group) kktrain trainers with ddp, fsdp and fsdp with ``reshard_after_forward = false``
take turns, ``--steps`` optimizer steps each per round, for ``--rounds`` rounds; a step is timed
from a barrier to the end of ``kktrain.loop.train_step`` (forward, backward, clip, optimizer,
scheduler) on every rank, and the slowest rank counts. Printed: the median step per strategy and
model, the ratio to ddp, and what each process holds of parameters + gradients + optimizer state.

    python bench/distributed_step.py [--nproc 2] [--steps 10] [--rounds 4] [--models tiny,latin]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

STRATEGIES = (("ddp", {"distributed.strategy": "ddp"}), ("fsdp", {"distributed.strategy": "fsdp"}),
              ("fsdp, no reshard", {"distributed.strategy": "fsdp", "distributed.reshard_after_forward": False}))


def _trainer(model: str, options: dict[str, Any], out: Path) -> Any:
    from kktrain.config import assemble
    from kktrain.trainer import Trainer

    core: dict[str, Any] = {"checkpoint.at_epoch_end": False, "schedule.name": "constant", "log_every": 1000}
    task_options: dict[str, Any] = {}
    if model == "tiny":  # an MLP of 4 x 512 wide layers: 0.8 M parameters, like the Latin model
        task_options = {"task.samples": 8192, "task.dim": 64, "task.hidden": 512, "task.layers": 4, "task.classes": 16}
        core["batch_size"] = 64
    assembly = assemble(task=model, options={**core, **options, **task_options}, flags={"max_steps": 100_000, "out": str(out)},
                        environ={})
    tr = Trainer.from_assembly(assembly, quiet=True).setup()
    tr.hook.on_train_start(trainer=tr)
    return tr


def _held_bytes(tr: Any) -> int:
    """Bytes of parameters, gradients (as big as the parameters) and optimizer state on this process."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).numel() * local(p).element_size() for p in tr.params)
    state = sum(local(v).numel() * local(v).element_size() for s in tr.optimizer.state.values()
                for v in s.values() if isinstance(v, torch.Tensor))
    return 2 * params + state


def _timed_steps(tr: Any, n: int) -> list[float]:
    import torch.distributed as dist

    from kktrain.loop import train_step

    times = []
    for _ in range(n):
        batches = tr.data.next_step(tr.state, tr.config.grad_accum)
        if batches is None:
            tr.state.epoch, tr.state.batch_in_epoch, tr.state.sample_offset = tr.state.epoch + 1, 0, 0
            tr.data.restart()
            batches = tr.data.next_step(tr.state, tr.config.grad_accum)
        dist.barrier()
        t = time.perf_counter()
        train_step(tr, batches)
        elapsed = torch.tensor([time.perf_counter() - t])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    return times


def worker(args: argparse.Namespace) -> None:
    """Runs under torchrun: every strategy in turn, rank 0 prints the table rows as JSON."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            trainers = {name: _trainer(model, opts, Path(tmp) / f"{model}-{i}") for i, (name, opts) in enumerate(STRATEGIES)}
            times: dict[str, list[float]] = {name: [] for name in trainers}
            for tr in trainers.values():
                _timed_steps(tr, 3)  # warm-up
            for _ in range(args.rounds):
                for name, tr in trainers.items():
                    times[name] += _timed_steps(tr, args.steps)
            base = statistics.median(times["ddp"])
            for name, tr in trainers.items():
                med = statistics.median(times[name])
                rows.append({"model": model, "strategy": name, "params_m": sum(p.numel() for p in tr.model.parameters()) / 1e6,
                             "step_ms": med * 1e3, "vs_ddp": med / base, "held_mib": _held_bytes(tr) / 2**20})
            for tr in reversed(list(trainers.values())):
                tr.close(sync=True)
    if rank == 0:
        print("ROWS " + json.dumps(rows), flush=True)


def main() -> None:
    """Launch the workers and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--models", default="tiny,latin")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", f"--nproc-per-node={args.nproc}", __file__, "--worker", "--steps", str(args.steps),
           "--rounds", str(args.rounds), "--models", args.models]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    print(f"{args.nproc} processes, gloo, 1 thread each; median step over {args.rounds} x {args.steps} steps (slowest rank)")
    print(f"| model | strategy | step (ms) | vs ddp | params+grads+optimizer per process (MiB) |")
    print("|---|---|---|---|---|")
    for r in json.loads(line[5:]):
        print(f"| {r['model']} ({r['params_m']:.2f} M) | {r['strategy']} | {r['step_ms']:.1f} | {r['vs_ddp']:.2f} | {r['held_mib']:.1f} |")


if __name__ == "__main__":
    main()

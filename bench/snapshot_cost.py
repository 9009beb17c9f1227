"""What spike-rollback's in-memory snapshots cost, as a share of training time, in one process.

The model is the default Latin-square transformer (4 layers, d_model 128, batch 128; the tiny
MLP task when the Latin task is not installed). Two measurements:

1. ``trainer.snapshot()`` timed on its own (a deep copy of model, optimizer, scheduler, RNG and
   plugin state): its cost per step is ``snapshot_ms / snapshot_every``.
2. End to end: kktrain with no plugin against kktrain with ``--plugin spike-rollback`` at
   ``snapshot_every`` in (1, 10, 100), runs alternating, best steps/s of each compared. This
   includes the plugin's one ``loss.item()`` per step (free on the CPU, a sync on a GPU).

Times are process CPU time by default (``--clock cpu``, ``time.process_time``): on a machine
shared with other jobs, wall time measures their load more than this process; with one thread
CPU time is the work done. ``--clock wall`` for a dedicated machine or a GPU.

    python bench/snapshot_cost.py [--steps 60] [--repeats 2] [--threads 1] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kktrain import RunConfig, Trainer
from clock import Clock  # bench/clock.py

EVERY = (1, 10, 100)
CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
now = time.process_time


def _make_task() -> Any:
    try:
        from kktrain.tasks.latin import make_task
    except ImportError:
        from kktrain.tasks.tiny import TinyOptions, TinyTask

        return TinyTask(TinyOptions(samples=64 * 200, dim=32, hidden=128, classes=10, layers=4))
    return make_task()


def _config(task: Any, steps: int, out: Path) -> RunConfig:
    batch = task.config_defaults().get("batch_size", 128)
    return RunConfig(
        task=task.name, max_steps=steps, batch_size=batch, log_every=10, out=str(out), val_every=0,
        checkpoint={"at_epoch_end": False, "every_steps": 0}, data={"workers": 0}, schedule={"name": "constant"},
    )


def _rate(plugins: list[Any], cfg: RunConfig, options: dict[str, dict[str, Any]]) -> float:
    clock = Clock(now)
    tr = Trainer(cfg, [*plugins, clock], plugin_options=options, task=_make_task(), quiet=True)
    tr.fit()
    return clock.steps_per_s()


def snapshot_ms(cfg: RunConfig, count: int = 10) -> tuple[float, int]:
    """Median milliseconds of one ``trainer.snapshot()`` after a few steps (optimizer state exists)."""
    cfg = cfg.model_copy(update={"max_steps": 3, "log_every": 1})
    tr = Trainer(cfg, [], task=_make_task(), quiet=True)
    tr.fit()
    times = []
    for _ in range(count):
        t = now()
        snap = tr.snapshot()
        times.append((now() - t) * 1e3)
    size = sum(v.numel() * v.element_size() for v in snap["model"].values())
    size += sum(v.numel() * v.element_size() for s in snap["optimizer"]["state"].values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return statistics.median(times), size


def main(argv: list[str] | None = None) -> int:
    """Time snapshots alone, then end to end for each ``snapshot_every``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=sorted(CLOCK), default="cpu")
    args = ap.parse_args(argv)
    global now
    now = CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    task = _make_task()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock, task {task.name}, "
          f"{sum(p.numel() for p in task.build_model().parameters()):,} parameters")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ms, size = snapshot_ms(_config(task, args.steps, root / "snap"))
        runs: dict[str, list[float]] = {"none": [], **{f"every {k}": [] for k in EVERY}}
        n = 0
        for r in range(args.repeats):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for label in order:
                n += 1
                cfg = _config(task, args.steps, root / f"run{n}")
                if label == "none":
                    runs[label].append(_rate([], cfg, {}))
                else:
                    every = int(label.split()[1])
                    runs[label].append(_rate(["spike-rollback"], cfg, {"spike-rollback": {"snapshot_every": every}}))
    base = max(runs["none"])
    step_ms = 1e3 / base
    print(f"snapshot: {ms:.2f} ms for {size / 2**20:.1f} MiB (model + optimizer state); "
          f"a step without plugins: {step_ms:.1f} ms ({base:.2f} steps/s)")
    print(f"{'snapshot_every':>14}  {'computed share':>14}  {'measured steps/s':>16}  {'measured share':>14}")
    for k in EVERY:
        best = max(runs[f"every {k}"])
        computed = ms / (k * step_ms + ms)
        measured = 1 - best / base
        print(f"{k:>14}  {computed:>13.2%}  {best:>16.2f}  {measured:>13.2%}")
    print("(share = fraction of training time spent on snapshots; measured includes run-to-run noise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

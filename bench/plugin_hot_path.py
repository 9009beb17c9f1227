"""Hot-path cost of curriculum and memory-monitor: kktrain with the plugin against without, one process.

The tiny MLP at batch 64 is overhead-bound, so a plugin's per-step cost shows here if anywhere.
Runs alternate (without, with, with, without, ...); the best steps/s of each is compared. Also
times the pieces on their own: one memory sample (psutil RSS, with and without child processes)
and one curriculum knob change (the data loader restarts at the current position).

    python bench/plugin_hot_path.py [--repeats 4] [--steps 1500] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kktrain import RunConfig, Trainer
from kktrain.loop import run
from clock import Clock  # bench/clock.py


def rate(plugins: list[Any], options: dict[str, dict[str, Any]], steps: int, out: Path, workers: int = 0) -> float:
    from kktrain.tasks.tiny import TinyOptions, TinyTask

    task = TinyTask(TinyOptions(samples=64 * 200, dim=32, hidden=64, classes=10, layers=2))
    cfg = RunConfig(task="tiny", max_steps=steps, batch_size=64, log_every=50, out=str(out), val_every=0,
                    checkpoint={"at_epoch_end": False, "every_steps": 0}, data={"workers": workers})
    clock = Clock()
    tr = Trainer(cfg, [*plugins, clock], plugin_options=options, task=task, quiet=True)
    tr.setup()
    run(tr)
    return clock.steps_per_s()


def compare(label: str, plugins: list[str], options: dict[str, dict[str, Any]], steps: int, repeats: int, workers: int = 0) -> None:
    base, plug = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            pair = [([], {}, base), (plugins, options, plug)]
            for names, opts, out in pair if i % 2 == 0 else pair[::-1]:
                out.append(rate(names, opts, steps, Path(tmp) / f"{label}{i}{len(out)}{len(names)}", workers))
    b, p = max(base), max(plug)
    print(f"{label:<44} without {b:8.1f} steps/s  with {p:8.1f} steps/s  ratio {p / b:.3f}  "
          f"cost {(1 / p - 1 / b) * 1e6:+8.1f} us/step")


def sample_cost(repeats: int = 2000) -> None:
    from kktrain_memory_monitor import MemoryMonitorOptions, MemoryMonitorPlugin

    for children in (False, True):
        mon = MemoryMonitorPlugin(MemoryMonitorOptions(include_children=children))
        mon.sample()
        t0 = time.perf_counter()
        for _ in range(repeats):
            mon.sample()
        print(f"memory sample (include_children={children}): {(time.perf_counter() - t0) / repeats * 1e6:.1f} us")


def knob_change_cost(repeats: int = 40) -> None:
    """Latency of the first batch after ``set_knobs`` (the loader restarts) against a plain next batch."""
    import statistics

    from kktrain.tasks.tiny import TinyOptions, TinyTask

    for workers in (0, 2):
        with tempfile.TemporaryDirectory() as tmp:
            task = TinyTask(TinyOptions(samples=64 * 200, dim=32, hidden=64, classes=10, layers=2))
            cfg = RunConfig(task="tiny", max_steps=1000, batch_size=64, out=str(Path(tmp) / "r"), data={"workers": workers})
            tr = Trainer(cfg, [], task=task, quiet=True)
            tr.setup()
            for _ in range(5):
                tr.next_batch()
            plain, restart = [], []
            for i in range(repeats):
                t0 = time.perf_counter()
                tr.next_batch()
                plain.append(time.perf_counter() - t0)
                tr.set_knobs({"noise": 0.01 * (i % 2 + 1)})
                t0 = time.perf_counter()
                tr.next_batch()
                restart.append(time.perf_counter() - t0)
            tr.close()
        print(f"knob change, {workers} workers: next batch {statistics.median(plain) * 1e3:.2f} ms, "
              f"first batch after the change {statistics.median(restart) * 1e3:.2f} ms (medians of {repeats})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    sample_cost()
    knob_change_cost()
    one_stage = {"curriculum": {"stages": [{"knobs": {"noise": 0.0}}]}}
    every_100 = {"curriculum": {"stages": [{"steps": 100, "knobs": {"noise": 0.01 * (i % 2)}} for i in range(args.steps // 100)] + [{}]}}
    compare("curriculum, one stage (on_step only)", ["curriculum"], one_stage, args.steps, args.repeats)
    compare("curriculum, a knob change every 100 steps", ["curriculum"], every_100, args.steps, args.repeats)
    compare("curriculum, change every 100 steps, 2 workers", ["curriculum"], every_100, args.steps, args.repeats, workers=2)
    compare("memory-monitor, sample_every=10", ["memory-monitor"], {"memory-monitor": {"sample_every": 10}}, args.steps, args.repeats)
    compare("memory-monitor, sample_every=1", ["memory-monitor"], {"memory-monitor": {"sample_every": 1}}, args.steps, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())

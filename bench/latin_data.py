"""How fast the Latin task makes puzzles, against the time of one training step.

    python bench/latin_data.py [--batch 256] [--repeats 15] [--threads N] [--against OLD_LATIN.py]

Prints, per size, the one-off cost of the base pool and puzzles per second of
``LatinDataset.__getitems__`` (one process, numpy, CPU time: on a shared machine that leaves out
the time other jobs hold the core, though not what they do to its caches); then the default
knobs' batch of 128 and 512 against a forward + backward + AdamW step of the default model on the
same batch (wall time, best of a few: the step's share is an upper bound).

``--against FILE`` loads another version of ``kktrain/tasks/latin.py`` (e.g. from
``git show main:core/kktrain/tasks/latin.py > /tmp/latin_main.py``) and times both on the same
keys, alternating, and prints the speed-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import statistics
import time
from types import ModuleType
from typing import Any

import torch

from kktrain.task import SampleKey
from kktrain.tasks import latin

MODES = ["STANDARD", "ZERO_INCLUSIVE", "NEGATIVE"]


def load_module(path: str) -> ModuleType:
    """Import a latin.py from a file, under another name."""
    spec = importlib.util.spec_from_file_location("latin_against", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the module's annotations through it
    spec.loader.exec_module(module)
    return module


def batch_times(modules: list[ModuleType], knobs: dict[str, Any], batch: int, repeats: int) -> list[list[float]]:
    """CPU seconds to build one batch of ``batch`` puzzles, per module, alternating, fresh keys each round."""
    datasets = [m.LatinDataset(10, knobs) for m in modules]
    times: list[list[float]] = [[] for _ in modules]
    for r in range(repeats + 1):
        keys = [SampleKey(i, (r + 1) << 32 | i, knobs) for i in range(batch)]
        for dataset, out in zip(datasets, times):
            start = time.process_time()
            dataset.__getitems__(keys)
            out.append(time.process_time() - start)
    return [t[1:] for t in times]  # the first round builds the pools


def step_seconds(task: latin.LatinTask, batch: dict[str, torch.Tensor], repeats: int) -> float:
    """Best wall seconds of forward + backward + clip + AdamW step of the default model."""
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        task.loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return min(times[2:])


def main() -> None:
    """Print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the step (default: torch's)")
    parser.add_argument("--against", default=None, help="another latin.py to compare with")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modules = [latin] + ([load_module(args.against)] if args.against else [])

    print(f"batch {args.batch}, fill 0.5, all modes; one process; CPU ms per batch (median, best of {args.repeats})")
    head = f"{'n':>4} {'pool (once)':>12} {'ms/batch':>9} {'best':>6} {'puzzles/s':>10}"
    print(head + (f" {'against':>9} {'speed-up':>9}" if args.against else ""))
    for n in (5, 9, 16):
        start = time.process_time()
        latin.base_pool(n)
        pool = time.process_time() - start
        knobs = {"sizes": [n], "modes": MODES, "fill_min": 0.5, "fill_max": 0.5}
        times = batch_times(modules, knobs, args.batch, args.repeats)
        ours = statistics.median(times[0])
        line = f"{n:>4} {pool * 1e3:>10.0f}ms {ours * 1e3:>9.2f} {min(times[0]) * 1e3:>6.2f} {args.batch / ours:>10.0f}"
        if args.against:
            theirs = statistics.median(times[1])
            line += f" {theirs * 1e3:>7.2f}ms {theirs / ours:>8.2f}x"
        print(line)

    task = latin.make_task()
    knobs = task.default_knobs()
    print(f"\ndefault knobs (sizes {knobs['sizes']}, fill {knobs['fill_min']}-{knobs['fill_max']}, all modes)")
    threads = torch.get_num_threads()
    for size in (task.config_defaults()["batch_size"], 512):
        times = batch_times(modules, knobs, size, args.repeats)
        data = statistics.median(times[0])
        batch = latin.LatinDataset(10, knobs).__getitems__([SampleKey(i, i, knobs) for i in range(size)])
        step = step_seconds(task, batch, 3)
        line = (
            f"batch {size:>4}: data {data * 1e3:6.2f} ms ({size / data:6.0f} puzzles/s); train step {step * 1e3:5.0f} ms "
            f"({threads} torch threads): data = {data / step:5.1%} of a step"
        )
        if args.against:
            line += f"; against {statistics.median(times[1]) * 1e3:.2f} ms ({statistics.median(times[1]) / data:.2f}x)"
        print(line)


if __name__ == "__main__":
    main()

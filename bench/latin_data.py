"""How fast the Latin task makes puzzles, against the time of one training step.

    python bench/latin_data.py [--batch 256] [--repeats 10] [--threads N]

Prints, per size, the one-off cost of the base pool and puzzles per second of
``LatinDataset.__getitems__`` (one process, numpy; CPU time), then the default knobs' batch
against a forward + backward + AdamW step of the default model on the same batch size (wall time:
on a shared machine, run it when the machine is quiet).
"""

from __future__ import annotations

import argparse
import time

import torch

from kktrain.task import SampleKey
from kktrain.tasks import latin


def batch_seconds(dataset: latin.LatinDataset, knobs: dict, batch: int, repeats: int) -> float:
    """Median seconds to build one batch of ``batch`` puzzles (fresh seeds every time)."""
    times = []
    for r in range(repeats + 1):
        keys = [SampleKey(i, (r + 1) << 32 | i, knobs) for i in range(batch)]
        # CPU time: the generator is single-threaded numpy, so on a shared machine this is the
        # time it would take alone, with other jobs' load left out.
        start = time.process_time()
        dataset.__getitems__(keys)
        times.append(time.process_time() - start)
    return sorted(times[1:])[repeats // 2]  # the first call warms the pools' cache


def step_seconds(task: latin.LatinTask, batch: dict, repeats: int) -> float:
    """Median seconds of forward + backward + AdamW step of the default model."""
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
    return sorted(times[2:])[repeats // 2]


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the step (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    task = latin.make_task()
    dataset = task.train_dataset()
    modes = ["STANDARD", "ZERO_INCLUSIVE", "NEGATIVE"]
    print(f"batch {args.batch}, fill 0.5, all modes; one process")
    print(f"{'n':>4} {'pool (once)':>12} {'ms/batch':>9} {'puzzles/s':>10}")
    for n in (5, 9, 16):
        start = time.process_time()
        latin.base_pool(n)
        pool = time.process_time() - start
        knobs = {"sizes": [n], "modes": modes, "fill_min": 0.5, "fill_max": 0.5}
        seconds = batch_seconds(dataset, knobs, args.batch, args.repeats)
        print(f"{n:>4} {pool * 1e3:>10.0f}ms {seconds * 1e3:>9.1f} {args.batch / seconds:>10.0f}")

    knobs = task.default_knobs()
    size = task.config_defaults()["batch_size"]
    data = batch_seconds(dataset, knobs, size, args.repeats)
    batch = dataset.__getitems__([SampleKey(i, i, knobs) for i in range(size)])
    step = step_seconds(task, batch, max(3, args.repeats // 2))
    print(f"default knobs {knobs['sizes']}, batch {size}: data {data * 1e3:.1f} ms ({size / data:.0f} puzzles/s)")
    threads = torch.get_num_threads()
    print(f"train step {step * 1e3:.0f} ms with {threads} torch threads: data = {data / step:.1%} of it")


if __name__ == "__main__":
    main()

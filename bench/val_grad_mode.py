"""Validation under torch.inference_mode() vs torch.no_grad() on the default Latin task.

    OMP_NUM_THREADS=1 .venv/bin/python bench/val_grad_mode.py [--reps 3]

The default task's validation (untrained default model, 1 thread), the two modes interleaved;
prints each time and the ratio. Results are in docs/config.md (``val_grad_mode``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kktrain.tasks.latin import LatinTask


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = LatinTask()
    model = task.build_model().eval()
    device = torch.device("cpu")
    modes = {"no_grad": torch.no_grad, "inference": torch.inference_mode}
    with torch.inference_mode():
        task.validate(model, device)  # build the held-out puzzles once (cached), warm up
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.reps):
        for name, ctx in modes.items():
            t0 = time.perf_counter()
            with ctx():
                task.validate(model, device)
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name:10s} median {statistics.median(ts):.3f} s  ({', '.join(f'{t:.3f}' for t in ts)})")
    a, b = statistics.median(times["no_grad"]), statistics.median(times["inference"])
    print(f"inference/no_grad = {b / a:.3f}; saved {a - b:.3f} s per validation ({(a - b) / a:.1%})")


if __name__ == "__main__":
    main()

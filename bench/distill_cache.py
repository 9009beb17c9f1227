"""Cached teacher logits (distill.cache) against live teacher forwards, on the tiny task.

    OMP_NUM_THREADS=1 .venv/bin/python bench/distill_cache.py [--reps 2]

A wide teacher (hidden 1024, 4 layers) distilled into the default tiny student for 4 epochs
(16 steps each); the first epoch fills the cache, the next three read it. Runs interleaved;
prints each run's training time and the ratio. Results: plugins/kktrain-distill/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kktrain.testing import run_tiny


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = run_tiny(root, steps=1, task_options={"hidden": 1024, "layers": 4}, out=root / "teacher").run_dir
        times: dict[str, list[float]] = {"live": [], "cache": []}
        for rep in range(args.reps):
            for name in times:
                opts = {"distill.teacher": str(teacher), "distill.cache": name == "cache", "log_every": 64, "val_at_epoch_end": False,
                        "checkpoint.at_epoch_end": False}
                t0 = time.perf_counter()
                out = run_tiny(root, plugins=["distill"], steps=64, options=opts, out=root / f"{name}{rep}")
                times[name].append(time.perf_counter() - t0)
                if name == "cache":
                    print("cache", out.summary["distill"]["cache"])
        for name, ts in times.items():
            print(f"{name:6s} median {statistics.median(ts):.3f} s ({', '.join(f'{t:.3f}' for t in ts)})")
        live, cache = statistics.median(times["live"]), statistics.median(times["cache"])
        print(f"cache/live = {cache / live:.3f} (64 steps, 48 of them from the cache)")


if __name__ == "__main__":
    main()

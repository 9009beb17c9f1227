"""Activation checkpointing on the default Latin model: peak memory saved and time it costs.

    python bench/grad_checkpoint.py                  # CPU, 1 thread
    python bench/grad_checkpoint.py --device cuda    # peak via torch.cuda.max_memory_allocated

Two workloads: the default knobs (grids 4..6, batch 128) and the curriculum's last stage sized
grid (16 x 16 = 256 cells, batch 32), where activations dominate.

Memory. On CUDA: ``torch.cuda.max_memory_allocated`` over one step, minus what was allocated
before it. On CPU torch has no such counter, and RSS or tracemalloc do not see torch's allocator
well (glibc keeps freed pages; tracemalloc sees only Python objects), so the step runs under
``torch.profiler.profile(profile_memory=True)``: the CPU allocator reports every tensor
allocation and free with its size; summed in time order they give the live tensor bytes, whose
maximum over the step (minus the bytes live at its start) is the step's peak, the CPU analogue of
``max_memory_allocated``. Measured after a warm-up step, so the optimizer state already exists.

Time: median step time (forward+loss, backward, AdamW), alternating plain and checkpointed
blocks in one process; the ratio is the price of recomputing each block's forward in backward.
Checkpointing goes through the plugin's own ``checkpoint_forward`` on ``task.checkpoint_blocks``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile


def cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak live tensor bytes during ``fn`` above those live at its start (CPU allocator events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(fn: Callable[[], None]) -> int:
    """``max_memory_allocated`` during ``fn`` above what was allocated at its start."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def workload(name: str, sizes: list[int], batch_size: int, args: argparse.Namespace) -> None:
    """Measure one workload, plain and checkpointed, on two identical models."""
    from kktrain.task import SampleKey
    from kktrain.tasks.latin import LatinOptions, make_task
    from kktrain_grad_checkpoint import checkpoint_forward

    device = torch.device(args.device)
    task = make_task(LatinOptions(size_min=min(sizes), size_max=max(sizes)))
    knobs = task.default_knobs()
    data = task.train_dataset()
    seeds = np.random.default_rng(0).integers(0, 2**62, (args.steps, batch_size))
    batches = [{k: v.to(device) for k, v in task.collate(data.__getitems__([SampleKey(i, int(s), knobs) for i, s in enumerate(row)])).items()}
               for row in seeds]

    runs = {}
    for kind in ("plain", "checkpointed"):
        torch.manual_seed(0)
        model = task.build_model().to(device)
        if kind == "checkpointed":
            for block in task.checkpoint_blocks(model):
                checkpoint_forward(block)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        runs[kind] = (model, opt)

    def step(kind: str, batch: dict[str, torch.Tensor]) -> None:
        model, opt = runs[kind]
        task.loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    peak = cuda_peak_bytes if device.type == "cuda" else cpu_peak_bytes
    mem = {}
    for kind in runs:
        step(kind, batches[0])  # warm-up: optimizer state exists
        mem[kind] = peak(lambda kind=kind: step(kind, batches[0]))

    def block(kind: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for batch in batches:
            step(kind, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / len(batches)

    times: dict[str, list[float]] = {"plain": [], "checkpointed": []}
    for _ in range(args.rounds):
        for kind in times:
            times[kind].append(block(kind))
    t = {k: statistics.median(v) for k, v in times.items()}
    cells = int(batches[0]["tokens"][0].numel())
    print(f"\n{name}: grids {sizes[0]}..{sizes[-1]} (up to {cells} cells), batch {batch_size}, "
          f"{len(task.checkpoint_blocks(runs['plain'][0]))} blocks, {device}")
    print(f"  peak step memory   plain {mem['plain'] / 2**20:8.1f} MiB   checkpointed {mem['checkpointed'] / 2**20:8.1f} MiB"
          f"   saved {(1 - mem['checkpointed'] / mem['plain']) * 100:5.1f} %")
    print(f"  step time          plain {t['plain'] * 1e3:8.1f} ms    checkpointed {t['checkpointed'] * 1e3:8.1f} ms"
          f"    cost {(t['checkpointed'] / t['plain'] - 1) * 100:+5.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=4, help="alternating blocks of each kind")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); memory: "
          + ("torch.cuda.max_memory_allocated" if args.device == "cuda" else "CPU allocator events (torch.profiler)"))
    workload("default knobs", [4, 5, 6], 128, args)
    workload("16 x 16 grids", [16], 32, args)


if __name__ == "__main__":
    main()

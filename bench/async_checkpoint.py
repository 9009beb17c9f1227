"""How long a checkpoint holds the training loop: ``checkpoint.async = true`` against a synchronous write.

The model is the default Latin-square transformer (batch 128; the tiny MLP task when the Latin
task is not installed), with ``--plugin ema`` so the payload holds a second copy of the weights.
Two trainers, one writing synchronously and one in the background, take turns: each trains
``--between`` steps, then checkpoints; the stall is the wall time ``save_checkpoint`` blocks the
loop (the sync write: torch.save, fsync, hash, rename, manifest; the async one: copying the state
into reused CPU buffers, plus waiting for a previous write still in flight). Wall time, since a
stall is waiting; run it on a quiet machine. The background write's own duration and the steps
that ran meanwhile are printed too.

    python bench/async_checkpoint.py [--saves 8] [--between 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kktrain import RunConfig, Trainer
from kktrain.loop import train_step


def _make_task() -> Any:
    try:
        from kktrain.tasks.latin import make_task
    except ImportError:
        from kktrain.tasks.tiny import TinyOptions, TinyTask

        return TinyTask(TinyOptions(samples=64 * 200, dim=32, hidden=128, classes=10, layers=4))
    return make_task()


def _trainer(out: Path, background: bool) -> Trainer:
    task = _make_task()
    cfg = RunConfig(
        task=task.name, max_steps=100_000, batch_size=task.config_defaults().get("batch_size", 128), out=str(out),
        checkpoint={"at_epoch_end": False, "every_steps": 0, "keep_last": 2, "async": background},
        data={"workers": 0}, schedule={"name": "constant"},
    )
    tr = Trainer(cfg, ["ema"], task=task, quiet=True).setup()
    tr.hook.on_train_start(trainer=tr)  # the loop's own start (EMA starts its average here)
    return tr


def _steps(tr: Trainer, n: int) -> list[float]:
    times = []
    for _ in range(n):
        batches = tr.data.next_step(tr.state, tr.config.grad_accum)
        if batches is None:
            tr.state.epoch, tr.state.batch_in_epoch = tr.state.epoch + 1, 0
            tr.data.restart()
            batches = tr.data.next_step(tr.state, tr.config.grad_accum)
        t = time.perf_counter()
        train_step(tr, batches)
        times.append(time.perf_counter() - t)
        writer = tr.checkpoints.writer
        if writer is not None and writer.in_flight:
            writer.poll()
    return times


def main() -> None:
    """Print the median stall of each, their ratio, and what the background write cost."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saves", type=int, default=8)
    parser.add_argument("--between", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sync, bg = _trainer(Path(tmp) / "sync", False), _trainer(Path(tmp) / "async", True)
        for tr in (sync, bg):
            _steps(tr, 5)
            tr.save_checkpoint("step")  # first save: buffers are allocated, files created
            _steps(tr, args.between)
        stalls: dict[str, list[float]] = {"sync": [], "async": []}
        step_times: list[float] = []
        for _ in range(args.saves):
            for name, tr in (("sync", sync), ("async", bg)):
                t = time.perf_counter()
                tr.save_checkpoint("step")
                stalls[name].append(time.perf_counter() - t)
                step_times += _steps(tr, args.between) if name == "async" else []
                if name == "sync":
                    _steps(tr, args.between)
        writer = bg.checkpoints.writer
        assert writer is not None
        writer.wait()
        size = max((p.stat().st_size for p in (Path(tmp) / "sync" / "checkpoints").glob("*.pt")), default=0)
        params = sum(p.numel() for p in sync.params)
        s, a = statistics.median(stalls["sync"]), statistics.median(stalls["async"])
        print(f"model: {sync.task.name}, {params / 1e6:.2f} M parameters, checkpoint {size / 2**20:.1f} MiB (with EMA)")
        print(f"sync write stall:  median {s * 1e3:.1f} ms  (min {min(stalls['sync']) * 1e3:.1f}, max {max(stalls['sync']) * 1e3:.1f})")
        print(f"async stall:       median {a * 1e3:.1f} ms  (min {min(stalls['async']) * 1e3:.1f}, max {max(stalls['async']) * 1e3:.1f})")
        print(f"async / sync:      {a / s:.3f}  (goal <= 0.20)")
        print(f"background write:  median {statistics.median(writer.write_seconds) * 1e3:.1f} ms; "
              f"median step while training on: {statistics.median(step_times) * 1e3:.1f} ms")
        for tr in (sync, bg):
            tr.close()


if __name__ == "__main__":
    main()

"""Per-step cost of the guard plugins (nan-guard, spike-rollback, mps-guard) on an overhead-bound
model, against kktrain with no plugin, in one process, runs alternating (best steps/s compared).

The model is a small MLP at batch 64 (a step is well under a millisecond), so the plugins' own
work shows: nan-guard's fused finite check and its one sync, spike-rollback's ``loss.item()``
and (here) its snapshot every ``snapshot_every`` steps, mps-guard's ``on_step`` call.

Times are process CPU time (``time.process_time``), which other jobs on a shared machine do
not inflate; with one thread it is the work done.

    python bench/guard_overhead.py [--steps 2000] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import time

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from kktrain import RunConfig, Trainer
from clock import Clock  # bench/clock.py

SETUPS: dict[str, tuple[list[str], dict[str, dict[str, Any]]]] = {
    "none": ([], {}),
    "nan-guard": (["nan-guard"], {}),
    "none (grad_clip off)": ([], {}),
    "nan-guard (grad_clip off)": (["nan-guard"], {}),
    "spike-rollback (every 100)": (["spike-rollback"], {"spike-rollback": {"snapshot_every": 100}}),
    "mps-guard": (["mps-guard"], {}),
    "all three": (["nan-guard", "spike-rollback", "mps-guard"], {"spike-rollback": {"snapshot_every": 100}}),
}


def _rate(label: str, steps: int, out: Path) -> float:
    from kktrain.tasks.tiny import TinyOptions, TinyTask

    plugins, options = SETUPS[label]
    cfg = RunConfig(task="tiny", max_steps=steps, batch_size=64, log_every=100, out=str(out), val_every=0,
                    checkpoint={"at_epoch_end": False, "every_steps": 0}, data={"workers": 0},
                    grad_clip=None if "clip" in label else 1.0)
    clock = Clock(time.process_time)
    task = TinyTask(TinyOptions(samples=64 * 200, dim=32, hidden=64, classes=10, layers=2))
    tr = Trainer(cfg, [*plugins, clock], plugin_options=options, task=task, quiet=True)
    tr.fit()
    return clock.steps_per_s()


def main(argv: list[str] | None = None) -> int:
    """Alternate the setups; print steps/s and µs per step over no plugin."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), tiny MLP 32-64-64-10, batch 64")
    rates: dict[str, list[float]] = {k: [] for k in SETUPS}
    with tempfile.TemporaryDirectory() as tmp:
        n = 0
        for r in range(args.repeats):
            for label in list(SETUPS) if r % 2 == 0 else list(reversed(SETUPS)):
                n += 1
                rates[label].append(_rate(label, args.steps, Path(tmp) / f"run{n}"))
    for label, values in rates.items():
        base = max(rates["none (grad_clip off)" if "clip" in label else "none"])
        best = max(values)
        print(f"{label:>28}: {best:8.1f} steps/s  ratio {best / base:.3f}  {(1 / best - 1 / base) * 1e6:+7.1f} µs/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())

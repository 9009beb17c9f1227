"""What the logger plugins (csv, tensorboard, mlflow) cost on the default task's training step.

The default Latin task, no other plugin, a metrics record every ``--log-every`` steps (lower
than a real run's 50, so the loggers' share shows), no validation and no checkpoints in the timed
window. Configurations run interleaved (none, csv, tensorboard, mlflow, all three, then again in
another order) with OMP_NUM_THREADS=1; steps/s is measured on the process's CPU time between the
first and the last train record (``time.process_time``: other jobs on a shared machine drop out,
the TensorBoard writer's background thread counts). A wrapper around ``on_log`` times the
loggers' own work per record. Reported: the best steps/s of each configuration, its ratio to no
logger, and the mean time per record inside the loggers.

    OMP_NUM_THREADS=1 python bench/logger_overhead.py [--steps 120] [--log-every 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch

from kktrain import RunConfig, Trainer, hookimpl
from clock import Clock  # bench/clock.py

CONFIGS: dict[str, list[str]] = {
    "none": [], "csv": ["csv"], "tensorboard": ["tensorboard"], "mlflow": ["mlflow"],
    "all three": ["csv", "tensorboard", "mlflow"],
}


class LogTimer:
    """Times the whole ``on_log`` call (every implementation) per record."""

    name = "bench-log-timer"

    def __init__(self) -> None:
        self.seconds: list[float] = []

    @hookimpl(wrapper=True, tryfirst=True)
    def on_log(self, trainer: Any, record: dict[str, Any]) -> Generator[None, Any, Any]:
        t0 = time.process_time()
        result = yield
        self.seconds.append(time.process_time() - t0)
        return result


def one_run(plugins: list[str], steps: int, log_every: int, out: Path) -> tuple[float, float]:
    """(steps/s on CPU time, mean on_log seconds per record) of one run."""
    from kktrain.tasks.latin import make_task

    task = make_task()
    cfg = RunConfig(task=task.name, max_steps=steps, batch_size=task.config_defaults().get("batch_size", 128),
                    log_every=log_every, out=str(out), val_every=0, plugins=plugins,
                    checkpoint={"at_epoch_end": False, "every_steps": 0}, data={"workers": 0})
    clock, timer = Clock(timer=time.process_time), LogTimer()
    tr = Trainer(cfg, [*plugins, clock, timer], task=task, quiet=True,
                 plugin_options={"mlflow": {"tracking_uri": (out.parent / "mlruns").as_uri()}} if "mlflow" in plugins else None)
    tr.fit()
    return clock.steps_per_s(), statistics.mean(timer.seconds)


def main(argv: list[str] | None = None) -> int:
    """Run every configuration ``repeats`` times, interleaved; print rates and ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, latin task, {args.steps} steps, "
          f"a record every {args.log_every} steps")
    rates: dict[str, list[float]] = {k: [] for k in CONFIGS}
    per_record: dict[str, list[float]] = {k: [] for k in CONFIGS}
    order = list(CONFIGS)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name in order if i % 2 == 0 else reversed(order):
                rate, seconds = one_run(CONFIGS[name], args.steps, args.log_every, Path(tmp) / f"{name}-{i}".replace(" ", "_"))
                rates[name].append(rate)
                per_record[name].append(seconds)
    base = max(rates["none"])
    for name in CONFIGS:
        best = max(rates[name])
        ms = 1e3 * min(per_record[name])
        print(f"{name:>12}: {best:6.2f} steps/s  ratio {best / base:.3f}  on_log {ms:6.3f} ms/record "
              f"= {ms / args.log_every:.4f} ms/step at log_every {args.log_every} "
              f"({ms / 50:.4f} at the default 50)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

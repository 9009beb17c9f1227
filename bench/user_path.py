"""The user's path: an ordinary TensorDataset and the smallest task, against the loop a user writes.

The plain loop uses no kktrain class: torch's DataLoader (per-sample fetch, default collate,
``shuffle=True``), AdamW with torch's default kernel choice, no clipping, constant LR, the loss
synced every 50 steps. kktrain trains the same seeded MLP (64-128-10, batch 64) on the same
TensorDataset through a three-method task, with the matching config (``grad_clip=0``,
``schedule.name=constant``, no validation, no checkpoints). Sides alternate; each run's steps/s
is measured on process CPU time (one torch thread), so other load on the machine distorts little.

    OMP_NUM_THREADS=1 python bench/user_path.py [--steps 2100] [--repeats 5] [--plugins]

Printed: steps/s of each side (median), the ratio to the plain loop and the overhead per step;
with ``--plugins`` also kktrain with ema + nan-guard + spike-rollback, and each alone.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from clock import Clock  # bench/clock.py

N, DIM, HIDDEN, CLASSES, BATCH = 64 * 400, 64, 128, 10, 64


def data() -> TensorDataset:
    """Fixed points and labels (the same for both sides)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, DIM, generator=g)
    w = torch.randn(DIM, CLASSES, generator=g)
    return TensorDataset(x, (x @ w).argmax(1))


def mlp() -> torch.nn.Module:
    """The model, seeded."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES))


class MinimalTask:
    """The smallest task around the user's model and data."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def build_model(self) -> torch.nn.Module:
        return mlp()

    def train_dataset(self) -> TensorDataset:
        return self.dataset

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)


def plain(dataset: TensorDataset, steps: int) -> float:
    """Steps per CPU second of the hand-written loop."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    losses: list[torch.Tensor] = []
    step, t0, s0 = 0, None, 0
    while step < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            step += 1
            if step % 50 == 0:
                torch.stack(losses).mean().item()
                losses = []
                if t0 is None:
                    t0, s0 = time.process_time(), step
            if step >= steps:
                break
    assert t0 is not None
    return (step - s0) / (time.process_time() - t0)


def kktrain_side(dataset: TensorDataset, steps: int, out: Path, plugins: list[str], options: dict[str, Any]) -> float:
    """Steps per CPU second of kktrain (the clock plugin reads the time at log points only)."""
    import kktrain

    clock = Clock(time.process_time)
    kktrain.fit(MinimalTask(dataset), plugins=[*plugins, clock], out=out, quiet=True, options={
        "max_steps": steps, "batch_size": BATCH, "grad_clip": 0, "schedule.name": "constant", "log_every": 50,
        "val_every": 0, "checkpoint.at_epoch_end": False, "checkpoint.every_steps": 0, **options,
    })
    return clock.steps_per_s()


def main(argv: list[str] | None = None) -> int:
    """Alternate the sides; print medians and ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--plugins", action="store_true", help="also ema + nan-guard + spike-rollback, together and alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dataset = data()
    sides: dict[str, tuple[list[str], dict[str, Any]]] = {"kktrain": ([], {})}
    if args.plugins:
        sides["kktrain + ema + nan-guard + spike-rollback"] = (["ema", "nan-guard", "spike-rollback"], {})
        for name in ("ema", "nan-guard", "spike-rollback"):
            sides[f"kktrain + {name}"] = ([name], {})
    rates: dict[str, list[float]] = {"plain per-sample DataLoader loop": []}
    rates.update({k: [] for k in sides})
    rates["kktrain, per-sample dataset (no batch indexing)"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            order = list(rates)
            if i % 2:
                order.reverse()
            for label in order:
                out = Path(tmp) / f"{i}-{len(rates[label])}-{abs(hash(label))}"
                if label.startswith("plain"):
                    rates[label].append(plain(dataset, args.steps))
                elif label.startswith("kktrain, per-sample"):
                    rates[label].append(kktrain_side(_PerSample(dataset), args.steps, out, [], {}))  # type: ignore[arg-type]
                else:
                    plugins, options = sides[label]
                    rates[label].append(kktrain_side(dataset, args.steps, out, plugins, options))
    base = statistics.median(rates["plain per-sample DataLoader loop"])
    print(f"torch {torch.__version__}, 1 thread, MLP {DIM}-{HIDDEN}-{CLASSES}, batch {BATCH}, {args.steps} steps, "
          f"{args.repeats} repeats, medians of steps per CPU second")
    for label, values in rates.items():
        rate = statistics.median(values)
        print(f"  {label:<52} {rate:8.1f} steps/s  ratio {rate / base:5.2f}  {(1 / rate - 1 / base) * 1e3:+.3f} ms/step")
    return 0


class _PerSample(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """The same data behind a plain __getitem__: kktrain cannot index it by the whole batch."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        return self.base[i]


if __name__ == "__main__":
    raise SystemExit(main())

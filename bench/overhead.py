"""kktrain's per-step overhead against a plain hand-written PyTorch loop, in one process.

Three cases:

- ``mlp``: a small MLP at batch 64 (overhead-bound: the trainer's own cost shows). Both loops see
  the same dataset in the same batch order (the plain loop through a DataLoader over kktrain's
  batch sampler, kktrain through its own direct fetch), the same AdamW (plain: foreach kernel;
  kktrain: its default, fused), warmup+cosine schedule, grad clipping, a loss sync every
  ``log_every`` steps and validation at each epoch's end.
- ``latin``: the default Latin-square transformer (compute-bound), the same way; with
  ``--plugins`` also kktrain with ema + nan-guard + spike-rollback against the same plain loop.
- ``user``: the user's path (``bench/user_path.py``): an ordinary ``TensorDataset`` behind the
  smallest task, against the per-sample DataLoader loop a user writes by hand, which uses no
  kktrain class at all. This ratio includes kktrain's data path.

Runs alternate several times; the best steps/s of each is compared (least disturbed by other
load); the user case uses medians of process CPU time.

    OMP_NUM_THREADS=1 python bench/overhead.py [--repeats 5] [--mlp-steps 3000] [--latin-steps 60]
        [--plugins] [--skip-latin] [--skip-user]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kktrain import RunConfig, Trainer
from kktrain.data import BatchPlan, KeyBatchSampler
from kktrain.loop import run
from clock import Clock  # bench/clock.py


def _config(task: str, steps: int, batch: int, log_every: int, out: Path) -> RunConfig:
    return RunConfig(
        task=task, max_steps=steps, batch_size=batch, log_every=log_every, out=str(out), val_every=0,
        checkpoint={"at_epoch_end": False, "every_steps": 0}, data={"workers": 0},
    )


def kktrain_rate(task_obj: Any, cfg: RunConfig, plugins: tuple[str, ...] = ()) -> float:
    """Steps/s of kktrain with no plugins, or the named ones (the clock only sees on_log)."""
    clock = Clock(time.process_time)  # CPU time: other load on the machine drops out (1 thread)
    if plugins:
        import kktrain

        kktrain.fit(task_obj, plugins=[*plugins, clock], out=cfg.out, quiet=True, options={
            "max_steps": cfg.max_steps, "batch_size": cfg.batch_size, "log_every": cfg.log_every, "val_every": 0,
            "checkpoint.at_epoch_end": False, "checkpoint.every_steps": 0, "data.workers": 0,
        })
        return clock.steps_per_s()
    tr = Trainer(cfg, [clock], task=task_obj, quiet=True)
    tr.setup()
    run(tr)
    return clock.steps_per_s()


def plain_rate(task_obj: Any, cfg: RunConfig) -> float:
    """Steps/s of a hand-written loop doing the same work."""
    torch.manual_seed(cfg.seed)
    model = task_obj.build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.effective_weight_decay, foreach=True)
    total = cfg.max_steps
    warmup = int(0.05 * total)
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [torch.optim.lr_scheduler.LinearLR(opt, 1 / (warmup + 1), 1.0, warmup),
         torch.optim.lr_scheduler.CosineAnnealingLR(opt, total - warmup)],
        milestones=[warmup],
    )
    dataset = task_obj.train_dataset()
    sampler = KeyBatchSampler(BatchPlan(len(dataset), cfg.batch_size, seed=cfg.seed))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=task_obj.collate,
                                         generator=torch.Generator().manual_seed(0))
    marks, losses, step, epoch = [], [], 0, 0
    model.train()
    while step < total:
        sampler.epoch = epoch
        for batch in loader:
            loss = task_obj.loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.detach())
            if step % cfg.log_every == 0:
                torch.stack(losses).mean().item()
                losses = []
                marks.append((step, time.process_time()))
            if step >= total:
                break
        model.eval()  # validation at each epoch's end, as kktrain does
        with torch.no_grad():
            task_obj.validate(model, torch.device("cpu"))
        model.train()
        epoch += 1
    (s0, t0), (s1, t1) = marks[0], marks[-1]
    return (s1 - s0) / (t1 - t0)


def compare(label: str, make_task: Any, steps: int, batch: int, log_every: int, repeats: int,
            plugins: tuple[str, ...] = ()) -> float:
    """Alternate plain and kktrain runs; print steps/s and the ratio of the best runs."""
    plain, kk = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            task_obj = make_task()
            cfg = _config(task_obj.name, steps, batch, log_every, Path(tmp) / f"{label}{i}")
            if i % 2 == 0:
                plain.append(plain_rate(task_obj, cfg))
                kk.append(kktrain_rate(make_task(), cfg, plugins))
            else:
                kk.append(kktrain_rate(task_obj, cfg, plugins))
                plain.append(plain_rate(make_task(), cfg))
    best_plain, best_kk = max(plain), max(kk)
    ratio = best_kk / best_plain
    overhead_ms = (1 / best_kk - 1 / best_plain) * 1e3
    print(f"{label:>6}: plain {best_plain:8.1f} steps/s (median {statistics.median(plain):.1f})  "
          f"kktrain {best_kk:8.1f} steps/s (median {statistics.median(kk):.1f})  "
          f"ratio {ratio:.3f}  overhead {overhead_ms:+.3f} ms/step")
    return ratio


def main(argv: list[str] | None = None) -> int:
    """Run both comparisons."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mlp-steps", type=int, default=3000)
    ap.add_argument("--latin-steps", type=int, default=60)
    ap.add_argument("--skip-mlp", action="store_true")
    ap.add_argument("--skip-latin", action="store_true")
    ap.add_argument("--skip-user", action="store_true", help="skip the user's-path case (bench/user_path.py)")
    ap.add_argument("--plugins", action="store_true",
                    help="also ema + nan-guard + spike-rollback (Latin, and the user's path: together and each alone)")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    from kktrain.tasks.tiny import TinyOptions, TinyTask

    def mlp() -> TinyTask:
        return TinyTask(TinyOptions(samples=64 * 200, dim=32, hidden=64, classes=10, layers=2))

    if not args.skip_mlp:
        compare("mlp", mlp, args.mlp_steps, 64, 50, args.repeats)
    if not args.skip_latin:
        try:
            from kktrain.tasks.latin import make_task as latin
        except ImportError:
            print("latin: task not available")
            return 0
        latin_batch = latin().config_defaults().get("batch_size", 128)
        compare("latin", latin, args.latin_steps, latin_batch, 10, max(2, args.repeats // 2))
        if args.plugins:
            compare("latin+ema+nan-guard+spike-rollback", latin, args.latin_steps, latin_batch, 10,
                    max(2, args.repeats // 2), ("ema", "nan-guard", "spike-rollback"))
    if not args.skip_user:
        import user_path  # bench/user_path.py

        print("user's path (TensorDataset, minimal task) against a plain per-sample DataLoader loop:")
        user_path.main(["--repeats", str(args.repeats), *(["--plugins"] if args.plugins else [])])
    return 0


if __name__ == "__main__":
    sys.exit(main())

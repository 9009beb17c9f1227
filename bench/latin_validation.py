"""What one validation of the Latin task costs, and what its decoders and test-time augmentation give.

    python bench/latin_validation.py [--size 9] [--fill 0.3] [--puzzles 200] [--checkpoint RUN/checkpoints/best.pt]
                                     [--against OLD_LATIN.py] [--tta 0] [--threads 1]

One validation of ``--puzzles`` held-out puzzles of one size (CPU time of ``task.validate``, one
process; the model is the default one, untrained unless ``--checkpoint`` names a kktrain
checkpoint). Printed: the time and the model's work (grid-passes: how many grids went through
a forward) of the plain validation (``valid_iter``), of the same with ``valid_fast`` and with
``--tta`` views, and the headline metrics. ``--against FILE`` runs another version's
``validate`` (e.g. ``git show main:core/kktrain/tasks/latin.py > /tmp/latin_main.py``) on the same
model and puzzles and checks that ``valid_iter`` per size is the same.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from kktrain.tasks import latin


def load_module(path: str) -> ModuleType:
    """Import a latin.py from a file, under another name."""
    spec = importlib.util.spec_from_file_location("latin_against", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the module's annotations through it
    spec.loader.exec_module(module)
    return module


def counted(model: torch.nn.Module) -> tuple[torch.nn.Module, Callable[[], int]]:
    """The model with a forward hook counting the grids it is given."""
    seen = [0]
    model.register_forward_hook(lambda module, args, out: seen.__setitem__(0, seen[0] + len(args[0])))
    return model, lambda: seen[0]


def timed_validation(task: Any, weights: dict[str, torch.Tensor], make_model: Callable[[], torch.nn.Module]) -> tuple[float, int, dict[str, float]]:
    """CPU seconds, grid-passes and metrics of one ``task.validate`` (the validation set built beforehand)."""
    model, passes = counted(make_model())
    model.load_state_dict(weights)
    model.eval()
    task.validation_set()
    start = time.process_time()
    with torch.no_grad():
        metrics = task.validate(model, torch.device("cpu"))
    return time.process_time() - start, passes(), metrics


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=9)
    parser.add_argument("--fill", type=float, default=0.3)
    parser.add_argument("--puzzles", type=int, default=200)
    parser.add_argument("--checkpoint", default=None, help="a kktrain checkpoint of the default Latin model")
    parser.add_argument("--against", default=None, help="another latin.py to compare with")
    parser.add_argument("--tta", type=int, default=4, help="views for the TTA row (0: skip it)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shape = dict(size_min=args.size, size_max=args.size, val_sizes=[args.size], val_fill=args.fill, val_puzzles=args.puzzles)
    ours = latin.make_task(latin.LatinOptions(**shape, val_fast=False))
    torch.manual_seed(0)
    if args.checkpoint:
        payload = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        weights = payload["model"]
        print(f"model: {args.checkpoint} (step {payload.get('step')})")
    else:
        weights = ours.build_model().state_dict()
        print("model: untrained (seed 0)")
    print(f"validation: {args.puzzles} puzzles of n = {args.size}, {args.fill:.0%} shown; {args.threads} torch thread(s); CPU time")

    rows = []
    if args.against:
        old = load_module(args.against)
        theirs = old.make_task(old.LatinOptions(**shape))
        rows.append(("before (" + args.against + ")", timed_validation(theirs, weights, theirs.build_model)))
    rows.append(("valid_iter (give_up)", timed_validation(ours, weights, ours.build_model)))
    fast = latin.make_task(latin.LatinOptions(**shape, val_fast=True))
    rows.append(("+ valid_fast", timed_validation(fast, weights, fast.build_model)))
    if args.tta:
        tta = latin.make_task(latin.LatinOptions(**shape, val_fast=False, tta=args.tta))
        rows.append((f"+ tta={args.tta}", timed_validation(tta, weights, tta.build_model)))

    keys = ["valid_iter", "valid_oneshot", "cell_acc", "exact_iter", "valid_fast", "valid_iter_tta", "valid_oneshot_tta", "cell_acc_tta"]
    print(f"{'':<28} {'CPU s':>8} {'grid-passes':>12}  metrics")
    for name, (seconds, passes, metrics) in rows:
        shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)
        print(f"{name:<28} {seconds:>8.2f} {passes:>12}  {shown}")
    if args.against:
        before, after = rows[0][1], rows[1][1]
        print(f"valid_iter: {after[0] and before[0] / after[0]:.1f}x less CPU time, {before[1] / max(after[1], 1):.1f}x fewer grid-passes")
        # Shares of whole grids: the old code averaged in float32, so compare to well below 1/puzzles.
        same = abs(before[2]["valid_iter"] - after[2]["valid_iter"]) < 0.1 / args.puzzles
        print(f"valid_iter before {before[2]['valid_iter']:.4f}, after {after[2]['valid_iter']:.4f}: {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()

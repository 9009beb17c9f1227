"""EMA's cost as a share of a training step on the default Latin model (goal: at most 5 %).

    python bench/ema_cost.py                 # 1 thread, default Latin model (d_model 128, 4 layers), batch 128
    python bench/ema_cost.py --threads 2 --rounds 8

A plain hand-written step (forward+loss, backward, clip, AdamW foreach, zero_grad) on pre-made
batches, alternating in one process between blocks of steps without and with the ema plugin's
own update (``EmaPlugin.update``: one ``torch._foreach_lerp_`` over all parameters). Printed:
the median step time of each, the share (with - without) / without, and the update alone timed
in isolation as a share of the plain step. Data generation and validation are left out, so the
share is an upper bound for a real run (which also loads data). The kktrain hook call itself
(``on_step``, one pluggy call) costs a few microseconds, well below the resolution here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=6, help="alternating blocks of each kind")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from kktrain.tasks.latin import LatinOptions, make_task
    from kktrain_ema import EmaPlugin

    task = make_task(LatinOptions())
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    data = task.train_dataset()
    from kktrain.task import SampleKey

    knobs = task.default_knobs()
    batches = [
        task.collate(data.__getitems__([SampleKey(i, int(s), knobs) for i, s in
                                        enumerate(np.random.default_rng(b).integers(0, 2**62, args.batch_size))]))
        for b in range(args.steps)
    ]
    ema = EmaPlugin(EmaPlugin.Options(decay=0.999))
    ema.track(model)
    ema.start()
    params = list(model.parameters())

    def step(batch: dict[str, torch.Tensor], with_ema: bool) -> None:
        loss = task.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if with_ema:
            ema.update()

    def block(with_ema: bool) -> float:
        t0 = time.perf_counter()
        for batch in batches:
            step(batch, with_ema)
        return (time.perf_counter() - t0) / len(batches)

    block(False), block(True)  # warm-up
    plain, with_ema = [], []
    for _ in range(args.rounds):
        plain.append(block(False))
        with_ema.append(block(True))
    t_plain, t_ema = statistics.median(plain), statistics.median(with_ema)

    reps = 200
    t0 = time.perf_counter()
    for _ in range(reps):
        ema.update()
    t_update = (time.perf_counter() - t0) / reps

    n_params = sum(p.numel() for p in params)
    print(f"Latin model: {len(params)} tensors, {n_params / 1e6:.2f} M parameters; batch {args.batch_size}; "
          f"{args.threads} thread(s); torch {torch.__version__}")
    print(f"plain step            {t_plain * 1e3:8.2f} ms (median of {args.rounds} blocks of {args.steps})")
    print(f"step + EMA update     {t_ema * 1e3:8.2f} ms")
    print(f"EMA share of a step   {(t_ema - t_plain) / t_plain * 100:8.2f} %   (with - without) / without")
    print(f"EMA update alone      {t_update * 1e6:8.1f} us = {t_update / t_plain * 100:.2f} % of a plain step")


if __name__ == "__main__":
    main()

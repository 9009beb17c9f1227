"""optim8bit: bitsandbytes AdamW8bit against torch AdamW on this machine, in one process.

For the default Latin transformer and a small MLP: the optimizer step alone (same random
gradients, alternating runs, best of ``--repeats``) and the size of the optimizer state. On CPU,
bitsandbytes' 8-bit step dequantizes and requantizes every state block in Python-dispatched
torch ops per parameter, so expect it to be slower than torch's foreach AdamW; the point of the
plugin is the state memory (about a quarter), which matters on GPUs with large models.

    python bench/optim8bit.py [--repeats 5] [--steps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _state_mb(opt: torch.optim.Optimizer) -> float:
    total = 0
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.numel() > 1 and not key.startswith("qmap"):
                total += value.numel() * value.element_size()
    return total / 2**20


def _time_steps(make_opt, model: torch.nn.Module, steps: int) -> tuple[float, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_opt(params)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) * 1e-2 for p in params]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    opt.step()  # states exist from here on
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps * 1e3, _state_mb(opt)


def compare(label: str, make_model, steps: int, repeats: int, min_8bit_size: int) -> None:
    import bitsandbytes as bnb

    def torch_adamw(params):
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)

    def bnb_adamw(params):
        return bnb.optim.AdamW8bit(params, lr=1e-3, min_8bit_size=min_8bit_size)

    plain, eight = [], []
    for i in range(repeats):
        order = [(torch_adamw, plain), (bnb_adamw, eight)]
        for make_opt, out in order if i % 2 == 0 else order[::-1]:
            out.append(_time_steps(make_opt, make_model(), steps))
    (t_plain, mb_plain), (t_eight, mb_eight) = min(plain), min(eight)
    n = sum(p.numel() for p in make_model().parameters())
    print(f"{label:>6} ({n / 1e6:.2f} M params): torch AdamW {t_plain:7.2f} ms/step, state {mb_plain:6.2f} MB | "
          f"AdamW8bit {t_eight:7.2f} ms/step, state {mb_eight:6.2f} MB | time x{t_eight / t_plain:.2f}, "
          f"state x{mb_eight / mb_plain:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import bitsandbytes as bnb

    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, {torch.get_num_threads()} threads, CPU")
    from kktrain.tasks.latin import make_task as latin

    def mlp() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                   torch.nn.ReLU(), torch.nn.Linear(1024, 10))

    def transformer() -> torch.nn.Module:
        torch.manual_seed(0)
        return latin().build_model()

    compare("latin", transformer, args.steps, args.repeats, 4096)
    compare("mlp", mlp, args.steps, args.repeats, 4096)
    return 0


if __name__ == "__main__":
    sys.exit(main())

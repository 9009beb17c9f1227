"""Start-up cost: `kktrain --help` and `kktrain run --task tiny --max-steps 1` against `import torch`
and against the smallest hand-written loop (one AdamW step).

Each command runs as a fresh process, the commands in turn, several rounds; printed are the
median wall time and the median CPU time (user + sys of the child: on a shared machine the CPU
time is the steadier figure). ``--kktrain PATH`` measures another installation's ``kktrain``
executable beside this one (for a before/after comparison, e.g. a venv holding an older commit).

    OMP_NUM_THREADS=1 python bench/startup.py [--rounds 5] [--kktrain OTHER_VENV/bin/kktrain]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


PLAIN_STEP = """
import torch
m = torch.nn.Linear(8, 2)
o = torch.optim.AdamW(m.parameters())
m(torch.randn(4, 8)).sum().backward()
o.step()
"""


def measure(cmd: list[str], cwd: str) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``cmd`` (CPU: this child's user + sys)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    """Alternate the commands; print medians."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kktrain", action="append", default=[], help="another kktrain executable to compare")
    args = ap.parse_args(argv)
    mine = str(Path(sys.executable).with_name("kktrain"))
    exes = {"this": mine, **{f"other{i}": e for i, e in enumerate(args.kktrain)}}
    with tempfile.TemporaryDirectory() as tmp:
        cmds: dict[str, list[str]] = {
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            # The smallest hand-written loop: torch.optim's first step imports torch._dynamo (~1.5 s CPU).
            "plain loop, one AdamW step": [sys.executable, "-c", PLAIN_STEP],
        }
        for tag, exe in exes.items():
            cmds[f"{tag}: kktrain --help"] = [exe, "--help"]
            cmds[f"{tag}: kktrain run --task tiny --max-steps 1"] = [
                exe, "run", "--task", "tiny", "--max-steps", "1", "--quiet", "--out", "RUN"]
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
        for r in range(args.rounds):
            order = list(cmds) if r % 2 == 0 else list(reversed(cmds))
            for label in order:
                cmd = [c if c != "RUN" else str(Path(tmp) / f"run{r}-{abs(hash(label))}") for c in cmds[label]]
                results[label].append(measure(cmd, tmp))
    print(f"{args.rounds} rounds, medians; {', '.join(f'{t} = {e}' for t, e in exes.items() if t != 'this')}")
    for label, values in results.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"  {label:<56} wall {wall:6.2f} s   cpu {cpu:6.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Helpers (not fixtures) for driving the real ``kktrain`` console script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


KKTRAIN = str(Path(sys.executable).parent / "kktrain")


def kk(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``kktrain ARGS`` in ``cwd``; return the completed process (text)."""
    base = {k: v for k, v in os.environ.items() if k != "KKTRAIN_TRACE_HOOKS"}
    full_env = {**base, "OMP_NUM_THREADS": "1", "KKTRAIN_RUNS_DIR": str(cwd / "runs"), **(env or {})}
    proc = subprocess.run([KKTRAIN, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kktrain {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with (size, mtime_ns): to prove nothing was touched."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}

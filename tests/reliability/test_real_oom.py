"""A real CPU out-of-memory under a real memory limit is recovered by mps-guard (issue 15).

The child process imports torch and kktrain, then caps its own address space (RLIMIT_AS) a little
above what it uses, and trains a batch whose activations need more: the CPU allocator raises
``RuntimeError: [enforce fail at alloc_cpu.cpp] ... DefaultCPUAllocator: can't allocate memory``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CHILD = textwrap.dedent('''
    import json, resource, sys
    from pathlib import Path
    import torch
    from kktrain.testing import run_tiny
    import kktrain_mps_guard  # noqa: F401  (imported before the limit, like the rest)

    def vm_bytes():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
        raise SystemExit("no VmSize")

    plugins = sys.argv[1:]
    opts = {"batch_size": 4096, "task.samples": 4096, "task.hidden": 8192, "task.layers": 1, "task.dim": 8}
    # Everything allocated once before the limit: one step without the limit would need ~1 GB more.
    run_tiny(Path("warm"), steps=1, task_options={"samples": 64, "hidden": 16384, "layers": 1}, batch_size=64)
    limit = vm_bytes() + int(__import__("os").environ.get("OOM_MARGIN_MB", "700")) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        out = run_tiny(Path("."), steps=2, plugins=plugins, batch_size=4096,
                       task_options={"samples": 4096, "hidden": 16384, "layers": 1}, out=Path("run"))
        print(json.dumps({"status": out.summary["status"],
                          "events": [e["event"] for e in out.summary["events"]]}))
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e).splitlines()[0][:300]}))
''')


def _child(tmp_path: Path, *plugins: str) -> dict:
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "warm").mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KKTRAIN_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "child.py", *plugins], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def can_limit_memory() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS with /proc/self/status is Linux only")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and hard < 8 * 2**30:
        pytest.skip(f"the hard RLIMIT_AS here ({hard}) leaves no room to set a test limit")


def test_without_the_guard_the_limit_is_a_real_allocator_error(tmp_path: Path, can_limit_memory: None) -> None:
    result = _child(tmp_path)
    assert result.get("error") == "RuntimeError" and "can't allocate memory" in result["message"], result


def test_mps_guard_recovers_a_real_cpu_oom_by_splitting_the_batch(tmp_path: Path, can_limit_memory: None) -> None:
    result = _child(tmp_path, "mps-guard")
    assert result.get("status") == "completed", result
    assert "oom_retry" in result["events"], result

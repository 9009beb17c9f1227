"""optim8bit through the real CLI: the 8-bit path, and the fall-back in environments where it cannot run.

The fall-back environments are real interpreters, not mocks: a directory on PYTHONPATH holds a
``bitsandbytes`` package that shadows the installed one, either failing to import (not installed,
or a broken install) or importing like bitsandbytes <= 0.42 on a machine without CUDA, whose
AdamW8bit builds but fails at its first step (``'NoneType' object has no attribute
'cadam32bit_grad_fp32'``: no native library for this device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kktrain import load_checkpoint

pytest.importorskip("bitsandbytes", reason="optim8bit's 8-bit path needs bitsandbytes (extra 'bnb')")

KKTRAIN = Path(sys.executable).parent / "kktrain"

BROKEN_IMPORT = 'raise ImportError("No module named \'bitsandbytes\' (shadowed by the test environment)")\n'

NO_DEVICE_SUPPORT = '''\
"""Behaves like bitsandbytes 0.42 on a machine without CUDA: imports, builds, fails at step()."""
__version__ = "0.42.0"
from . import optim
'''

NO_DEVICE_SUPPORT_OPTIM = '''\
import torch


class _NoNativeLib:
    def __getattr__(self, name):
        return None


lib = None


class AdamW8bit(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, is_paged=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    lib.cadam32bit_grad_fp32(p, p.grad)  # AttributeError, as in bitsandbytes 0.42 without CUDA
'''


def shadow_env(tmp_path: Path, kind: str) -> dict[str, str]:
    root = tmp_path / f"shadow-{kind}"
    pkg = root / "bitsandbytes"
    pkg.mkdir(parents=True)
    if kind == "missing":
        (pkg / "__init__.py").write_text(BROKEN_IMPORT)
    else:
        (pkg / "__init__.py").write_text(NO_DEVICE_SUPPORT)
        (pkg / "optim.py").write_text(NO_DEVICE_SUPPORT_OPTIM)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    return env


def kktrain(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KKTRAIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


RUN = ("run", "--task", "tiny", "--plugin", "optim8bit", "-o", "task.hidden=64", "-o", "optim8bit.min_8bit_size=256", "-q")


def test_cli_8bit_run_then_resume_where_bitsandbytes_cannot_run_is_refused(tmp_path):
    done = kktrain(*RUN, "--max-steps", "8", "--stop-at-step", "4", "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    ckpt = load_checkpoint(sorted((tmp_path / "run" / "checkpoints").glob("step_*.pt"))[-1])
    assert ckpt["optimizer"]["state"][2]["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.uint8  # 64x64 weight
    # resuming the 8-bit state where bitsandbytes is missing: one line, exit 2, checkpoints intact
    resumed = kktrain(*RUN, "--max-steps", "8", "--out", "run", "--resume", "auto", cwd=tmp_path, env=shadow_env(tmp_path, "missing"))
    assert resumed.returncode == 2, resumed.stderr
    error = [line for line in resumed.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "trained with optimizer bitsandbytes" in error[0] and "torch.optim" in error[0], resumed.stderr
    assert not (tmp_path / "run" / "checkpoints" / "final.pt").exists()


@pytest.mark.parametrize(("kind", "cause"), [
    ("missing", "bitsandbytes is not installed or fails to import"),
    ("no-device-support", "bitsandbytes 0.42.0 cannot run AdamW8bit on cpu/torch.float32 (AttributeError"),
])
def test_cli_falls_back_to_torch_adamw_with_one_warning(tmp_path, kind, cause):
    env = shadow_env(tmp_path, kind)
    done = kktrain(*RUN, "--max-steps", "4", "--out", "run", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "optim8bit_fallback" in line]
    assert len(warnings) == 1 and cause in warnings[0], done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["optim8bit"]["impl"] == "torch" and cause in summary["optim8bit"]["fallback_reason"]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")["optimizer"]["state"][1]
    assert state["exp_avg"].dtype == torch.float32  # torch AdamW's state
    logged = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["level"] for r in logged if r["event"] == "optim8bit_fallback"] == ["warning"]
    if kind == "no-device-support":
        refused = kktrain(*RUN, "-o", "optim8bit.on_unavailable=error", "--max-steps", "4", "--out", "strict", cwd=tmp_path, env=env)
        assert refused.returncode == 2
        assert refused.stderr.startswith("error: optim8bit: bitsandbytes 0.42.0 cannot run AdamW8bit on cpu")
        assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "strict").exists()

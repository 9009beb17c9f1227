"""Shared by the vcache tests: recorded machines and the run config profiles are compared against.

``machines.json`` holds what kktrain's detection reports for recorded machines (AMD 5600X3D and
7800X3D, i7-13700K, Xeon 8488C, Graviton2, an M2 Pro, a CI VM); the core's tests check that the
file still says what detection says (tests/core/test_hardware.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kktrain import HardwareInfo, RunConfig

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
MACHINES: dict[str, Any] = json.loads((HERE / "machines.json").read_text())


def machine(name: str) -> HardwareInfo:
    """A recorded Linux machine as kktrain detected it."""
    return HardwareInfo.from_dict(MACHINES[name])


def sysctl_machine(name: str) -> HardwareInfo:
    """A recorded macOS machine (CPU from sysctl, MPS available)."""
    return HardwareInfo.from_dict(MACHINES[name])


def Data(**values: Any) -> dict[str, Any]:  # noqa: N802 - reads like the model it builds
    """A ``data`` table: workers 0, no pinned memory, no persistent workers, unless given."""
    return {"workers": 0, "pin_memory": False, "persistent_workers": False, **values}


def Config(*, data: dict[str, Any] | None = None, batch_size: int = 128, **values: Any) -> RunConfig:  # noqa: N802
    """A RunConfig with batch 128 and :func:`Data` defaults."""
    return RunConfig(batch_size=batch_size, data=data if data is not None else Data(), **values)

"""The run config the hardware tests hand to profile code: the real RunConfig, with the data-loader
defaults the profiles are compared against (no pinned memory, no persistent workers)."""

from __future__ import annotations

from typing import Any

from kktrain import RunConfig


def Data(**values: Any) -> dict[str, Any]:  # noqa: N802 - reads like the model it builds
    """A ``data`` table: workers 0, no pinned memory, no persistent workers, unless given."""
    return {"workers": 0, "pin_memory": False, "persistent_workers": False, **values}


def Config(*, data: dict[str, Any] | None = None, batch_size: int = 128, **values: Any) -> RunConfig:  # noqa: N802
    """A RunConfig with batch 128 and :func:`Data` defaults."""
    return RunConfig(batch_size=batch_size, data=data if data is not None else Data(), **values)

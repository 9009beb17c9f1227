"""Shared by the benches: a plugin that timestamps each train metrics record (nothing per step)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kktrain import hookimpl


class Clock:
    """Records ``(step, perf_counter)`` at each train record (every ``log_every`` steps)."""

    name = "bench-clock"

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self.timer = timer  # time.process_time on a shared machine: other jobs' load drops out
        self.marks: list[tuple[int, float]] = []

    @hookimpl
    def on_log(self, trainer: Any, record: dict[str, Any]) -> None:
        if record["kind"] == "train":
            self.marks.append((record["step"], self.timer()))

    def steps_per_s(self) -> float:
        """Steps per second between the first and the last record."""
        (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
        return (s1 - s0) / (t1 - t0)

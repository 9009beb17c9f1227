"""csv: rows equal the metrics records, header = union of keys, a kill -9 and resume leaves each row once."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

RUN: dict[str, Any] = {"batch_size": 16, "log_every": 2, "val_every": 4, "task_options": {"samples": 128}}
VOLATILE = {"time", "train/steps_per_s", "train/samples_per_s", "train/epoch_time_s", "val/time_s"}


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _as_cells(record: dict[str, Any], header: list[str]) -> dict[str, str]:
    return {k: ("" if k not in record else str(record[k])) for k in header}


def test_rows_are_the_records_and_the_header_their_union(kktrain_run):
    out = kktrain_run(plugins=["csv"], steps=10, **RUN)
    header, rows = _rows(out.run_dir / "metrics.csv")
    records = out.metrics
    assert header[:4] == ["step", "kind", "time", "epoch"]
    assert set(header) == {k for r in records for k in r}
    assert {"train/loss", "train/grad_norm", "val/acc", "train/epoch_time_s"} <= set(header)
    assert rows == [_as_cells(r, header) for r in records]
    assert float(rows[0]["train/loss"]) == records[0]["train/loss"]  # full precision
    assert out.summary["csv"] == {"path": str(out.run_dir / "metrics.csv"), "rows": len(records)}


def test_kinds_selects_the_rows(kktrain_run):
    out = kktrain_run(plugins=["csv"], steps=10, options={"csv.kinds": ["val"]}, **RUN)
    header, rows = _rows(out.run_dir / "metrics.csv")
    assert {r["kind"] for r in rows} == {"val"} and [int(r["step"]) for r in rows] == [4, 8, 10]
    assert not any(k.startswith("train/") for k in header)


_CRASHING_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from kktrain import hookimpl
    from kktrain.testing import run_tiny

    class Killer:
        name = "killer"
        def __init__(self, at):
            self.at = at
        @hookimpl
        def on_step(self, trainer, loss):
            if trainer.state.step == self.at:
                os.kill(os.getpid(), signal.SIGKILL)

    out, kill_at, resume = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "resume"
    run_tiny(out.parent, plugins=["csv", Killer(kill_at)], steps=12, out=out, resume="auto" if resume else None,
             batch_size=16, log_every=1, val_every=4, task_options={"samples": 128}, **{"checkpoint.every_steps": 5})
    """
)


def test_kill_and_resume_leave_each_row_once(tmp_path: Path):
    script = tmp_path / "run.py"
    script.write_text(_CRASHING_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out: str, kill_at: int, mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), str(tmp_path / out), str(kill_at), mode],
                              env=env, capture_output=True, text=True, timeout=120)

    assert run("whole", 0, "fresh").returncode == 0
    crashed = run("killed", 9, "fresh")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    _, before = _rows(tmp_path / "killed" / "metrics.csv")
    assert max(int(r["step"]) for r in before) == 8, "rows past the checkpoint at step 5 to drop"
    resumed = run("killed", 0, "resume")
    assert resumed.returncode == 0, resumed.stderr
    header, rows = _rows(tmp_path / "killed" / "metrics.csv")
    whole_header, whole_rows = _rows(tmp_path / "whole" / "metrics.csv")
    assert header == whole_header
    keys = [(r["kind"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys))

    def stable(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]

    assert stable(rows) == stable(whole_rows)
    jsonl = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len([r for r in jsonl if r["kind"] != "resume"])


def test_contract(plugin_contract):
    plugin_contract("csv")

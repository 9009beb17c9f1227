"""curriculum through the real CLI, and the Latin preset driving the Latin task's data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from kktrain import hookimpl

KKTRAIN = Path(sys.executable).parent / "kktrain"


def kktrain(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KKTRAIN), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_stage_file_and_inline_config_stages(tmp_path):
    (tmp_path / "stages.toml").write_text(
        '[[stage]]\nname = "clean"\nuntil_step = 3\nknobs = { noise = 0.0 }\n\n[[stage]]\nname = "noisy"\nknobs = { noise = 0.5 }\n'
    )
    done = kktrain("run", "--task", "tiny", "--plugin", "curriculum", "-o", "curriculum.file=stages.toml",
                   "--max-steps", "6", "--out", "from-file", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "from-file" / "summary.json").read_text())
    assert [(t["name"], t["step"]) for t in summary["curriculum"]["stages"]] == [("clean", 0), ("noisy", 3)]
    assert summary["curriculum"]["source"] == "file stages.toml"

    (tmp_path / "run.toml").write_text(
        'max_steps = 6\n\n[plugins.curriculum]\non_resume_change = "restart"\n\n'
        '[[plugins.curriculum.stages]]\nuntil_step = 2\nknobs = { loss_weight = 1.0 }\n\n'
        '[[plugins.curriculum.stages]]\nknobs = { loss_weight = 0.0 }\n'
    )
    done = kktrain("run", "--task", "tiny", "--plugin", "curriculum", "--config", "run.toml", "--out", "inline", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "inline" / "summary.json").read_text())
    assert summary["curriculum"]["source"] == "inline stages"
    assert summary["curriculum"]["on_resume_change"] == "restart"
    assert summary["curriculum"]["final_stage"]["knobs"]["loss_weight"] == 0.0


def test_cli_preset_without_its_knobs_is_one_line_exit_2(tmp_path):
    done = kktrain("run", "--task", "tiny", "--plugin", "curriculum", "-o", "curriculum.preset=phased",
                   "--max-steps", "2", "--out", "never", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: curriculum preset phased sets knob(s)"), done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "never").exists()


class LatinBatches:
    """Records size, mode and share of revealed cells of every puzzle each step trains on."""

    name = "latin-batches"

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, Any]] = {}

    @hookimpl(wrapper=True)
    def forward_loss(self, trainer: Any, batch: Any) -> Any:
        from kktrain.tasks.latin import EMPTY, PAD

        tokens, size = batch["tokens"], batch["size"]
        cells = (size * size).float()
        shown = ((tokens != PAD) & (tokens != EMPTY)).flatten(1).sum(1).float()
        self.seen[trainer.state.step + 1] = {
            "sizes": set(size.tolist()), "modes": set(batch["mode"].tolist()),
            "share": (shown / cells).tolist(), "cells": cells.tolist(),
        }
        return (yield)


def test_latin_preset_changes_the_latin_data_at_quarter_boundaries(kktrain_run):
    from kktrain.tasks.latin import Mode

    rec = LatinBatches()
    out = kktrain_run(
        task="latin", plugins=["curriculum", rec], steps=8,
        options={"curriculum.preset": "latin", "batch_size": 8, "val_every": 0, "checkpoint.every_steps": 0,
                 "checkpoint.best_metric": ""},
        task_options={"d_model": 8, "layers": 1, "heads": 1, "samples_per_epoch": 64, "val_sizes": [3], "val_puzzles": 2},
    )
    got = [(t["stage"], t["step"]) for t in out.summary["curriculum"]["stages"]]
    assert got == [(0, 0), (1, 2), (2, 4), (3, 6)]  # quarters of 8 steps
    quarters = [
        (range(3, 6), {Mode.STANDARD}, (0.5, 0.7)),
        (range(3, 9), {Mode.STANDARD}, (0.3, 0.5)),
        (range(3, 13), {Mode.STANDARD, Mode.ZERO_INCLUSIVE}, (0.1, 0.3)),
        (range(3, 17), set(Mode), (0.0, 0.1)),
    ]
    for step, seen in rec.seen.items():
        sizes, modes, (lo, hi) = quarters[(step - 1) // 2]
        assert seen["sizes"] <= set(sizes), (step, seen["sizes"])
        assert seen["modes"] <= {int(m) for m in modes}, (step, seen["modes"])
        for share, cells in zip(seen["share"], seen["cells"]):
            assert lo - 0.5 / cells <= share <= hi + 0.5 / cells, (step, share)
    # the later quarters really reach their new sizes and modes
    assert max(max(rec.seen[s]["sizes"]) for s in (7, 8)) > 12
    assert any(int(Mode.NEGATIVE) in rec.seen[s]["modes"] for s in (7, 8))
    assert max(max(rec.seen[s]["sizes"]) for s in (3, 4)) > 5

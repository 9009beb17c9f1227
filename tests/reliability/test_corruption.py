"""Every shape of a bad newest checkpoint is skipped with a warning by ``--resume auto`` (issue 15)."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kktrain.checkpoint import FORMAT, FORMAT_VERSION, file_sha256
from rel import TINY, kk

RUN = (*TINY, "--max-steps", "8", "-o", "checkpoint.every_steps=2", "-o", "checkpoint.at_epoch_end=false")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corrupt")
    kk(*RUN, "--out", "run", "--stop-at-step", "6", cwd=root, check=True)  # step 2, 4, 6; no final
    names = sorted(p.name for p in (root / "run" / "checkpoints").iterdir())
    assert names == [f"step_0000000{n}.pt{j}" for n in (2, 4, 6) for j in ("", ".json")], names
    return root / "run"


def _manifest_for(p: Path, **changes: object) -> None:
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "sha256": file_sha256(p), "bytes": p.stat().st_size,
                "step": 6, "kind": "step", **changes}
    Path(f"{p}.json").write_text(json.dumps(manifest))


class _Code:
    def __reduce__(self):
        return (print, ("code ran from a checkpoint!",))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


SHAPES: dict[str, Callable[[Path], None]] = {
    "truncated": _truncate,
    "byte flipped": _flip,
    "manifest missing": lambda p: Path(f"{p}.json").unlink(),
    "manifest not json": lambda p: Path(f"{p}.json").write_text("{not json"),
    "manifest a list": lambda p: Path(f"{p}.json").write_text("[1, 2, 3]"),
    "manifest step a string": lambda p: _manifest_for(p, step="six"),
    "manifest step null": lambda p: _manifest_for(p, step=None),
    "manifest bytes wrong": lambda p: _manifest_for(p, bytes=1),
    "manifest of another format": lambda p: _manifest_for(p, format="something-else"),
    "data file missing": lambda p: p.unlink(),
    "empty data file": lambda p: (p.write_bytes(b""), _manifest_for(p)),
    "garbage with a matching checksum": lambda p: (p.write_bytes(b"not a torch file"), _manifest_for(p)),
    "code with a matching checksum": lambda p: (p.write_bytes(pickle.dumps({"format": FORMAT, "x": _Code()})), _manifest_for(p)),
    "a plain tensor with a matching checksum": lambda p: (torch.save(torch.zeros(3), p), _manifest_for(p)),
    "another program's dict with a matching checksum": lambda p: (torch.save({"weights": torch.zeros(3)}, p), _manifest_for(p)),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_resume_auto_skips_a_bad_newest_checkpoint(base: Path, tmp_path: Path, shape: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(base, run)
    SHAPES[shape](run / "checkpoints" / "step_00000006.pt")
    (run / "checkpoints" / ".step_00000008.pt.tmp-424242").write_bytes(b"a killed write's leftovers")
    proc = kk(*RUN, "--out", "run", "--resume", "auto", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "code ran" not in proc.stdout + proc.stderr, proc.stderr
    if shape != "data file missing":  # a lone manifest is not a checkpoint: nothing to warn about
        assert "step_00000006.pt" in proc.stderr and "skip" in proc.stderr, proc.stderr  # a warning names it
    log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    resumed = [r for r in log if r.get("event") == "resumed"]
    assert resumed and resumed[-1]["step"] == 4, resumed
    assert not (run / "checkpoints" / ".step_00000008.pt.tmp-424242").exists(), "stray temporary file not cleaned up"
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_resume_auto_without_any_checkpoint_restarts_the_runs_own_config(base: Path, tmp_path: Path) -> None:
    """Not the default task, and the run's config.toml is not overwritten with another one."""
    run = tmp_path / "run"
    shutil.copytree(base, run)
    for p in (run / "checkpoints").iterdir():
        p.unlink()
    before = (run / "config.toml").read_text()
    proc = kk("run", "-q", "--max-steps", "8", "--out", "run", "--resume", "auto", cwd=tmp_path)  # no --task
    assert proc.returncode == 0, proc.stderr
    assert "no verified checkpoint" in proc.stderr and "from step 0" in proc.stderr, proc.stderr
    assert 'task = "tiny"' in (run / "config.toml").read_text() and 'task = "tiny"' in before
    assert json.loads((run / "summary.json").read_text())["steps"] == 8

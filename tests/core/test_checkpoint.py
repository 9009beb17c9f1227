"""Checkpoints: atomic and verified writes, rolling, safe loading, model-fit reports, write failures."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from kktrain import CheckpointError, hookimpl
from kktrain.checkpoint import check_model_fit, list_checkpoints, load_checkpoint, newest_valid, prune, verify, write_checkpoint


def _payload(step: int) -> dict:
    return {"format": "kktrain-checkpoint", "version": 1, "step": step, "model": {"w": torch.full((3,), float(step))}}


def test_write_verify_load_round_trip(tmp_path: Path) -> None:
    ref = write_checkpoint(tmp_path, "step_00000001.pt", _payload(1), step=1, kind="step")
    assert verify(ref.path) == (True, "ok")
    assert torch.equal(load_checkpoint(ref.path)["model"]["w"], torch.ones(3))
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_truncated_and_flipped_files_fail_verification(tmp_path: Path) -> None:
    ref = write_checkpoint(tmp_path, "a.pt", _payload(1), step=1, kind="step")
    data = ref.path.read_bytes()
    ref.path.write_bytes(data[:-10])
    assert verify(ref.path)[1].startswith("size differs")
    flipped = bytearray(data)
    flipped[5] ^= 1
    ref.path.write_bytes(bytes(flipped))
    assert "checksum" in verify(ref.path)[1]
    with pytest.raises(CheckpointError, match="failed verification"):
        load_checkpoint(ref.path)


def test_a_checkpoint_without_manifest_is_not_trusted(tmp_path: Path) -> None:
    torch.save(_payload(3), tmp_path / "step_00000003.pt")  # as if killed before the manifest
    write_checkpoint(tmp_path, "step_00000002.pt", _payload(2), step=2, kind="step")
    warnings: list[str] = []
    assert newest_valid(tmp_path, warnings.append) == tmp_path / "step_00000002.pt"
    assert "no valid manifest" in warnings[0]


def test_prune_keeps_the_newest_k_and_never_best_or_final(tmp_path: Path) -> None:
    for s in range(1, 6):
        write_checkpoint(tmp_path, f"step_{s:08d}.pt", _payload(s), step=s, kind="step")
    write_checkpoint(tmp_path, "best.pt", _payload(2), step=2, kind="best")
    prune(tmp_path, 2)
    names = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert names == ["best.pt", "step_00000004.pt", "step_00000005.pt"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005.pt", "step_00000004.pt", "best.pt"]


def test_model_fit_report_names_missing_unexpected_mismatched() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    state = {"0.weight": torch.zeros(16, 4), "0.bias": torch.zeros(8), "extra": torch.zeros(1)}
    with pytest.raises(CheckpointError) as e:
        check_model_fit(model, state, "x.pt")
    msg = str(e.value)
    assert "2 missing: 1.weight, 1.bias" in msg and "1 unexpected: extra" in msg and "0.weight (16, 4) vs (8, 4)" in msg


def test_checkpoint_has_complete_state(kktrain_run) -> None:
    out = kktrain_run(steps=10, task_options={"dropout": 0.1})
    p = out.final_payload()
    assert {"model", "optimizer", "scheduler", "state", "rng", "config", "plugins", "task", "meta"} <= set(p)
    assert {"python", "numpy", "torch"} <= set(p["rng"])
    assert p["state"]["step"] == 10 and p["config"]["max_steps"] == 10


class FailingWrite:
    """A test plugin whose state fails to serialise with ENOSPC on the Nth checkpoint: a real
    partial write into the temporary file, as when the disk fills up."""

    name = "failing-write"

    def __init__(self, fail_at_call: int) -> None:
        self.calls = 0
        self.fail_at_call = fail_at_call

    def state_dict(self) -> dict:
        self.calls += 1
        if self.calls == self.fail_at_call:
            return {"blob": torch.zeros(1000), "boom": _DiskFull()}
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]

    @hookimpl
    def on_step(self, trainer, loss) -> None:
        return None


class _DiskFull:
    def __reduce__(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_never_corrupts_earlier_checkpoints(kktrain_run, tmp_path: Path) -> None:
    plugin = FailingWrite(fail_at_call=3)
    out = kktrain_run(plugins=[plugin], steps=40, raise_errors=False, **{"checkpoint.every_steps": 5, "checkpoint.keep_last": 5})
    assert isinstance(out.error, CheckpointError) and "No space left on device" in str(out.error)
    assert "earlier checkpoints are intact" in str(out.error)
    ck = out.run_dir / "checkpoints"
    assert sorted(p.name for p in ck.glob("*.pt")) == ["step_00000005.pt", "step_00000010.pt"]
    assert all(verify(p)[0] for p in ck.glob("*.pt"))
    assert not [p for p in ck.iterdir() if ".tmp" in p.name]
    resumed = kktrain_run(plugins=[FailingWrite(fail_at_call=0)], steps=40, resume="auto", out=out.run_dir)
    assert resumed.summary["status"] == "completed"

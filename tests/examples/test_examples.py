"""The examples in examples/ are user projects: they run as their README says, as tests.

examples/cnn-tensordataset: a small CNN on an ordinary TensorDataset, trained from the CLI with
ema, early-stopping and amp bf16, killed with SIGKILL and resumed to the bit-identical result,
exported to ONNX and checked in onnxruntime; then trained from Python, with and without a task
class. examples/char-lm: dict batches, a perplexity metric, a curriculum over the context length.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kktrain import load_checkpoint
from kktrain.testing import compare_payloads

REPO = Path(__file__).resolve().parents[2]
CNN = REPO / "examples" / "cnn-tensordataset"
CHAR = REPO / "examples" / "char-lm"
KKTRAIN = [sys.executable, "-m", "kktrain"]

CNN_RUN = ["run", "--task", "cnn_task:CNNTask", "-q", "--max-steps", "96", "--plugin", "ema", "--plugin", "early-stopping",
           "--plugin", "amp", "-o", "amp.dtype=bf16", "-o", "early-stopping.monitor=val/acc", "-o", "val_every=32",
           "-o", "checkpoint.every_steps=8", "-o", "data.workers=2"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(CNN), str(CHAR)])}


def _kk(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*KKTRAIN, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"kktrain {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def _final(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "final.pt")


@pytest.mark.slow
def test_cnn_from_the_cli_killed_resumed_exported(tmp_path: Path) -> None:
    _kk(*CNN_RUN, "--out", "whole", cwd=tmp_path)
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["status"] in ("completed", "stopped")
    assert summary["final"]["val/acc"] > 0.9 and summary["final"]["val_ema/acc"] > 0.9, summary["final"]

    # SIGKILL mid-run, then --resume auto (no other flag): the same final weights, bit for bit.
    proc = subprocess.Popen([*KKTRAIN, *CNN_RUN, "--out", "killed"], cwd=tmp_path, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list((tmp_path / "killed").glob("checkpoints/step_*.pt.json"))[2:] and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "killed" / "checkpoints" / "final.pt").exists(), "killed too late to test anything"
    _kk("run", "--resume", "auto", "--out", "killed", "--task", "cnn_task:CNNTask", "-q", cwd=tmp_path)
    diffs = compare_payloads(_final(tmp_path / "whole"), _final(tmp_path / "killed"))
    assert not diffs, diffs

    # ONNX: the command checks the export in onnxruntime itself; check it again from outside.
    proc = _kk("export", "whole", "--task", "cnn_task:CNNTask", "--out", "cnn.onnx", cwd=tmp_path)
    assert "checked: onnxruntime batch 2" in proc.stdout and "checked: onnxruntime batch 5" in proc.stdout
    import onnxruntime

    sys.path.insert(0, str(CNN))
    try:
        import kktrain
        from cnn_task import CNNTask, make_bars

        model = kktrain.load_model(tmp_path / "whole", task=CNNTask())  # EMA weights: the export's default
    finally:
        sys.path.remove(str(CNN))
    images, _ = make_bars(7, seed=5)
    session = onnxruntime.InferenceSession(str(tmp_path / "cnn.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        expected = model(images)
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "train_no_task.py"])
def test_cnn_from_python(tmp_path: Path, script: str) -> None:
    proc = subprocess.run([sys.executable, str(CNN / script), str(tmp_path / "run")], cwd=CNN, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status, acc = proc.stdout.split()[:2]
    assert status in ("completed", "stopped") and float(acc) > 0.9, proc.stdout


def test_cnn_glue_is_at_most_15_lines() -> None:
    # The promise: an existing model and Dataset train with kktrain in at most 15 lines of glue.
    # The glue is CNNTask's method bodies (build_model ... config_defaults), nothing else.
    import ast

    tree = ast.parse((CNN / "cnn_task.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CNNTask")
    lines = set()
    for fn in cls.body:
        if isinstance(fn, ast.FunctionDef):
            for stmt in fn.body:
                lines.update(range(stmt.lineno, stmt.end_lineno + 1))
    assert len(lines) <= 15, len(lines)


@pytest.mark.slow
def test_char_lm_with_a_sequence_length_curriculum(tmp_path: Path) -> None:
    args = ["run", "--task", "char_lm:CharLMTask", "-q", "--max-steps", "60", "-o", "val_every=30", "-o", "task.d_model=32",
            "--plugin", "curriculum", "-o", "curriculum.stages=[{until_step = 30, knobs = {seq_len = 16}}, {knobs = {seq_len = 48}}]",
            "-o", "task.seq_len=48", "-o", "data.workers=1"]
    _kk(*args, "--out", "lm", cwd=tmp_path)
    summary = json.loads((tmp_path / "lm" / "summary.json").read_text())
    stages = [e for e in summary["events"] if e["event"] == "curriculum_stage"]
    assert [(e["step"], e["knobs"]["seq_len"]) for e in stages] == [(0, 16), (30, 48)]
    assert summary["best"] == {**summary["best"], "metric": "val/ppl", "mode": "min"}
    assert 1.0 < summary["final"]["val/ppl"] < 45  # the corpus has 56 symbols: chance is ~56
    # Dict batches with a knob in the workers resume exactly: cut at 45 (after the stage change).
    _kk(*args, "--out", "cut", "--stop-at-step", "45", cwd=tmp_path)
    _kk("run", "--resume", "auto", "--out", "cut", "--task", "char_lm:CharLMTask", "-q", cwd=tmp_path)
    assert not compare_payloads(_final(tmp_path / "lm"), _final(tmp_path / "cut"))


@pytest.mark.slow
def test_the_default_task_exported_to_onnx_solves_puzzles_in_onnxruntime(tmp_path: Path) -> None:
    """Seed 000's Android path: train the Latin solver, `kktrain export` it, solve in onnxruntime."""
    import numpy as np
    import onnxruntime

    from kktrain.tasks import latin as L

    _kk("run", "-q", "--out", "lat", "--max-steps", "150", "-o", "task.size_min=4", "-o", "task.size_max=4",
        "-o", "task.val_sizes=[4]", "-o", "task.d_model=64", "-o", "task.layers=2", "-o", "task.val_puzzles=50",
        "-o", "val_every=150", "-o", 'task.modes=["STANDARD"]', "-o", "batch_size=64", cwd=tmp_path)
    proc = _kk("export", "lat", "--out", "latin.onnx", cwd=tmp_path)  # an installed task: no --task needed
    assert "checked: onnxruntime" in proc.stdout
    session = onnxruntime.InferenceSession(str(tmp_path / "latin.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    count = 20  # held-out puzzles (seeds the training data never used), half the cells shown
    seeds = np.uint64(987654321) + np.arange(count, dtype=np.uint64)
    puzzles = L.make_puzzles(seeds, np.full(count, 4), np.zeros(count, dtype=np.int64), np.full(count, 0.5), augment=True)
    clues, size, mode = puzzles["tokens"], puzzles["size"], puzzles["mode"]
    grid = clues.numpy().copy()
    for _ in range(16):  # one cell per pass: the most confident hidden cell of each grid
        hidden = grid == L.EMPTY
        if not hidden.any():
            break
        (logits,) = session.run(None, dict(zip(names, (grid, size.numpy(), mode.numpy()))))
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        confidence = np.where(hidden, probs.max(-1) / probs.sum(-1), -1.0).reshape(count, -1)
        best = confidence.argmax(1)
        for g in range(count):
            if hidden[g].any():
                r, c = divmod(int(best[g]), grid.shape[-1])
                grid[g, r, c] = int(logits[g, r, c].argmax())
    valid = L.is_valid_completion(torch.from_numpy(grid), clues, size, mode)
    assert valid.float().mean() >= 0.9, valid  # the trained model reached 1.0 valid_iter in torch

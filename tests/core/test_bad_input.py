"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, nothing touched.

Every case runs the real console script in a directory that already holds a finished run, and
checks that no file in it was created, changed or removed.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from kkcli import kk, tree_state

TINY = ["run", "--task", "tiny", "-q"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a finished tiny run ("done"), a corrupt and a foreign checkpoint, a file."""
    root = tmp_path_factory.mktemp("bad_input")
    kk(*TINY, "--out", "done", "--max-steps", "6", cwd=root, check=True)
    ck = root / "done" / "checkpoints" / "final.pt"
    corrupt = root / "corrupt.pt"
    data = bytearray(ck.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    shutil.copy(root / "done" / "checkpoints" / "final.pt.json", root / "corrupt.pt.json")
    (root / "garbage.pt").write_bytes(b"not a checkpoint at all")
    kk(*TINY, "--out", "wide", "--max-steps", "2", "-o", "task.hidden=32", cwd=root, check=True)

    class Evil:
        def __reduce__(self):
            return (print, ("code ran from a checkpoint!",))

    with open(root / "evil.pt", "wb") as f:
        pickle.dump({"format": "kktrain-checkpoint", "x": Evil()}, f)
    (root / "a_file").write_text("I am a file\n")
    (root / "bad.toml").write_text("batch_size = [unclosed\n")
    (root / "wrongtype.toml").write_text('batch_size = "many"\n')
    (root / "unknown.toml").write_text("batch_sise = 3\n")
    return root


CASES = {
    "unknown plugin": (["--plugin", "does-not-exist"], "plugin 'does-not-exist' is not installed"),
    "unknown core key": (["-o", "batch_sise=3"], "batch_sise"),
    "wrong type": (["-o", "batch_size=abc"], "batch_size"),
    "negative batch size": (["--batch-size", "-5"], "batch_size"),
    "zero max steps": (["--max-steps", "0"], "max_steps"),
    "negative grad clip": (["-o", "grad_clip=-1"], "grad_clip"),
    "-o without =": (["-o", "batch_size"], "KEY=VALUE"),
    "missing config file": (["--config", "nope.toml"], "does not exist"),
    "invalid toml": (["--config", "bad.toml"], "not valid TOML"),
    "wrong type in file": (["--config", "wrongtype.toml"], "batch_size"),
    "unknown key in file": (["--config", "unknown.toml"], "batch_sise"),
    "unknown task": (["--task", "nope"], "unknown task 'nope'"),
    "task module missing": (["--task", "no_such_module_xyz:make"], "cannot import module"),
    "unknown task option": (["-o", "task.hiden=3"], "hiden"),
    "plugin option without plugin": (["-o", "ema.decay=0.9"], "--plugin ema"),
    "corrupt checkpoint": (["--resume", "corrupt.pt", "--out", "new1"], "checksum mismatch"),
    "garbage checkpoint": (["--resume", "garbage.pt", "--out", "new2"], "failed verification"),
    "missing checkpoint": (["--resume", "missing.pt", "--out", "new3"], "does not exist"),
    "checkpoint of another model": (["--resume", "wide/checkpoints/final.pt", "--out", "new4", "-o", "task.hidden=16"], "another model"),
    "output path is a file": (["--out", "a_file"], "is a file"),
    "output under a file": (["--out", "a_file/sub"], "is a file"),
    "run dir already has checkpoints": (["--out", "done"], "--resume auto"),
    "cuda not available": (["--device", "cuda", "--out", "new5"], "CUDA is not available"),
    "bad env value": (["--out", "new6"], "batch_size"),
    "unknown device": (["--device", "tpu"], "tpu"),
    "not a number": (["--max-steps", "abc"], "abc"),
    "unknown flag": (["--bogus"], "--bogus"),
}
ENV = {"bad env value": {"KKTRAIN_BATCH_SIZE": "lots"}}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(workdir: Path, case: str) -> None:
    if case == "cuda not available" and torch.cuda.is_available():
        pytest.skip("the 'cuda not available' error cannot be provoked on a machine that has CUDA")
    args, needle = CASES[case]
    before = tree_state(workdir)
    proc = kk(*TINY, *args, cwd=workdir, env=ENV.get(case))
    after = tree_state(workdir)
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"{case}: exit {proc.returncode}\n{proc.stdout}\n{err}"
    assert "Traceback" not in err and "Traceback" not in proc.stdout
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{case}: expected one line, got:\n{err}"
    assert needle in err, f"{case}: {needle!r} not in {err!r}"
    assert before == after, f"{case}: files changed: {set(before) ^ set(after)}"


def test_checkpoint_with_code_is_refused_without_running_it(workdir: Path) -> None:
    shutil.copy(workdir / "evil.pt", workdir / "evil2.pt")
    # Give it a valid manifest, so only weights_only stands between the file and the code.
    from kktrain.checkpoint import FORMAT, FORMAT_VERSION, file_sha256

    p = workdir / "evil2.pt"
    (workdir / "evil2.pt.json").write_text(
        '{"format": "%s", "version": %d, "sha256": "%s", "bytes": %d, "step": 1, "kind": "step"}'
        % (FORMAT, FORMAT_VERSION, file_sha256(p), p.stat().st_size)
    )
    proc = kk(*TINY, "--resume", "evil2.pt", "--out", "new7", cwd=workdir)
    assert proc.returncode == 2
    assert "code ran" not in proc.stdout + proc.stderr
    assert "holds code or objects kktrain does not load" in proc.stderr and "weights_only" not in proc.stderr
    assert not (workdir / "new7").exists()

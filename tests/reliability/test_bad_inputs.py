"""The bad-input table: each case through the real CLI exits 2 with one line, no traceback, and leaves
the directory tree exactly as it was (issue 15). tests/core/test_bad_input.py has the first 27."""

from __future__ import annotations

from pathlib import Path

import pytest

from rel import TINY, kk

BIG = str(2**64)

CASES: dict[str, tuple[list[str], str]] = {
    # the issue's reproductions
    "betas >= 1": (["-o", "optimizer.betas=[1.0, 0.999]"], "betas"),
    "stop at step 0": (["--stop-at-step", "0"], "stop_at_step"),
    "seed beyond 2**63": (["--seed", BIG], "seed"),
    "negative seed": (["--seed", "-1"], "seed"),
    "task os:system": (["--task", "os:system"], "os:system"),
    "task os:getcwd": (["--task", "os:getcwd"], "not a task"),
    "task ':'": (["--task", ":"], "module:factory"),
    "batch size true": (["-o", "batch_size=true"], "batch_size"),
    "lr inf": (["-o", "optimizer.lr=inf"], "optimizer.lr"),
    "empty --out": (["--out", ""], "out"),
    "max steps 1e20": (["--max-steps", "1e20"], "--max-steps"),
    "max steps runs for ever": (["--max-steps", str(10**17)], "max_steps"),
    "resume auto in a directory that is not a run": (["--resume", "auto", "--out", "notarun"], "not a kktrain run"),
    # more values of the wrong kind
    "lr nan": (["-o", "optimizer.lr=nan"], "optimizer.lr"),
    "negative lr": (["-o", "optimizer.lr=-1"], "optimizer.lr"),
    "grad clip inf": (["-o", "grad_clip=inf"], "grad_clip"),
    "eps zero": (["-o", "optimizer.eps=0"], "optimizer.eps"),
    "unknown optimizer": (["-o", "optimizer.name=lion"], "optimizer.name"),
    "negative weight decay": (["-o", "optimizer.weight_decay=-0.1"], "weight_decay"),
    "momentum 1": (["-o", "optimizer.momentum=1.0"], "momentum"),
    "nesterov without sgd": (["-o", "optimizer.nesterov=true"], "nesterov"),
    "warmup ratio above 1": (["-o", "schedule.warmup_ratio=1.5"], "warmup_ratio"),
    "unknown schedule": (["-o", "schedule.name=linear"], "schedule.name"),
    "negative workers": (["-o", "data.workers=-1"], "data.workers"),
    "workers true": (["-o", "data.workers=true"], "data.workers"),
    "workers flag negative": (["--workers", "-2"], "data.workers"),
    "zero epochs": (["--epochs", "0"], "epochs"),
    "epochs beyond the bound": (["--epochs", str(10**8)], "epochs"),
    "keep_last 0": (["-o", "checkpoint.keep_last=0"], "keep_last"),
    "negative every_steps": (["-o", "checkpoint.every_steps=-1"], "every_steps"),
    "unknown best mode": (["-o", "checkpoint.best_mode=sideways"], "best_mode"),
    "log_every 0": (["-o", "log_every=0"], "log_every"),
    "grad_accum 0": (["-o", "grad_accum=0"], "grad_accum"),
    "threads 0": (["-o", "threads=0"], "threads"),
    "fractional seed": (["-o", "seed=1.5"], "seed"),
    "unknown matmul precision": (["-o", "matmul_precision=ultra"], "matmul_precision"),
    "task option below its bound": (["-o", "task.samples=1"], "samples"),
    "task option out of range": (["-o", "task.dropout=1.5"], "dropout"),
    "plugin option out of range": (["--plugin", "ema", "-o", "ema.decay=2"], "decay"),
    "plugin option true for a number": (["--plugin", "ema", "-o", "ema.decay=true"], "decay"),
    "task option true for a number": (["-o", "task.hidden=true"], "hidden"),
    "env value inf": (["--out", "new-env"], "optimizer.lr"),
    # paths, checkpoints, plugins
    "resume a missing file": (["--resume", "missing.pt", "--out", "new1"], "does not exist"),
    "resume a plain directory": (["--resume", "adir", "--out", "new2"], "checkpoint adir"),
    "resume with another task": (["--task", "latin", "--resume", "done/checkpoints/final.pt", "--out", "new3"], "--task tiny"),
    "plugin as a file path": (["--plugin", "../evil"], "not a plugin name"),
    "config is a directory": (["--config", "adir"], "is a directory"),
    "-o without a key": (["-o", "=3"], "KEY=VALUE"),
    "plugins.NAME not a table": (["-o", "plugins.ema=3"], "table of options"),
}
ENV = {"env value inf": {"KKTRAIN_OPTIMIZER__LR": "inf"}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    kk(*TINY, "--max-steps", "2", "--out", "done", cwd=root, check=True)
    (root / "notarun").mkdir()
    (root / "notarun" / "notes.txt").write_text("my files, not a run\n")
    (root / "adir").mkdir()
    (root / "adir" / "keep.txt").write_text("x\n")
    return root


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(workdir: Path, case: str) -> None:
    args, needle = CASES[case]
    before = _tree(workdir)
    proc = kk(*TINY, *args, cwd=workdir, **ENV.get(case, {}))
    assert _tree(workdir) == before, f"{case}: the directory tree changed"
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"{case}: exit {proc.returncode}\n{err}"
    assert "Traceback" not in err + proc.stdout, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), f"{case}: expected one line:\n{err}"
    assert needle in err, f"{case}: {needle!r} not in {err!r}"

"""A checkpoint or run directory from a stranger never chooses what code to import (issue 15, security).

The forged checkpoints are manifest-verified (the manifest is easy to forge: it is a checksum, not
a signature), so only the trust rules stand between the file and an import.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kktrain.checkpoint import write_checkpoint
from rel import TINY, kk, one_line_error

EVIL = '''
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("code from a checkpoint ran")

def make():
    from kktrain.tasks.tiny import make_task
    return make_task()

class Plugin:
    pass
'''


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sec")
    kk(*TINY, "--max-steps", "2", "--out", "run", cwd=root, check=True)
    return root / "run"


def _forge(src: Path, dst: Path, *, task: str | None = None, plugins: list[str] | None = None) -> None:
    payload = torch.load(src, weights_only=True)
    if task is not None:
        payload["config"]["task"] = task
        payload["task"]["name"] = task
    if plugins is not None:
        payload["config"]["plugins"] = plugins
    write_checkpoint(dst.parent, dst.name, payload, step=payload["step"], kind=payload["kind"])


@pytest.mark.parametrize("task", ["this:nothing", "evil:make", "os:abort", "code:interact"])
def test_a_forged_checkpoint_naming_code_is_refused_without_importing_it(base: Path, tmp_path: Path, task: str) -> None:
    (tmp_path / "evil.py").write_text(EVIL)
    _forge(base / "checkpoints" / "final.pt", tmp_path / "forged.pt", task=task)
    proc = kk("run", "--resume", "forged.pt", "--out", "new", "-q", cwd=tmp_path, timeout=60)
    line = one_line_error(proc, 2)
    assert "not signed by this machine" in line and f"--task {task}" in line, line
    assert "Beautiful is better" not in proc.stdout + proc.stderr  # `import this` prints the Zen
    assert not (tmp_path / "IMPORTED").exists() and not (tmp_path / "new").exists()


def test_a_forged_task_differing_from_the_one_given_is_refused(base: Path, tmp_path: Path) -> None:
    (tmp_path / "evil.py").write_text(EVIL)
    _forge(base / "checkpoints" / "final.pt", tmp_path / "forged.pt", task="evil:make")
    proc = kk("run", "--task", "tiny", "--resume", "forged.pt", "--out", "new", "-q", cwd=tmp_path)
    line = one_line_error(proc, 2)
    assert "is a run of task 'evil:make', not 'tiny'" in line, line
    assert not (tmp_path / "IMPORTED").exists()


def test_resume_auto_in_a_downloaded_run_dir_with_a_py_beside_it(base: Path, tmp_path: Path) -> None:
    run = tmp_path / "downloaded"
    shutil.copytree(base, run)
    (tmp_path / "evil.py").write_text(EVIL)
    (run / "evil.py").write_text(EVIL)
    _forge(base / "checkpoints" / "final.pt", run / "checkpoints" / "final.pt", task="evil:make")
    for p in (run / "checkpoints").glob("step_*"):
        p.unlink()
    proc = kk("run", "--resume", "auto", "--out", "downloaded", "-q", cwd=tmp_path)
    one_line_error(proc, 2)
    # Without a checkpoint, the run's config.toml (edited to name the code) is refused the same way.
    for p in (run / "checkpoints").iterdir():
        p.unlink()
    toml = (run / "config.toml").read_text().replace('task = "tiny"', 'task = "evil:make"')
    (run / "config.toml").write_text(toml)
    proc = kk("run", "--resume", "auto", "--out", "downloaded", "-q", cwd=tmp_path)
    line = one_line_error(proc, 2)
    assert "not signed by this machine" in line, line
    assert not (tmp_path / "IMPORTED").exists() and not (run / "IMPORTED").exists()


@pytest.mark.parametrize("plugin", ["evil:Plugin", "evil.Plugin", "../evil"])
def test_plugins_named_by_a_stranger_checkpoint_are_never_imported(base: Path, tmp_path: Path, plugin: str) -> None:
    (tmp_path / "evil.py").write_text(EVIL)
    _forge(base / "checkpoints" / "final.pt", tmp_path / "forged.pt", plugins=[plugin])
    proc = kk("run", "--resume", "forged.pt", "--out", "new", "-q", cwd=tmp_path)
    line = one_line_error(proc, 2)
    assert f"plugin '{plugin}'" in line, line
    assert not (tmp_path / "IMPORTED").exists() and not (tmp_path / "new").exists()


def test_the_users_own_run_resumes_its_module_task_without_naming_it(tmp_path: Path) -> None:
    """The other side of the trust model: a run this machine signed needs no --task."""
    (tmp_path / "mine.py").write_text("from kktrain.tasks.tiny import make_task as make\n")
    kk("run", "--task", "mine:make", "-q", "--max-steps", "2", "--out", "r", cwd=tmp_path, check=True)
    kk("run", "--resume", "auto", "-q", "--max-steps", "3", "--out", "r", cwd=tmp_path, check=True)

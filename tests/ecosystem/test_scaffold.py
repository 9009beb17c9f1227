"""``kktrain new-plugin``: the scaffold installs, is listed, and its generated tests pass."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ecosystem_env import IsolatedEnv, isolated_env  # noqa: F401 (fixture)
from kktrain import ConfigError
from kktrain.scaffold import plugin_names, scaffold

KKTRAIN = Path(sys.executable).parent / "kktrain"


def test_names():
    assert plugin_names("loss-logger") == {
        "name": "loss-logger", "dist": "kktrain-loss-logger", "package": "kktrain_loss_logger",
        "cls": "LossLoggerPlugin", "snake": "loss_logger", "kktrain_version": plugin_names("x")["kktrain_version"],
    }
    assert plugin_names("kktrain-lr-finder")["dist"] == "kktrain-lr-finder"
    for bad in ("Loss", "loss_logger", "-x", "x-", "a--b", "9lives", ""):
        with pytest.raises(ConfigError, match="is not valid"):
            plugin_names(bad)


def test_scaffold_files(tmp_path):
    target = tmp_path / "kktrain-lr-probe"
    written = scaffold("lr-probe", target)
    rel = sorted(str(p.relative_to(target)) for p in written)
    assert rel == ["README.md", "docs/lr-probe.md", "pyproject.toml", "src/kktrain_lr_probe/__init__.py", "tests/test_lr_probe.py"]
    project = tomllib.loads((target / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["kktrain"] == {"lr-probe": "kktrain_lr_probe:LrProbePlugin"}
    assert project["readme"] == "README.md"
    for path in written:
        if path.suffix == ".py":
            compile(path.read_text(), str(path), "exec")
        assert "$" not in path.read_text().replace("${", ""), f"unsubstituted placeholder in {path}"


def test_refuses_to_overwrite_an_existing_directory(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    proc = subprocess.run([str(KKTRAIN), "new-plugin", "fresh-one", "--dir", str(target)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "already exists" in proc.stderr
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_refuses_a_bad_or_taken_name(tmp_path):
    proc = subprocess.run([str(KKTRAIN), "new-plugin", "Bad_Name", "--dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2 and "is not valid" in proc.stderr and proc.stderr.count("\n") == 1
    from kktrain.manager import installed_entry_points

    taken = sorted(installed_entry_points())[0]
    proc = subprocess.run([str(KKTRAIN), "new-plugin", taken, "--dir", str(tmp_path / "y")], capture_output=True, text=True)
    assert proc.returncode == 2 and f"plugin name '{taken}' is taken" in proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_scaffolded_plugin_installs_and_its_tests_pass(isolated_env: IsolatedEnv, tmp_path: Path):
    env = isolated_env
    target = tmp_path / "kktrain-step-ticker"
    created = env.kktrain("new-plugin", "step-ticker", "--dir", str(target))
    assert "created plugin 'step-ticker'" in created.stdout
    env.install(target)
    listed = env.plugins()["step-ticker"]
    assert listed["error"] is None, listed["error"]
    assert (listed["distribution"], listed["version"]) == ("kktrain-step-ticker", "0.1.0")
    assert listed["hooks"] == ["on_step"] and listed["options"] == ["every"]
    source = env.root.parent / f"src-{target.name}"
    proc = env.run("-m", "pytest", str(source / "tests"), "-q", "-p", "no:cacheprovider", cwd=source)
    assert "5 passed" in proc.stdout, proc.stdout[-2000:]

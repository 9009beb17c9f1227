"""The repository ships separate distributions: the core alone works, each plugin adds exactly itself.

A child environment that has torch and kktrain's dependencies but none of kktrain's distributions
(see ecosystem_env.py, ``inherit_kktrain=False``) gets ``./core`` installed the way a user would
(a real wheel build, no editable install), then one plugin, then vcache with its package data.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

import kktrain
from ecosystem_env import REPO, IsolatedEnv

PLUGIN_DIRS = sorted(p for p in (REPO / "plugins").iterdir() if (p / "pyproject.toml").is_file())


def _project(folder: Path) -> dict:
    return tomllib.loads((folder / "pyproject.toml").read_text())["project"]


def test_every_builtin_plugin_folder_is_a_distribution():
    assert len(PLUGIN_DIRS) >= 12, PLUGIN_DIRS
    for folder in PLUGIN_DIRS:
        project = _project(folder)
        name = folder.name.removeprefix("kktrain-")
        package = "kktrain_" + name.replace("-", "_")
        assert project["name"] == folder.name
        assert list(project["entry-points"]["kktrain"]) == [name], "one plugin per distribution, named like its folder"
        assert project["entry-points"]["kktrain"][name].startswith(f"{package}:")
        assert (folder / "src" / package / "__init__.py").is_file(), f"{folder.name}: src/{package}/ is the package"
        assert (folder / "tests").is_dir() and list((folder / "tests").glob("test_*.py")), f"{folder.name}: its own tests/"
        assert project["readme"] == "README.md" and (folder / "README.md").is_file()
        assert not [d for d in project["dependencies"] if d.split("=")[0].split(">")[0].strip() == "torch"], (
            f"{folder.name}: torch comes with kktrain; a plugin must not pin it"
        )


def test_one_version_for_every_distribution():
    core = _project(REPO / "core")
    assert core["name"] == "kktrain" and core["version"] == kktrain.__version__
    for folder in PLUGIN_DIRS:
        project = _project(folder)
        assert project["version"] == kktrain.__version__, f"{folder.name} is at {project['version']}, the core at {kktrain.__version__}"
        assert f"kktrain=={kktrain.__version__}" in project["dependencies"], f"{folder.name}: depend on kktrain=={kktrain.__version__}"


def test_plugins_third_party_dependencies_live_in_their_own_distribution():
    core_deps = " ".join(_project(REPO / "core")["dependencies"])
    assert "bitsandbytes" not in core_deps and "psutil" not in core_deps
    assert any(d.startswith("bitsandbytes") for d in _project(REPO / "plugins" / "kktrain-optim8bit")["dependencies"])
    assert any(d.startswith("psutil") for d in _project(REPO / "plugins" / "kktrain-memory-monitor")["dependencies"])
    assert "optional-dependencies" not in _project(REPO / "core") or "bnb" not in _project(REPO / "core")["optional-dependencies"]


@pytest.mark.slow
def test_core_alone_then_one_plugin_then_vcache(tmp_path: Path):
    env = IsolatedEnv(tmp_path / "venv", inherit_kktrain=False)
    # Nothing of kktrain is visible before the install.
    probe = env.run("-c", "import importlib.util as u; print(u.find_spec('kktrain'))")
    assert probe.stdout.strip() == "None", probe.stdout

    env.install(REPO / "core")
    assert env.plugins() == {}
    run = env.kktrain("run", "--task", "tiny", "--max-steps", "3", "-q", "--out", str(tmp_path / "core-only"))
    assert json.loads((tmp_path / "core-only" / "summary.json").read_text())["status"] == "completed", run.stderr

    missing = env.kktrain("run", "--task", "tiny", "--plugin", "ema", "--out", str(tmp_path / "no"), check=False)
    assert missing.returncode == 2, missing.stderr
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in missing.stderr
    assert "plugin 'ema' is not installed" in lines[0] and "pip install kktrain-ema" in lines[0]
    assert not (tmp_path / "no").exists()
    no_report = env.kktrain("hw-report", check=False)
    assert no_report.returncode == 2 and "pip install kktrain-vcache" in no_report.stderr, no_report.stderr
    assert "hw-report" not in env.kktrain("--help").stdout.split("Commands:")[-1]

    # One plugin's folder adds exactly that plugin.
    env.install(REPO / "plugins" / "kktrain-ema")
    listed = env.plugins()
    assert sorted(listed) == ["ema"] and listed["ema"]["distribution"] == "kktrain-ema"
    assert listed["ema"]["version"] == kktrain.__version__
    env.kktrain("run", "--task", "tiny", "--plugin", "ema", "--max-steps", "4", "-q", "--out", str(tmp_path / "ema"))
    summary = json.loads((tmp_path / "ema" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["plugins"] == ["ema"]
    assert any(k.startswith("val_ema/") for k in summary["final"]), summary["final"]
    amp = env.kktrain("run", "--task", "tiny", "--plugin", "amp", check=False)
    assert amp.returncode == 2 and "pip install kktrain-amp" in amp.stderr

    # vcache from its folder: a real wheel carries the profiles (a link to hardware_profiles/ in
    # the repository) as package data, and adds `kktrain hw-report` through register_commands.
    env.install(REPO / "plugins" / "kktrain-vcache", with_paths=(REPO / "hardware_profiles",))
    installed = env.run("-c", "import kktrain_vcache, pathlib; print(pathlib.Path(kktrain_vcache.__file__).parent)").stdout.strip()
    assert str(env.root) in installed, "vcache must come from the child environment, not the repository"
    shipped = sorted(p.name for p in Path(installed, "hardware_profiles").iterdir())
    assert shipped == sorted(p.name for p in (REPO / "hardware_profiles").glob("*.toml"))
    assert not Path(installed, "hardware_profiles").is_symlink(), "the wheel holds real files"
    report = json.loads(env.kktrain("hw-report", "--json").stdout)
    assert report["match"]["cpu_profile"]["name"]
    assert sorted(env.plugins()) == ["ema", "vcache"]

"""``kktrain new-plugin``: the scaffold installs, is listed, and its generated tests pass."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ecosystem_env import IsolatedEnv, isolated_env  # noqa: F401 (fixture)
from kktrain import ConfigError
from kktrain.scaffold import plugin_names, scaffold


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
    assert rel == ["README.md", "pyproject.toml", "src/kktrain_lr_probe/__init__.py", "tests/test_lr_probe.py"]
    project = tomllib.loads((target / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["kktrain"] == {"lr-probe": "kktrain_lr_probe:LrProbePlugin"}
    assert project["readme"] == "README.md"
    for path in written:
        if path.suffix == ".py":
            compile(path.read_text(), str(path), "exec")
        assert "$" not in path.read_text().replace("${", ""), f"unsubstituted placeholder in {path}"


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the real CLI entry point in-process: (exit code, stdout, stderr)."""
    from kktrain.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_refuses_to_overwrite_an_existing_directory(tmp_path, capsys):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    code, _, err = _cli(capsys, "new-plugin", "fresh-one", "--dir", str(target))
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "already exists" in err
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_default_directory_is_the_distribution_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    from kktrain.cli import main

    main(["new-plugin", "lr-probe"])
    assert (tmp_path / "kktrain-lr-probe" / "src" / "kktrain_lr_probe" / "__init__.py").is_file()
    assert "pip install --no-deps -e" in capsys.readouterr().out
    code, _, err = _cli(capsys, "new-plugin", "lr-probe")
    assert code == 2 and "already exists" in err


def test_refuses_a_bad_or_taken_name(tmp_path, capsys):
    code, _, err = _cli(capsys, "new-plugin", "Bad_Name", "--dir", str(tmp_path / "x"))
    assert code == 2 and "is not valid" in err and err.count("\n") == 1
    from kktrain.manager import installed_entry_points

    taken = sorted(installed_entry_points())[0]
    code, _, err = _cli(capsys, "new-plugin", taken, "--dir", str(tmp_path / "y"))
    assert code == 2 and f"plugin name '{taken}' is taken" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_scaffolded_plugin_installs_and_its_tests_pass(isolated_env: IsolatedEnv, tmp_path: Path):
    env = isolated_env
    target = tmp_path / "kktrain-step-ticker"
    scaffold("step-ticker", target)  # the CLI path is tested in-process above
    env.install(target)
    listed = env.plugins()["step-ticker"]
    assert listed["error"] is None, listed["error"]
    assert (listed["distribution"], listed["version"]) == ("kktrain-step-ticker", "0.1.0")
    assert listed["hooks"] == ["on_step"] and listed["options"] == ["every"]
    source = env.root.parent / f"src-{target.name}"
    proc = env.run("-m", "pytest", str(source / "tests"), "-q", "-p", "no:cacheprovider", cwd=source)
    assert "5 passed" in proc.stdout, proc.stdout[-2000:]

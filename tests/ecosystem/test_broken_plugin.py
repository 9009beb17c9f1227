"""A third-party plugin whose import fails: named with its distribution, one line, exit 2.

A real distribution is pip-installed into an isolated environment; its module raises ImportError
(as a plugin with a missing native dependency does). Unrelated runs must not be affected: plugins
are imported only when enabled.
"""

from __future__ import annotations

from pathlib import Path

from ecosystem_env import IsolatedEnv, isolated_env  # noqa: F401 (fixture)


def _broken_distribution(root: Path) -> Path:
    src = root / "kktrain-broken"
    (src / "kktrain_broken").mkdir(parents=True)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "kktrain-broken"\nversion = "0.3.1"\n\n'
        '[project.entry-points.kktrain]\nbroken = "kktrain_broken:BrokenPlugin"\n'
    )
    (src / "kktrain_broken" / "__init__.py").write_text('raise ImportError("needs libfoo.so, which is not installed")\n')
    return src


def test_a_plugin_that_fails_to_import_is_named_with_its_distribution(isolated_env: IsolatedEnv, tmp_path: Path):
    env = isolated_env
    env.install(_broken_distribution(tmp_path))

    run = env.kktrain("run", "--task", "tiny", "-q", "--plugin", "broken", "--out", str(tmp_path / "r"), check=False)
    assert run.returncode == 2, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "plugin 'broken' from distribution kktrain-broken 0.3.1 failed to load" in lines[0]
    assert "needs libfoo.so" in lines[0] and "--plugin broken" in lines[0]
    assert not (tmp_path / "r").exists()

    listed = env.plugins()["broken"]
    assert listed["version"] == "0.3.1" and "failed to load" in listed["error"]

    ok = env.kktrain("run", "--task", "tiny", "-q", "--max-steps", "2", "--out", str(tmp_path / "ok"))
    assert ok.returncode == 0 and (tmp_path / "ok" / "summary.json").exists()

    # The command line still works: `kktrain --help` imports only plugins that add commands.
    shown = env.kktrain("--help")
    assert "Usage:" in shown.stdout and "run" in shown.stdout and not shown.stderr.strip(), shown.stderr

"""A third-party plugin, installed as its own distribution, is a first-class kktrain plugin.

examples/kktrain-grad-noise is pip-installed into an isolated environment (see ecosystem_env.py: a
child venv layered on this one, so torch is never downloaded or resolved), then:
``kktrain plugins --json`` lists it with its version, ``kktrain run --plugin grad-noise`` uses it,
its own tests pass with only kktrain's fixtures, kktrain's contract suite picks it up, and
``pip uninstall`` removes it from ``kktrain plugins`` again. The parent environment never sees it.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

from ecosystem_env import REPO, IsolatedEnv, isolated_env  # noqa: F401 (fixture)
from kktrain.manager import installed_entry_points

EXAMPLE = REPO / "examples" / "kktrain-grad-noise"
PLUGIN = "grad-noise"


def _project() -> dict:
    return tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]


def test_example_declares_its_entry_point():
    project = _project()
    assert project["entry-points"]["kktrain"] == {PLUGIN: "kktrain_grad_noise:GradNoisePlugin"}
    assert project["dependencies"] == ["kktrain>=0.1"], "the example must not pin torch (it would be resolved)"


def test_third_party_plugin_install_run_test_uninstall(isolated_env: IsolatedEnv, tmp_path: Path):
    env = isolated_env
    project = _project()

    env.install(EXAMPLE)
    installed = sorted(p.name for p in env.site_packages.iterdir())
    assert not [n for n in installed if n.startswith(("torch", "kktrain-"))], installed  # torch, kktrain not reinstalled
    assert "kktrain_grad_noise" in installed

    # `kktrain plugins --json` lists it with its distribution and version.
    listed = env.plugins()[PLUGIN]
    assert listed["error"] is None, listed["error"]
    assert (listed["distribution"], listed["version"]) == (project["name"], project["version"])
    assert listed["entry_point"] == "kktrain_grad_noise:GradNoisePlugin"
    assert listed["description"].startswith("Adds annealed Gaussian noise")
    assert {"on_after_backward", "on_train_end"} <= set(listed["hooks"])
    assert listed["options"] == ["eta", "gamma", "seed"]

    # Isolation: this (the parent) environment does not see the child's install.
    assert PLUGIN not in installed_entry_points()

    # `kktrain run --plugin grad-noise` uses it: summary section, metrics column, log event.
    out = tmp_path / "run"
    env.kktrain("run", "--task", "tiny", "--plugin", PLUGIN, "-o", "grad-noise.eta=0.3", "-o", "log_every=2",
                "--max-steps", "6", "--out", str(out), "-q")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["plugins"] == [PLUGIN]
    assert summary[PLUGIN]["steps_noised"] == 6
    assert summary[PLUGIN]["eta"] == 0.3
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:
        assert math.isclose(r["grad_noise/std"], math.sqrt(0.3 / r["step"] ** 0.55), rel_tol=1e-12)
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert "grad_noise_start" in events
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["plugins"]["enabled"] == [PLUGIN]
    assert config["plugins"][PLUGIN]["eta"] == 0.3

    # Its own tests pass, using only kktrain's fixtures (from the pytest11 entry point).
    source = env.source_copy(EXAMPLE)
    own = env.run("-m", "pytest", str(source / "tests"), "-q", "-p", "no:cacheprovider", cwd=source)
    assert " passed" in own.stdout and "failed" not in own.stdout, own.stdout[-2000:]

    # kktrain's contract suite, run in that environment, checks the third-party plugin too.
    contract = env.run("-m", "pytest", str(REPO / "tests" / "contract" / "test_plugin_contract.py"),
                       "-q", "-p", "no:cacheprovider", "-k", PLUGIN, cwd=tmp_path)
    assert "5 passed" in contract.stdout, contract.stdout[-2000:]

    # pip uninstall removes it from `kktrain plugins`.
    env.pip("uninstall", "-y", "--quiet", project["name"])
    after = env.plugins()
    assert PLUGIN not in after and "ema" in after, sorted(after)

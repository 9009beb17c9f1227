"""Structural rules of the code base that review alone would let slip."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "core" / "kktrain"


def _private_trainer_uses(path: Path) -> list[str]:
    """``tr._x`` / ``trainer._x`` / ``self.tr._x`` in a file: reaching into the Trainer's internals."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else None
            if name in ("tr", "trainer"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}.{node.attr}")
    return found


def test_loop_cli_and_plugins_use_only_the_trainers_public_api():
    files = [CORE / "loop.py", CORE / "cli.py", CORE / "progress.py", *sorted((REPO / "plugins").glob("kktrain-*/src/**/*.py"))]
    bad = [hit for f in files for hit in _private_trainer_uses(f)]
    assert not bad, "use the Trainer's public attributes instead:\n" + "\n".join(bad)


def test_batch_helpers_do_not_import_the_trainer():
    # batch.py and data.py sit below the trainer: importing it would bring back the import cycle.
    for name in ("batch.py", "data.py", "checkpoint.py"):
        tree = ast.parse((CORE / name).read_text(encoding="utf-8"))
        modules = [n.module for n in tree.body if isinstance(n, ast.ImportFrom)]  # top level only, not TYPE_CHECKING
        assert not {"kktrain.trainer", "kktrain.loop"} & set(modules), f"{name} imports the trainer or the loop at run time"


def test_the_core_names_no_builtin_plugin_in_its_code():
    # Plugins are found by entry point; the core's behaviour never depends on a plugin's name.
    # (cli.COMMAND_DISTRIBUTIONS only says which distribution to install for a missing command.)
    names = [p.name.removeprefix("kktrain-") for p in (REPO / "plugins").glob("kktrain-*")]
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        if path.name in ("testing.py", "scaffold.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not offenders, offenders

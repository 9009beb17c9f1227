"""The plugin contract, run over every installed plugin (builtin and third-party, Composer-style).

The plugins are discovered at collection time from the ``kktrain`` entry-point group, so a
distribution installed next to kktrain is checked by the same tests as the builtin ones:

    pytest tests/contract -q                       # all installed plugins
    pytest tests/contract -q -k grad-noise         # one

Each plugin trains the tiny task for a few steps (see ``kktrain.testing.CONTRACT_*``); a plugin
that needs special settings to run on the CPU declares them as ``contract_options`` (its own
option keys) and ``contract_config`` (core keys) class attributes (docs/writing-plugins.md).
No plugin is skipped: one whose package does not import fails with "plugin 'NAME' failed to load".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kktrain.manager import _dist_of, installed_entry_points
from kktrain.testing import (
    check_plugin_imports,
    check_plugin_options,
    check_plugin_resume,
    check_plugin_state,
    load_installed_plugin,
)

REPO = Path(__file__).resolve().parents[2]
PLUGINS = sorted(installed_entry_points())
BUILTIN_DIST = "kktrain"


def test_some_plugins_are_installed():
    assert PLUGINS, "no plugin in the 'kktrain' entry-point group: is kktrain installed (pip install -e .)?"


@pytest.mark.parametrize("name", PLUGINS)
def test_options_are_strict_and_named(name):
    check_plugin_options(name)


@pytest.mark.parametrize("name", PLUGINS)
def test_imports_only_the_public_api(name):
    check_plugin_imports(name)


@pytest.mark.parametrize("name", PLUGINS)
def test_state_survives_checkpoint_round_trip(name, tmp_path):
    check_plugin_state(tmp_path, name)


@pytest.mark.parametrize("name", PLUGINS)
def test_resume_is_bit_exact(name, tmp_path):
    check_plugin_resume(tmp_path, name)


@pytest.mark.parametrize("name", PLUGINS)
def test_has_docs(name):
    """Builtin: docs/plugins/<name>.md with an options table; third-party: a README in its metadata."""
    cls = load_installed_plugin(name)
    dist, version = _dist_of(installed_entry_points()[name])
    if dist == BUILTIN_DIST:
        page = REPO / "docs" / "plugins" / f"{name}.md"
        if not page.is_file():
            pytest.fail(f"plugin '{name}' has no docs page: write {page.relative_to(REPO)} (see docs/writing-plugins.md)", pytrace=False)
        text = page.read_text(encoding="utf-8")
        assert text.lstrip().startswith("#"), f"{page.name}: start with a '# {name}' title"
        fields = list(getattr(cls.Options, "model_fields", {})) if getattr(cls, "Options", None) is not None else []
        missing = [f for f in fields if f"`{f}`" not in text and f"| {f} " not in text]
        assert not missing, f"{page.name}: options {missing} are not in its options table"
    else:
        from importlib.metadata import distribution

        meta = distribution(dist).metadata
        description = meta.get_payload() if hasattr(meta, "get_payload") else ""  # type: ignore[attr-defined]
        description = description or meta.get("Description") or ""
        if len(description.strip()) < 80:
            pytest.fail(
                f"plugin '{name}' (distribution {dist} {version}) ships no README: set readme = \"README.md\" in its pyproject.toml",
                pytrace=False,
            )

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

import pytest

from kktrain.manager import installed_entry_points
from kktrain.testing import (
    check_plugin_docs,
    check_plugin_imports,
    check_plugin_options,
    check_plugin_resume,
    check_plugin_state,
)

PLUGINS = sorted(installed_entry_points())


def test_some_plugins_are_installed():
    assert PLUGINS, "no plugin in the 'kktrain' entry-point group: install some (make install, or pip install -e plugins/kktrain-ema)"


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
    """Every plugin's distribution ships its README: a title and its options table."""
    check_plugin_docs(name)

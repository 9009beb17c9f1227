"""on_hw_detect recommendations: invalid values are one-line errors; unknown keys are ignored with a warning."""

from __future__ import annotations

import pytest

from kktrain import PluginError, hookimpl


class Recommends:
    name = "recommends"

    def __init__(self, changes):
        self.changes = changes

    @hookimpl
    def on_hw_detect(self, hw, config, user_set):
        return self.changes


def test_an_invalid_recommendation_is_a_one_line_error_naming_plugin_and_key(kktrain_run):
    with pytest.raises(PluginError) as err:
        kktrain_run(plugins=[Recommends({"batch_size": -3})], steps=1)
    msg = str(err.value)
    assert "\n" not in msg and "plugin 'recommends' set batch_size = -3" in msg and "greater than" in msg


def test_unknown_recommendation_keys_are_ignored_with_a_warning(kktrain_run):
    out = kktrain_run(plugins=[Recommends({"dat.workers": 4, "batch_size": 8, "amp.dtype": "bf16"})], steps=2)
    assert out.trainer.config.batch_size == 8
    log = (out.run_dir / "log.jsonl").read_text()
    assert '"config_change_ignored"' in log and "dat.workers" in log
    assert "amp.dtype" not in log  # an installed plugin that is not enabled: silently not applicable

"""Config layering (defaults < task < file < env < flags), provenance, plugin and task tables."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from kktrain.config import Layered, build_run_config, normalise_key, parse_overrides, parse_value, read_env, split_layers
from kktrain.errors import ConfigError


def test_parse_value_uses_toml_syntax() -> None:
    assert parse_value("3") == 3 and parse_value("3e-4") == 3e-4 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("bf16") == "bf16" and parse_value('"x y"') == "x y"
    # bare words in a list, as a shell leaves -o task.modes=[STANDARD,NEGATIVE]: strings, numbers stay numbers
    assert parse_value("[STANDARD]") == ["STANDARD"] and parse_value("[STANDARD, 3]") == ["STANDARD", 3]
    assert parse_value("[a,,b]") == "[a,,b]" and parse_value("[[a]]") == "[[a]]"


def test_later_layers_win_and_remember_their_source() -> None:
    layered = Layered()
    layered.add({"batch_size": 8, "optimizer.lr": 0.1}, "task")
    layered.add({"batch_size": 16}, "file a.toml")
    layered.add(read_env({"KKTRAIN_BATCH_SIZE": "32", "KKTRAIN_OPTIMIZER__LR": "0.5", "HOME": "/x"}), "env")
    layered.add(parse_overrides(["batch_size=64"]), "-o")
    cfg = build_run_config(layered)
    assert cfg.batch_size == 64 and cfg.optimizer.lr == 0.5
    assert layered.sources["batch_size"] == "-o" and layered.sources["optimizer.lr"] == "env"
    assert "batch_size" in layered.user_set() and "optimizer.lr" in layered.user_set()


def test_plugin_keys_route_to_plugin_tables_and_enabled_is_a_union() -> None:
    layered = Layered()
    layered.add({"plugins.enabled": ["ema"], "plugins.ema.decay": 0.9}, "file")
    layered.add({"plugins": ["amp"]}, "flag")
    layered.add(parse_overrides(["ema.decay=0.99", "amp.dtype=bf16", "task.size=5"]), "-o")
    core, plugins, task = split_layers(layered)
    assert core["plugins"] == ["ema", "amp"]
    assert plugins == {"ema": {"decay": 0.99}, "amp": {"dtype": "bf16"}}
    assert task == {"size": 5}


def test_key_normalisation() -> None:
    assert normalise_key("batch-size") == "batch_size"
    assert normalise_key("task.size") == "task_options.size"
    assert normalise_key("early_stopping.patience", ["early-stopping"]) == "plugins.early-stopping.patience"
    assert normalise_key("plugins") == "plugins.enabled"


def test_unknown_keys_name_the_problem() -> None:
    layered = Layered()
    layered.add({"ema.decay": 0.9}, "-o")
    with pytest.raises(ConfigError, match="--plugin ema"):
        split_layers(layered)
    layered = Layered()
    layered.add({"optimizer.lrr": 0.9}, "-o")
    with pytest.raises(ConfigError, match="lrr"):
        build_run_config(layered)


def test_config_show_reports_sources(cli, tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('seed = 7\n[optimizer]\nlr = 0.002\n[data]\nworkers = 1\n')
    proc = cli("config", "show", "--task", "tiny", "--config", "c.toml", "-o", "grad_accum=2", "--batch-size", "8",
               env={"KKTRAIN_LOG_EVERY": "3", "COLUMNS": "200"}, check=True)
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 3:
            rows[cells[0]] = (cells[1], cells[2])
    assert rows["seed"] == ("7", "file c.toml")
    assert rows["optimizer.lr"] == ("0.002", "file c.toml")
    assert rows["grad_accum"] == ("2", "-o")
    assert rows["batch_size"] == ("8", "flag")
    assert rows["log_every"] == ("3", "env KKTRAIN_LOG_EVERY")
    assert rows["max_steps"][1] == "task" and rows["optimizer.weight_decay"] == ("0.01", "default")


def test_config_show_toml_round_trips_into_a_run(cli, tmp_path: Path) -> None:
    proc = cli("config", "show", "--task", "tiny", "--toml", "-o", "batch_size=8", check=True)
    (tmp_path / "eff.toml").write_text(proc.stdout)
    data = tomllib.loads(proc.stdout)
    assert data["batch_size"] == 8 and data["plugins"]["enabled"] == [] and data["task_options"]["hidden"] == 16
    run = cli("run", "--config", "eff.toml", "-q", "--out", "r", check=True)
    assert run.returncode == 0
    saved = tomllib.loads((tmp_path / "r" / "config.toml").read_text())
    assert saved["batch_size"] == 8 and saved["task"] == "tiny"


def test_grad_clip_zero_or_off_switches_clipping_off() -> None:
    from kktrain import RunConfig

    assert RunConfig(grad_clip=0).grad_clip is None
    layered = Layered()
    layered.add(parse_overrides(["grad_clip=off"]), "-o")
    assert build_run_config(layered).grad_clip is None
    assert RunConfig(grad_clip=0.5).grad_clip == 0.5

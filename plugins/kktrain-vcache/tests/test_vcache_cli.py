"""vcache through the real command line: `config show` credits its changes, `hw-report` runs."""

from __future__ import annotations

import json

from kktrain import RunConfig, detect_hardware
from kktrain_vcache.profiles import load_profiles, plan


def test_config_show_includes_hardware_profile_changes(kktrain_cli) -> None:
    proc = kktrain_cli("config", "show", "--task", "tiny", "--plugin", "vcache", env={"COLUMNS": "200"}, check=True)
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 3:
            rows[cells[0]] = (cells[1], cells[2])
    changed = {k for k, v in rows.items() if v[1] == "plugin vcache"}
    # What this machine's profile asks for, computed directly (core keys only: no plugin enabled).
    expected = plan(detect_hardware(), RunConfig(task="tiny", batch_size=32, plugins=["vcache"]), load_profiles())
    assert changed == {c.key for c in expected.changes if "." not in c.key or c.key.startswith("data.")}


def test_hw_report_command(kktrain_cli) -> None:
    text = kktrain_cli("hw-report", check=True).stdout
    assert "Detected hardware" in text and "Profiles (training on" in text
    data = json.loads(kktrain_cli("hw-report", "--json", "--device", "cpu", check=True).stdout)
    assert data["hardware"]["cpu"]["threads"] >= 1
    assert data["match"]["cpu_profile"]["name"]
    bad = kktrain_cli("hw-report", "--profiles-dir", "no/such/dir")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr

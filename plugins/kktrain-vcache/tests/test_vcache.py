"""The vcache plugin: concrete config updates from the matching hardware profile."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pluggy
import pytest
from pydantic import ValidationError

from kktrain import GpuInfo, HardwareInfo, hookspecs
from kktrain_vcache import VCachePlugin
from kktrain_vcache.profiles import ProfileError, UnknownProfileError

from vcache_helpers import Config as _Config
from vcache_helpers import Data, machine


def Config(**values):  # noqa: N802
    """The shared test config with this plugin enabled unless told otherwise."""
    return _Config(**{"plugins": ["vcache"], **values})


@pytest.fixture(autouse=True)
def no_user_profile_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own KKTRAIN_HW_PROFILES must not change what these tests see.
    monkeypatch.delenv("KKTRAIN_HW_PROFILES", raising=False)


def make(**options: object) -> VCachePlugin:
    return VCachePlugin(VCachePlugin.Options(**options))


def test_5600x3d_on_cpu() -> None:
    updates = make().on_hw_detect(hw=machine("ryzen5_5600x3d"), config=Config(), user_set=frozenset())
    assert updates == {
        "batch_size": 160,  # 128 + 32, the seed's V-Cache boost
        "data.workers": 8,  # cores + 2 = the seed's 8 on a 6-core 5600X3D
        "data.prefetch_factor": 6,
        "data.persistent_workers": True,
        "threads": 6,
    }  # amp/compile are not enabled, so none of their keys


def test_7800x3d_with_amp_and_compile() -> None:
    config = Config(batch_size=64, plugins=["vcache", "amp", "compile"])
    updates = make().on_hw_detect(hw=machine("ryzen7_7800x3d"), config=config, user_set=frozenset())
    assert updates["batch_size"] == 96
    assert updates["data.workers"] == 10
    assert updates["threads"] == 8
    assert updates["amp.dtype"] == "bf16"  # Zen 4 has AVX512_BF16
    assert (updates["compile.cpp_wrapper"], updates["compile.onednn"]) == (True, True)


def test_5600x3d_without_amp_plugin_gets_no_amp_or_compile_keys() -> None:
    updates = make().on_hw_detect(hw=machine("ryzen7_7800x3d"), config=Config(), user_set=frozenset())
    assert not any(key.startswith(("amp.", "compile.")) for key in updates)


def test_cuda_run_takes_gpu_recommendations() -> None:
    gpu = GpuInfo(0, "NVIDIA H100 80GB HBM3", (9, 0), 80 << 30, True, "hopper")
    hw = dataclasses.replace(machine("ryzen5_5600x3d"), gpus=(gpu,))
    config = Config(plugins=["vcache", "amp"])
    updates = make().on_hw_detect(hw=hw, config=config, user_set=frozenset())
    assert updates["amp.dtype"] == "bf16"
    assert updates["matmul_precision"] == "high"
    assert updates["data.workers"] == 8
    assert "batch_size" not in updates  # GPU memory, not L3, bounds the batch on cuda


def test_never_returns_a_key_the_user_set() -> None:
    plugin = make()
    config = Config(batch_size=256, plugins=["vcache", "amp"])
    user_set = frozenset({"batch_size", "threads", "plugins.amp.dtype"})  # the core's spellings
    updates = plugin.on_hw_detect(hw=machine("ryzen7_7800x3d"), config=config, user_set=user_set)
    assert not {"batch_size", "threads", "amp.dtype"} & set(updates)
    assert updates["data.workers"] == 10
    assert not {"batch_size", "threads", "amp.dtype"} & {c.key for c in plugin.plan.changes}


def test_user_set_zero_workers_drops_prefetch() -> None:
    # With the user's workers = 0 kept by the core, prefetch_factor/persistent_workers would make
    # torch's DataLoader raise, so the plugin does not ask for them.
    updates = make().on_hw_detect(
        hw=machine("ryzen5_5600x3d"), config=Config(), user_set=frozenset({"data.workers"})
    )
    assert "data.prefetch_factor" not in updates
    assert "data.persistent_workers" not in updates


def test_force_profile_by_name() -> None:
    plugin = make(profile="zen3_vcache")
    updates = plugin.on_hw_detect(hw=machine("this_machine"), config=Config(), user_set=frozenset())
    assert plugin.plan.match.cpu.profile.name == "zen3_vcache"
    assert updates["batch_size"] == 160
    assert updates["data.workers"] == 4  # cores + 2 on this 2-core machine


def test_unknown_profile_name_fails_at_set_up() -> None:
    with pytest.raises(UnknownProfileError, match="unknown hardware profile 'zen9'; known profiles: .*zen4"):
        make(profile="zen9")


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        VCachePlugin.Options(profil="zen3")


def test_dry_run_changes_nothing() -> None:
    plugin = make(dry_run=True)
    assert plugin.on_hw_detect(hw=machine("ryzen5_5600x3d"), config=Config(), user_set=frozenset()) is None
    assert plugin.plan.updates["batch_size"] == 160  # what it would set, logged at on_train_start


def test_profiles_dir_option(tmp_path: Path) -> None:
    (tmp_path / "mine.toml").write_text(
        'name = "my_box"\ndescription = "my workstation"\n[match]\nvendor = "intel"\nfamilies = ["intel_emeraldrapids"]\n'
        "[recommend]\n# tested: 3 workers\ndata.workers = 3\n"
    )
    plugin = make(profiles_dir=[str(tmp_path)])
    updates = plugin.on_hw_detect(hw=machine("this_machine"), config=Config(), user_set=frozenset())
    assert plugin.plan.match.cpu.profile.name == "my_box"
    assert updates == {"data.workers": 3}


def test_broken_profile_in_profiles_dir_fails_at_set_up(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\ndescription = "x"\n[recommend]\ndata.wrkers = 3\n')
    with pytest.raises(ProfileError, match=re.escape(f"{bad}: recommend.data.wrkers: unknown key")):
        make(profiles_dir=[str(tmp_path)])


def test_env_profile_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "zen3_vcache.toml").write_text(
        'name = "zen3_vcache"\ndescription = "mine"\n[match]\nfamilies = ["zen3_vcache"]\n'
        "[recommend.on_cpu]\n# measured on my box\nbatch_size_scale = 1.5\n"
    )
    monkeypatch.setenv("KKTRAIN_HW_PROFILES", str(tmp_path))
    updates = make().on_hw_detect(hw=machine("ryzen5_5600x3d"), config=Config(), user_set=frozenset())
    assert updates == {"batch_size": 192}


def test_hook_on_hw_detect_through_pluggy() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(make(), name="vcache")
    results = pm.hook.on_hw_detect(hw=machine("ryzen5_5600x3d"), config=Config(), user_set=frozenset())
    assert results == [
        {
            "batch_size": 160,
            "data.workers": 8,
            "data.prefetch_factor": 6,
            "data.persistent_workers": True,
            "threads": 6,
        }
    ]


def test_nothing_to_change_returns_none() -> None:
    config = Config(data=Data(workers=1, persistent_workers=True), threads=4)
    result = make().on_hw_detect(hw=machine("graviton2_m6g"), config=config, user_set=frozenset())
    assert result is None


def test_a_run_logs_the_profile_and_a_dry_run_changes_nothing(kktrain_run):
    """Against this machine: the matched profile is logged and in the summary; dry_run only logs."""
    dry = kktrain_run(plugins=["vcache"], options={"vcache.dry_run": True}, steps=2)
    events = [e["event"] for e in dry.summary["events"]]
    assert "vcache_profile" in events
    assert dry.summary["vcache"]["dry_run"] is True and dry.summary["vcache"]["profiles"]
    assert dry.trainer.config_sources.get("threads") is None  # nothing applied
    if dry.summary["vcache"]["changes"]:
        assert "vcache_would_set" in events
    real = kktrain_run(plugins=["vcache"], steps=2)
    for change in real.summary["vcache"]["changes"]:
        assert real.trainer.config_sources.get(change["key"], "").startswith("plugin vcache") or "." in change["key"]

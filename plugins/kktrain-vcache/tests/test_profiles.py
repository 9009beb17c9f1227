"""Hardware profiles (the vcache plugin's): loading, matching, recommendations, the report."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import re
import tomllib
from pathlib import Path

import pytest

from kktrain import GpuInfo, HardwareInfo
from kktrain_vcache import profiles as hardware
from kktrain_vcache.profiles import (
    HardwareError,
    ProfileError,
    UnknownProfileError,
    compute_recommendations,
    concrete_recommendations,
    device_kind_of,
    evaluate_expression,
    load_profile_file,
    load_profiles,
    match_profile,
    plan,
    render_report,
)

from vcache_helpers import REPO, Config, Data, machine, sysctl_machine

MIB = 1 << 20
NO_ENV: dict[str, str] = {}


def builtin() -> list[hardware.HardwareProfile]:
    return load_profiles(env=NO_ENV)


# Compute capability -> architecture, as the core's detection names them.
ARCHS = {(6, 0): "pascal", (7, 0): "volta", (7, 5): "turing", (8, 0): "ampere", (8, 9): "ada", (9, 0): "hopper",
         (10, 0): "blackwell"}


def with_gpu(hw: HardwareInfo, name: str, cc: tuple[int, int], gib: int = 80) -> HardwareInfo:
    gpu = GpuInfo(0, name, cc, gib << 30, cc >= (8, 0), ARCHS[cc])
    return dataclasses.replace(hw, gpus=(gpu,))


# ----------------------------------------------------------------------------------------------
# Shipped profiles
# ----------------------------------------------------------------------------------------------

SHIPPED = sorted(Path(str(p)) for p in (importlib.resources.files("kktrain_vcache") / "hardware_profiles").iterdir() if p.name.endswith(".toml"))
ALLOWED_KEYS = {
    "batch_size_delta", "batch_size_scale", "data.workers", "data.prefetch_factor", "data.pin_memory",
    "data.persistent_workers", "threads", "matmul_precision", "amp.dtype", "compile.cpp_wrapper",
    "compile.onednn", "compile.mode", "mps-guard.memory_limit_gb",
}  # fmt: skip


def test_every_family_the_brief_names_has_a_profile() -> None:
    names = {p.name for p in builtin()}
    assert names == {
        "zen3_vcache", "zen4_vcache", "zen4", "zen3", "intel", "intel_amx", "apple_m", "nvidia_volta",
        "nvidia_turing", "nvidia_ampere", "nvidia_ada", "nvidia_hopper", "generic_cpu",
    }  # fmt: skip


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_profile_validates(path: Path) -> None:
    profile = load_profile_file(path)
    assert profile.name == path.stem
    for kind in ("cpu", "cuda", "mps"):
        assert set(profile.recommend.for_device(kind)) <= ALLOWED_KEYS


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_profile_explains_every_recommendation(path: Path) -> None:
    lines = path.read_text().splitlines()
    section = ""
    for number, line in enumerate(lines):
        if line.startswith("["):
            section = line
        elif section.startswith("[recommend") and re.match(r"^[a-z]", line):
            above = lines[number - 1]
            assert above.startswith("# "), f"{path.name}:{number + 1}: {line!r} needs a rationale comment"


def test_builtin_profiles_load_from_the_package_data() -> None:
    assert {Path(p.source).name for p in builtin()} == {p.name for p in SHIPPED}


# ----------------------------------------------------------------------------------------------
# User profiles and errors
# ----------------------------------------------------------------------------------------------

GOOD = 'name = "mine"\ndescription = "test"\n[match]\nvendor = "amd"\nfamilies = ["zen3_vcache"]\nmin_l3_mb = 96\n'


def write_profile(folder: Path, filename: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD + "[recommend]\ndata.wrkers = 3\n", "recommend.data.wrkers: unknown key"),
        (GOOD + "[recommend]\ndata.workers = true\n", "recommend.data.workers"),
        (GOOD + '[recommend]\nthreads = "coers + 1"\n', "unknown name 'coers'"),
        (GOOD + '[recommend]\nthreads = "import os"\n', "bad expression"),
        (GOOD + '[recommend]\namp.dtype = "int8"\n', "recommend.amp.dtype"),
        (GOOD + "[recommend]\nbatch_size_delta = 32\nbatch_size_scale = 1.5\n", "not both"),
        (GOOD.replace("zen3_vcache", "zen9"), "match.families.0: unknown family 'zen9'"),
        (GOOD.replace("amd", "amdd"), "match.vendor"),
        (GOOD + '[recommend]\nthreads = 4\n[recommend]\nthreads = 5\n', "invalid TOML"),
        ('description = "no name"\n', "name: Field required"),
        ('name = "g"\ndescription = "x"\n[match]\ngpu_archs = ["ampere"]\n[recommend.on_cpu]\nthreads = 1\n',
         "applies only on cuda"),
    ],
)  # fmt: skip
def test_broken_user_profile_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write_profile(tmp_path / "profiles", "broken.toml", text)
    with pytest.raises(ProfileError, match=re.escape(message)) as info:
        load_profiles([tmp_path / "profiles"], env=NO_ENV)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value).strip()


def test_profile_dir_from_env(tmp_path: Path) -> None:
    write_profile(tmp_path / "a", "mine.toml", GOOD)
    env = {"KKTRAIN_HW_PROFILES": f"{tmp_path / 'a'}"}
    names = [p.name for p in load_profiles(env=env)]
    assert names[-1] == "mine"


def test_missing_profile_dir_is_an_error(tmp_path: Path) -> None:
    env = {"KKTRAIN_HW_PROFILES": str(tmp_path / "nope")}
    with pytest.raises(ProfileError, match="KKTRAIN_HW_PROFILES.*does not exist"):
        load_profiles(env=env)


def test_user_profile_with_builtin_name_replaces_it(tmp_path: Path) -> None:
    text = 'name = "zen3_vcache"\ndescription = "mine"\n[match]\nfamilies = ["zen3_vcache"]\n'
    text += "[recommend.on_cpu]\nbatch_size_delta = 64\n"
    write_profile(tmp_path, "v.toml", text)
    profiles = load_profiles([tmp_path], env=NO_ENV)
    assert [p.description for p in profiles if p.name == "zen3_vcache"] == ["mine"]
    match = match_profile(machine("ryzen5_5600x3d"), profiles, "cpu")
    assert compute_recommendations(machine("ryzen5_5600x3d"), match)["batch_size_delta"] == 64


def test_duplicate_names_in_one_dir_is_an_error(tmp_path: Path) -> None:
    write_profile(tmp_path, "a.toml", GOOD)
    write_profile(tmp_path, "b.toml", GOOD)
    with pytest.raises(ProfileError, match="both named 'mine'"):
        load_profiles([tmp_path], env=NO_ENV)


# ----------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------

EXPECTED_CPU_PROFILE = {
    "ryzen5_5600x3d": "zen3_vcache",
    "ryzen7_7800x3d": "zen4_vcache",
    "core_i7_13700k": "intel",
    "xeon_8488c": "intel_amx",
    "graviton2_m6g": "generic_cpu",
    "this_machine": "intel",  # Emerald Rapids, but the hypervisor hides AMX: no bf16 tiles to use
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CPU_PROFILE))
def test_cpu_profile_matches(name: str) -> None:
    result = match_profile(machine(name), builtin(), "cpu")
    assert result.cpu is not None and result.cpu.profile.name == EXPECTED_CPU_PROFILE[name]
    assert result.gpu is None


def test_match_explains_itself() -> None:
    result = match_profile(machine("xeon_8488c"), builtin(), "cpu")
    assert result.cpu.reasons == ("vendor intel", "isa amx_tile amx_bf16")
    assert [c.profile.name for c in result.candidates] == ["intel_amx", "intel", "generic_cpu"]
    assert json.loads(json.dumps(result.to_dict()))["cpu_profile"]["name"] == "intel_amx"


def test_more_specific_user_profile_wins(tmp_path: Path) -> None:
    write_profile(tmp_path, "mine.toml", GOOD)  # vendor + family + min_l3_mb: specificity 3 > 2
    result = match_profile(machine("ryzen5_5600x3d"), load_profiles([tmp_path], env=NO_ENV), "cpu")
    assert result.cpu.profile.name == "mine"
    assert "L3 96 MB >= 96 MB" in result.cpu.reasons


def test_unknown_fact_never_matches(tmp_path: Path) -> None:
    write_profile(tmp_path, "mine.toml", GOOD)
    hw = machine("ryzen5_5600x3d")
    hw = dataclasses.replace(hw, cpu=dataclasses.replace(hw.cpu, l3_bytes=None))
    result = match_profile(hw, load_profiles([tmp_path], env=NO_ENV), "cpu")
    assert result.cpu.profile.name == "zen3_vcache"


def test_equal_specificity_later_loaded_wins(tmp_path: Path) -> None:
    text = 'name = "mine"\ndescription = "x"\n[match]\nvendor = "amd"\nfamilies = ["zen3_vcache"]\n'
    write_profile(tmp_path, "mine.toml", text)
    result = match_profile(machine("ryzen5_5600x3d"), load_profiles([tmp_path], env=NO_ENV), "cpu")
    assert result.cpu.profile.name == "mine"


@pytest.mark.parametrize(
    ("gpu", "cc", "profile", "dtype"),
    [("Tesla V100-SXM2-32GB", (7, 0), "nvidia_volta", "fp16"), ("Tesla T4", (7, 5), "nvidia_turing", "fp16"),
     ("NVIDIA A100-SXM4-80GB", (8, 0), "nvidia_ampere", "bf16"), ("NVIDIA L4", (8, 9), "nvidia_ada", "bf16"),
     ("NVIDIA H100 80GB HBM3", (9, 0), "nvidia_hopper", "bf16"), ("NVIDIA B200", (10, 0), "nvidia_hopper", "bf16")],
)  # fmt: skip
def test_gpu_profile_on_cuda(gpu: str, cc: tuple[int, int], profile: str, dtype: str) -> None:
    hw = with_gpu(machine("ryzen5_5600x3d"), gpu, cc)
    result = match_profile(hw, builtin(), "cuda")
    assert (result.cpu.profile.name, result.gpu.profile.name) == ("zen3_vcache", profile)
    recs = compute_recommendations(hw, result)
    assert recs["amp.dtype"] == dtype  # the GPU profile owns the compute side on cuda
    assert recs["data.workers"] == 8  # the CPU profile still feeds the data loader
    assert "batch_size_delta" not in recs  # the V-Cache batch boost is for CPU compute only
    assert "compile.cpp_wrapper" not in recs


def test_gpu_profile_ignored_when_training_on_cpu() -> None:
    hw = with_gpu(machine("ryzen5_5600x3d"), "NVIDIA A100-SXM4-80GB", (8, 0))
    result = match_profile(hw, builtin(), "cpu")
    assert result.gpu is None
    assert compute_recommendations(hw, result)["batch_size_delta"] == 32


def test_pascal_has_no_gpu_profile() -> None:
    hw = with_gpu(machine("core_i7_13700k"), "Tesla P100-PCIE-16GB", (6, 0))
    result = match_profile(hw, builtin(), "cuda")
    assert (result.cpu.profile.name, result.gpu) == ("intel", None)


def test_apple_on_mps() -> None:
    hw = dataclasses.replace(sysctl_machine("macbook_m2_pro"), ram_bytes=16 << 30)
    result = match_profile(hw, builtin(), device_kind_of("auto", hw))
    assert (result.device_kind, result.cpu.profile.name) == ("mps", "apple_m")
    recs = compute_recommendations(hw, result)
    assert recs["threads"] == 6  # performance cores only
    assert recs["data.workers"] == 4  # one per efficiency core
    assert recs["amp.dtype"] == "fp16"
    assert recs["mps-guard.memory_limit_gb"] == 12.0  # min(14, 16 GB - 4 GB for macOS)
    big = dataclasses.replace(hw, ram_bytes=64 << 30)
    assert compute_recommendations(big, result)["mps-guard.memory_limit_gb"] == 14.0


def test_unknown_ram_drops_the_key_that_needs_it() -> None:
    hw = dataclasses.replace(sysctl_machine("macbook_m2_pro"), ram_bytes=None)
    recs = compute_recommendations(hw, match_profile(hw, builtin(), "mps"))
    assert "mps-guard.memory_limit_gb" not in recs
    assert recs["amp.dtype"] == "fp16"


def test_force_profile_by_name() -> None:
    result = match_profile(machine("this_machine"), builtin(), "cpu", force="zen3_vcache")
    assert result.cpu.profile.name == "zen3_vcache"
    assert result.cpu.reasons == ("forced by name (zen3_vcache)",)


def test_force_unknown_profile_lists_known_ones() -> None:
    with pytest.raises(UnknownProfileError, match="unknown hardware profile 'zen9'.*zen3_vcache"):
        match_profile(machine("this_machine"), builtin(), "cpu", force="zen9")


def test_force_gpu_profile_on_cpu_run_is_an_error() -> None:
    with pytest.raises(HardwareError, match="for CUDA GPUs but the run trains on cpu"):
        match_profile(machine("this_machine"), builtin(), "cpu", force="nvidia_ampere")


def test_device_kind_of() -> None:
    cpu_only = machine("this_machine")
    assert device_kind_of("auto", cpu_only) == "cpu"
    assert device_kind_of("auto", with_gpu(cpu_only, "NVIDIA L4", (8, 9))) == "cuda"
    assert device_kind_of("cuda:1", cpu_only) == "cuda"
    with pytest.raises(HardwareError, match="unknown device 'tpu'"):
        device_kind_of("tpu", cpu_only)


# ----------------------------------------------------------------------------------------------
# Values, concrete updates, report
# ----------------------------------------------------------------------------------------------


def test_expressions() -> None:
    names = {"cores": 6, "threads": 12, "perf_cores": 6, "ram_gb": 32.0}
    assert evaluate_expression("cores + 2", names) == 8
    assert evaluate_expression("min(8, max(1, threads - perf_cores))", names) == 6
    assert evaluate_expression("min(4, cores // 4)", names) == 1
    assert evaluate_expression("threads // 5", names) == 2
    with pytest.raises(ValueError, match="unsupported syntax"):
        evaluate_expression("__import__('os')", names)


def test_expression_results_are_clamped_to_sane_values() -> None:
    hw = machine("graviton2_m6g")  # no SMT: threads - perf_cores = 0
    text = 'name = "x"\ndescription = "x"\n[recommend]\ndata.workers = "threads - cores - 3"\nthreads = "cores - 9"\n'
    profile = hardware._parse_profile(text, "x.toml")
    recs = compute_recommendations(hw, match_profile(hw, [profile], "cpu"))
    assert (recs["data.workers"], recs["threads"]) == (0, 1)


def test_concrete_batch_size_and_plugin_keys() -> None:
    recs = {"batch_size_delta": 32, "amp.dtype": "bf16", "compile.onednn": True, "threads": 6}
    assert concrete_recommendations(recs, Config()) == {"batch_size": 160, "threads": 6}
    config = Config(plugins=["amp"])
    assert concrete_recommendations(recs, config)["amp.dtype"] == "bf16"
    scaled = concrete_recommendations({"batch_size_scale": 1.5}, Config(batch_size=100))
    assert scaled == {"batch_size": 150}


def test_concrete_drops_prefetch_without_workers() -> None:
    recs = {"data.workers": 8, "data.prefetch_factor": 6, "data.persistent_workers": True}
    config = Config(data=Data(workers=0))
    # The user set workers = 0, so prefetch/persistent would make torch's DataLoader raise.
    assert concrete_recommendations(recs, config, {"data.workers"}) == {}
    assert concrete_recommendations(recs, config) == recs


def test_concrete_leaves_out_values_already_set() -> None:
    config = Config(threads=6)
    assert concrete_recommendations({"threads": 6, "data.workers": 8}, config) == {"data.workers": 8}


def test_plan_leaves_user_set_keys_alone() -> None:
    result = plan(machine("ryzen5_5600x3d"), Config(), builtin(), user_set={"batch_size"})
    assert "batch_size" not in result.updates
    keys = {c.key: c for c in result.changes}
    assert "batch_size" not in keys
    assert keys["data.workers"] == ("data.workers", 0, 8, "zen3_vcache")


def test_user_set_plugin_option_in_either_spelling() -> None:
    config = Config(plugins=["amp"])
    recs = {"amp.dtype": "bf16", "threads": 6}
    for spelling in ("amp.dtype", "plugins.amp.dtype"):
        assert concrete_recommendations(recs, config, {spelling}) == {"threads": 6}


def test_render_report_text_and_json() -> None:
    hw = with_gpu(machine("ryzen5_5600x3d"), "NVIDIA A100-SXM4-80GB", (8, 0))
    result = plan(hw, Config(device="cuda", plugins=["amp"]), builtin())
    text = render_report(hw, result.match, result.changes)
    for expected in ("AMD Ryzen 5 5600X3D", "zen3_vcache (3D V-Cache)", "nvidia_ampere", "amp.dtype", "96 MiB"):
        assert expected in text
    data = json.loads(render_report(hw, result.match, result.changes, as_json=True))
    assert data["match"]["gpu_profile"]["name"] == "nvidia_ampere"
    assert {"key": "amp.dtype", "old": None, "new": "bf16", "source": "nvidia_ampere"} in data["changes"]


def test_report_prints_what_it_returns(capsys: pytest.CaptureFixture[str]) -> None:
    hw = machine("ryzen5_5600x3d")
    text = hardware.report(as_json=True, config=Config(), hw=hw)
    assert capsys.readouterr().out.strip() == text.strip()
    assert json.loads(text)["match"]["cpu_profile"]["name"] == "zen3_vcache"


def test_render_report_without_changes() -> None:
    hw = machine("graviton2_m6g")
    match = match_profile(hw, builtin(), "cpu")
    assert "No config changes" in render_report(hw, match, [])


def test_toml_dotted_keys_are_nested_tables() -> None:
    # The profile format relies on this TOML rule: `data.workers = 8` under [recommend] is
    # recommend.data.workers, so profiles spell keys exactly like the run config.
    assert tomllib.loads("[r]\ndata.workers = 8\n") == {"r": {"data": {"workers": 8}}}


def test_docs_list_every_shipped_profile() -> None:
    docs = (REPO / "docs/hardware.md").read_text()
    for path in SHIPPED:
        assert f"| `{path.stem}` |" in docs, f"docs/hardware.md: add {path.stem} to the shipped table"

"""Hardware detection on recorded machines (the core's part; profiles are the vcache plugin's)."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest

from kktrain.hardware import (
    CpuInfo,
    GpuInfo,
    HardwareInfo,
    cpu_from_sysctl,
    detect,
    gpu_arch,
    parse_sysctl,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hw"
REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
NO_ENV: dict[str, str] = {}


def machine(name: str) -> HardwareInfo:
    return detect(FIXTURES / name, probe_torch=False)


def with_gpu(hw: HardwareInfo, name: str, cc: tuple[int, int], gib: int = 80) -> HardwareInfo:
    gpu = GpuInfo(0, name, cc, gib << 30, cc >= (8, 0), gpu_arch(*cc))
    return dataclasses.replace(hw, gpus=(gpu,))


def write_tree(root: Path, cpuinfo: str, l3: dict[str, str] | None = None) -> Path:
    """A minimal recorded tree: cpuinfo plus one L3 entry per CPU list in ``l3``."""
    (root / "proc").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text(cpuinfo)
    for cpu, (size, shared) in enumerate((l3 or {}).items()):
        index = root / f"sys/devices/system/cpu/cpu{cpu}/cache/index3"
        index.mkdir(parents=True)
        for name, value in (("level", "3"), ("type", "Unified"), ("size", size), ("shared_cpu_list", shared)):
            (index / name).write_text(value + "\n")
    return root


# ----------------------------------------------------------------------------------------------
# Detection on recorded machines
# ----------------------------------------------------------------------------------------------

MACHINES = {
    # name: (vendor, family, cores, threads, L3 MiB, RAM kB, vcache)
    "ryzen5_5600x3d": ("amd", "zen3_vcache", 6, 12, 96, 32768364, True),
    "ryzen7_7800x3d": ("amd", "zen4_vcache", 8, 16, 96, 65022444, True),
    "core_i7_13700k": ("intel", "intel_raptorlake", 16, 24, 30, 65641980, False),
    "xeon_8488c": ("intel", "intel_sapphirerapids", 4, 8, 105, 32076500, False),
    "graviton2_m6g": ("arm", "arm_neoverse", 4, 4, 32, 16069788, False),
    "this_machine": ("intel", "intel_emeraldrapids", 2, 2, 260, 24684092, False),
}


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_detect_recorded_machine(name: str) -> None:
    vendor, family, cores, threads, l3_mib, ram_kb, vcache = MACHINES[name]
    cpu = machine(name).cpu
    assert (cpu.vendor, cpu.family, cpu.vcache) == (vendor, family, vcache)
    assert (cpu.physical_cores, cpu.threads) == (cores, threads)
    assert cpu.l3_bytes == l3_mib * MIB
    assert machine(name).ram_bytes == ram_kb * 1024


ISA = {
    # name: (present, absent)
    "ryzen5_5600x3d": ({"avx2", "fma", "sha_ni"}, {"avx512f", "avx512_bf16", "amx_tile"}),
    "ryzen7_7800x3d": ({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}, {"amx_tile"}),
    "core_i7_13700k": ({"avx2", "avx_vnni"}, {"avx512f"}),
    "xeon_8488c": ({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}, set()),
    "graviton2_m6g": ({"asimd", "neon", "asimddp"}, {"sve", "avx2"}),
    "this_machine": ({"avx2", "avx512f", "avx512_vnni"}, {"amx_tile"}),
}


@pytest.mark.parametrize("name", sorted(ISA))
def test_isa_flags(name: str) -> None:
    present, absent = ISA[name]
    cpu = machine(name).cpu
    assert present <= set(cpu.isa)
    assert not absent & set(cpu.isa)


def test_model_names() -> None:
    assert machine("ryzen5_5600x3d").cpu.model_name == "AMD Ryzen 5 5600X3D 6-Core Processor"
    # arm64 cpuinfo has no model name: it is built from the implementer and part ids.
    assert machine("graviton2_m6g").cpu.model_name == "ARM Neoverse-N1"


def test_hybrid_intel_counts_performance_cores() -> None:
    cpu = machine("core_i7_13700k").cpu
    assert cpu.performance_cores == 8  # cpu_core/cpus = 0-15: 8 P-cores with 2 threads each
    assert machine("ryzen5_5600x3d").cpu.performance_cores is None


def test_l3_sums_distinct_instances_per_ccd(tmp_path: Path) -> None:
    # A 7950X3D: CCD0 carries the 96 MB V-Cache, CCD1 a plain 32 MB.
    block = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 97\n"
    block += "model name\t: AMD Ryzen 9 7950X3D 16-Core Processor\nphysical id\t: 0\ncore id\t\t: {n}\n\n"
    cpuinfo = "".join(block.format(n=n) for n in range(2))
    root = write_tree(tmp_path, cpuinfo, {"98304K": "0-7,16-23", "32768K": "8-15,24-31"})
    cpu = detect(root, probe_torch=False).cpu
    assert cpu.l3_bytes == 128 * MIB
    assert (cpu.l3_instances, cpu.l3_instance_bytes) == (2, 96 * MIB)
    assert cpu.family == "zen4_vcache"


def test_vcache_from_l3_per_ccd_without_x3d_in_the_name(tmp_path: Path) -> None:
    # EPYC Milan-X says "7773X", not X3D: its 96 MB per CCD gives it away.
    cpuinfo = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
        "model name\t: AMD EPYC 7773X 64-Core Processor\ncache size\t: 512 KB\n"
    )
    root = write_tree(tmp_path, cpuinfo, {"98304K": "0-7,64-71"})
    assert detect(root, probe_torch=False).cpu.family == "zen3_vcache"


def test_plain_zen3_is_not_vcache(tmp_path: Path) -> None:
    cpuinfo = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 33\n"
        "model name\t: AMD Ryzen 5 5600X 6-Core Processor\ncache size\t: 512 KB\n"
    )
    root = write_tree(tmp_path, cpuinfo, {"32768K": "0-11"})
    cpu = detect(root, probe_torch=False).cpu
    assert (cpu.family, cpu.vcache) == ("zen3", False)


def test_intel_l3_falls_back_to_cpuinfo_cache_size() -> None:
    # The xeon_8488c tree has no sysfs cache directory (as in many containers).
    assert not (FIXTURES / "xeon_8488c/sys").exists()
    assert machine("xeon_8488c").cpu.l3_bytes == 107520 * 1024


def test_amd_cache_size_is_not_taken_for_l3(tmp_path: Path) -> None:
    # AMD's cpuinfo "cache size" is the per-core L2 (512 KB), so without sysfs the L3 is unknown.
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text((FIXTURES / "ryzen5_5600x3d/proc/cpuinfo").read_text())
    cpu = detect(tmp_path, probe_torch=False).cpu
    assert cpu.l3_bytes is None
    assert cpu.family == "zen3_vcache"  # still known from the X3D model name


def test_missing_files_give_none_not_a_crash(tmp_path: Path) -> None:
    hw = detect(tmp_path, probe_torch=False)
    assert hw.cpu == CpuInfo()
    assert (hw.ram_bytes, hw.gpus, hw.mps_available) == (None, (), False)


def test_garbage_files_give_none_not_a_crash(tmp_path: Path) -> None:
    root = write_tree(tmp_path, "no colons here\n\x00\x01 binary : junk\n", {"lots": "x-y"})
    (root / "proc/meminfo").write_text("MemTotal: many kB\n")
    hw = detect(root, probe_torch=False)
    assert (hw.cpu.family, hw.cpu.l3_bytes, hw.ram_bytes) == ("unknown", None, None)


def test_to_dict_is_json() -> None:
    hw = with_gpu(machine("ryzen5_5600x3d"), "NVIDIA A100-SXM4-80GB", (8, 0))
    data = hw.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["cpu"]["family"] == "zen3_vcache"
    assert data["gpus"][0]["capability"] == [8, 0]


def test_macos_sysctl_apple_silicon() -> None:
    values = parse_sysctl((FIXTURES / "macbook_m2_pro/sysctl.txt").read_text())
    cpu = cpu_from_sysctl(values)
    assert (cpu.vendor, cpu.family, cpu.model_name) == ("apple", "apple_m2", "Apple M2 Pro")
    assert (cpu.physical_cores, cpu.threads, cpu.performance_cores) == (10, 10, 6)
    assert {"neon", "asimd", "bf16"} <= set(cpu.isa)


def test_macos_sysctl_intel_mac() -> None:
    values = {
        "machdep.cpu.brand_string": "Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz",
        "machdep.cpu.vendor": "GenuineIntel",
        "machdep.cpu.family": "6",
        "machdep.cpu.model": "158",
        "machdep.cpu.features": "FPU VME SSE SSE2 AVX1.0 FMA F16C",
        "machdep.cpu.leaf7_features": "SMEP BMI1 AVX2 BMI2",
        "hw.physicalcpu": "8",
        "hw.logicalcpu": "16",
        "hw.l3cachesize": "16777216",
    }
    cpu = cpu_from_sysctl(values)
    assert (cpu.vendor, cpu.family, cpu.threads, cpu.l3_bytes) == ("intel", "intel_skylake", 16, 16 * MIB)
    assert {"avx", "avx2", "fma"} <= set(cpu.isa)
    assert cpu.performance_cores is None


@pytest.mark.parametrize(
    ("cc", "arch"),
    [((6, 1), "pascal"), ((7, 0), "volta"), ((7, 5), "turing"), ((8, 0), "ampere"), ((8, 6), "ampere"),
     ((8, 9), "ada"), ((9, 0), "hopper"), ((10, 0), "blackwell"), ((12, 0), "blackwell"), ((3, 5), "unknown")],
)  # fmt: skip
def test_gpu_arch(cc: tuple[int, int], arch: str) -> None:
    assert gpu_arch(*cc) == arch


def test_live_detection_does_not_crash() -> None:
    hw = detect()
    assert hw.cpu.threads and hw.cpu.threads >= 1
    assert hw.ram_bytes and hw.ram_bytes > 0




# The vcache plugin's tests match profiles against these machines without the recorded trees: its
# fixture must say what detection says.
VCACHE_MACHINES = REPO / "plugins" / "kktrain-vcache" / "tests" / "machines.json"


def test_vcache_fixture_matches_detection_of_the_recorded_machines() -> None:
    recorded = json.loads(VCACHE_MACHINES.read_text())
    for name, data in recorded.items():
        if (FIXTURES / name / "proc").is_dir():
            assert machine(name).to_dict() == data, f"{name}: regenerate {VCACHE_MACHINES.name} from detect()"
        else:  # macOS: sysctl only
            values = parse_sysctl((FIXTURES / name / "sysctl.txt").read_text())
            assert CpuInfo(**{**data["cpu"], "isa": tuple(data["cpu"]["isa"])}) == cpu_from_sysctl(values)
    assert set(recorded) == {d.name for d in FIXTURES.iterdir() if d.is_dir()}


def test_hardware_info_round_trips_through_a_dict() -> None:
    hw = with_gpu(machine("ryzen5_5600x3d"), "NVIDIA A100-SXM4-80GB", (8, 0))
    assert HardwareInfo.from_dict(json.loads(json.dumps(hw.to_dict()))) == hw

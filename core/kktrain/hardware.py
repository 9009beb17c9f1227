"""Hardware detection: what CPU, RAM, GPUs and MPS this machine has, as a frozen HardwareInfo.

:func:`detect` reads ``/proc`` and ``/sys`` under a root directory (``sysctl`` on macOS) and asks
torch about CUDA GPUs and MPS. It is a pure function of its inputs, so tests feed it recorded
machines. Detection is all the core does with hardware: the ``on_hw_detect`` hook hands the result
to plugins, and turning it into config changes (the hardware profiles) is the vcache plugin's job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

__all__ = [
    "CpuInfo",
    "GpuInfo",
    "HardwareInfo",
    "detect",
    "detect_hardware",
    "detect_cpu",
    "cpu_from_sysctl",
    "parse_sysctl",
    "gpu_arch",
]

DeviceKind = Literal["cpu", "cuda", "mps"]
DEVICE_KINDS: tuple[str, ...] = ("cpu", "cuda", "mps")
MIB = 1 << 20
GIB = 1 << 30
# A 3D V-Cache CCD has 96 MB of L3 (32 MB on die + 64 MB stacked); plain Zen 3/4/5 CCDs have 32.
VCACHE_MIN_L3_PER_CCD = 96 * MIB

VENDORS = ("amd", "intel", "arm", "apple", "ampere", "qualcomm", "nvidia", "hisilicon", "other")
FAMILIES = (
    "zen2", "zen3", "zen3_vcache", "zen4", "zen4_vcache", "zen5", "zen5_vcache", "amd_other",
    "intel_skylake", "intel_icelake", "intel_alderlake", "intel_raptorlake", "intel_meteorlake",
    "intel_arrowlake", "intel_sapphirerapids", "intel_emeraldrapids", "intel_graniterapids",
    "intel_other",
    "apple_m1", "apple_m2", "apple_m3", "apple_m4", "apple_other",
    "arm_neoverse", "arm_other",
    "unknown",
)  # fmt: skip
GPU_ARCHS = ("pascal", "volta", "turing", "ampere", "ada", "hopper", "blackwell", "rocm", "unknown")
# Only the ISA extensions that change what a trainer should do are kept (the full x86 flag list
# is ~150 words of noise in a report). Profiles may only ask for these.
ISA_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx_vnni",
    "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8", "sha_ni", "vaes",
    "neon", "asimd", "asimdhp", "asimddp", "sve", "sve2", "bf16", "i8mm", "sme",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# What was detected
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuInfo:
    """The host CPU; a field the system did not tell is ``None``."""

    vendor: str | None = None
    model_name: str | None = None
    family: str = "unknown"
    physical_cores: int | None = None
    threads: int | None = None
    # P-cores on hybrid parts (Intel 12th gen+, Apple M); None where all cores are alike.
    performance_cores: int | None = None
    l3_bytes: int | None = None
    # The largest single L3 (one CCD on AMD): what one core can actually hit.
    l3_instance_bytes: int | None = None
    l3_instances: int | None = None
    isa: tuple[str, ...] = ()
    vcache: bool = False

    # The vocabulary of the fields above, for plugins that match on them (hardware profiles).
    VENDORS: ClassVar[tuple[str, ...]] = VENDORS
    FAMILIES: ClassVar[tuple[str, ...]] = FAMILIES
    ISA_FLAGS: ClassVar[tuple[str, ...]] = ISA_FLAGS

    def has(self, flag: str) -> bool:
        """Whether the CPU reports ISA extension ``flag`` (one of :data:`ISA_FLAGS`)."""
        return flag in self.isa


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA (or ROCm) device as torch sees it."""

    index: int
    name: str
    capability: tuple[int, int]
    total_memory_bytes: int
    bf16: bool
    arch: str

    ARCHS: ClassVar[tuple[str, ...]] = GPU_ARCHS


@dataclass(frozen=True)
class HardwareInfo:
    """Everything :func:`detect` found: CPU, RAM, CUDA GPUs, MPS."""

    cpu: CpuInfo = CpuInfo()
    ram_bytes: int | None = None
    gpus: tuple[GpuInfo, ...] = ()
    mps_available: bool = False

    @property
    def default_device(self) -> DeviceKind:
        """The device ``device = "auto"`` trains on: CUDA, then MPS, then CPU."""
        if self.gpus:
            return "cuda"
        return "mps" if self.mps_available else "cpu"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HardwareInfo:
        """The inverse of :meth:`to_dict` (a recorded machine, ``hw-report --json``'s hardware)."""
        cpu = dict(data.get("cpu", {}))
        cpu["isa"] = tuple(cpu.get("isa", ()))
        gpus = tuple(
            GpuInfo(**{**g, "capability": tuple(g["capability"])}) for g in data.get("gpus", ())
        )
        return cls(cpu=CpuInfo(**cpu), ram_bytes=data.get("ram_bytes"), gpus=gpus,
                   mps_available=bool(data.get("mps_available", False)))


# ----------------------------------------------------------------------------------------------
# Linux: /proc and /sys under a root directory
# ----------------------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    """The stripped text of ``path``, or None when it cannot be read."""
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _int(text: str | None, base: int = 10) -> int | None:
    """``int(text, base)``, or None for missing or malformed text."""
    try:
        return int(text, base) if text is not None else None
    except ValueError:
        return None


def _cpuinfo_blocks(text: str) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Split /proc/cpuinfo into per-processor blocks and the keys outside them (ARM's trailer)."""
    blocks: list[dict[str, str]] = []
    common: dict[str, str] = {}
    for chunk in re.split(r"\n\s*\n", text):
        fields = {}
        for line in chunk.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "processor" in fields and fields["processor"].isdigit():
            blocks.append(fields)
        else:
            common.update(fields)
    return blocks, common


def _cpu_list(text: str | None) -> set[int]:
    """Parse a kernel cpu list like ``0-5,12-17``."""
    cpus: set[int] = set()
    for part in (text or "").split(","):
        lo, _, hi = part.strip().partition("-")
        if lo.isdigit() and (hi or lo).isdigit():
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _size_bytes(text: str | None) -> int | None:
    """Parse a cache size as sysfs (``32768K``) or cpuinfo (``512 KB``) writes it."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text or "", re.IGNORECASE)
    if not match:
        return None
    return int(match[1]) * {"": 1, "K": 1 << 10, "M": MIB, "G": GIB}[match[2].upper()]


def _cache_instances(cpu_root: Path, level: int) -> list[int]:
    """Sizes of the distinct data/unified caches of ``level``, deduplicated by who shares them."""
    instances: dict[str, int] = {}
    for index in sorted(cpu_root.glob("cpu[0-9]*/cache/index[0-9]*")):
        if _int(_read(index / "level")) != level or _read(index / "type") == "Instruction":
            continue
        size = _size_bytes(_read(index / "size"))
        if size is None:
            continue
        # Without shared_cpu_list or id we cannot tell instances apart: assume one shared cache
        # (summing per-CPU entries would multiply an L3 by the number of CPUs).
        key = _read(index / "shared_cpu_list") or _read(index / "id") or "shared"
        instances[key] = size
    return list(instances.values())


def _sysfs_cores(cpu_root: Path) -> int | None:
    """Physical cores from sysfs topology (for ARM, whose cpuinfo has no core ids)."""
    cores = set()
    for topo in cpu_root.glob("cpu[0-9]*/topology"):
        core = _read(topo / "core_id")
        if core is None:
            return None
        cores.add((_read(topo / "physical_package_id"), core))
    return len(cores) or None


def _core_ids(blocks: list[dict[str, str]]) -> dict[int, tuple[str, str]]:
    """Processor number -> (physical id, core id), where cpuinfo gives both."""
    ids = {}
    for block in blocks:
        if "core id" in block:
            ids[int(block["processor"])] = (block.get("physical id", "0"), block["core id"])
    return ids


def _performance_cores(root: Path, core_ids: dict[int, tuple[str, str]]) -> int | None:
    """P-cores on an Intel hybrid part: the kernel lists their CPUs in cpu_core/cpus."""
    p_cpus = _cpu_list(_read(root / "sys/devices/cpu_core/cpus"))
    if not p_cpus or not _read(root / "sys/devices/cpu_atom/cpus"):
        return None
    known = {core_ids[cpu] for cpu in p_cpus if cpu in core_ids}
    return len(known) or len(p_cpus)


_INTEL_MODELS = {
    "intel_skylake": {0x4E, 0x5E, 0x55, 0x8E, 0x9E, 0xA5, 0xA6},  # + Kaby/Coffee/Comet/Cascade
    "intel_icelake": {0x6A, 0x6C, 0x7D, 0x7E, 0x8C, 0x8D, 0xA7},  # + Tiger Lake, Rocket Lake
    "intel_alderlake": {0x97, 0x9A, 0xBE},
    "intel_raptorlake": {0xB7, 0xBA, 0xBF},
    "intel_meteorlake": {0xAA, 0xAC},
    "intel_arrowlake": {0xC5, 0xC6, 0xBD},  # + Lunar Lake
    "intel_sapphirerapids": {0x8F},
    "intel_emeraldrapids": {0xCF},
    "intel_graniterapids": {0xAD, 0xAE},
}
# Family 19h model ranges that are Zen 4 (Genoa, Raphael, Phoenix, Bergamo); the rest are Zen 3.
_ZEN4_MODELS = (range(0x10, 0x20), range(0x60, 0x80), range(0xA0, 0xB0))
_ARM_VENDORS = {0x41: "arm", 0x61: "apple", 0x51: "qualcomm", 0xC0: "ampere", 0x4E: "nvidia"}
_NEOVERSE_PARTS = {
    0xD0C: "Neoverse-N1", 0xD40: "Neoverse-V1", 0xD49: "Neoverse-N2",
    0xD4F: "Neoverse-V2", 0xD8E: "Neoverse-N3", 0xD84: "Neoverse-V3",
}  # fmt: skip
# Apple cores as Asahi Linux reports them: the part number's high nibble is the generation.
_APPLE_PARTS = {0x2: "apple_m1", 0x3: "apple_m2"}


def _amd_family(cpu_family: int | None, model: int | None, name: str, l3_ccd: int | None) -> str:
    """zen2..zen5(_vcache) from the x86 family/model, V-Cache from the name or the L3 per CCD."""
    if cpu_family == 0x17 and model is not None and model >= 0x30:
        return "zen2"
    if cpu_family == 0x19 and model is not None:
        base = "zen4" if any(model in r for r in _ZEN4_MODELS) else "zen3"
    elif cpu_family == 0x1A:
        base = "zen5"
    else:
        return "amd_other"
    # "Ryzen 7 5800X3D 8-Core Processor": X3D is mid-name; EPYC Milan-X/Genoa-X ("7773X") only
    # show it through their 96 MB L3 per CCD.
    stacked = bool(re.search(r"\dX3D\b", name)) or (l3_ccd or 0) >= VCACHE_MIN_L3_PER_CCD
    return f"{base}_vcache" if stacked else base


def _intel_family(cpu_family: int | None, model: int | None) -> str:
    """The Intel generation from the family-6 model number."""
    if cpu_family == 6 and model is not None:
        for family, models in _INTEL_MODELS.items():
            if model in models:
                return family
    return "intel_other"


def _isa(words: Iterable[str]) -> tuple[str, ...]:
    """Keep the flags kktrain cares about; AArch64's ``asimd`` is what AArch32 called ``neon``."""
    flags = {w.lower() for w in words} & set(ISA_FLAGS)
    if "asimd" in flags:
        flags.add("neon")
    return tuple(sorted(flags))


def _arm_identity(first: dict[str, str]) -> tuple[str | None, str | None, str]:
    """(vendor, model name, family) from the ARM ``CPU implementer``/``CPU part`` ids."""
    implementer = _int(first.get("CPU implementer"), 16)
    part = _int(first.get("CPU part"), 16)
    vendor = _ARM_VENDORS.get(implementer or -1, "other" if implementer is not None else None)
    if vendor == "arm" and part in _NEOVERSE_PARTS:
        return vendor, f"ARM {_NEOVERSE_PARTS[part]}", "arm_neoverse"
    if vendor == "apple":
        family = _APPLE_PARTS.get((part or 0) >> 4, "apple_other")
        generation = family.removeprefix("apple_").upper() if family != "apple_other" else "Silicon"
        return vendor, f"Apple {generation}", family
    name = f"ARM part {first['CPU part']}" if "CPU part" in first else None
    return vendor, name, "arm_other" if vendor else "unknown"


def _x86_identity(first: dict[str, str], l3_ccd: int | None) -> tuple[str | None, str | None, str]:
    """(vendor, model name, family) from the x86 ``vendor_id``/``cpu family``/``model`` fields."""
    name = first.get("model name")
    cpu_family, model = _int(first.get("cpu family")), _int(first.get("model"))
    vendor_id = first.get("vendor_id", "")
    if vendor_id == "AuthenticAMD":
        return "amd", name, _amd_family(cpu_family, model, name or "", l3_ccd)
    if vendor_id == "GenuineIntel":
        return "intel", name, _intel_family(cpu_family, model)
    return ("other" if vendor_id else None), name, "unknown"


def detect_cpu(root: Path = Path("/")) -> CpuInfo:
    """Read the CPU from ``root/proc/cpuinfo`` and ``root/sys/devices/system/cpu``; never raises."""
    root = Path(root)
    cpu_root = root / "sys/devices/system/cpu"
    blocks, common = _cpuinfo_blocks(_read(root / "proc/cpuinfo") or "")
    first = {**common, **(blocks[0] if blocks else {})}
    l3 = _cache_instances(cpu_root, 3)
    if "vendor_id" in first:
        vendor, name, family = _x86_identity(first, max(l3, default=None))
        isa = _isa(first.get("flags", "").split())
    else:
        vendor, name, family = _arm_identity(first)
        isa = _isa(first.get("Features", "").split())
    # Intel's cpuinfo "cache size" is the L3; AMD's is the per-core L2, so it is no fallback there.
    if not l3 and vendor == "intel" and (size := _size_bytes(first.get("cache size"))):
        l3 = [size]
    core_ids = _core_ids(blocks)
    threads = len(blocks) or len(list(cpu_root.glob("cpu[0-9]*"))) or None
    cores = len(set(core_ids.values())) or _sysfs_cores(cpu_root) or threads
    return CpuInfo(
        vendor=vendor,
        model_name=name,
        family=family,
        physical_cores=cores,
        threads=threads,
        performance_cores=_performance_cores(root, core_ids),
        l3_bytes=sum(l3) or None,
        l3_instance_bytes=max(l3, default=None),
        l3_instances=len(l3) or None,
        isa=isa,
        vcache=family.endswith("_vcache"),
    )


def _ram_bytes(root: Path) -> int | None:
    """MemTotal from ``root/proc/meminfo``."""
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", _read(root / "proc/meminfo") or "", re.M)
    return int(match[1]) * 1024 if match else None


# ----------------------------------------------------------------------------------------------
# macOS: sysctl
# ----------------------------------------------------------------------------------------------

_SYSCTL_KEYS = (
    "machdep.cpu.brand_string", "machdep.cpu.vendor", "machdep.cpu.family", "machdep.cpu.model",
    "machdep.cpu.features", "machdep.cpu.leaf7_features", "hw.physicalcpu", "hw.logicalcpu",
    "hw.perflevel0.physicalcpu", "hw.nperflevels", "hw.memsize", "hw.l3cachesize",
    "hw.optional.AdvSIMD", "hw.optional.neon", "hw.optional.arm.FEAT_BF16",
    "hw.optional.arm.FEAT_I8MM", "hw.optional.arm.FEAT_SME",
)  # fmt: skip
_SYSCTL_ARM_FEATURES = {
    "hw.optional.AdvSIMD": "asimd", "hw.optional.neon": "asimd",
    "hw.optional.arm.FEAT_BF16": "bf16", "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_SME": "sme",
}  # fmt: skip
# macOS spells some x86 flags its own way.
_SYSCTL_X86_NAMES = {"avx1.0": "avx", "avx512bf16": "avx512_bf16", "avx512vnni": "avx512_vnni"}


def parse_sysctl(text: str) -> dict[str, str]:
    """Parse ``sysctl NAME ...`` output (``name: value`` lines) into a dict."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            values[key.strip()] = value.strip()
    return values


def _run_sysctl(keys: Iterable[str]) -> dict[str, str]:
    """Ask sysctl for ``keys``; unknown keys are skipped (sysctl still prints the others)."""
    try:
        result = subprocess.run(
            ["sysctl", *keys], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_sysctl(result.stdout)


def cpu_from_sysctl(values: Mapping[str, str]) -> CpuInfo:
    """Build :class:`CpuInfo` from macOS sysctl values (Apple Silicon or Intel Macs)."""
    brand = values.get("machdep.cpu.brand_string")
    apple = re.match(r"Apple M(\d+)", brand or "")
    vendor: str | None
    if apple:
        vendor, family = "apple", f"apple_m{apple[1]}"
        isa = _isa(flag for key, flag in _SYSCTL_ARM_FEATURES.items() if values.get(key) == "1")
    else:
        keys = ("machdep.cpu.features", "machdep.cpu.leaf7_features")
        words = " ".join(values.get(key, "") for key in keys).split()
        isa = _isa(_SYSCTL_X86_NAMES.get(w.lower(), w) for w in words)
        fields: dict[str, str] = {"vendor_id": values.get("machdep.cpu.vendor", ""), "model name": brand or ""}
        fields |= {"cpu family": values.get("machdep.cpu.family", ""),
                   "model": values.get("machdep.cpu.model", "")}  # fmt: skip
        vendor, _, family = _x86_identity(fields, None)
    cores = _int(values.get("hw.physicalcpu"))
    hybrid = (_int(values.get("hw.nperflevels")) or 1) > 1
    l3 = _int(values.get("hw.l3cachesize")) or None
    return CpuInfo(
        vendor=vendor,
        model_name=brand,
        family=family,
        physical_cores=cores,
        threads=_int(values.get("hw.logicalcpu")) or cores,
        performance_cores=_int(values.get("hw.perflevel0.physicalcpu")) if hybrid else None,
        l3_bytes=l3,
        l3_instance_bytes=l3,
        l3_instances=1 if l3 else None,
        isa=isa,
        vcache=False,
    )


# ----------------------------------------------------------------------------------------------
# torch: CUDA GPUs and MPS
# ----------------------------------------------------------------------------------------------


def gpu_arch(major: int, minor: int) -> str:
    """The NVIDIA architecture name of compute capability ``major.minor``."""
    if major == 7:
        return "turing" if minor >= 5 else "volta"
    if major == 8:
        return "ada" if minor >= 9 else "ampere"
    names = {6: "pascal", 9: "hopper", 10: "blackwell", 11: "blackwell", 12: "blackwell"}
    return names.get(major, "unknown")


def _probe_gpus() -> tuple[GpuInfo, ...]:
    """The CUDA devices torch can use; none when torch or the driver is missing."""
    try:
        import torch

        if not torch.cuda.is_available():
            return ()
        rocm = torch.version.hip is not None
        gpus = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            cc = (props.major, props.minor)
            arch = "rocm" if rocm else gpu_arch(*cc)
            bf16 = torch.cuda.is_bf16_supported() if rocm else cc >= (8, 0)
            gpus.append(GpuInfo(index, props.name, cc, int(props.total_memory), bf16, arch))
        return tuple(gpus)
    except Exception:  # a broken driver must not stop a CPU run; detection reports no GPU
        return ()


def _probe_mps() -> bool:
    """Whether torch can train on Apple's MPS backend."""
    try:
        import torch

        return bool(torch.backends.mps.is_available())
    except Exception:
        return False


def detect(root: Path = Path("/"), *, probe_torch: bool = True) -> HardwareInfo:
    """Detect CPU and RAM under ``root`` (sysctl on macOS), and GPUs/MPS through torch."""
    root = Path(root)
    live = root == Path("/")
    if live and sys.platform == "darwin":
        values = _run_sysctl(_SYSCTL_KEYS)
        cpu, ram = cpu_from_sysctl(values), _int(values.get("hw.memsize"))
    else:
        cpu, ram = detect_cpu(root), _ram_bytes(root)
    if live and cpu.threads is None:  # Windows, or /proc hidden: the OS still knows the count
        cpu = dataclasses.replace(cpu, threads=os.cpu_count())
    if live and ram is None and hasattr(os, "sysconf"):  # no /proc/meminfo: ask the OS (POSIX)
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            ram = None
    gpus = _probe_gpus() if probe_torch else ()
    mps = probe_torch and _probe_mps()
    return HardwareInfo(cpu=cpu, ram_bytes=ram, gpus=gpus, mps_available=mps)




detect_hardware = detect
"""The public name of :func:`detect` (``kktrain.detect_hardware``)."""


# ----------------------------------------------------------------------------------------------
# The cores this process may use (threads)
# ----------------------------------------------------------------------------------------------


def cgroup_cpu_quota(root: Path = Path("/")) -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), or None when unlimited or unknown."""
    v2 = _read(root / "sys/fs/cgroup/cpu.max")
    if v2 is not None:
        parts = v2.split()
        if len(parts) == 2 and parts[0] != "max":
            quota, period = _int(parts[0]), _int(parts[1])
            if quota and period and quota > 0:
                return quota / period
        return None
    quota = _int(_read(root / "sys/fs/cgroup/cpu/cpu.cfs_quota_us") or _read(root / "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us"))
    period = _int(_read(root / "sys/fs/cgroup/cpu/cpu.cfs_period_us") or _read(root / "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us"))
    if quota and period and quota > 0:
        return quota / period
    return None


def usable_cores(root: Path = Path("/")) -> int:
    """How many cores this process may use: its CPU affinity, capped by the cgroup's quota
    (rounded up; a container with ``--cpus=1.5`` gets 2). At least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        import math

        cores = min(cores, max(1, math.ceil(quota - 1e-9)))
    return max(1, cores)

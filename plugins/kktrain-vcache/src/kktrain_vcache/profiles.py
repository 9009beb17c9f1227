"""Hardware profiles: the TOML format, loading, matching, and how a match becomes config changes.

Given what the core detected (:class:`kktrain.HardwareInfo`), three pure steps, so tests can feed
recorded machines:

1. :func:`load_profiles` reads the TOML profiles (the shipped ``hardware_profiles/*.toml``, then
   ``KKTRAIN_HW_PROFILES`` directories, then explicit directories);
2. :func:`match_profile` picks the most specific CPU profile and, when the run trains on CUDA, the
   most specific GPU profile: a :class:`MatchResult` that says why;
3. :func:`plan` merges the chosen profiles' recommendations (GPU profile > CPU profile's
   ``on_<device>`` table > CPU profile's base table), resolves symbolic values (``"cores + 2"``)
   against the hardware, turns ``batch_size_delta``/``batch_size_scale`` into a concrete
   ``batch_size`` and lists the changes against the current config.

``docs/hardware.md`` describes the profile format and the matching rules.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.resources
import io
import json
import math
import operator
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from kktrain import ConfigError, CpuInfo, GpuInfo, HardwareInfo, RunConfig, detect_hardware

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the tomli fallback kktrain declares for 3.10
    import tomli as tomllib

__all__ = [
    "HardwareError",
    "ProfileError",
    "UnknownProfileError",
    "HardwareProfile",
    "ProfileMatch",
    "MatchResult",
    "Recommendation",
    "Change",
    "Plan",
    "load_profiles",
    "load_profile_file",
    "profile_by_name",
    "device_kind_of",
    "match_profile",
    "explain_recommendations",
    "compute_recommendations",
    "concrete_recommendations",
    "plan_changes",
    "plan",
    "render_report",
    "report",
]

DeviceKind = Literal["cpu", "cuda", "mps"]
DEVICE_KINDS: tuple[str, ...] = ("cpu", "cuda", "mps")
PROFILES_ENV = "KKTRAIN_HW_PROFILES"
MIB = 1 << 20
GIB = 1 << 30
VENDORS = CpuInfo.VENDORS
FAMILIES = CpuInfo.FAMILIES
ISA_FLAGS = CpuInfo.ISA_FLAGS
GPU_ARCHS = GpuInfo.ARCHS


class HardwareError(ConfigError, ValueError):
    """Bad hardware-profile input; the message names the problem and the fix (exit code 2)."""


class ProfileError(HardwareError):
    """A profile file or directory is invalid; the message names the file and the key."""


class UnknownProfileError(HardwareError):
    """A profile was asked for by a name that no loaded profile has."""


# ----------------------------------------------------------------------------------------------
# Profiles: the TOML format
# ----------------------------------------------------------------------------------------------

EXPRESSION_NAMES = ("cores", "threads", "perf_cores", "ram_gb")
_BINOPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}


def _eval_node(node: ast.AST, names: Mapping[str, float | None]) -> float:
    """Evaluate one node of a value expression: numbers, names, + - * / //, min(), max()."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value) if isinstance(node.value, float) else node.value
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ValueError(f"unknown name {node.id!r} (use {', '.join(EXPRESSION_NAMES)})")
        value = names[node.id]
        if value is None:
            raise LookupError(node.id)  # the machine did not tell; the key is left out
        return value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval_node(node.left, names), _eval_node(node.right, names))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval_node(node.operand, names)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("min", "max")
        and node.args
        and not node.keywords
    ):
        fn = min if node.func.id == "min" else max
        return fn(_eval_node(arg, names) for arg in node.args)
    raise ValueError(f"unsupported syntax {ast.unparse(node)!r}")


def evaluate_expression(text: str, names: Mapping[str, float | None]) -> float:
    """Evaluate a symbolic profile value such as ``"min(8, cores + 2)"`` against ``names``."""
    return _eval_node(ast.parse(text.strip(), mode="eval").body, names)


def _check_expression(text: str) -> str:
    """Validate an expression at load time, so a typo fails with the file, not mid-run."""
    try:
        evaluate_expression(text, dict.fromkeys(EXPRESSION_NAMES, 8.0))
    except (SyntaxError, ValueError, ZeroDivisionError) as err:
        raise ValueError(
            f"bad expression {text!r}: {err}; write a number or e.g. \"cores + 2\", "
            f"\"min(8, threads // 2)\" over {', '.join(EXPRESSION_NAMES)}"
        ) from None
    return text


def _int_or_expression(value: Any) -> int | str:
    """An integer or an expression string (one validator, so errors are one clear line)."""
    if isinstance(value, str):
        return _check_expression(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"expected an integer or an expression string, got {value!r}")


def _number_or_expression(value: Any) -> float | int | str:
    """A number or an expression string."""
    if isinstance(value, float):
        return value
    try:
        return _int_or_expression(value)
    except ValueError:
        raise ValueError(f"expected a number or an expression string, got {value!r}") from None


IntValue = Annotated[int | str, PlainValidator(_int_or_expression)]
FloatValue = Annotated[float | int | str, PlainValidator(_number_or_expression)]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DataRecommend(_Table):
    """``data.*``: the DataLoader."""

    workers: IntValue | None = None
    prefetch_factor: IntValue | None = None
    pin_memory: StrictBool | None = None
    persistent_workers: StrictBool | None = None


class AmpRecommend(_Table):
    """``amp.*``: emitted only when the amp plugin is enabled."""

    dtype: Literal["bf16", "fp16", "fp32"] | None = None


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class CompileRecommend(_Table):
    """``compile.*``: emitted only when the compile plugin is enabled."""

    cpp_wrapper: StrictBool | None = None
    onednn: StrictBool | None = None
    mode: CompileMode | None = None


class MpsGuardRecommend(_Table):
    """``mps-guard.*``: emitted only when the mps-guard plugin is enabled."""

    memory_limit_gb: FloatValue | None = None


class Recommendations(_Table):
    """One table of recommendations, keyed like the run config (TOML dotted keys)."""

    batch_size_delta: StrictInt | None = None
    batch_size_scale: Annotated[StrictFloat | StrictInt, Field(gt=0)] | None = None
    threads: IntValue | None = None
    matmul_precision: Literal["highest", "high", "medium"] | None = None
    data: DataRecommend | None = None
    amp: AmpRecommend | None = None
    compile: CompileRecommend | None = None
    mps_guard: MpsGuardRecommend | None = Field(None, alias="mps-guard")

    @model_validator(mode="after")
    def _one_batch_rule(self) -> Recommendations:
        if self.batch_size_delta is not None and self.batch_size_scale is not None:
            raise ValueError("set batch_size_delta or batch_size_scale, not both")
        return self

    def flat(self) -> dict[str, Any]:
        """The set values as dotted run-config keys (``{"data.workers": "cores + 2"}``)."""
        nested = self.model_dump(by_alias=True, exclude_none=True, exclude=set(_ON_DEVICE))
        return _flatten(nested)


_ON_DEVICE = ("on_cpu", "on_cuda", "on_mps")


class Recommend(Recommendations):
    """The ``[recommend]`` table; ``on_cpu``/``on_cuda``/``on_mps`` apply only on that device."""

    on_cpu: Recommendations | None = None
    on_cuda: Recommendations | None = None
    on_mps: Recommendations | None = None

    def for_device(self, kind: str) -> dict[str, Any]:
        """The base table overlaid with the ``on_<kind>`` table, as dotted keys."""
        extra = getattr(self, f"on_{kind}", None)
        return _overlay(self.flat(), extra.flat() if extra else {})


def _flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"workers": 8}}`` -> ``{"data.workers": 8}``."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_BATCH_KEYS = ("batch_size_delta", "batch_size_scale")


def _overlay(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    """``high`` wins; the two batch keys are one setting, so either one replaces both."""
    merged = dict(low)
    if any(key in high for key in _BATCH_KEYS):
        for key in _BATCH_KEYS:
            merged.pop(key, None)
    merged.update(high)
    return merged


def _check_family(name: str) -> str:
    """A family is a known name, ``apple_m<N>``, or a glob (``apple_m*``) that matches one."""
    known = name in FAMILIES or re.fullmatch(r"apple_m\d+", name)
    if not known and not ("*" in name and fnmatch.filter(FAMILIES, name)):
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return name


class Match(_Table):
    """The ``[match]`` table: every criterion given must hold; none given matches any machine."""

    vendor: Literal[VENDORS] | None = None  # type: ignore[valid-type]
    families: list[Annotated[str, AfterValidator(_check_family)]] = []
    isa: list[Literal[ISA_FLAGS]] = []  # type: ignore[valid-type]
    min_l3_mb: Annotated[int, Field(ge=0)] | None = None
    gpu_archs: list[Literal[GPU_ARCHS]] = []  # type: ignore[valid-type]

    @field_validator("vendor", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @property
    def specificity(self) -> int:
        """How specific the criteria are: one point each, each ISA flag a point of its own."""
        given = (self.vendor, self.families, self.min_l3_mb is not None, self.gpu_archs)
        return sum(1 for criterion in given if criterion) + len(self.isa)


class HardwareProfile(_Table):
    """One hardware profile: which machines it describes and what it recommends for them."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]
    description: str
    match: Match = Match()
    recommend: Recommend = Recommend()
    _source: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _gpu_profiles_are_cuda_only(self) -> HardwareProfile:
        if self.match.gpu_archs and (self.recommend.on_cpu or self.recommend.on_mps):
            message = "a GPU profile (match.gpu_archs) applies only on cuda: drop on_cpu/on_mps"
            raise ValueError(message)
        return self

    @property
    def is_gpu(self) -> bool:
        """GPU profiles (``match.gpu_archs`` set) apply only when the run trains on CUDA."""
        return bool(self.match.gpu_archs)

    @property
    def source(self) -> str | None:
        """The file the profile was read from."""
        return self._source


# ----------------------------------------------------------------------------------------------
# Profiles: loading
# ----------------------------------------------------------------------------------------------


def _builtin_profile_files() -> list[tuple[str, str]]:
    """(name for errors, text) of the shipped ``hardware_profiles/*.toml``, sorted by name."""
    # Package data of this distribution (in the repository a link to the top-level folder).
    folder: Any = importlib.resources.files("kktrain_vcache") / "hardware_profiles"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".toml")), key=lambda f: f.name)
    return [(f"hardware_profiles/{f.name}", f.read_text(encoding="utf-8")) for f in files]


def _describe(error: ValidationError) -> str:
    """First pydantic error as ``key.path: message``."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key (see docs/hardware.md for the keys a profile may use)"
    return f"{where}: {message}"


def _parse_profile(text: str, origin: str) -> HardwareProfile:
    """Validate one profile's TOML text; errors name ``origin`` and the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(f"hardware profile {origin}: invalid TOML: {err}; fix it") from None
    try:
        profile = HardwareProfile.model_validate(data)
    except ValidationError as err:
        raise ProfileError(f"hardware profile {origin}: {_describe(err)}; fix it") from None
    profile._source = origin
    return profile


def load_profile_file(path: Path | str) -> HardwareProfile:
    """Read and validate one profile file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ProfileError(f"hardware profile {path}: cannot read it ({err.strerror})") from None
    return _parse_profile(text, str(path))


def _profile_dirs(
    extra_dirs: Iterable[Path | str], env: Mapping[str, str]
) -> list[tuple[Path, str]]:
    """User profile directories in load order: the env variable's, then the explicit ones."""
    from_env = [(Path(p), PROFILES_ENV) for p in env.get(PROFILES_ENV, "").split(os.pathsep) if p]
    return from_env + [(Path(p), "the profiles_dir option") for p in extra_dirs]


def _dir_profiles(folder: Path, origin: str) -> list[HardwareProfile]:
    """Every ``*.toml`` in ``folder``; two files with one profile name is an error."""
    if not folder.is_dir():
        raise ProfileError(
            f"hardware profile directory {folder} (from {origin}) does not exist; "
            "create it or fix the path"
        )
    profiles = [load_profile_file(path) for path in sorted(folder.glob("*.toml"))]
    _reject_duplicates(profiles)
    return profiles


def _reject_duplicates(profiles: list[HardwareProfile]) -> None:
    """Within one directory a name must be unique (across directories the later one wins)."""
    seen: dict[str, HardwareProfile] = {}
    for profile in profiles:
        if profile.name in seen:
            raise ProfileError(
                f"hardware profiles {seen[profile.name].source} and {profile.source} are both "
                f"named {profile.name!r}; rename one"
            )
        seen[profile.name] = profile


def load_profiles(
    extra_dirs: Iterable[Path | str] = (), *, env: Mapping[str, str] | None = None
) -> list[HardwareProfile]:
    """Builtin, ``$KKTRAIN_HW_PROFILES``, then ``extra_dirs`` profiles; a same name replaces."""
    builtin = [_parse_profile(text, origin) for origin, text in _builtin_profile_files()]
    _reject_duplicates(builtin)
    by_name: dict[str, HardwareProfile] = {p.name: p for p in builtin}
    for folder, origin in _profile_dirs(extra_dirs, os.environ if env is None else env):
        for profile in _dir_profiles(folder, origin):
            by_name.pop(profile.name, None)  # re-insert: load order breaks specificity ties
            by_name[profile.name] = profile
    return list(by_name.values())


def profile_by_name(profiles: Iterable[HardwareProfile], name: str) -> HardwareProfile:
    """The profile called ``name``, or :class:`UnknownProfileError` listing the known ones."""
    profiles = list(profiles)
    for profile in profiles:
        if profile.name == name:
            return profile
    known = ", ".join(sorted(p.name for p in profiles))
    raise UnknownProfileError(f"unknown hardware profile {name!r}; known profiles: {known}")


# ----------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileMatch:
    """A profile that matched, how specific it is, and which facts made it match."""

    profile: HardwareProfile
    specificity: int
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "name": self.profile.name,
            "source": self.profile.source,
            "specificity": self.specificity,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class MatchResult:
    """The CPU profile (always, when any matches) and the GPU profile (only on CUDA) chosen."""

    device_kind: DeviceKind
    cpu: ProfileMatch | None
    gpu: ProfileMatch | None
    candidates: tuple[ProfileMatch, ...] = ()

    @property
    def profiles(self) -> tuple[HardwareProfile, ...]:
        """The chosen profiles in merge order (a later one wins on shared keys)."""
        return tuple(m.profile for m in (self.cpu, self.gpu) if m is not None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "device_kind": self.device_kind,
            "cpu_profile": self.cpu.to_dict() if self.cpu else None,
            "gpu_profile": self.gpu.to_dict() if self.gpu else None,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def _match_reasons(match: Match, hw: HardwareInfo) -> tuple[str, ...] | None:
    """Why each criterion holds, or None as soon as one does not (unknown facts never match)."""
    cpu, reasons = hw.cpu, []
    if match.vendor:
        if cpu.vendor != match.vendor:
            return None
        reasons.append(f"vendor {cpu.vendor}")
    if match.families:
        if not any(fnmatch.fnmatchcase(cpu.family, pattern) for pattern in match.families):
            return None
        reasons.append(f"family {cpu.family}")
    if match.isa:
        if not all(cpu.has(flag) for flag in match.isa):
            return None
        reasons.append("isa " + " ".join(match.isa))
    if match.min_l3_mb is not None:
        if cpu.l3_bytes is None or cpu.l3_bytes < match.min_l3_mb * MIB:
            return None
        reasons.append(f"L3 {cpu.l3_bytes // MIB} MB >= {match.min_l3_mb} MB")
    if match.gpu_archs:
        # The run trains on the first visible GPU (torchrun sets CUDA_VISIBLE_DEVICES per rank).
        if not hw.gpus or hw.gpus[0].arch not in match.gpu_archs:
            return None
        reasons.append(f"gpu {hw.gpus[0].name} ({hw.gpus[0].arch})")
    return tuple(reasons) or ("fallback: matches any machine",)


def device_kind_of(device: str, hw: HardwareInfo) -> DeviceKind:
    """The kind of device a run trains on: ``auto`` resolved against ``hw``, ``cuda:1`` -> cuda."""
    kind = hw.default_device if device == "auto" else device.partition(":")[0]
    if kind not in DEVICE_KINDS:
        raise HardwareError(f"unknown device {device!r}; use auto, cpu, cuda or mps")
    return kind  # type: ignore[return-value]


def _best(candidates: list[ProfileMatch]) -> ProfileMatch | None:
    """Highest specificity; on a tie the later-loaded profile (user dirs load last) wins."""
    best = None
    for candidate in candidates:
        if best is None or candidate.specificity >= best.specificity:
            best = candidate
    return best


def match_profile(
    hw: HardwareInfo,
    profiles: Iterable[HardwareProfile],
    device_kind: str = "cpu",
    *,
    force: str | None = None,
) -> MatchResult:
    """Choose the CPU profile and, on CUDA, the GPU profile for ``hw``; ``force`` names one."""
    if device_kind not in DEVICE_KINDS:
        raise HardwareError(f"unknown device kind {device_kind!r}; use cpu, cuda or mps")
    profiles = list(profiles)
    candidates = []
    for profile in profiles:
        reasons = _match_reasons(profile.match, hw)
        if reasons is not None:
            candidates.append(ProfileMatch(profile, profile.match.specificity, reasons))
    cpu = _best([c for c in candidates if not c.profile.is_gpu])
    gpu = _best([c for c in candidates if c.profile.is_gpu]) if device_kind == "cuda" else None
    if force is not None:
        forced = profile_by_name(profiles, force)
        chosen = ProfileMatch(forced, forced.match.specificity, (f"forced by name ({force})",))
        if forced.is_gpu and device_kind != "cuda":
            raise HardwareError(
                f"hardware profile {force!r} is for CUDA GPUs but the run trains on "
                f"{device_kind}; force a CPU profile or set device = \"cuda\""
            )
        cpu, gpu = (cpu, chosen) if forced.is_gpu else (chosen, gpu)
    ranked = sorted(candidates, key=lambda c: -c.specificity)
    return MatchResult(device_kind, cpu, gpu, tuple(ranked))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Recommendations -> config updates
# ----------------------------------------------------------------------------------------------


class Recommendation(NamedTuple):
    """One recommended key: resolved value, the profile's raw value, and the profile."""

    key: str
    value: Any
    raw: Any
    source: str


class Change(NamedTuple):
    """One config change a plan would make."""

    key: str
    old: Any
    new: Any
    source: str


# Lower bounds after resolving an expression: a DataLoader can have 0 workers, nothing else 0.
_INT_FLOORS = {"data.workers": 0, "data.prefetch_factor": 1, "threads": 1}
_FLOAT_FLOORS = {"mps-guard.memory_limit_gb": 1.0}
# Keys owned by a plugin's options; they are only emitted when that plugin is enabled.
_PLUGIN_PREFIXES = ("amp", "compile", "mps-guard")


def _expression_names(hw: HardwareInfo) -> dict[str, float | None]:
    """What expressions may refer to; each falls back to its nearest known relative."""
    cpu = hw.cpu
    cores = cpu.physical_cores or cpu.threads
    return {
        "cores": cores,
        "threads": cpu.threads or cores,
        "perf_cores": cpu.performance_cores or cores,
        "ram_gb": hw.ram_bytes / GIB if hw.ram_bytes else None,
    }


def _resolve(key: str, raw: Any, names: Mapping[str, float | None]) -> Any:
    """A profile value made concrete; raises LookupError when it needs an unknown fact."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        return raw
    if isinstance(raw, str) and key not in _INT_FLOORS and key not in _FLOAT_FLOORS:
        return raw  # an enum value such as "bf16"
    value = evaluate_expression(raw, names) if isinstance(raw, str) else raw
    if key in _INT_FLOORS:
        return max(_INT_FLOORS[key], math.floor(value))
    if key in _FLOAT_FLOORS:
        return max(_FLOAT_FLOORS[key], round(float(value), 2))
    return value


def _layers(match: MatchResult, kind: str) -> list[tuple[str, dict[str, Any]]]:
    """(profile name, dotted recommendations) in merge order."""
    layers = []
    if match.cpu is not None:
        layers.append((match.cpu.profile.name, match.cpu.profile.recommend.for_device(kind)))
    if match.gpu is not None:
        layers.append((match.gpu.profile.name, match.gpu.profile.recommend.for_device(kind)))
    return layers


def explain_recommendations(
    hw: HardwareInfo, match: MatchResult, device_kind: str | None = None
) -> list[Recommendation]:
    """Every recommended key with its resolved value and the profile it came from."""
    kind = device_kind or match.device_kind
    merged: dict[str, tuple[Any, str]] = {}
    for name, values in _layers(match, kind):
        overlaid = _overlay({k: v for k, (v, _) in merged.items()}, values)
        merged = {k: (v, name if k in values else merged[k][1]) for k, v in overlaid.items()}
    names = _expression_names(hw)
    out = []
    for key, (raw, source) in merged.items():
        try:
            out.append(Recommendation(key, _resolve(key, raw, names), raw, source))
        except (LookupError, ZeroDivisionError):
            continue  # e.g. "ram_gb - 4" on a machine whose RAM is unknown: leave the default
    return out


def compute_recommendations(
    hw: HardwareInfo, match: MatchResult, device_kind: str | None = None
) -> dict[str, Any]:
    """Dotted keys -> resolved values (batch size still as ``batch_size_delta``/``_scale``)."""
    return {r.key: r.value for r in explain_recommendations(hw, match, device_kind)}


_MISSING = object()


def _get(config: Any, key: str, default: Any = _MISSING) -> Any:
    """Read a dotted key from a pydantic model, namespace or mapping."""
    value = config
    for part in key.split("."):
        if isinstance(value, Mapping):
            value = value.get(part, _MISSING)
        else:  # "mps-guard" is not an identifier: an options model would call it mps_guard
            value = getattr(value, part, getattr(value, part.replace("-", "_"), _MISSING))
        if value is _MISSING:
            return default
    return value


def _user_set(key: str, user_set: Iterable[str]) -> bool:
    """Whether the user set ``key``; plugin keys count in both spellings (``plugins.amp.dtype``)."""
    return key in user_set or (_plugin_of(key) is not None and f"plugins.{key}" in user_set)


def _plugin_of(key: str) -> str | None:
    """The plugin that owns ``key`` (``amp.dtype`` -> ``amp``), or None for a core key."""
    head = key.split(".", 1)[0]
    return head if head in _PLUGIN_PREFIXES else None


def concrete_recommendations(
    recommendations: Mapping[str, Any], config: Any, user_set: Iterable[str] = ()
) -> dict[str, Any]:
    """Recommendations as config updates: a concrete ``batch_size``, nothing the user set."""
    # Also dropped: disabled plugins' keys, keys already at their value, prefetch without workers.
    updates = dict(recommendations)
    delta, scale = updates.pop("batch_size_delta", None), updates.pop("batch_size_scale", None)
    base = _get(config, "batch_size", None)
    if isinstance(base, int) and (delta is not None or scale is not None):
        updates["batch_size"] = max(1, base + delta if delta is not None else round(base * scale))
    enabled = set(_get(config, "plugins", ()) or ())
    updates = {k: v for k, v in updates.items() if _plugin_of(k) in (None, *enabled)}
    # The core skips user-set keys too; leaving them out here keeps that true whatever spelling
    # the core's user_set uses for plugin options.
    user_set = frozenset(user_set)
    updates = {k: v for k, v in updates.items() if not _user_set(k, user_set)}
    workers = updates.get("data.workers", _get(config, "data.workers", None))
    if workers == 0:  # torch's DataLoader raises on either without worker processes
        updates.pop("data.prefetch_factor", None)
        if updates.get("data.persistent_workers"):
            del updates["data.persistent_workers"]
    return {k: v for k, v in updates.items() if _get(config, k) != v}


def plan_changes(
    config: Any,
    updates: Mapping[str, Any],
    user_set: Iterable[str] = (),
    sources: Mapping[str, str] | None = None,
) -> list[Change]:
    """The changes ``updates`` would make to ``config``; keys the user set are kept as set."""
    sources = sources or {}
    user_set = frozenset(user_set)
    changes = []
    for key, new in updates.items():
        old = _get(config, key, None)
        if _user_set(key, user_set) or old == new:
            continue
        changes.append(Change(key, old, new, sources.get(key, "?")))
    return changes


@dataclass(frozen=True)
class Plan:
    """What the hardware profiles would do to one run's config."""

    hw: HardwareInfo
    match: MatchResult
    recommendations: tuple[Recommendation, ...]
    updates: dict[str, Any]
    changes: tuple[Change, ...]


def plan(
    hw: HardwareInfo,
    config: Any,
    profiles: Iterable[HardwareProfile],
    *,
    user_set: Iterable[str] = (),
    force: str | None = None,
) -> Plan:
    """Match ``hw`` to ``profiles`` for ``config.device`` and compute the config updates."""
    kind = device_kind_of(str(_get(config, "device", "auto")), hw)
    match = match_profile(hw, profiles, kind, force=force)
    recs = explain_recommendations(hw, match, kind)
    updates = concrete_recommendations({r.key: r.value for r in recs}, config, user_set)
    sources = {r.key: r.source for r in recs}
    for batch_key in _BATCH_KEYS:
        if batch_key in sources:
            sources["batch_size"] = sources[batch_key]
    changes = plan_changes(config, updates, user_set, sources)
    return Plan(hw, match, tuple(recs), updates, tuple(changes))


# ----------------------------------------------------------------------------------------------
# The report (`kktrain hw-report`)
# ----------------------------------------------------------------------------------------------


def _fmt_bytes(n: int | None) -> str:
    """``100663296`` -> ``96 MiB``; unknown -> ``?``."""
    if n is None:
        return "?"
    if n >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n // MIB} MiB" if n >= MIB else f"{n // 1024} KiB"


def _hardware_rows(hw: HardwareInfo) -> list[tuple[str, str]]:
    """(label, text) lines describing ``hw``."""
    cpu = hw.cpu
    family = cpu.family + (" (3D V-Cache)" if cpu.vcache else "")
    cores = f"{cpu.physical_cores or '?'} physical / {cpu.threads or '?'} threads"
    if cpu.performance_cores:
        cores += f" ({cpu.performance_cores} performance cores)"
    l3 = _fmt_bytes(cpu.l3_bytes)
    if (cpu.l3_instances or 0) > 1:
        l3 += f" in {cpu.l3_instances} instances (largest {_fmt_bytes(cpu.l3_instance_bytes)})"
    gpus = [
        f"{g.index}: {g.name} (sm {g.capability[0]}.{g.capability[1]}, {g.arch}, "
        f"{_fmt_bytes(g.total_memory_bytes)}, bf16 {'yes' if g.bf16 else 'no'})"
        for g in hw.gpus
    ]
    return [
        ("CPU", cpu.model_name or "?"),
        ("Family", f"{family}, vendor {cpu.vendor or '?'}"),
        ("Cores", cores),
        ("L3", l3),
        ("ISA", " ".join(cpu.isa) or "?"),
        ("RAM", _fmt_bytes(hw.ram_bytes)),
        ("GPUs", "; ".join(gpus) or "none"),
        ("MPS", "available" if hw.mps_available else "no"),
    ]


def _report_json(hw: HardwareInfo, match: MatchResult, changes: Iterable[Change]) -> str:
    """The report as JSON."""
    body = {
        "hardware": hw.to_dict(),
        "match": match.to_dict(),
        "changes": [
            {"key": c.key, "old": c.old, "new": c.new, "source": c.source} for c in changes
        ],
    }
    return json.dumps(body, indent=2, default=str)


def render_report(
    hw: HardwareInfo,
    match: MatchResult,
    changes: Iterable[Change | tuple[str, Any, Any, str]],
    as_json: bool = False,
) -> str:
    """What was detected, which profiles match and why, and what would change in the config."""
    rows = [Change(*c) for c in changes]
    if as_json:
        return _report_json(hw, match, rows)
    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    # markup off: model names and reasons may hold "[...]", which rich would eat as a style tag.
    console = Console(file=buffer, width=110, color_system=None, highlight=False, markup=False)
    detected = Table(title="Detected hardware", show_header=False, title_justify="left")
    for label, text in _hardware_rows(hw):
        detected.add_row(label, text)
    console.print(detected)
    chosen = Table(title=f"Profiles (training on {match.device_kind})", title_justify="left")
    for column in ("role", "profile", "specificity", "why"):
        chosen.add_column(column)
    for role, picked in (("cpu", match.cpu), ("gpu", match.gpu)):
        if picked is not None:
            why = "; ".join(picked.reasons)
            chosen.add_row(role, picked.profile.name, str(picked.specificity), why)
    console.print(chosen)
    table = Table(title="Config changes (with --plugin vcache)", title_justify="left")
    if any(_plugin_of(change.key) for change in rows):
        table.caption = "amp.*, compile.*, mps-guard.*: only with that plugin enabled"
    for column in ("key", "now", "new", "from profile"):
        table.add_column(column)
    for change in rows:
        old = "default" if change.old is None else repr(change.old)
        table.add_row(change.key, old, repr(change.new), change.source)
    console.print(table if rows else "No config changes: the config already matches.")
    return buffer.getvalue()


# Plugins whose options profiles set; the report assumes them on, saying so, to show everything.
_REPORT_PLUGINS = ("vcache", "amp", "compile", "mps-guard")


def report(
    *,
    as_json: bool = False,
    device: str = "auto",
    extra_dirs: Iterable[Path | str] = (),
    config: Any = None,
    user_set: Iterable[str] = (),
    hw: HardwareInfo | None = None,
) -> str:
    """``kktrain hw-report``: detect, match, print and return the report against ``config``."""
    if config is None:  # the defaults of a run with every hardware-tunable plugin on
        config = RunConfig(device=device, plugins=list(_REPORT_PLUGINS))
    hw = detect_hardware() if hw is None else hw
    result = plan(hw, config, load_profiles(extra_dirs), user_set=user_set)
    text = render_report(hw, result.match, result.changes, as_json=as_json)
    print(text, end="" if text.endswith("\n") else "\n")
    return text

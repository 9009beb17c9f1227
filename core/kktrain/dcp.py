"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): the format under torchrun.

Layout of one checkpoint, a directory in ``RUN/checkpoints/``::

    step_00000500/             (also best/, final/): committed by renaming step_00000500.tmp/
        .metadata              DCP's index (rank 0)
        __0_0.distcp ...       every rank's shard of model, optimizer and sharded plugin tensors
        state.pt               rank 0: step, scheduler, training state, config, task, plugin states
        rank_00000.pt ...      every rank's own RNG states
        manifest.json          sha256 and size of every file, step, kind, world size: written last

All ranks write into ``NAME.tmp/``; each hashes the files it wrote, rank 0 gathers the hashes,
writes the manifest, fsyncs and renames the directory into place (the commit), then fsyncs the
parent. A directory without a manifest, with a file missing, extra, truncated or altered, is not
trusted; an uncommitted ``.tmp`` one is never even listed. Model and optimizer state go through
``get_state_dict``, so they load into another world size and strategy (DCP reshards); plugin
states are taken from rank 0, except ``DTensor`` values (FSDP shards such as the EMA weights),
which are stored sharded and come back sharded like the model.

Nothing here executes code from a checkpoint. Stock DCP does: its reader unpickles ``.metadata``
with ``pickle.load`` and its planner reads non-tensor values with ``torch.load(weights_only=False)``.
:class:`kktrain.dcp_safe.SafeFileSystemReader` unpickles with an allow-list of DCP's own
metadata classes and :class:`kktrain.dcp_safe.SafeLoadPlanner` reads values with
``weights_only=True``; ``state.pt`` and the per-rank files load with ``weights_only=True`` too.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kktrain.errors import CheckpointError

if TYPE_CHECKING:
    from kktrain.trainer import Trainer

FORMAT = "kktrain-sharded-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_FILE = "state.pt"
_DIR_RE = re.compile(r"^(?:step_(\d+)|best|final)$")
_PLACEHOLDER = "kktrain_sharded_tensor"


def rank_file(rank: int) -> str:
    """The per-rank file of ``rank`` (its RNG states)."""
    return f"rank_{rank:05d}.pt"


def dir_name(kind: str, step: int) -> str:
    """The directory name of a checkpoint of ``kind`` at ``step``."""
    return {"best": "best", "final": "final"}.get(kind, f"step_{step:08d}")


# --------------------------------------------------------------------------------------------
# Reading DCP without executing code
# --------------------------------------------------------------------------------------------


def safe_reader(path: Path) -> Any:
    """A :class:`kktrain.dcp_safe.SafeFileSystemReader` of the DCP files in ``path``."""
    from kktrain.dcp_safe import SafeFileSystemReader

    return SafeFileSystemReader(str(path))


def safe_planner(**kwargs: Any) -> Any:
    """A :class:`kktrain.dcp_safe.SafeLoadPlanner`."""
    from kktrain.dcp_safe import SafeLoadPlanner

    return SafeLoadPlanner(**kwargs)


def read_metadata(path: Path) -> Any:
    """DCP's metadata of the checkpoint in ``path``, unpickled with the allow-list."""
    try:
        return safe_reader(path).read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely ({type(e).__name__}: {_first_line(e)}): its DCP metadata holds "
            "objects other than DCP's own; kktrain never loads code from a checkpoint"
        ) from None


def _first_line(e: BaseException) -> str:
    """The line of a load error worth showing: the refused global, never torch's advice to load
    with ``weights_only=False``."""
    import re

    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"the global {found.group(1)} is not allowed"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    return (lines[0] if lines else "").replace("WeightsUnpickler error: ", "")[:200]


def _dcp_load(state: dict[str, Any], path: Path, *, no_dist: bool = False, process_group: Any = None) -> None:
    """``dcp.load`` with the safe reader and planner; every failure becomes a :class:`CheckpointError`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: meant so
            dcp.load(state, storage_reader=safe_reader(path), planner=safe_planner(), no_dist=no_dist,
                     process_group=process_group)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        detail = f"{type(e).__name__}: {_first_line(e)}"
        failures = getattr(e, "failures", None)
        if isinstance(failures, Mapping) and failures:  # {rank: (exception, traceback)}
            inner = next(iter(failures.values()))
            inner = inner[0] if isinstance(inner, tuple) and inner else inner
            detail = f"{type(inner).__name__}: {_first_line(inner)}"
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely ({detail}): it is corrupt, or holds objects other than tensors "
            "and plain containers; kktrain never loads code from a checkpoint"
        ) from None


# --------------------------------------------------------------------------------------------
# Files: manifest, verification, listing
# --------------------------------------------------------------------------------------------


def is_sharded(path: Path) -> bool:
    """Whether ``path`` is a sharded checkpoint directory (committed or not)."""
    return path.is_dir() and ((path / MANIFEST).exists() or (path / ".metadata").exists() or (path / STATE_FILE).exists())


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a sharded checkpoint, or ``None`` when missing or unreadable."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def committed_dirs(directory: Path) -> list[Path]:
    """Committed-looking checkpoint directories (``step_N``, ``best``, ``final``) in ``directory``."""
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.is_dir() and _DIR_RE.match(p.name)]


def dir_step(path: Path) -> int:
    """The step of a checkpoint directory: its manifest's, else its name's (-1 when neither says)."""
    manifest = read_manifest(path) or {}
    m = _DIR_RE.match(path.name)
    return int(manifest.get("step", int(m.group(1)) if m and m.group(1) else -1))


def verify(path: Path) -> tuple[bool, str]:
    """Check a sharded checkpoint against its manifest: (ok, reason)."""
    if not path.is_dir():
        return False, "directory missing"
    if path.name.endswith((".tmp", ".old")):
        return False, "an uncommitted directory (the write did not finish)"
    manifest = read_manifest(path)
    if manifest is None:
        return False, "no valid manifest (the write did not finish)"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return False, "no valid manifest (the write did not finish)"
    on_disk = {p.name for p in path.iterdir()} - {MANIFEST}
    if on_disk != set(files):
        missing, extra = sorted(set(files) - on_disk), sorted(on_disk - set(files))
        return False, f"files differ from the manifest (missing {missing[:3]}, extra {extra[:3]})"
    from kktrain.checkpoint import file_sha256

    for name, entry in sorted(files.items()):
        p = path / name
        if p.stat().st_size != entry.get("bytes"):
            return False, f"{name}: size differs from the manifest (truncated)"
        if file_sha256(p) != entry.get("sha256"):
            return False, f"{name}: checksum mismatch (corrupt)"
    return True, "ok"


def _fsync(path: Path) -> None:
    from kktrain.checkpoint import _fsync_dir

    _fsync_dir(path)


def _write_file(path: Path, write: Callable[[Any], None]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# What goes where: DCP (sharded tensors), state.pt (rank 0), rank files
# --------------------------------------------------------------------------------------------


def _is_dtensor(value: Any) -> bool:
    return type(value).__name__ == "DTensor" and hasattr(value, "full_tensor")


def _split_sharded(obj: Any, found: list[Any]) -> Any:
    """``obj`` with every ``DTensor`` replaced by a placeholder; the DTensors appended to ``found``."""
    if _is_dtensor(obj):
        found.append(obj)
        return {_PLACEHOLDER: len(found) - 1, "shape": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch.")}
    if isinstance(obj, Mapping):
        return {k: _split_sharded(v, found) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_split_sharded(v, found) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_split_sharded(v, found) for v in obj)
    return obj


def _placeholders(obj: Any, out: dict[int, tuple[list[int], str]]) -> None:
    if isinstance(obj, Mapping):
        if _PLACEHOLDER in obj:
            out[int(obj[_PLACEHOLDER])] = (list(obj["shape"]), str(obj["dtype"]))
            return
        for v in obj.values():
            _placeholders(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _placeholders(v, out)


def _fill(obj: Any, tensors: Mapping[str, Any]) -> Any:
    if isinstance(obj, Mapping):
        if _PLACEHOLDER in obj:
            return tensors[str(obj[_PLACEHOLDER])]
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, tensors) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_fill(v, tensors) for v in obj)
    return obj


@dataclass
class ShardedParts:
    """One checkpoint's content on this rank, split by where it is written."""

    name: str
    kind: str
    step: int
    dcp_state: dict[str, Any]
    """Written through DCP: ``model``, ``optimizer`` (``get_state_dict``), ``plugin_tensors``."""
    rank_state: dict[str, Any]
    """This rank's own file: its RNG states."""
    main_state: dict[str, Any] | None
    """Rank 0's ``state.pt``: everything else (``None`` on the other ranks)."""
    strategy: str = "ddp"
    staged: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def prepare(trainer: Trainer, kind: str) -> ShardedParts:
    """This rank's parts of a checkpoint of ``kind`` (collective under FSDP: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tr = trainer
    payload = tr.checkpoints.payload(kind=kind)
    model_state = get_model_state_dict(tr.model)
    dcp_state: dict[str, Any] = {"model": model_state}
    # An optimizer that has not stepped has no state; get_optimizer_state_dict would create it
    # with a zero-LR step, and a resume would then differ from the uninterrupted run.
    optimizer_empty = not tr.optimizer.state
    if not optimizer_empty:
        dcp_state["optimizer"] = get_optimizer_state_dict(tr.model, tr.optimizer)
    sharded: list[Any] = []
    plugins = _split_sharded(payload["plugins"], sharded)
    dcp_state["plugin_tensors"] = {str(i): t for i, t in enumerate(sharded)}
    main_state = None
    if tr.is_main:
        main_state = {k: v for k, v in payload.items() if k not in ("model", "optimizer", "rng", "plugins")}
        main_state["plugins"] = plugins
        main_state["optimizer_empty"] = optimizer_empty
        main_state["optimizer_groups"] = payload["optimizer"]["param_groups"] if optimizer_empty else None
        main_state["distributed"] = {"world_size": tr.world_size, "strategy": tr.distributed.strategy}
    return ShardedParts(
        dir_name(kind, tr.state.step), kind, tr.state.step, dcp_state, {"rng": payload["rng"], "rank": tr.rank},
        main_state, strategy=tr.distributed.strategy,
    )


def commit(parts: ShardedParts, directory: Path, *, rank: int, world_size: int, group: Any = None) -> Path:
    """Write ``parts`` of every rank into ``NAME.tmp/`` and commit it as ``NAME/`` (all ranks call).

    Every rank ends with the same outcome: the committed path, or a :class:`CheckpointError`
    (the ``.tmp`` directory is then left behind, never trusted, and removed by the next attempt).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.api import CheckpointException

    distributed = world_size > 1 and dist.is_initialized()
    final = directory / parts.name
    tmp = directory / f"{parts.name}.tmp"
    t0 = time.perf_counter()
    error: str | None = None
    if rank == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by an attempt that crashed
            tmp.mkdir()
        except OSError as e:
            error = f"cannot create {tmp} ({e.strerror or e})"
    error = _agree(error, distributed, group)
    if error is not None:
        raise CheckpointError(f"writing checkpoint {final} failed ({error}): free disk space or choose another --out; "
                              "earlier checkpoints are intact")
    entries: dict[str, dict[str, Any]] = {}
    local_error: str | None = None
    try:
        dcp.save(parts.dcp_state, storage_writer=FileSystemWriter(str(tmp), sync_files=True, thread_count=1),
                 process_group=group, no_dist=not distributed)
        mine = [tmp / rank_file(rank)]
        _write_file(mine[0], lambda f: torch.save(parts.rank_state, f))
        if parts.main_state is not None:
            mine.append(tmp / STATE_FILE)
            _write_file(mine[-1], lambda f: torch.save(parts.main_state, f))
            mine.append(tmp / ".metadata")
        mine += sorted(tmp.glob(f"__{rank}_*.distcp"))
        from kktrain.checkpoint import file_sha256

        entries = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in mine}
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        local_error = f"{type(e).__name__}: {_first_line(e)}"
    t_write = time.perf_counter() - t0
    gathered: list[Any] = [(entries, local_error)]
    if distributed:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (entries, local_error), group=group)
    outcome: str | None = next((err for _, err in gathered if err), None)
    if rank == 0 and outcome is None:
        try:
            files = {name: entry for ents, _ in gathered for name, entry in ents.items()}
            on_disk = {p.name for p in tmp.iterdir()}
            if on_disk != set(files):
                raise OSError(f"unexpected files in {tmp.name}: {sorted(on_disk ^ set(files))[:4]}")
            manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": parts.step, "kind": parts.kind,
                        "world_size": world_size, "strategy": parts.strategy, "time": time.time(), "files": files}
            _write_file(tmp / f".{MANIFEST}.part", lambda f: f.write(json.dumps(manifest, indent=1, sort_keys=True).encode()))
            os.replace(tmp / f".{MANIFEST}.part", tmp / MANIFEST)
            _fsync(tmp)
            _swap_in(tmp, final)
            _fsync(directory)
        except OSError as e:
            outcome = f"{type(e).__name__}: {e.strerror or e}"
    outcome = _agree(outcome, distributed, group)
    parts.timings.update(write_s=t_write, total_s=time.perf_counter() - t0)
    if outcome is not None:
        raise CheckpointError(
            f"writing checkpoint {final} failed ({outcome}): free disk space or choose another --out; earlier "
            "checkpoints are intact"
        )
    return final


def _agree(value: str | None, distributed: bool, group: Any) -> str | None:
    """Rank 0's value on every rank (each rank's first error wins over ``None``)."""
    if not distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)  # group rank 0 is global rank 0 (a group of all ranks)
    return box[0]


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (a second best/) moves aside first and is
    deleted only once the new one is in place."""
    if final.exists():
        old = final.with_name(f"{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


# --------------------------------------------------------------------------------------------
# Loading: the run's resume (every rank), and consolidation (one process: export, load_model)
# --------------------------------------------------------------------------------------------


def _load_torch(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a usable checkpoint"
        raise CheckpointError(
            f"checkpoint {path.parent} cannot be loaded safely ({what}: {type(e).__name__}: {_first_line(e)}): it is "
            "corrupt or holds objects other than tensors and plain containers; kktrain never loads code from a checkpoint"
        ) from None


def read_state(path: Path, *, verify_checksum: bool = True) -> dict[str, Any]:
    """The non-tensor part of a sharded checkpoint (``state.pt``), verified first; tensors stay on disk.

    The result is a payload without ``model``/``optimizer``/``rng`` and with ``sharded`` set to the
    directory: :meth:`kktrain.checkpointer.Checkpointer.load` fills them in (:func:`load_sharded`).
    """
    if verify_checksum:
        ok, reason = verify(path)
        if not ok:
            raise CheckpointError(f"checkpoint {path} failed verification: {reason}; pick another checkpoint or use --resume auto")
    from kktrain import checkpoint as ckpt

    state = _load_torch(path / STATE_FILE, STATE_FILE)
    if not isinstance(state, dict) or state.get("format") != ckpt.FORMAT:
        raise CheckpointError(f"{path} is not a kktrain checkpoint: give a directory written by kktrain")
    if state.get("version", 0) > ckpt.FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer kktrain (format {state.get('version')}): upgrade kktrain")
    state["sharded"] = str(path)
    return state


def _rank_state(path: Path, rank: int, saved_world: int) -> dict[str, Any]:
    """This rank's saved file; a rank beyond the saved world size takes rank 0's (the same seed)."""
    state = _load_torch(path / rank_file(rank if rank < saved_world else 0), "rank file")
    if not isinstance(state, dict) or "rng" not in state:
        raise CheckpointError(f"checkpoint {path}: {rank_file(rank)} holds no RNG state: pick another checkpoint")
    return state


def _templates(placeholders: Mapping[int, tuple[list[int], str]], mesh: Any, device: torch.device) -> dict[str, Any]:
    """Tensors to load sharded plugin values into: ``DTensor`` shards on this run's mesh (fsdp), else full."""
    out: dict[str, Any] = {}
    for i, (shape, dtype_name) in placeholders.items():
        dtype = getattr(torch, dtype_name)
        if mesh is not None:
            from torch.distributed.tensor import Replicate, Shard
            from torch.distributed.tensor import empty as dtensor_empty

            out[str(i)] = dtensor_empty(shape, dtype=dtype, device_mesh=mesh, placements=[Shard(0) if shape else Replicate()])
        else:
            out[str(i)] = torch.empty(shape, dtype=dtype, device=device)
    return out


def load_sharded(trainer: Trainer, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Load a sharded checkpoint into the trainer's model and optimizer (every rank; DCP reshards to
    this world size and strategy) and return the payload completed for ``Checkpointer.load``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, set_state_dict

    from kktrain import checkpoint as ckpt
    from kktrain.checkpointer import qualname

    tr = trainer
    path = Path(payload["sharded"])
    metadata = read_metadata(path)
    saved = metadata.state_dict_metadata
    shapes = {k[len("model."):]: v.size for k, v in saved.items() if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    ckpt.check_model_fit(tr.model, {k: torch.empty(s, device="meta") for k, s in shapes.items()}, str(path))
    saved_opt = (payload.get("meta") or {}).get("optimizer")
    if saved_opt and saved_opt != qualname(tr.optimizer):
        raise CheckpointError(
            f"checkpoint {path} was trained with optimizer {saved_opt}, this run builds {qualname(tr.optimizer)}: "
            "enable the same optimizer plugins (e.g. --plugin optim8bit)"
        )
    state: dict[str, Any] = {"model": get_model_state_dict(tr.model)}
    optimizer_empty = bool(payload.get("optimizer_empty"))
    if not optimizer_empty:
        state["optimizer"] = get_optimizer_state_dict(tr.model, tr.optimizer)
        want = {f"optimizer.state.{fqn}.{name}" for fqn, values in state["optimizer"]["state"].items() for name in values}
        have = {k for k in saved if k.startswith("optimizer.state.")}
        if want != have:
            odd = sorted(want ^ have)
            raise CheckpointError(
                f"checkpoint {path}: optimizer state does not fit ({len(odd)} keys differ, e.g. {odd[0]}): resume with the "
                "same optimizer plugins"
            )
    places: dict[int, tuple[list[int], str]] = {}
    _placeholders(payload.get("plugins") or {}, places)
    state["plugin_tensors"] = _templates(places, tr.distributed.mesh, tr.device)
    import torch.distributed as dist

    _dcp_load(state, path, no_dist=not dist.is_initialized())
    if optimizer_empty:
        set_state_dict(tr.model, tr.optimizer, model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(tr.model, tr.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    saved_world = int((payload.get("distributed") or {}).get("world_size", 1))
    out = {k: v for k, v in payload.items() if k != "sharded"}
    out["model"] = tr.model.state_dict()
    out["optimizer"] = tr.optimizer.state_dict()
    out["rng"] = _rank_state(path, tr.rank, saved_world)["rng"]
    out["plugins"] = _fill(payload.get("plugins") or {}, state["plugin_tensors"])
    return out


def _nest(paths: Mapping[str, tuple[Any, ...]], values: Mapping[str, Any]) -> dict[str, Any]:
    """A nested state dict from DCP's flattened keys and their paths (int path parts make lists)."""
    root: dict[Any, Any] = {}
    for key, path in paths.items():
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = values[key]

    def lists(obj: Any) -> Any:
        if isinstance(obj, dict):
            obj = {k: lists(v) for k, v in obj.items()}
            if obj and all(isinstance(k, int) for k in obj):
                return [obj[i] for i in sorted(obj)]
        return obj

    return lists(root)


def consolidate(path: Path) -> dict[str, Any]:
    """Every DCP value of a sharded checkpoint as full, plain tensors (one process, no process group)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(path)
    flat: dict[str, Any] = {}
    for key, meta in metadata.state_dict_metadata.items():
        flat[key] = torch.empty(meta.size, dtype=meta.properties.dtype) if isinstance(meta, TensorStorageMetadata) else None
    paths = {k: tuple(metadata.planner_data.get(k, (k,))) for k in flat}
    template = _nest(paths, flat)
    _dcp_load(template, path, no_dist=True)
    return template


def load_full(path: Path, *, verify_checksum: bool = True) -> dict[str, Any]:
    """A sharded checkpoint as one payload of full CPU tensors, like a single-file checkpoint's
    (``model``: the model's state dict; ``optimizer``: keyed by parameter name; ``rng``: rank 0's)."""
    state = read_state(path, verify_checksum=verify_checksum)
    tensors = consolidate(path)
    state.pop("sharded")
    state["model"] = tensors.get("model", {})
    state["optimizer"] = tensors.get("optimizer", {"state": {}, "param_groups": state.get("optimizer_groups") or []})
    state["plugins"] = _fill(state.get("plugins") or {}, tensors.get("plugin_tensors", {}))
    state["rng"] = _rank_state(path, 0, 1)["rng"]
    return state

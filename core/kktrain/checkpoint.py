"""Atomic, verified, rolling checkpoints.

Layout of ``RUN/checkpoints/``::

    step_00000500.pt        rolling (keep_last K), written every N steps, at epoch ends, on SIGTERM;
                            a multiple of checkpoint.keep_every is a milestone, never pruned
    step_00000500.pt.json   its manifest: sha256, size, step, kind; written after the .pt
    best.pt  best.pt.json   the best by ``checkpoint.best_metric``
    final.pt final.pt.json  at the end of training

A write goes to a temporary file, is fsynced, hashed from what is on disk, and renamed into
place; the manifest follows the same way. A checkpoint without a manifest, or whose hash does not
match, is not trusted. Loading uses ``torch.load(weights_only=True)``: a checkpoint holds tensors
and plain containers only and can never execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kktrain.errors import CheckpointError

FORMAT = "kktrain-checkpoint"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
_STEP_DIR_RE = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint file on disk with its manifest."""

    path: Path
    step: int
    kind: str
    sha256: str


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_checkpoint(directory: Path, name: str, payload: dict[str, Any], *, step: int, kind: str) -> CheckpointRef:
    """Write ``payload`` atomically as ``directory/name`` plus its manifest; return the reference."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    manifest_path = directory / f"{name}.json"
    # The old manifest goes first: a crash between the two renames leaves an untrusted file,
    # never a manifest that vouches for the wrong content.
    manifest_path.unlink(missing_ok=True)
    _atomic_write(path, lambda f: torch.save(payload, f))
    digest = file_sha256(path)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "sha256": digest, "bytes": path.stat().st_size, "step": step, "kind": kind}
    _atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return CheckpointRef(path, step, kind, digest)


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest next to a checkpoint, or ``None`` when missing or unreadable."""
    try:
        return json.loads(Path(f"{path}.json").read_text())
    except (OSError, ValueError):
        return None


def verify(path: Path) -> tuple[bool, str]:
    """Check a checkpoint against its manifest: (ok, reason)."""
    if path.is_dir():  # a sharded checkpoint (torchrun): kktrain.dcp
        from kktrain import dcp

        return dcp.verify(path)
    if not path.is_file():
        return False, "file missing"
    manifest = read_manifest(path)
    if manifest is None or manifest.get("format") != FORMAT:
        return False, "no valid manifest (the write did not finish)"
    if path.stat().st_size != manifest.get("bytes"):
        return False, "size differs from the manifest (truncated)"
    if file_sha256(path) != manifest.get("sha256"):
        return False, "checksum mismatch (corrupt)"
    return True, "ok"


def load_checkpoint(path: str | os.PathLike[str], *, verify_checksum: bool = True) -> dict[str, Any]:
    """Load a verified checkpoint with ``weights_only=True`` onto the CPU."""
    p = Path(path)
    if p.is_dir():
        from kktrain import dcp

        if dcp.is_sharded(p):  # consolidated into full CPU tensors
            return dcp.load_full(p, verify_checksum=verify_checksum)
        raise CheckpointError(f"{p} is a directory: give a checkpoint file, or use --resume auto --out {p}")
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist: check the path, or use --resume auto")
    if verify_checksum:
        ok, reason = verify(p)
        if not ok:
            raise CheckpointError(f"checkpoint {p} failed verification: {reason}; pick another checkpoint or use --resume auto")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a usable checkpoint"
        lines = str(e).splitlines() or [""]
        detail = next((ln.strip() for ln in lines if "Unsupported global" in ln), lines[0])
        detail = detail.replace("WeightsUnpickler error: ", "")[:200]
        raise CheckpointError(
            f"checkpoint {p} cannot be loaded safely ({type(e).__name__}: {detail}): it is corrupt or "
            "holds objects other than tensors and plain containers; kktrain never loads code from a checkpoint"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a kktrain checkpoint: give a file written by kktrain")
    if payload.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{p} was written by a newer kktrain (format {payload.get('version')}): upgrade kktrain")
    return payload


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory`` (rolling, best, final), newest step first; unverified too."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        if p.suffix == ".pt" and not p.name.startswith("."):
            manifest = read_manifest(p) or {}
            m = _STEP_RE.match(p.name)
            step = manifest.get("step", int(m.group(1)) if m else -1)
            found.append((step, p.name.startswith("step_"), p))
    from kktrain import dcp

    found += [(dcp.dir_step(p), p.name.startswith("step_"), p) for p in dcp.committed_dirs(directory)]
    found.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [p for _, _, p in found]


def newest_valid(directory: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that verifies; corrupt or unfinished ones are skipped with a warning."""
    for p in list_checkpoints(directory):
        ok, reason = verify(p)
        if ok:
            return p
        warn(f"skipping checkpoint {p.name}: {reason}")
    return None


def prune(directory: Path, keep_last: int, keep_every: int = 0) -> list[Path]:
    """Delete rolling step checkpoints beyond the newest ``keep_last``; return what was removed.

    Milestones (a step that is a multiple of ``keep_every`` > 0) are never deleted. Sharded ones
    (``step_N/`` directories) count too: a run resumed on another world size has both.
    """
    steps = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_RE.match(p.name) or _STEP_DIR_RE.match(p.name)))
    removed = []
    for step, p in steps[: max(0, len(steps) - keep_last)]:
        if keep_every and step % keep_every == 0:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
            Path(f"{p}.json").unlink(missing_ok=True)
        removed.append(p)
    return removed


def step_name(step: int) -> str:
    """File name of the rolling checkpoint for ``step``."""
    return f"step_{step:08d}.pt"


def check_model_fit(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a report of missing, unexpected and shape-mismatched keys when ``state`` does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
            if items:
                shown = ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        raise CheckpointError(
            f"checkpoint {source} is for another model ({'; '.join(parts)}): resume with the task "
            "and model options it was trained with"
        )

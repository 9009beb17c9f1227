"""Atomic, verified, rolling checkpoints.

Layout of ``RUN/checkpoints/``::

    step_00000500.pt        rolling (keep_last K), written every N steps, at epoch ends, on SIGTERM;
                            a multiple of checkpoint.keep_every is a milestone, never pruned
    step_00000500.pt.json   its manifest: sha256, size, step, kind; written after the .pt
    best.pt  best.pt.json   the best by ``checkpoint.best_metric``
    final.pt final.pt.json  at the end of training

A write goes to a temporary file, is fsynced and hashed from what is on disk; its manifest is
written to a temporary file too. Only when both are complete are they renamed into place (the
checkpoint first, the manifest last). A checkpoint that replaces one of the same name (``best.pt``,
``final.pt`` of an extended run) keeps the old pair as ``.NAME.prev`` + ``.NAME.prev.json`` (hard
links, no copy) until the new pair is in place, so a write that fails or is killed at any moment
leaves the old checkpoint verifiable: :func:`newest_valid` falls back to the kept version and
:func:`sweep` (run start, under the run lock) puts it back and removes temporary files of killed
writes. A checkpoint without a manifest, or whose hash does not match, is not trusted. Loading uses
``torch.load(weights_only=True)``: a checkpoint holds tensors and plain containers only and can
never execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
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


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_synced(tmp: Path, write: Callable[[Any], None]) -> None:
    """Write ``tmp`` and fsync it; on any failure the partial file is removed."""
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    tmp = _tmp_name(path)
    _write_synced(tmp, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def backup_path(path: Path) -> Path:
    """Where the previous version of ``path`` is kept while a checkpoint of the same name is rewritten."""
    return path.with_name(f".{path.name}.prev")


def _keep_previous(path: Path) -> bool:
    """Hard-link the current pair of ``path`` to its backup names; False when there is none."""
    manifest, prev = Path(f"{path}.json"), backup_path(path)
    if not (path.is_file() and manifest.is_file()):
        return False
    _drop_backup(path)
    try:
        os.link(manifest, f"{prev}.json")
        os.link(path, prev)
    except OSError:  # a filesystem without hard links: the old pair stays until the renames
        _drop_backup(path)
        return False
    return True


def _drop_backup(path: Path) -> None:
    prev = backup_path(path)
    prev.unlink(missing_ok=True)
    Path(f"{prev}.json").unlink(missing_ok=True)


def write_checkpoint(directory: Path, name: str, payload: dict[str, Any], *, step: int, kind: str,
                     extra: dict[str, Any] | None = None) -> CheckpointRef:
    """Write ``payload`` atomically as ``directory/name`` plus its manifest; return the reference.

    Both files are complete on disk (fsynced, hashed) before either is renamed into place; an
    existing checkpoint of the same name stays verifiable (itself, or its kept previous version)
    at every moment, and a failure leaves no temporary file behind.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    manifest_path = directory / f"{name}.json"
    tmp, tmp_manifest = _tmp_name(path), _tmp_name(manifest_path)
    try:
        _write_synced(tmp, lambda f: torch.save(payload, f))
        digest = file_sha256(tmp)
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "sha256": digest, "bytes": tmp.stat().st_size,
                    "step": step, "kind": kind, **(extra or {})}
        _write_synced(tmp_manifest, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        kept = _keep_previous(path)
        os.replace(tmp, path)
        os.replace(tmp_manifest, manifest_path)  # last: from here on the new pair is the checkpoint
        _fsync_dir(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
        raise
    if kept:
        _drop_backup(path)
    return CheckpointRef(path, step, kind, digest)


def sweep(directory: Path, warn: Callable[[str], None]) -> None:
    """Tidy what killed writes left in ``directory`` (call it holding the run lock).

    Temporary files of unfinished writes are removed; a checkpoint whose rewrite was interrupted
    gets its kept previous version back when it does not verify itself.
    """
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name.startswith(".") and ".tmp-" in p.name and p.is_file():
            p.unlink(missing_ok=True)
    for prev in directory.glob(".*.prev"):
        path = directory / prev.name[1:-len(".prev")]
        if verify(path)[0] or not verify(prev)[0]:
            _drop_backup(path)
            continue
        # The manifest first: if this is interrupted too, the backup pair is still complete.
        os.replace(f"{prev}.json", f"{path}.json")
        os.replace(prev, path)
        _fsync_dir(directory)
        warn(f"checkpoint {path.name}: its rewrite was interrupted; restored the previous version (step {read_step(path)})")


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest next to a checkpoint, or ``None`` when missing, unreadable or not a JSON object."""
    try:
        manifest = json.loads(Path(f"{path}.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def read_step(path: Path) -> int:
    """The step a checkpoint's manifest names (from its file name without one; -1 if neither)."""
    step = (read_manifest(path) or {}).get("step")
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else -1


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
    step = manifest.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return False, f"manifest has no valid step ({step!r})"
    if path.stat().st_size != manifest.get("bytes"):
        return False, "size differs from the manifest (truncated)"
    if file_sha256(path) != manifest.get("sha256"):
        return False, "checksum mismatch (corrupt)"
    return True, "ok"


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def unsafe_load_message(path: Path, error: BaseException) -> str:
    """One line for a checkpoint torch's ``weights_only`` loader refused or could not read.

    It names the offending global when there is one, and never repeats torch's advice to load
    with ``weights_only=False`` (that would run the file's code).
    """
    text = str(error)
    m = _GLOBAL_RE.search(text)
    refused = m is not None or "Weights only load failed" in text
    if refused:
        advice = ("weights_only", "Weights only load failed", "Check the documentation", "Please file", "do those steps")
        plain = [ln.strip().replace("WeightsUnpickler error:", "").strip() for ln in text.splitlines()]
        what = f"the global {m.group(1)}" if m else next(
            (ln[:120] for ln in plain if ln and not any(a in ln for a in advice)), "objects other than tensors")
        return (f"checkpoint {path} holds code or objects kktrain does not load ({what}): a kktrain checkpoint "
                "holds only tensors and plain containers, and kktrain never loads code from a checkpoint; use a "
                "checkpoint written by kktrain")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")[:160]
    detail = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return (f"checkpoint {path} cannot be read ({detail}): it is corrupt or not a torch file; pick another "
            "checkpoint or use --resume auto")


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
        with warnings.catch_warnings():  # torch's "Detected pickle protocol" note on a foreign file
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a usable checkpoint"
        raise CheckpointError(unsafe_load_message(p, e)) from None
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
            found.append((read_step(p), p.name.startswith("step_"), p))
    from kktrain import dcp

    found += [(dcp.dir_step(p), p.name.startswith("step_"), p) for p in dcp.committed_dirs(directory)]
    found.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [p for _, _, p in found]


def newest_valid(directory: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that verifies; corrupt or unfinished ones are skipped with a warning.

    A checkpoint whose rewrite was cut short is replaced by its kept previous version.
    """
    return newest_valid_of(list_checkpoints(directory), warn)


def newest_loadable(directory: Path, warn: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies *and* loads, with its payload (``state.pt`` only for a
    sharded one); a bad one (a matching checksum over a file torch cannot load) is skipped too."""
    from kktrain import dcp

    skipped: set[Path] = set()
    while True:
        candidates = [p for p in list_checkpoints(directory) if p not in skipped]
        path = newest_valid_of(candidates, warn)
        if path is None:
            return None
        try:
            payload = dcp.read_state(path) if dcp.is_sharded(path) else load_checkpoint(path)
        except CheckpointError as e:
            warn(f"skipping checkpoint {path.name}: {e}")
            skipped.add(path)
            skipped.add(directory / path.name.removeprefix(".").removesuffix(".prev"))
            continue
        return path, payload


def newest_valid_of(candidates: list[Path], warn: Callable[[str], None]) -> Path | None:
    """The first of ``candidates`` (newest first) that verifies, or its kept previous version."""
    for p in candidates:
        ok, reason = verify(p)
        if ok:
            return p
        prev = backup_path(p)
        if prev.is_file() and verify(prev)[0]:
            warn(f"checkpoint {p.name}: {reason}; using its previous version, kept while it was rewritten")
            return prev
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

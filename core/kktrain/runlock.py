"""One run per run directory: ``RUN/.lock``, held for the run's life.

The lock is a POSIX record lock (``lockf``) on ``RUN/.lock``, which records the holder's pid and
host. The kernel releases it when its process dies, and, unlike ``flock``, a forked child (a
data-loader worker outliving a killed parent for a moment) does not hold it; so a lock file left
by a killed run (``kill -9``) is free to take: the next run takes it over with a warning naming the
dead holder. A second run on
the same directory while the first is alive is refused with one line. The lock is released (and
the file removed) on every exit path the process survives: the end of the run, an abort, a crash,
an interrupt, a failed set-up. Record locks belong to a process, so two trainers in one Python
process are not kept apart. Where ``fcntl`` is not available (Windows) runs are not locked.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from kktrain.errors import ConfigError

LOCK_FILE = ".lock"


class RunLock:
    """The lock on one run directory (:meth:`acquire` it, :meth:`release` it)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._file is not None

    def acquire(self, warn: Callable[[str], None]) -> None:
        """Take the lock, or raise :class:`ConfigError` when a live run holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        if self._file is not None:
            return
        for _ in range(5):  # the file may be removed and re-created by a holder between open and flock
            try:
                f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the run's life
            except OSError as e:
                raise ConfigError(
                    f"cannot write to run directory {self.path.parent} ({e.strerror or e}): make it writable or choose another --out"
                ) from None
            try:
                fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(f)
                f.close()
                raise ConfigError(
                    f"run directory {self.path.parent} is in use by another kktrain run ({_describe(holder)}): wait for "
                    "it to finish, stop it, or choose another --out"
                ) from None
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino
            except OSError:
                same = False
            if not same:  # we locked a file its holder just removed: try the new one
                f.close()
                continue
            stale = _read_holder(f)
            if stale and stale.get("pid") != os.getpid():
                warn(f"took over the lock of {self.path.parent} from a run that is gone ({_describe(stale)}); "
                     "it was killed without releasing it")
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
            f.flush()
            self._file = f
            return
        raise ConfigError(f"cannot lock run directory {self.path.parent}: another run keeps replacing {self.path.name}; choose another --out")

    def release(self) -> None:
        """Remove the lock file and let go of the lock (safe to call more than once)."""
        f, self._file = self._file, None
        if f is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        f.close()


def _read_holder(f: IO[str]) -> dict[str, Any]:
    try:
        f.seek(0)
        data = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}"

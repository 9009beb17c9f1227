"""Which runs are the user's own: a signature over the code a run names, keyed by a local secret.

A resume rebuilds the run's task (and module:Class plugins) from what the run recorded. A run
directory or a checkpoint can come from anyone, and importing ``mypkg.tasks:make`` because a file
says so would let the file choose what code runs. So kktrain signs what a run names with an HMAC
keyed by a secret that never leaves this machine (``$KKTRAIN_HOME/trust.key``, default
``~/.config/kktrain/trust.key``, created on first use, mode 0600). A resume imports a recorded
``module:factory`` only when the signature verifies: the user's own run on the user's machine.
Anything else (a downloaded run, an edited config, another user's key) needs the user to name the
code again (``--task mypkg.tasks:make``). Installed entry-point names are never signed: looking up
``latin`` in the installed distributions imports nothing a file chose.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

KEY_FILE = "trust.key"


def home() -> Path:
    """kktrain's per-user directory (``$KKTRAIN_HOME``, else ``~/.config/kktrain``)."""
    configured = os.environ.get("KKTRAIN_HOME")
    return Path(configured) if configured else Path.home() / ".config" / "kktrain"


def _key(create: bool) -> bytes | None:
    path = home() / KEY_FILE
    try:
        return path.read_bytes()
    except OSError:
        if not create:
            return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes()
    except OSError:
        return None  # no writable home: nothing is signed, so resumes must name their code
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path.read_bytes()


def _message(specs: Iterable[str]) -> bytes:
    return "\n".join(sorted(set(specs))).encode()


def sign(specs: Iterable[str]) -> str | None:
    """The signature of the code specs a run names, or None when there is no usable key."""
    key = _key(create=True)
    return hmac.new(key, _message(specs), hashlib.sha256).hexdigest() if key else None


def verify(specs: Iterable[str], signature: object) -> bool:
    """Whether ``signature`` was made on this machine, with this user's key, for these specs."""
    if not isinstance(signature, str) or not signature:
        return False
    key = _key(create=False)
    if key is None:
        return False
    expected = hmac.new(key, _message(specs), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


def code_specs(task: str, plugins: Iterable[str] = ()) -> list[str]:
    """The specs of a run that name code to import: a module:factory task, module:Class plugins."""
    return [s for s in (task, *plugins) if ":" in s or s.startswith("<")]

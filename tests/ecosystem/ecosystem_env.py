"""An isolated Python environment for installing plugin distributions the way a user would.

``python -m venv --system-site-packages`` does not work from inside a virtual environment: the
new venv inherits the *base* interpreter's site-packages, not the venv's, so torch and kktrain
would be missing. Instead the child venv is created without pip and gets one ``.pth`` file that
calls ``site.addsitedir`` on each of the parent's site-packages directories: torch, kktrain (with
its editable finder and entry points) and pip are visible, nothing is copied or downloaded, and
what pip installs goes into the child's own site-packages (pip installs into ``sys.prefix``).
Removing the child directory removes everything; the parent environment is never written to.

With ``inherit_kktrain=False`` the child sees the parent's packages *except* kktrain's own
distributions (the core and every ``kktrain-*`` plugin): the parent's site-packages are mirrored
as a folder of symbolic links that leaves those out. That is a machine with torch and kktrain's
dependencies but no kktrain, where ``pip install ./core`` installs the core alone.

pip always runs with ``--no-deps --no-build-isolation --no-index``: it never resolves torch, and
never touches the network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sysconfig
import time
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# kktrain's own distributions in a site-packages folder: dist-info, editable finders and .pth files.
_KKTRAIN_ENTRY = re.compile(r"^(__editable__[._]+)?_*kktrain", re.IGNORECASE)


def _mirror_without_kktrain(site_dir: Path, into: Path) -> Path:
    """A folder of links to every entry of ``site_dir`` except kktrain's distributions."""
    into.mkdir(parents=True)
    for entry in site_dir.iterdir():
        if not _KKTRAIN_ENTRY.match(entry.name):
            (into / entry.name).symlink_to(entry)
    return into


class IsolatedEnv:
    """A child venv layered on the current environment; pip installs stay inside it."""

    def __init__(self, root: Path, *, inherit_kktrain: bool = True) -> None:
        self.root = root
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt", clear=True).create(root)
        bindir = "Scripts" if os.name == "nt" else "bin"
        self.python = root / bindir / ("python.exe" if os.name == "nt" else "python")
        purelib = subprocess.run(
            [str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        self.site_packages = Path(purelib)
        parents = [p for p in dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]]) if Path(p).is_dir()]
        if not inherit_kktrain:
            parents = [str(_mirror_without_kktrain(Path(p), root.parent / f"parent-site-{i}")) for i, p in enumerate(parents)]
        lines = [f"import site; site.addsitedir({p!r})" for p in parents]
        (self.site_packages / "_kktrain_parent_env.pth").write_text("\n".join(lines) + "\n")
        self.timings["create_venv_s"] = time.perf_counter() - t0

    def env(self) -> dict[str, str]:
        """Environment for child processes: no inherited venv or pip configuration."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHONHOME", "KKTRAIN_"))}
        env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1",
                   VIRTUAL_ENV=str(self.root), PATH=f"{self.python.parent}{os.pathsep}{env.get('PATH', '')}")
        return env

    def run(self, *args: str, cwd: Path | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the child's python with ``args``."""
        proc = subprocess.run([str(self.python), *args], cwd=cwd or self.root, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)[:200]} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
        return proc

    def kktrain(self, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The kktrain CLI as the child environment sees it (``python -m kktrain``: the parent's
        ``kktrain`` console script is bound to the parent's interpreter and would not see the child)."""
        return self.run("-m", "kktrain", *args, cwd=cwd, check=check)

    def pip(self, *args: str) -> subprocess.CompletedProcess[str]:
        """pip of the parent environment, installing into the child."""
        return self.run("-m", "pip", *args)

    def install(self, source: Path, *, with_paths: tuple[Path, ...] = ()) -> None:
        """Install a distribution from a source tree, copied first (builds write into the tree).

        A tree of this repository is copied to the same place under a copy of the repository,
        links kept, with ``with_paths`` beside it: the targets its links point to (vcache's
        ``hardware_profiles`` link), so the build sees exactly what a build in the repository sees.
        """
        ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
        if source.resolve().is_relative_to(REPO):
            mirror = self.root.parent / "repo"
            copy = mirror / source.resolve().relative_to(REPO)
            for extra in with_paths:
                target = mirror / extra.resolve().relative_to(REPO)
                if not target.exists():
                    shutil.copytree(extra, target, ignore=ignore)
            if not copy.exists():
                shutil.copytree(source, copy, ignore=ignore, symlinks=True)
        else:
            copy = self.root.parent / f"src-{source.name}"
            if not copy.exists():
                shutil.copytree(source, copy, ignore=ignore)
        t0 = time.perf_counter()
        self.pip("install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet", str(copy))
        self.timings[f"pip_install_{source.name}_s"] = time.perf_counter() - t0

    def source_copy(self, source: Path) -> Path:
        """Where :meth:`install` copied ``source``."""
        if source.resolve().is_relative_to(REPO):
            return self.root.parent / "repo" / source.resolve().relative_to(REPO)
        return self.root.parent / f"src-{source.name}"

    def plugins(self) -> dict[str, dict]:
        """``kktrain plugins --json`` in the child, by plugin name."""
        return {p["name"]: p for p in json.loads(self.kktrain("plugins", "--json").stdout)}


@pytest.fixture
def isolated_env(tmp_path: Path) -> IsolatedEnv:
    """A fresh child venv on top of the current environment (see the module docstring)."""
    return IsolatedEnv(tmp_path / "venv")

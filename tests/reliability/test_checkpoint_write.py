"""A failed checkpoint write never destroys the checkpoint it was replacing (issue 15, data loss).

Faults come from outside the process: a real file-size limit (RLIMIT_FSIZE: the kernel refuses the
write with EFBIG) and, where a user namespace allows mounting one, a real full tmpfs (ENOSPC,
which torch.save reports as ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``).
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kktrain.checkpoint import backup_path, newest_valid, sweep, verify, write_checkpoint
from rel import KKTRAIN, TINY, env_for, kk, one_line_error

# A model of ~0.6 MB per checkpoint (hidden=128, Adam states): logs stay far below the limit.
BIG = ("-o", "task.hidden=128", "-o", "task.layers=3", "-o", "checkpoint.at_epoch_end=false")
LIMIT = 200_000


def _fsize_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def _no_temp_files(directory: Path) -> None:
    left = [p.name for p in directory.iterdir() if ".tmp" in p.name or p.name.endswith(".prev") or p.name.endswith(".prev.json")]
    assert not left, left


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    kk(*TINY, *BIG, "--max-steps", "4", "--out", "run", cwd=root, check=True)
    assert verify(root / "run" / "checkpoints" / "final.pt")[0]
    return root / "run"


def test_extending_a_run_whose_final_write_fails_keeps_the_old_final(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    ck = run / "checkpoints"
    before = (ck / "final.pt").read_bytes(), (ck / "final.pt.json").read_bytes()
    proc = kk(*TINY, *BIG, "--max-steps", "6", "--out", "run", "--resume", "auto", cwd=tmp_path, preexec_fn=_fsize_limit(LIMIT))
    line = one_line_error(proc, 2, warnings=True)
    assert "writing checkpoint" in line and "final.pt" in line and "earlier checkpoints are intact" in line, line
    assert ((ck / "final.pt").read_bytes(), (ck / "final.pt.json").read_bytes()) == before
    assert verify(ck / "final.pt")[0]
    _no_temp_files(ck)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "writing checkpoint" in summary["error"]
    # Still resumable: the same command without the limit finishes the extension.
    kk(*TINY, *BIG, "--max-steps", "6", "--out", "run", "--resume", "auto", cwd=tmp_path, check=True)
    assert json.loads((ck / "final.pt.json").read_text())["step"] == 6


def test_the_first_write_failing_leaves_no_file_and_one_line(tmp_path: Path) -> None:
    proc = kk(*TINY, *BIG, "--max-steps", "4", "--out", "run", "-o", "checkpoint.every_steps=2", cwd=tmp_path,
              preexec_fn=_fsize_limit(LIMIT))
    one_line_error(proc, 2)
    ck = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ck.iterdir()] == [], "a failed first write left files"


def _tmpfs_script(tmp: Path, run: Path) -> str:
    """Inside a private mount namespace: a tmpfs just big enough for the run, then the extension."""
    size_kb = sum(p.stat().st_size for p in run.rglob("*") if p.is_file()) // 1024 + 300
    return textwrap.dedent(f"""
        set -e
        mkdir -p {tmp}/small
        mount -t tmpfs -o size={size_kb}k tmpfs {tmp}/small
        cp -r {run} {tmp}/small/run
        cd {tmp}/small
        set +e
        {KKTRAIN} {' '.join(TINY)} {' '.join(BIG)} --max-steps 6 --out run --resume auto 2> err.txt
        echo "rc=$?" > {tmp}/result.txt
        cp err.txt {tmp}/err.txt
        {sys.executable} -c "
import json, sys
from pathlib import Path
from kktrain.checkpoint import verify
ck = Path('run/checkpoints')
print(json.dumps({{'final_ok': verify(ck / 'final.pt')[0], 'files': sorted(p.name for p in ck.iterdir()),
                  'summary': json.loads(Path('run/summary.json').read_text())}}))
" > {tmp}/after.json
    """)


def test_disk_full_on_a_real_small_filesystem(finished_run: Path, tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1): cannot mount a small tmpfs without root")
    probe = subprocess.run([unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs in a user namespace here ({probe.stderr.strip()[:120]})")
    script = _tmpfs_script(tmp_path, finished_run)
    subprocess.run([unshare, "-rm", "sh", "-c", script], env=env_for(tmp_path), timeout=240, check=True)
    rc = (tmp_path / "result.txt").read_text().strip()
    err = (tmp_path / "err.txt").read_text().strip()
    assert rc == "rc=2", (rc, err)
    errors = [ln for ln in err.splitlines() if not ln.startswith("warning")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "writing checkpoint" in err and "free disk space" in err, err
    after = json.loads((tmp_path / "after.json").read_text())
    assert after["final_ok"], after
    assert not [f for f in after["files"] if ".tmp" in f or ".prev" in f], after["files"]
    assert after["summary"]["status"] == "failed"


# ---------------------------------------------------------------- the shapes a cut-short rewrite leaves


def _two_versions(directory: Path) -> tuple[bytes, bytes]:
    write_checkpoint(directory, "best.pt", {"format": "kktrain-checkpoint", "version": 1, "step": 3}, step=3, kind="best")
    old = (directory / "best.pt").read_bytes(), (directory / "best.pt.json").read_bytes()
    return old


def test_a_rewrite_cut_between_the_renames_falls_back_to_the_kept_version(tmp_path: Path) -> None:
    """The state a kill between the two renames leaves: new data, old manifest, the old pair kept."""
    old_data, old_manifest = _two_versions(tmp_path)
    prev = backup_path(tmp_path / "best.pt")
    import os

    os.link(tmp_path / "best.pt.json", f"{prev}.json")
    os.link(tmp_path / "best.pt", prev)
    write_checkpoint(tmp_path, "new.pt", {"format": "kktrain-checkpoint", "version": 1, "step": 9}, step=9, kind="best")
    os.replace(tmp_path / "new.pt", tmp_path / "best.pt")  # the data rename happened, the manifest's did not
    (tmp_path / "new.pt.json").unlink()
    assert not verify(tmp_path / "best.pt")[0]
    warnings: list[str] = []
    assert newest_valid(tmp_path, warnings.append) == prev
    assert "previous version" in warnings[0]
    sweep(tmp_path, warnings.append)
    assert (tmp_path / "best.pt").read_bytes() == old_data and (tmp_path / "best.pt.json").read_bytes() == old_manifest
    assert verify(tmp_path / "best.pt")[0] and not prev.exists()


def test_sweep_removes_temporary_files_of_killed_writes(tmp_path: Path) -> None:
    _two_versions(tmp_path)
    for name in (".step_00000004.pt.tmp-12345", ".step_00000004.pt.json.tmp-12345", ".best.pt.tmp-99"):
        (tmp_path / name).write_bytes(b"partial")
    sweep(tmp_path, lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.pt.json"]


def test_a_read_only_run_directory_is_one_line_and_untouched(finished_run: Path, tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _tree(run)
    script = (f"mount --bind {run} {run} && mount -o remount,ro,bind {run} {run} || exit 99; cd {tmp_path}; "
              f"{KKTRAIN} {' '.join(TINY)} {' '.join(BIG)} --max-steps 6 --out run --resume auto")
    if unshare is None:
        pytest.skip("no unshare(1): cannot make a read-only mount without root")
    proc = subprocess.run([unshare, "-rm", "sh", "-c", script], env=env_for(tmp_path), capture_output=True, text=True, timeout=240)
    if proc.returncode == 99:
        pytest.skip(f"cannot bind-mount read-only in a user namespace here ({proc.stderr.strip()[:120]})")
    line = one_line_error(proc, 2, warnings=True)
    assert "Read-only file system" in line and "choose another --out" in line, line
    assert _tree(run) == before

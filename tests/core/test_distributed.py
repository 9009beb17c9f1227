"""Distributed training for real: torchrun, gloo, CPU (docs/distributed.md).

The torchrun launches are few and shared: ``_launch`` runs each once per test session (the
pytest-xdist workers agree through a lock file) and the tests read what it left. Launch ``pair``
trains the same run with DDP and with FSDP (async checkpoints) on 2 processes; ``three`` resumes
both on 3 processes; ``elastic`` SIGKILLs a worker mid-checkpoint under ``--max-restarts=1``;
``plugins`` runs FSDP with amp, EMA and the guards, and the combinations that are refused.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock

import kktrain
from distributed_runs import STEPS, TASK, Dump
from kkcli import kk
from kktrain import CheckpointError, dcp
from kktrain.testing import _tensors_equal, run_tiny

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the torchrun tests use the gloo backend on Linux")

SCRIPT = Path(__file__).with_name("distributed_runs.py")
TORCHRUN = Path(sys.executable).parent / "torchrun"
# Checkpoints of the shared runs: every 3 steps and at epoch ends (4 steps of 2 x 16 samples per
# rank on 2 processes); the 3 newest rolling ones stay: 8 (an epoch's end), 9 (mid-epoch), 12.
MID = 9
MID_SAMPLES = 2 * 16 * 2  # samples of epoch 2 consumed at step 9: 1 step x 2 micro-batches x 16 x 2 ranks
FSDP_VS_DDP_ATOL = 1e-5  # float32 sums may run in another order (reduce-scatter vs all-reduce); measured 0.0 here


# ---------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------


def _shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the workers' common directory


def torchrun(nproc: int, runs: list[dict[str, Any]], work: Path, *, extra: tuple[str, ...] = (), timeout: float = 300) -> dict[str, Any]:
    """Train ``runs`` (distributed_runs.py specs) under ``torchrun --standalone``; rank 0's results and the output."""
    work.mkdir(parents=True, exist_ok=True)
    spec = work / f"spec{len(list(work.glob('spec*.json')))}.json"
    results = spec.with_suffix(".results.json")
    spec.write_text(json.dumps({"runs": runs, "results": str(results)}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KKTRAIN_", "TORCHELASTIC_", "PYTEST_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parent))
    proc = subprocess.run([str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", *extra, str(SCRIPT), str(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=work)
    out = {"returncode": proc.returncode, "stderr": proc.stderr[-6000:], "results": None}
    if results.exists():
        out["results"] = json.loads(results.read_text())
    return out


def _launch(tmp_path_factory: pytest.TempPathFactory, name: str, start: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """Run ``start(directory)`` once for the whole session; every caller gets its directory and outcome."""
    root = _shared_root(tmp_path_factory)
    directory = root / f"dist-{name}"
    with FileLock(str(root / f"dist-{name}.lock")):
        done = directory / "outcome.json"
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            done.write_text(json.dumps(start(directory)))
    outcome = json.loads(done.read_text())
    assert outcome["returncode"] == 0, f"torchrun {name} failed:\n{outcome['stderr']}"
    return directory, outcome


def _pair(directory: Path) -> dict[str, Any]:
    common = {"plugins": ["ema"]}
    return torchrun(2, [
        {**common, "out": str(directory / "ddp"), "dump_end": str(directory / "ddp_end.pt")},
        {**common, "out": str(directory / "fsdp"), "dump_end": str(directory / "fsdp_end.pt"),
         "options": {"distributed.strategy": "fsdp", "checkpoint.async": True}},
    ], directory)


@pytest.fixture
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DDP and FSDP (async checkpoints) runs of the same config on 2 processes."""
    return _launch(tmp_path_factory, "pair", _pair)[0]


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _mid(run: Path) -> Path:
    return run / "checkpoints" / f"step_{MID:08d}"


def _assert_loaded_exactly(dump: dict[str, Any], checkpoint: Path) -> None:
    saved = kktrain.load_checkpoint(checkpoint)  # consolidated: full tensors
    diffs = _tensors_equal(saved["model"], dump["model"], "model")
    diffs += _tensors_equal(saved["optimizer"]["state"], dump["optimizer"]["state"], "optimizer.state")
    diffs += _tensors_equal(saved["optimizer"]["param_groups"], dump["optimizer"]["param_groups"], "optimizer.param_groups")
    assert not diffs, diffs[:8]


# ---------------------------------------------------------------------------------------------
# FSDP against DDP
# ---------------------------------------------------------------------------------------------


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if r["kind"] == "train"]


def test_fsdp_trains_like_ddp_and_every_rank_ends_with_the_same_parameters(pair: Path) -> None:
    """Same loss curve to FSDP_VS_DDP_ATOL (clipping and accumulation active), identical full
    parameters on both ranks, and the EMA (DTensor shards under FSDP) follows the same weights."""
    ddp, fsdp = _losses(pair / "ddp"), _losses(pair / "fsdp")
    assert len(ddp) == len(fsdp) == STEPS
    assert max(abs(a - b) for a, b in zip(ddp, fsdp)) < FSDP_VS_DDP_ATOL, (ddp, fsdp)
    assert ddp[0] != ddp[-1]
    d, f = (torch.load(pair / f"{k}_end.pt", weights_only=True) for k in ("ddp", "fsdp"))
    assert d["same_on_ranks"] and f["same_on_ranks"]
    assert f["param_types"] == ["DTensor"] and d["param_types"] == ["Parameter"]
    for key, value in d["model"].items():
        torch.testing.assert_close(f["model"][key], value, atol=FSDP_VS_DDP_ATOL, rtol=0)
    assert d["ema"] and set(d["ema"]) == set(f["ema"])
    for key, value in d["ema"].items():
        torch.testing.assert_close(f["ema"][key], value, atol=FSDP_VS_DDP_ATOL, rtol=0)
    log = (pair / "fsdp" / "log.jsonl").read_text()
    fsdp_event = next(json.loads(line) for line in log.splitlines() if '"event": "fsdp"' in line)
    assert fsdp_event["blocks"] == 3 and fsdp_event["world_size"] == 2  # the tiny task's 3 Linear layers, then the root


def test_sharded_checkpoints_are_committed_directories_with_a_manifest(pair: Path) -> None:
    """Every rank's shard and RNG file, rank 0's state and the manifest; rolling as before; the
    async writer logged its background writes; nothing uncommitted is left."""
    for strategy in ("ddp", "fsdp"):
        ck = pair / strategy / "checkpoints"
        names = sorted(p.name for p in ck.iterdir())
        assert names == ["final", "step_00000008", "step_00000009", "step_00000012"], names
        for d in ck.iterdir():
            assert dcp.verify(d) == (True, "ok")
            files = {p.name for p in d.iterdir()}
            assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rank_00000.pt", "rank_00001.pt", "state.pt",
                    "manifest.json"} == files
            manifest = json.loads((d / "manifest.json").read_text())
            assert manifest["world_size"] == 2 and manifest["strategy"] == strategy
    log = (pair / "fsdp" / "log.jsonl").read_text()
    assert '"background_s"' in log and '"background_s"' not in (pair / "ddp" / "log.jsonl").read_text()
    # Per-rank RNG states are kept per rank (DCP would keep one copy of a value both ranks save under one key).
    r0, r1 = (torch.load(_mid(pair / "ddp") / f"rank_0000{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["rank"] == 0 and r1["rank"] == 1


# ---------------------------------------------------------------------------------------------
# Resume on another world size
# ---------------------------------------------------------------------------------------------


class FirstBatch:
    """Records the inputs of the first micro-batch after (re)start."""

    name = "first-batch"

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None

    @kktrain.hookimpl(wrapper=True)
    def forward_loss(self, trainer: Any, batch: Any) -> Any:
        """Keep the first batch's inputs."""
        if self.x is None:
            self.x = batch[0].clone()
        return (yield)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_two_process_run_resumes_on_one_process(pair: Path, tmp_path: Path, strategy: str) -> None:
    """Model and optimizer load exactly; the data continues at the same sample of the epoch's order
    (here sample 128 of epoch 2), now as one process's batches; the run trains to its end."""
    run = _copy_run(pair / strategy, tmp_path / "run")
    first = FirstBatch()
    out = run_tiny(tmp_path, plugins=["ema", Dump(start=str(tmp_path / "start.pt")), first], steps=STEPS,
                   options={"batch_size": 16, "grad_accum": 2, "grad_clip": 0.5}, task_options=TASK,
                   resume=str(_mid(run)), out=run)
    dump = torch.load(tmp_path / "start.pt", weights_only=True)
    _assert_loaded_exactly(dump, _mid(pair / strategy))
    state = dump["state"]
    assert (state["epoch"], state["sample_offset"], state["batch_in_epoch"], state["world_size"]) == (2, MID_SAMPLES, 0, 1)
    from kktrain.tasks.tiny import TinyOptions, TinyTask

    data = TinyTask(TinyOptions(**TASK)).train_dataset()
    order = torch.randperm(256, generator=torch.Generator().manual_seed(0 * 1_000_003 + 2))
    assert first.x is not None and torch.equal(first.x, data.x[order[MID_SAMPLES:MID_SAMPLES + 16]])
    assert out.summary["status"] == "completed" and out.summary["steps"] == STEPS
    assert (run / "checkpoints" / "final.pt").exists()  # one process writes single files again


def _three(directory: Path, pair_dir: Path) -> dict[str, Any]:
    runs = []
    for strategy in ("ddp", "fsdp"):
        run = _copy_run(pair_dir / strategy, directory / strategy)
        runs.append({"out": str(run), "plugins": ["ema"], "resume": str(_mid(run)),
                     "dump_start": str(directory / f"{strategy}_start.pt")})
    return torchrun(3, runs, directory)


def test_a_two_process_run_resumes_on_three_processes(pair: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """DCP reshards model and optimizer (DDP: replicated, FSDP: into 3 shards) exactly; the data
    continues at the same sample, dealt out to 3 ranks; both runs train to their end."""
    directory, outcome = _launch(tmp_path_factory, "three", lambda d: _three(d, pair))
    for strategy, result in zip(("ddp", "fsdp"), outcome["results"]):
        dump = torch.load(directory / f"{strategy}_start.pt", weights_only=True)
        _assert_loaded_exactly(dump, _mid(pair / strategy))
        assert dump["same_on_ranks"]
        state = dump["state"]
        assert (state["sample_offset"], state["batch_in_epoch"], state["world_size"]) == (MID_SAMPLES, 0, 3)
        assert result["summary"]["status"] == "completed" and result["summary"]["steps"] == STEPS
        manifest = json.loads((directory / strategy / "checkpoints" / "final" / "manifest.json").read_text())
        assert manifest["world_size"] == 3 and "rank_00002.pt" in manifest["files"]


def test_resume_auto_skips_a_corrupt_or_unfinished_sharded_checkpoint(pair: Path, tmp_path: Path) -> None:
    """A sharded checkpoint whose shard fails its checksum is skipped with a warning, exactly like
    a single file; a leftover NAME.tmp directory is never a candidate."""
    run = _copy_run(pair / "ddp", tmp_path / "run")
    ck = run / "checkpoints"
    shutil.rmtree(ck / "final")
    shard = ck / "step_00000012" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    shutil.copytree(ck / "step_00000012", ck / "step_00000015.tmp")  # as a killed save leaves it
    out = run_tiny(tmp_path, plugins=["ema", Dump()], steps=STEPS, options={"batch_size": 16, "grad_accum": 2, "grad_clip": 0.5},
                   task_options=TASK, resume="auto", out=run, stop_at_step=10)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    skipped = [r["detail"] for r in log if r["event"] == "checkpoint_skipped"]
    assert skipped == ["skipping checkpoint step_00000012: __1_0.distcp: checksum mismatch (corrupt)"], skipped
    resumed = [r for r in log if r["event"] == "resumed"][-1]
    assert resumed["path"].endswith("step_00000009") and resumed["step"] == MID
    assert out.summary["steps"] == 10


def test_export_and_load_model_read_sharded_checkpoints(pair: Path, tmp_path: Path) -> None:
    """``kktrain.load_model`` and ``kktrain export`` consolidate a sharded run (FSDP shards, the
    EMA's too) into full weights."""
    end = torch.load(pair / "fsdp_end.pt", weights_only=True)
    raw = kktrain.load_model(pair / "fsdp", weights="raw")
    assert not _tensors_equal(dict(raw.state_dict()), end["model"])
    ema = kktrain.load_model(pair / "fsdp", weights="ema")
    assert not _tensors_equal({k: v for k, v in ema.state_dict().items() if k in end["ema"]}, end["ema"])
    proc = kk("export", str(pair / "fsdp"), "--format", "state_dict", "--weights", "raw", "--out", "w.pt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not _tensors_equal(torch.load(tmp_path / "w.pt", weights_only=True), end["model"])


# ---------------------------------------------------------------------------------------------
# Security: nothing in a sharded checkpoint executes code
# ---------------------------------------------------------------------------------------------


class _Evil:
    """Unpickling it writes a marker file (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> Any:
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _remanifest(directory: Path) -> None:
    """Write a manifest that vouches for the directory as it is, as an attacker can; the saved
    config names installed plugins only (the test's own Dump plugin is not one)."""
    from kktrain.checkpoint import file_sha256

    state = torch.load(directory / "state.pt", weights_only=True)
    state["config"]["plugins"] = ["ema"]
    torch.save(state, directory / "state.pt")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"] = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                         for p in directory.iterdir() if p.name != "manifest.json"}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _refuses_without_running_code(checkpoint: Path, marker: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="kktrain never loads code from a checkpoint"):
        kktrain.load_model(checkpoint)
    proc = kk("export", str(checkpoint), "--format", "state_dict", "--out", "w.pt", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "kktrain never loads code" in proc.stderr and "Traceback" not in proc.stderr
    proc = kk("run", "--task", "tiny", "--resume", str(checkpoint), "--out", "resumed", cwd=tmp_path)
    assert proc.returncode == 2 and "kktrain never loads code" in proc.stderr, proc.stderr
    assert not marker.exists(), "code from the checkpoint ran"
    assert not (tmp_path / "resumed").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # stock DCP on one process, on purpose
def test_crafted_dcp_metadata_is_refused_and_never_runs(pair: Path, tmp_path: Path) -> None:
    """A .metadata that unpickles to code: stock DCP runs it (shown here), kktrain refuses it."""
    import torch.distributed.checkpoint as stock

    evil = _copy_run(pair / "ddp" / "checkpoints" / "final", tmp_path / "evil")
    marker = tmp_path / "PWNED"
    (evil / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    _remanifest(evil)
    with pytest.raises(BaseException):  # noqa: B017,PT011 - stock DCP fails after the code ran
        stock.load({"x": torch.zeros(1)}, checkpoint_id=str(evil), no_dist=True)
    assert marker.exists(), "the crafted metadata does not reach stock DCP's unpickler: the test proves nothing"
    marker.unlink()
    _refuses_without_running_code(evil, marker, tmp_path)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # stock DCP on one process, on purpose
def test_crafted_non_tensor_dcp_value_is_refused_and_never_runs(pair: Path, tmp_path: Path) -> None:
    """A checkpoint whose DCP holds a pickled object among the optimizer's values: stock DCP's planner
    unpickles it with weights_only=False (shown here), kktrain's with weights_only=True."""
    import torch.distributed.checkpoint as stock

    src = pair / "ddp" / "checkpoints" / "final"
    evil = tmp_path / "evil"
    marker = tmp_path / "PWNED"
    content = dcp.consolidate(src)
    content["optimizer"]["param_groups"][0]["lr"] = _Evil(marker)
    stock.save(content, checkpoint_id=str(evil), no_dist=True)
    for name in ("state.pt", "rank_00000.pt", "rank_00001.pt", "manifest.json"):
        shutil.copy(src / name, evil / name)
    _remanifest(evil)
    assert not marker.exists()
    stock.load({"optimizer": {"param_groups": [{"lr": None}]}}, checkpoint_id=str(evil), no_dist=True)
    assert marker.exists(), "the crafted value does not reach stock DCP's planner: the test proves nothing"
    marker.unlink()
    _refuses_without_running_code(evil, marker, tmp_path)


# ---------------------------------------------------------------------------------------------
# Elastic restarts
# ---------------------------------------------------------------------------------------------


def _elastic(directory: Path) -> dict[str, Any]:
    run = {"out": str(directory / "run"), "plugins": ["ema"], "dump_end": str(directory / "end.pt"),
           "kill": {"at_step": MID, "rank": 1}}
    return torchrun(2, [run], directory, extra=("--max-restarts=1",))


def test_a_worker_killed_mid_checkpoint_is_restarted_and_the_run_resumes_exactly(
    pair: Path, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``torchrun --max-restarts=1``, no other flag: rank 1 is SIGKILLed while writing step 9's
    checkpoint; torchrun restarts both workers, they skip the unfinished step_9.tmp, resume from
    step 8 and end with the parameters, optimizer state and EMA of the uninterrupted DDP run, bit for bit."""
    directory, outcome = _launch(tmp_path_factory, "elastic", _elastic)
    assert "exitcode  : -9" in outcome["stderr"] or "Signals.SIGKILL" in outcome["stderr"] or "-9" in outcome["stderr"]
    log = [json.loads(line) for line in (directory / "run" / "log.jsonl").read_text().splitlines()]
    assert sum(1 for r in log if r["event"] == "train_start") == 2
    resumed = [r for r in log if r["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["path"].endswith("step_00000008"), resumed
    whole, elastic = (torch.load(p, weights_only=True) for p in (pair / "ddp_end.pt", directory / "end.pt"))
    diffs = _tensors_equal(whole["model"], elastic["model"], "model")
    diffs += _tensors_equal(whole["optimizer"], elastic["optimizer"], "optimizer")
    diffs += _tensors_equal(whole["ema"], elastic["ema"], "ema")
    assert not diffs, diffs[:8]
    assert not list((directory / "run" / "checkpoints").glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# FSDP with the plugins
# ---------------------------------------------------------------------------------------------


def _plugins(directory: Path) -> dict[str, Any]:
    fsdp = {"distributed.strategy": "fsdp"}
    return torchrun(2, [
        {"out": str(directory / "fp16"), "plugins": ["amp"], "options": {**fsdp, "amp.dtype": "fp16"}},
        {"out": str(directory / "source"), "plugins": ["spike-rollback"], "options": {"spike-rollback.source": "checkpoint"}},
        {"out": str(directory / "none"), "options": {"distributed.strategy": "none"}},
        {"out": str(directory / "guarded"), "plugins": ["amp", "ema", "grad-checkpoint", "nan-guard", "spike-rollback"],
         "nan_at": [5],
         "dump_end": str(directory / "guarded_end.pt"),
         "options": {**fsdp, "amp.dtype": "bf16", "nan-guard.policy": "rollback", "spike-rollback.snapshot_every": 2}},
    ], directory)


def test_fsdp_with_amp_ema_and_the_guards(tmp_path_factory: pytest.TempPathFactory) -> None:
    """amp bf16 becomes FSDP's MixedPrecisionPolicy; activation checkpointing runs inside the sharded blocks; nan-guard finds the injected NaN in the sharded
    gradients and spike-rollback restores its (sharded) snapshot; EMA follows; the ranks agree. What
    does not combine is refused in one line naming it, before anything is written."""
    directory, outcome = _launch(tmp_path_factory, "plugins", _plugins)
    fp16, source, none, guarded = outcome["results"]
    assert fp16["error"].startswith("amp: amp.dtype=fp16 does not combine with distributed.strategy=fsdp")
    assert source["error"].startswith("spike-rollback: source=checkpoint does not combine with sharded checkpoints")
    assert none["error"].startswith("distributed.strategy = none under torchrun with 2 processes")
    for error in (fp16, source, none):
        assert "\n" not in error["error"] and ": use -o" in error["error"]
    for name in ("fp16", "source", "none"):
        assert not (directory / name).exists()
    summary = guarded["summary"]
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["amp"]["fsdp_mixed_precision"] is True and summary["amp"]["dtype"] == "bf16"
    assert summary["nan-guard"]["rollbacks"] == 1 and summary["spike-rollback"]["rollbacks"] == 1
    assert summary["ema"]["updates"] > 0 and summary["grad-checkpoint"]["blocks"] == 3
    end = torch.load(directory / "guarded_end.pt", weights_only=True)
    assert end["same_on_ranks"] and all(torch.isfinite(v).all() for v in end["model"].values())


def test_the_command_line_under_torchrun_refuses_fp16_with_fsdp_in_one_line(tmp_path: Path) -> None:
    """``torchrun -m kktrain run``: every worker exits 2 with the same one line, nothing on disk."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KKTRAIN_", "TORCHELASTIC_", "PYTEST_"))}
    env.update(OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "kktrain", "run", "--task", "tiny", "--out", "r",
         "--plugin", "amp", "-o", "amp.dtype=fp16", "-o", "distributed.strategy=fsdp"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    expected = ("error: amp: amp.dtype=fp16 does not combine with distributed.strategy=fsdp (the GradScaler cannot "
                "unscale sharded gradients): use -o amp.dtype=bf16, or -o distributed.strategy=ddp")
    assert errors == [expected, expected], proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# What needs a GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP over NCCL with bf16 MixedPrecisionPolicy needs 2 CUDA GPUs; "
                    "this machine has none (run on a GPU host)")
def test_fsdp_mixed_precision_on_cuda_nccl(tmp_path: Path) -> None:
    """On 2 GPUs: FSDP over NCCL with amp's bf16 policy trains like DDP with bf16 autocast, loosely."""
    runs = [
        {"out": str(tmp_path / "ddp"), "plugins": ["amp"], "options": {"device": "cuda", "amp.dtype": "bf16"}},
        {"out": str(tmp_path / "fsdp"), "plugins": ["amp"], "dump_end": str(tmp_path / "fsdp_end.pt"),
         "options": {"device": "cuda", "amp.dtype": "bf16", "distributed.strategy": "fsdp"}},
    ]
    outcome = torchrun(2, runs, tmp_path)
    assert outcome["returncode"] == 0, outcome["stderr"]
    ddp, fsdp = outcome["results"]
    assert fsdp["summary"]["amp"]["fsdp_mixed_precision"] is True
    assert abs(_losses(tmp_path / "ddp")[-1] - _losses(tmp_path / "fsdp")[-1]) < 0.05
    assert torch.load(tmp_path / "fsdp_end.pt", weights_only=True)["same_on_ranks"]


# ---------------------------------------------------------------------------------------------
# The data order across world sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [True, False])
def test_every_world_size_consumes_the_epochs_order_from_the_front(drop_last: bool) -> None:
    """The ranks of one world size together train on the epoch's order in global batches, so a
    position is a prefix of that order; another world size starting at the same offset continues
    with the next sample, and what it trains on is the rest of the order, re-sharded."""
    from kktrain.data import BatchPlan

    n, bs, epoch = 203, 8, 3
    order = BatchPlan(n, bs, seed=5).indices(epoch).tolist()
    for world in (1, 2, 3):
        plans = [BatchPlan(n, bs, seed=5, rank=r, world_size=world, drop_last=drop_last) for r in range(world)]
        for k in range(plans[0].batches() + 1):
            seen = sorted(i for p in plans for i in p.indices(epoch)[: k * bs].tolist())
            assert seen == sorted(order[: plans[0].consumed(0, k, world)]), (world, k)
        for new_world in (1, 2, 3):
            k = 2
            offset = plans[0].consumed(0, k, world)
            rest = [BatchPlan(n, bs, seed=5, rank=r, world_size=new_world, drop_last=drop_last) for r in range(new_world)]
            after = [i for p in rest for i in p.indices(epoch, offset).tolist()]
            assert len(set(after)) == len(after) and set(after) <= set(order[offset:])
            assert rest[0].indices(epoch, offset)[:bs].tolist() == order[offset:offset + bs]  # the very next samples
            assert len({p.batches(offset) for p in rest}) == 1  # every rank the same number of batches

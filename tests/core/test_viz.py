"""kktrain plot, compare and lr-find: real runs, real PNGs (Agg), the CLI in a subprocess."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from kktrain.testing import run_cli
from kktrain.viz import RunRecords, plot_runs, read_run, smooth, suggest_lr

STAGES = [{"name": "full", "until_step": 12, "knobs": {"loss_weight": 1.0}}, {"name": "half", "knobs": {"loss_weight": 0.5}}]
RUN = {"log_every": 2, "val_every": 6}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    return width, height


def _not_blank(path: Path) -> None:
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))
    assert pixels.std() > 0.05, "the image is (nearly) one colour"


def test_plot_of_one_run_has_a_panel_per_metric_and_marks_stages(kktrain_run, tmp_path):
    out = kktrain_run(plugins=["curriculum"], steps=24, options={"curriculum.stages": STAGES}, **RUN)
    png = plot_runs([out.run_dir])
    assert png == out.run_dir / "plot.png"
    assert _png_size(png) == (1000, 4 * 260)  # train/loss, train/lr, val/loss, val/acc at 100 dpi
    _not_blank(png)
    two = plot_runs([out.run_dir], metrics=["val/acc"], out=tmp_path / "acc.png")
    assert _png_size(two) == (1000, 3 * 260)


def test_plot_cli_overlays_runs(kktrain_run, tmp_path):
    a = kktrain_run(steps=12, **RUN)
    b = kktrain_run(steps=12, **RUN, **{"optimizer.lr": 0.003})
    proc = run_cli("plot", str(a.run_dir), str(b.run_dir), "--metric", "val/loss", "--out", "cmp.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "wrote cmp.png"
    assert _png_size(tmp_path / "cmp.png") == (1000, 3 * 260)
    _not_blank(tmp_path / "cmp.png")


@pytest.mark.parametrize(("args", "message"), [
    (["plot", "nope"], "nope is not a directory"),
    (["plot", "empty"], "empty has no metrics.jsonl"),
    (["compare", "nope"], "nope is not a directory"),
])
def test_bad_run_dirs_are_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unknown_metric_names_the_known_ones(kktrain_run, tmp_path):
    out = kktrain_run(steps=6, **RUN)
    proc = run_cli("plot", str(out.run_dir), "--metric", "val/nope", cwd=tmp_path)
    assert proc.returncode == 2 and "no run has metric 'val/nope'" in proc.stderr and "val/acc" in proc.stderr
    assert not (out.run_dir / "plot.png").exists()


def test_without_matplotlib_plot_says_what_to_install(kktrain_run, tmp_path):
    import subprocess
    import sys

    out = kktrain_run(steps=6, **RUN)
    code = "import sys; sys.modules['matplotlib'] = None; from kktrain.cli import main; main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, "plot", str(out.run_dir)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "pip install 'kktrain[plot]'" in proc.stderr and "Traceback" not in proc.stderr


def test_compare_lists_metrics_plugins_and_the_config_keys_that_differ(kktrain_run, tmp_path):
    a = kktrain_run(plugins=["ema"], steps=12, **RUN)
    b = kktrain_run(steps=8, **RUN, **{"optimizer.lr": 0.003})
    proc = run_cli("compare", str(a.run_dir), str(b.run_dir), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    first, second = result["runs"]
    assert (first["steps"], second["steps"]) == (12, 8)
    assert first["plugins"] == ["ema"] and second["plugins"] == []
    assert first["final"]["val/acc"] == a.summary["final"]["val/acc"]
    assert "val_ema/acc" in first["final"]
    vals = [r["val/loss"] for r in a.metrics if r["kind"] == "val"]
    assert first["best"]["val/loss"]["value"] == min(vals)
    assert first["final_train_loss"] == [r for r in a.metrics if r["kind"] == "train"][-1]["train/loss"]
    differ = result["config_differences"]
    assert differ["optimizer.lr"] == [0.01, 0.003] and differ["max_steps"] == [12, 8]
    assert differ["plugins.enabled"] == [["ema"], []]
    assert "seed" not in differ and "out" not in differ
    table = run_cli("compare", str(a.run_dir), str(b.run_dir), cwd=tmp_path)
    assert table.returncode == 0 and "optimizer.lr" in table.stdout and "final val/acc" in table.stdout


def test_compare_picks_metrics_and_never_folds_into_a_pipe(kktrain_run, tmp_path):
    runs = [kktrain_run(steps=6, **RUN, **{"optimizer.lr": lr}) for lr in (0.01, 0.003, 0.001, 0.0003, 0.0001)]
    dirs = [str(r.run_dir) for r in runs]
    result = json.loads(run_cli("compare", *dirs, "--metric", "val/acc", "--json", cwd=tmp_path, check=True).stdout)
    assert all(set(r["final"]) == {"val/acc"} and set(r["best"]) == {"val/acc"} for r in result["runs"])
    table = run_cli("compare", *dirs, "--metric", "val/acc", cwd=tmp_path, check=True).stdout
    lines = table.splitlines()
    assert sum("final val/acc" in line for line in lines) == 1 and "final val/loss" not in table
    # five columns of run names would fold at 80 columns; into a pipe each row stays one line
    assert max(len(line) for line in lines) > 80
    names = [r.run_dir.name for r in runs]
    assert len(set(names)) == 5 and any(all(n in line for n in names) for line in lines)  # one header line holds them all
    bad = run_cli("compare", dirs[0], "--metric", "val/nope", cwd=tmp_path)
    assert bad.returncode == 2 and "no run has metric 'val/nope'" in bad.stderr


def test_suggestion_is_the_steepest_descent_of_the_smoothed_loss():
    lrs = [1e-6 * 10 ** (6 * i / 199) for i in range(200)]
    # a loss that falls fastest (in log lr) around 1e-3 and blows up past 1e-1
    losses = [2 - math.tanh(math.log10(lr) + 3) + (50 * (lr - 0.1) if lr > 0.1 else 0) for lr in lrs]
    lr, index = suggest_lr(lrs, losses)
    assert lr is not None and index is not None
    # the smoothing (EMA 0.98) lags the curve (here ~0.6 decade): the suggestion sits a little later,
    # well before the minimum near 1e-1
    assert 1e-3 <= lr <= 1e-2
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    assert suggest_lr(lrs[:4], losses[:4]) == (None, None)


def test_lr_find_sweeps_writes_json_and_png_and_creates_no_run(tmp_path):
    proc = run_cli("lr-find", "--task", "tiny", "--steps", "40", "--start", "1e-5", "--end", "10", "--out", "lf", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "lf" / "lr_find.json").read_text())
    lrs = result["lr"]
    assert lrs[0] == pytest.approx(1e-5) and len(lrs) == result["steps_run"] == len(result["loss"])
    ratios = {round(b / a, 9) for a, b in zip(lrs, lrs[1:])}
    assert len(ratios) == 1 and ratios.pop() == pytest.approx((10 / 1e-5) ** (1 / 39))
    assert result["suggested_lr"] == lrs[result["suggested_index"]]
    assert f"-o optimizer.lr={result['suggested_lr']:.3g}" in proc.stdout and "steepest descent" in proc.stdout
    width, height = _png_size(tmp_path / "lf" / "lr_find.png")
    assert (width, height) == (800, 450)
    _not_blank(tmp_path / "lf" / "lr_find.png")
    assert sorted(p.name for p in (tmp_path / "lf").iterdir()) == ["lr_find.json", "lr_find.png"]
    assert not (tmp_path / "runs").exists(), "lr-find must not create a run directory"


def test_lr_find_never_touches_an_existing_directory(kktrain_run, tmp_path):
    out = kktrain_run(steps=4, **RUN)
    before = {p: p.stat().st_mtime_ns for p in out.run_dir.rglob("*")}
    proc = run_cli("lr-find", "--task", "tiny", "--out", str(out.run_dir), cwd=tmp_path)
    assert proc.returncode == 2 and "never touches an existing directory" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in out.run_dir.rglob("*")} == before


def test_lr_find_stops_when_the_loss_diverges(tmp_path):
    proc = run_cli("lr-find", "--task", "tiny", "--steps", "60", "--start", "1e-3", "--end", "1e4", "-o", "grad_clip=off",
                   "-o", "optimizer.name=sgd", "--out", "lf", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "lf" / "lr_find.json").read_text())
    assert result["stopped_early"] and result["steps_run"] < 60
    assert "stopped early" in proc.stdout


def test_plot_against_time_reads_the_sessions_wall_time(kktrain_run, tmp_path):
    run = kktrain_run(steps=12, **RUN)
    records = read_run(run.run_dir)
    assert records.started is not None and records.started <= records.records[0]["time"]
    minutes = records.minutes()
    assert minutes == sorted(minutes) and minutes[0] is not None and minutes[0] >= 0
    proc = run_cli("plot", str(run.run_dir), "--x", "time", "--out", "t.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _not_blank(tmp_path / "t.png")
    bad = run_cli("plot", str(run.run_dir), "--x", "epoch", cwd=tmp_path)
    assert bad.returncode == 2 and "'epoch' is not one of 'step', 'time'" in bad.stderr


def test_minutes_leave_out_the_downtime_before_a_resume(tmp_path):
    records = [
        {"step": 10, "kind": "train", "time": 1060.0},
        {"step": 20, "kind": "train", "time": 1120.0},
        {"step": 10, "kind": "resume", "time": 9000.0},  # resumed two hours later from step 10
        {"step": 20, "kind": "train", "time": 9060.0},
    ]
    run = RunRecords(tmp_path, records, started=1000.0)
    assert run.minutes() == [1.0, 2.0, 2.0, 3.0]
    assert run.time_series("train", "step") == ([1.0, 2.0, 3.0], [10.0, 20.0, 20.0])

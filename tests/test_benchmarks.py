"""The GPU suite's CPU-safe path: it says there is no CUDA device and still prints the whole table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("dense", "75% static", "2:4 static, dense kernels", "2:4 static, semi-structured kernels")


def test_gpu_suite_cpu_path_prints_every_row(capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the suite puts benchmarks/ on it: undone after the test
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = suite  # (its dataclasses look their module up)
    try:
        spec.loader.exec_module(suite)
        assert suite.main(["--device", "cpu", "--presets", "tiny", "--steps", "2", "--batch-size", "2"]) == 0
    finally:
        sys.modules.pop("gpu_suite", None)
        sys.modules.pop("train_throughput", None)
    out = capsys.readouterr().out
    assert "no CUDA device" in out and "CUDA tests: skipped" in out
    rows = {line.split("|")[2].strip(): line for line in out.splitlines() if line.startswith("| tiny |")}
    assert sorted(rows) == sorted(RUNS)
    for line in rows.values():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert float(cells[3].replace(",", "")) > 0  # tokens/s
        assert cells[5] == "n/a" and cells[10] == "n/a (no CUDA)"  # MFU, targets
    assert rows["2:4 static, semi-structured kernels"].split("|")[10].strip() == "0"  # no layer on 2:4 kernels
    assert "note: tiny, 2:4 static, semi-structured kernels: no CUDA device" in out


def test_mask_update_benchmark_prints_both_implementations_with_identical_masks(capsys):
    spec = importlib.util.spec_from_file_location("mask_update", ROOT / "benchmarks" / "mask_update.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--preset", "tiny", "--n-layer", "1", "--rounds", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith(("| set", "| rigl"))]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [(m, n) for m in ("set", "rigl") for n in bench.IMPLEMENTATIONS]
    assert all(float(r[2]) > 0 and r[5].strip() == "yes" for r in rows)


def test_pruning_benchmark_prints_every_method_next_to_magnitude(capsys):
    spec = importlib.util.spec_from_file_location("pruning_bench", ROOT / "benchmarks" / "pruning.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--presets", "tiny", "--nsamples", "2", "--threads", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    assert [r[1].strip() for r in rows] == ["magnitude", "wanda", "sparsegpt"]
    for r in rows:
        assert float(r[4]) > 0 and float(r[6].replace(",", "")) > 0  # seconds, peak memory
    assert rows[0][5].strip() == "1x"

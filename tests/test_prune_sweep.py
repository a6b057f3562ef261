"""Pruning sweeps (``sparselm prune`` with comma lists): every run written and evaluated, the table equal
to perplexity recomputed on each run directory, the source untouched, calibration read once, resuming,
the essential-sparsity rule, and the errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import MICRO_MODEL, make_config
from sparselm.cli.main import main
from sparselm.data.paths import data_root
from sparselm.evaluation.perplexity import eval_tokens, perplexity
from sparselm.experiments import prune_sweep
from sparselm.experiments.prune_sweep import Point, essential_sparsity
from sparselm.models.runs import load_run

SEQLEN = 32
METHODS = ["magnitude", "wanda", "sparsegpt"]
SPARSITIES = [0.3, 0.6]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, small_corpus, cache_dir):
    """A dense micro GPT pre-trained for 20 steps, a held-out text (Brown after the training slice) and
    calibration ids from it as a .npy file."""
    from sparselm.training import PretrainConfig, pretrain

    root = tmp_path_factory.mktemp("sweep-source")
    cfg = make_config(PretrainConfig, preset="tiny", model=dict(MICRO_MODEL), corpus=str(small_corpus),
                      cache_dir=str(cache_dir), out=str(root / "run"), sparsity=0.0, max_steps=20, batch_size=8,
                      warmup_steps=5, eval_every=20, ckpt_every=20, eval_batches=2, lr=3e-3, progress=False)
    pretrain(cfg, progress=False, log=lambda *_: None)
    text = (data_root() / "corpus" / "brown.txt").read_text(encoding="utf-8")[80_000:83_500]
    (root / "held-out.txt").write_text(text, encoding="utf-8")
    (root / "other.txt").write_text(text[:2_000], encoding="utf-8")
    tok = load_run(root / "run")[1]
    ids = tok(text).input_ids[: 4 * SEQLEN]
    np.save(root / "calib.npy", np.asarray(ids, dtype=np.int64).reshape(4, SEQLEN))
    return root


def sweep_args(root, out, *extra):
    return ["prune", "--from", str(root / "run"), "--out", str(out), "--method", ",".join(METHODS),
            "--sparsity", ",".join(map(str, SPARSITIES)), "--n-m", "2:4", "--eval-data", str(root / "held-out.txt"),
            "--calibration", str(root / "calib.npy"), "--device", "cpu", "--no-progress", *extra]


def files_of(path):
    return {p.relative_to(path).as_posix(): p.stat().st_mtime_ns for p in path.rglob("*")}


@pytest.fixture(scope="module")
def swept(dense_run, tmp_path_factory):
    """The sweep run once (its calibration reads counted), with the source's files before it."""
    import sparselm.pruning.calibration as calibration

    source_before = files_of(dense_run / "run")
    reads = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSELM_CACHE", str(tmp_path_factory.mktemp("sweep-cache")))
        real = calibration.calibration_tokens
        mp.setattr(calibration, "calibration_tokens", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
        out = tmp_path_factory.mktemp("sweep") / "out"
        assert main(sweep_args(dense_run, out)) == 0
    return out, source_before, reads


def test_the_sweep_writes_every_run_and_the_table_of_their_perplexities(dense_run, swept):
    out, source_before, reads = swept
    record = json.loads((out / "sweep.json").read_text())
    names = [f"{m}-s30" for m in METHODS] + [f"{m}-s60" for m in METHODS] + [f"{m}-2of4" for m in METHODS]
    assert sorted(p["dir"] for p in record["points"]) == sorted(names)
    assert reads == [str(dense_run / "calib.npy")]  # once for the 6 calibrated runs
    assert files_of(dense_run / "run") == source_before  # nothing written into the source

    model, tok, _, _ = load_run(dense_run / "run")
    tokens = eval_tokens(dense_run / "held-out.txt", tok)
    dense = perplexity(model, tokens, SEQLEN)["ppl"]
    assert record["dense"]["ppl"] == dense
    table = (out / "sweep.md").read_text()
    assert f"| dense | {dense:.2f} |" in table
    for p in record["points"]:
        run = out / p["dir"]
        model = load_run(run)[0]
        expected = perplexity(model, tokens, SEQLEN)["ppl"]
        assert p["ppl"] == expected, p["dir"]  # the same model, windows and batches: bit for bit
        assert json.loads(next((run / "eval").glob("perplexity-held-out-*.json")).read_text())["ppl"] == expected
        summary = json.loads((run / "summary.json").read_text())
        assert summary["pruned_from"] == str(dense_run / "run") and summary["pruning"]["method"] == p["method"]
        assert p["measured_sparsity"] == pytest.approx(p["sparsity"], abs=1e-3)
    for m in METHODS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {m} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        by_dir = {p["dir"]: p["ppl"] for p in record["points"]}
        assert cells[2:5] == [f"{by_dir[f'{m}-{s}']:.2f}" for s in ("s30", "s60", "2of4")]
        knee = record["essential_sparsity"][m]
        curve = [(p["sparsity"], p["ppl"]) for p in record["points"] if p["method"] == m and p["n_m"] is None]
        assert knee == essential_sparsity(curve, dense, 0.01)
        assert cells[5] == (f"{100 * knee:g}%" if knee is not None else "none (< 30%)")
    assert "1.01 × dense" in table and "Jaiswal et al. 2023" in table


def test_the_plot_is_drawn_when_matplotlib_is_there(swept):
    pytest.importorskip("matplotlib")
    out = swept[0]
    png = out / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert json.loads((out / "sweep.json").read_text())["plot"] == "sweep.png"
    assert "![perplexity against sparsity](sweep.png)" in (out / "sweep.md").read_text()


def test_without_matplotlib_the_table_is_written_and_the_plot_skipped(swept, tmp_path, monkeypatch, caplog):
    from sparselm._optional import MissingExtra

    def missing(module, extra, purpose):
        raise MissingExtra(module, extra, purpose)

    monkeypatch.setattr(prune_sweep, "require", missing)
    record = json.loads((swept[0] / "sweep.json").read_text())
    assert prune_sweep.plot(record, tmp_path / "sweep.png") is None
    assert not (tmp_path / "sweep.png").exists()
    assert "sweep plot skipped" in caplog.text and "sparselm[report]" in caplog.text


def test_a_resumed_sweep_skips_finished_runs(dense_run, swept, capsys, monkeypatch, tmp_path):
    import sparselm.pruning.calibration as calibration

    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    reads, real = [], calibration.calibration_tokens
    monkeypatch.setattr(calibration, "calibration_tokens", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    out = swept[0]
    before = files_of(out)
    assert main(sweep_args(dense_run, out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("(done before)") == 9 and "wanda 60%: ppl " in printed
    assert reads == []  # nothing to prune: no calibration read
    after = files_of(out)
    assert {k: v for k, v in after.items() if not k.startswith("sweep.")} == \
        {k: v for k, v in before.items() if not k.startswith("sweep.")}  # no run written again
    # killed after pruning wanda-s60, before evaluating it; killed before sparsegpt-2of4 was pruned
    next((out / "wanda-s60" / "eval").glob("perplexity-*.json")).unlink()
    model_mtime = (out / "wanda-s60" / "model.safetensors").stat().st_mtime_ns
    import shutil

    shutil.rmtree(out / "sparsegpt-2of4")
    record = json.loads((out / "sweep.json").read_text())
    assert main(sweep_args(dense_run, out)) == 0
    assert capsys.readouterr().out.count("(done before)") == 7
    assert len(reads) == 1  # for sparsegpt-2of4
    assert (out / "wanda-s60" / "model.safetensors").stat().st_mtime_ns == model_mtime  # evaluated, not pruned
    again = json.loads((out / "sweep.json").read_text())
    assert [p["ppl"] for p in again["points"]] == [p["ppl"] for p in record["points"]]


def test_essential_sparsity_is_the_last_sparsity_within_tolerance_of_dense_from_below():
    curve = [(0.6, 10.08), (0.3, 10.05), (0.5, 10.5), (0.4, 10.09), (0.7, 30.0)]  # (unsorted)
    assert essential_sparsity(curve, 10.0, 0.01) == 0.4  # 0.6 is within again, but after the drop at 0.5
    assert essential_sparsity(curve, 10.0, 0.06) == 0.6
    assert essential_sparsity(curve, 10.0, 0.001) is None  # already 30% is more than 0.1% worse
    assert essential_sparsity(curve, 10.0, 5.0) == 0.7
    assert essential_sparsity([(0.3, 10.0), (0.4, math.nan), (0.5, 10.0)], 10.0, 0.01) == 0.3
    assert essential_sparsity([], 10.0) is None


def test_run_directory_names():
    assert Point("wanda", 0.3).name == "wanda-s30" and Point("wanda", 0.05).name == "wanda-s05"
    assert Point("magnitude", 0.375).name == "magnitude-s37.5"
    assert Point("sparsegpt", 0.5, "2:4").name == "sparsegpt-2of4" and Point("sparsegpt", 0.5, "2:4").level == "2:4"
    plan = prune_sweep.plan(["wanda", "wanda", "magnitude"], [0.5, 0.3, 0.5], ["4:8"])
    assert [p.name for p in plan] == ["wanda-s50", "wanda-s30", "magnitude-s50", "magnitude-s30", "wanda-4of8",
                                      "magnitude-4of8"]


@pytest.mark.parametrize("flag, value, message", [
    ("--eval-data", None, "needs --eval-data FILE.txt|PREPARED_DIR"),
    ("--sparsity", "0.5,1.0", "target: 1.0 is out of range; allowed [0.0, 1.0)"),
    ("--sparsity", "0.5,-0.1", "target: -0.1 is out of range"),
    ("--method", "wanda,obc", "method: 'obc' is not one of magnitude, sparsegpt, wanda"),
    ("--knee-tolerance", "-1", "--knee-tolerance -1.0: must be >= 0"),
])
def test_sweep_errors(dense_run, tmp_path, capsys, flag, value, message):
    args = sweep_args(dense_run, tmp_path / "out")
    if flag in args:
        i = args.index(flag)
        args[i: i + 2] = [] if value is None else [flag, value]
    else:
        args += [flag, value]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing pruned


def test_out_holding_another_sweep_or_other_files_is_refused(dense_run, swept, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    out = swept[0]
    before = files_of(out)
    args = sweep_args(dense_run, out)
    args[args.index("--eval-data") + 1] = str(dense_run / "other.txt")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds a different sweep" in err and "--eval-data" in err and "other.txt" in err
    assert files_of(out) == before
    assert main(sweep_args(dense_run, out, "--seed", "3")) == 2
    assert "seed: 0 there, 3 now" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(sweep_args(dense_run, tmp_path / "busy")) == 2
    assert "not a sweep to resume" in capsys.readouterr().err
    assert main(sweep_args(dense_run, dense_run / "run" / "sweep")) == 2
    assert "never writes into it" in capsys.readouterr().err


def test_single_values_prune_as_before_and_eval_data_evaluates_the_run(dense_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "one"
    assert main(["prune", "--from", str(dense_run / "run"), "--out", str(out), "--method", "wanda", "--sparsity", "0.5",
                 "--calibration", str(dense_run / "calib.npy"), "--eval-data", str(dense_run / "held-out.txt"),
                 "--eval-seqlen", "16", "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "pruned" in printed and "perplexity on" in printed
    assert not (out / "sweep.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pruning"]["method"] == "wanda" and summary["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-3)
    result = json.loads((out / "eval" / "perplexity-held-out-16.json").read_text())
    model, tok, _, _ = load_run(out)
    assert result["ppl"] == perplexity(model, eval_tokens(dense_run / "held-out.txt", tok), 16)["ppl"]
    assert main(["prune", "--from", str(dense_run / "run"), "--out", str(tmp_path / "two"), "--sparsity", "0.5",
                 "--knee-tolerance", "0.1"]) == 2
    assert "only for a sweep" in capsys.readouterr().err


def test_a_refined_sweep_is_labelled_by_pruner_and_refinement(dense_run, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "refined"
    assert main(["prune", "--from", str(dense_run / "run"), "--out", str(out), "--method", "wanda", "--sparsity", "0.3,0.6",
                 "--refine", "dsnot", "--eval-data", str(dense_run / "held-out.txt"), "--calibration",
                 str(dense_run / "calib.npy"), "--device", "cpu", "--no-progress"]) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert [(p["dir"], p["label"]) for p in record["points"]] == [("wanda-s30", "wanda+dsnot"), ("wanda-s60", "wanda+dsnot")]
    assert list(record["essential_sparsity"]) == ["wanda+dsnot"] and record["settings"]["refine"] == "dsnot"
    assert json.loads((out / "wanda-s60" / "summary.json").read_text())["pruning"]["refine"] == "dsnot"
    assert "| wanda+dsnot | — |" in (out / "sweep.md").read_text()

"""Experiment specs, the resumable grid runner, and reports from stored results."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from sparselm.experiments import SpecError, builtin_specs, load_spec
from sparselm.experiments.report import report_from_dir, write_report
from sparselm.experiments.grid import plan
from sparselm.experiments.runner import dry_run


def test_builtin_specs_validate_and_dry_run(tmp_path):
    assert set(builtin_specs()) >= {"cpu-demo", "cpu-full", "gpu-small", "paper-gpt2-small", "paper-gpt3-xl"}
    for name in builtin_specs():
        spec = load_spec(name)
        text = dry_run(spec, tmp_path / name, device="cuda" if name.startswith(("gpu", "paper")) else "cpu")
        assert "estimated time left" in text
    xl = dry_run(load_spec("paper-gpt3-xl"), tmp_path / "xl", device="cuda")
    # 26B tokens x 3 x 1.2127e9 sparse FLOPs/token (GPT-2 vocabulary padded to 50,304, as pre-training pads it)
    assert "s75-static-seed1337" in xl and "9.459e+19" in xl


def test_plan_skips_redundant_cells(tmp_path):
    spec = load_spec("cpu-demo")
    pre, fine = plan(spec, tmp_path)
    assert [c.name for c in pre] == ["s00-dense-seed1337", "s50-static-seed1337", "s75-static-seed1337"]
    assert len(fine) == 5  # no sparse fine-tuning of the dense model
    assert not any(c.pretrain.sparsity == 0 and c.mode == "sparse" for c in fine)


@pytest.mark.parametrize("change,match", [
    ({"preset": "gpt5"}, "preset: unknown 'gpt5'"),
    ({"tasks": ["e2e", "squad"]}, r"tasks: unknown \['squad'\]"),
    ({"modes": ["half"]}, r"modes: unknown \['half'\]"),
    ({"methods": ["magic"]}, r"methods: unknown \['magic'\]"),
    ({"sparsities": [0.5, 1.2]}, "sparsities: 1.2 is not a fraction"),
    ({"tokens": 100}, "less than one step"),
    ({"pretrain": {"optim": {"max_steps": 10, "warmup_steps": 50}}}, "warmup_steps=50 must be below"),
    ({"pretrain": {"sparsity": {"target": 0.5}}}, "pretrain.sparsity.target: set by the grid"),
    ({"pretrain": {"optim": {"lr": "fast"}}}, "optim.lr: expected float, got 'fast' .spec"),
    ({"pretrain": {"sparsity": {"end": 0.1}}, "methods": ["gmp"]}, "no update step"),
    ({"method_options": {"set": {"drop_fraction": 0.2}}}, r"method_options: \['set'\] are not among"),
    ({"methods": ["set"], "method_options": {"set": {"drop_fraction": 2}}}, "drop_fraction: 2.0 is out of range"),
    ({"finetune": {"optim": {"epochz": 3}}}, "finetune: optim.epochz: unknown key"),
    ({"eval_limit": 0}, "eval_limit"),
    ({"colour": "blue"}, r"unknown field\(s\) \['colour'\]"),
])
def test_spec_validation_errors(tmp_path, change, match):
    data = yaml.safe_load(yaml.safe_dump(load_spec("cpu-demo").to_dict()))
    data.update(change)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=match):
        load_spec(str(path))


def test_unknown_spec_name():
    with pytest.raises(SpecError, match="unknown spec 'nope'"):
        load_spec("nope")


def micro_spec(tmp_path, corpus) -> str:
    spec = {
        "name": "micro", "preset": "tiny", "corpus": str(corpus),
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 128, "vocab_size": 512},
        "pretrain": {"optim": {"max_steps": 40, "batch_size": 8, "warmup_steps": 4},
                     "run": {"eval_every": 20, "ckpt_every": 10, "eval_batches": 2}},
        "sparsities": [0.0, 0.5], "tasks": ["e2e"], "modes": ["dense", "sparse"],
        "finetune": {"optim": {"max_steps": 6, "batch_size": 8}, "data": {"limit_train": 48, "val_limit": 8},
                     "run": {"eval_every": 6, "ckpt_every": 3}},
        "eval_limit": 4, "decoding": {"num_beams": 2, "max_new_tokens": 12},
    }
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.mark.slow
def test_sigkill_and_rerun_completes_without_redoing_finished_cells(tmp_path, small_corpus, cache_dir):
    spec = micro_spec(tmp_path, small_corpus)
    out = tmp_path / "grid"
    env = dict(os.environ, SPARSELM_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "sparselm.cli.main", "reproduce", "--spec", spec, "--out", str(out), "--no-progress"]
    first = out / "pretrain" / "s00-dense-seed1337" / "summary.json"
    second_ckpt = out / "pretrain" / "s50-static-seed1337" / "checkpoint"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (first.exists() and second_ckpt.exists()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-way through the second pre-training cell
    proc.wait()
    assert first.exists() and not (out / "results.json").exists()
    stamp = first.stat().st_mtime_ns

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pretrain s00-dense-seed1337: done, skipped" in done.stdout
    assert "resumed from" in done.stdout or "starting the run again" in done.stdout
    assert first.stat().st_mtime_ns == stamp  # the finished cell was not redone
    results = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in results["rows"]] == ["done"] * 3
    assert all(p["status"] == "done" for p in results["pretrain"])
    # the resumed cell's log has each step once
    steps = [json.loads(line)["step"] for line in (out / "pretrain" / "s50-static-seed1337" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    for name in ("report.md", "report.html", "results.csv", "plots/pretrain_loss.png", "plots/bleu_vs_flops.png", "plots/finetune_gap.png"):
        assert (out / name).exists(), name

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # all done: nothing runs
    assert again.stdout.count("done, skipped") == 2 + 3


def fake_results():
    rows, pre = [], []
    for s, bleu in ((0.0, 60.0), (0.5, 58.5), (0.75, 57.0)):
        name = f"s{round(100 * s):02d}-{'dense' if s == 0 else 'static'}-seed1"
        curve = [{"step": k, "tokens": 1000 * k, "train_flops": 1e9 * k * (1 - s / 2), "val_loss": 6 - k / 10 - (0.1 - s / 10)} for k in (1, 2, 3)]
        pre.append({"cell": name, "sparsity": s, "method": "dense" if s == 0 else "static", "seed": 1, "status": "done",
                    "val_loss": curve[-1]["val_loss"], "train_flops": 3e9 * (1 - s / 2), "dense_train_flops": 3e9,
                    "average_param_count": 1e6 * (1 - s), "wall_time_s": 10.0, "curve": curve})
        for mode in ("dense", "sparse"):
            if s == 0 and mode == "sparse":
                continue
            rows.append({"cell": f"{name}/e2e-{mode}", "sparsity": s, "method": pre[-1]["method"], "seed": 1, "task": "e2e",
                         "mode": mode, "status": "done", "pretrain_flops": 3e9 * (1 - s / 2), "finetune_flops": 1e8,
                         "finetune_val_loss": 1.2, "bleu": bleu - (2.0 if mode == "sparse" else 0.0), "nist": 8.0,
                         "meteor": 40.0, "rouge_l": 65.0, "cider": 2.0, "val_ppl": 3.3})
    spec = load_spec("cpu-demo").to_dict()
    spec.update(seeds=[1])
    return {"spec": spec, "eval_split": "test", "pretrain": pre, "rows": rows}


def test_report_from_a_stored_results_file(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(fake_results()))
    md = report_from_dir(tmp_path).read_text()
    # the main table: each sparsity with dense and sparse fine-tuning, and the delta to the dense baseline
    assert "| 50% static | 2.25e+09 | dense | 58.50 | -1.50 |" in md
    assert "| 75% static | 1.88e+09 | sparse | 55.00 | -5.00 |" in md
    assert "| dense | 3.00e+09 | dense | 60.00 |  |" in md
    assert md.count("![") == 3
    html = (tmp_path / "report.html").read_text()
    assert "<table>" in html and html.count("<img") == 3
    from PIL import Image

    for png in ("pretrain_loss", "bleu_vs_flops", "finetune_gap"):
        with Image.open(tmp_path / "plots" / f"{png}.png") as im:
            assert im.size[0] >= 550 and im.size[1] >= 400  # one 5.5x4.5 inch panel at 110 dpi or more
    with pytest.raises(FileNotFoundError, match="results.json"):
        report_from_dir(tmp_path / "nothing")


def test_report_marks_incomplete_cells(tmp_path):
    res = fake_results()
    res["rows"][-1]["status"] = "failed"
    write_report(res, tmp_path)
    assert "Incomplete cells" in (tmp_path / "report.md").read_text()


def test_seeds_give_mean_std_intervals_and_significance_sentences(tmp_path, shared_data):
    """A 2-seed grid on disk (outputs chosen so that one comparison is clear-cut and one is a tie):
    results.csv, report.md and report.html carry mean ± std, n, bootstrap CIs and the verdicts."""
    import csv

    from sparselm.data.tasks import load_task
    from sparselm.evaluation.uncertainty import bleu_segments, bootstrap_ci
    from sparselm.experiments.results import collect, write_results

    spec_path = tmp_path / "two-seeds.yaml"
    spec_path.write_text("preset: tiny\nsparsities: [0.0, 0.5]\ntasks: [e2e]\nmodes: [dense, sparse]\nseeds: [1, 2]\n"
                         "eval_limit: 60\n")
    spec = load_spec(str(spec_path))
    examples = load_task("e2e").splits["test"][:60]
    refs = [e.refs for e in examples]
    good = [e.refs[0] for e in examples]
    short = [" ".join(e.refs[0].split()[:5]) for e in examples]
    outputs = {("dense", 0.0): good, ("dense", 0.5): short, ("sparse", 0.5): short}
    pre, fine = plan(spec, tmp_path / "grid")
    for cell in pre:
        cell.dir.mkdir(parents=True)
        (cell.dir / "summary.json").write_text(json.dumps({"final_val_loss": 5.0 + cell.seed / 10, "train_flops": 1e12,
                                                           "dense_train_flops": 2e12, "wall_time_s": 1.0}))
    for cell in fine:
        hyps = outputs[(cell.mode, cell.pretrain.sparsity)]
        if cell.pretrain.seed == 2:  # the second seed differs a little
            hyps = hyps[:-1] + [hyps[0]]
        segments = bleu_segments("e2e", hyps, refs)
        from sparselm.evaluation.metrics import mteval_bleu_nist

        cell.dir.mkdir(parents=True)
        (cell.dir / "summary.json").write_text(json.dumps({"final_val_loss": 1.0, "finetune_flops": 1e10}))
        cell.eval_file.parent.mkdir(parents=True)
        cell.eval_file.write_text(json.dumps({"metrics": {"bleu": mteval_bleu_nist(hyps, refs)["bleu"]},
                                              "confidence": {"bleu": list(bootstrap_ci("e2e", segments)), "level": 0.95},
                                              "bleu_segments": segments.astype(int).tolist()}))
    results = collect(spec, tmp_path / "grid")
    write_results(results, tmp_path / "grid")

    rows = list(csv.DictReader(open(tmp_path / "grid" / "results.csv")))
    assert len(rows) == 3 and all(r["n_seeds"] == "2" for r in rows)
    base = next(r for r in rows if r["sparsity"] == "0.0")
    assert float(base["bleu_std"]) > 0 and float(base["bleu_ci_lo"]) < float(base["bleu"]) < float(base["bleu_ci_hi"])
    assert len(list(csv.DictReader(open(tmp_path / "grid" / "results_per_seed.csv")))) == 6
    md = (tmp_path / "grid" / "report.md").read_text()
    assert " ± " in md and "(n=2)" in md
    spdf = next(c for c in results["comparisons"] if c["what"] == "spdf_vs_dense")
    tie = next(c for c in results["comparisons"] if c["what"] == "dense_ft_vs_sparse_ft")
    assert spdf["delta"] < -20 and spdf["p_value"] < 0.05 and spdf["n_inputs"] == 120 and spdf["n_seeds"] == 2
    assert tie["delta"] == 0 and tie["p_value"] == 1.0
    assert "sparse pre-training + dense fine-tuning vs dense pre-training + dense fine-tuning: ΔBLEU -" in md
    assert "significant at 5%" in md and "not significant at 5%" in md
    html = (tmp_path / "grid" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "<li>" in html  # standalone: images embedded (no loss curves here)


def test_method_variants_select_variable_spdf_and_sparse_wide_cells(tmp_path):
    spec = load_spec("cpu-study")
    pre, fine = plan(spec, tmp_path)
    names = [c.name for c in pre if c.seed == 1337]
    assert names == ["s00-dense-seed1337", "s50-static-seed1337", "s75-static-seed1337", "s75-gmp-seed1337",
                     "s75-vspdf-seed1337", "s75-wide-seed1337"]
    assert len(pre) == 18 and len(fine) == 30  # no sparse fine-tuning of dense or dense-tailed models
    vspdf = spec.pretrain_config(0.75, "vspdf", 1337, "x")
    assert vspdf.sparsity.method == "static" and vspdf.sparsity.dense_from(150) == 130
    wide = spec.pretrain_config(0.75, "wide", 1337, "x")
    assert wide.shape().n_embd == 256 and wide.sparsity.iso_flop == "wide"
    text = dry_run(spec, tmp_path, device="cpu")
    assert "s75-vspdf-seed1337" in text and "s75-wide-seed1337" in text


@pytest.mark.parametrize("methods,match", [
    ([{"method": "static"}], "a variant needs a name and a method"),
    (["static", {"name": "static", "method": "gmp"}], "names must be unique"),
    ([{"name": "x", "method": "static", "sparsities": [0.9]}], r"x's sparsities \[0.9\] are not all in"),
    ([{"name": "x", "method": "static", "dense_tail": 1.5}], "sparsity.dense_tail: 1.5 is out of range"),
    ([{"name": "x", "method": "static", "iso_flop": "tall"}], "sparsity.iso_flop: 'tall' is not one of none, wide"),
])
def test_method_variant_errors(tmp_path, methods, match):
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump({"preset": "tiny", "sparsities": [0.0, 0.5], "methods": methods, "tasks": ["e2e"]}))
    with pytest.raises(SpecError, match=match):
        load_spec(str(path))


# ---- prune-then-fine-tune rows ----------------------------------------------------------------
PRUNE_ROWS = [{"method": "wanda", "sparsity": 0.75}, {"method": "magnitude", "sparsity": 0.75, "n_m": None},
              {"method": "sparsegpt", "n_m": "2:4", "calibration": "corpus", "nsamples": 32}, "sparsegpt"]


def prune_spec(tmp_path, prune=PRUNE_ROWS, **change) -> str:
    data = yaml.safe_load(yaml.safe_dump(load_spec("cpu-demo").to_dict()))
    data.update(prune=prune, **change)
    path = tmp_path / "prune.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_prune_rows_plan_configs_and_dry_run(tmp_path):
    spec = load_spec(prune_spec(tmp_path))
    pre, fine = plan(spec, tmp_path / "grid")
    names = [c.name for c in pre]
    # a row without sparsity or n_m prunes to each of the spec's sparsities; 2:4 is 50%
    assert names == ["s00-dense-seed1337", "s50-static-seed1337", "s75-static-seed1337", "pruned-wanda-s75-seed1337",
                     "pruned-magnitude-s75-seed1337", "pruned-sparsegpt-2of4-s50-seed1337", "pruned-sparsegpt-s50-seed1337",
                     "pruned-sparsegpt-s75-seed1337"]
    assert len(fine) == 5 + 5 * 2  # every prune cell ends sparse: dense and sparse fine-tuning
    cell = pre[5]
    assert (cell.dir, cell.source.name, cell.sparsity, cell.method) == (
        tmp_path / "grid" / "prune" / cell.name, "s00-dense-seed1337", 0.5, "pruned-sparsegpt-2of4")
    assert [f.name for f in fine if f.pretrain is cell] == [f"{cell.name}/e2e-dense", f"{cell.name}/e2e-sparse"]
    cfg = spec.prune_config(cell.row, cell.seed, str(cell.source.dir), str(cell.dir))
    assert (cfg.method, cfg.n_m, cfg.nsamples, cfg.calibration, cfg.seed, cfg.from_run) == (
        "sparsegpt", "2:4", 32, "corpus", 1337, str(cell.source.dir))
    assert spec.prune_config(pre[3].row, 1337, "x", "y").calibration == "corpus"  # the grid's default
    assert pre[3].row.display == "75% pruned: wanda" and cell.row.display == "2:4 pruned: sparsegpt"
    text = dry_run(spec, tmp_path / "grid", device="cpu")
    assert "3 pre-training runs, 5 prune runs, 15 fine-tuning runs" in text
    assert "pruned-sparsegpt-2of4-s50-seed1337" in text and "x15 cells, 15 todo" in text


@pytest.mark.parametrize("prune,match", [
    ([{"method": "obs", "sparsity": 0.5}], r"prune\[0\].method: unknown 'obs'; choose from \['magnitude', 'sparsegpt', 'wanda'\]"),
    ([{"sparsity": 0.5}], r"prune\[0\]: a row needs a method"),
    ([{"method": "wanda", "out": "x"}], r"prune\[0\].out: set by the grid"),
    ([{"method": "wanda", "from_run": "x"}], r"prune\[0\].from_run: set by the grid"),
    ([{"method": "wanda", "target": 0.5}], r"prune\[0\].target: write sparsity"),
    ([{"method": "wanda", "eval_data": "held-out.txt"}], r"prune\[0\].eval_data: not used by a grid"),
    ([{"method": "wanda", "sparsity": 1.0}], r"prune\[0\].sparsity: 1.0 is not a fraction"),
    ([{"method": "wanda", "sparsity": "most"}], r"prune\[0\].sparsity: 'most' is not a fraction"),
    ([{"method": "wanda", "n_m": "4:4"}], r"prune\[0\].n_m: '4:4' must keep 0 < N < M"),
    (["magnitude", {"method": "wanda", "n_m": 124}], r"prune\[1\].n_m: expected a string like '2:4', got 124 \(quote it"),
    ([{"method": "wanda", "n_m": "2-4"}], r"prune\[0\].n_m: N:M must look like"),
    ([{"method": "wanda", "n_m": "2:4", "sparsity": 0.75}], r"prune\[0\].sparsity: 0.75 contradicts n_m '2:4'"),
    ([{"method": "wanda", "nsample": 8}], r"prune\[0\].nsample: unknown key.*did you mean prune\[0\].nsamples"),
    ([{"method": "sparsegpt", "options": {"dampp": 0.1}}], r"prune\[0\].options.dampp: unknown key"),
    ([{"method": "wanda", "nsamples": 0}], r"prune\[0\].nsamples: 0"),
    ([{"method": "wanda", "sparsity": 0.5}, {"method": "wanda", "sparsity": 0.5, "nsamples": 8}],
     r"prune\[1\]: same label 'pruned-wanda' and sparsity 0.5 as prune\[0\]; give one of them a name"),
    ([{"method": "wanda", "name": "static"}], r"prune\[0\]: its label 'static' is a pre-training method's"),
    ([{"method": "wanda", "name": "a/b"}], r"prune\[0\].name: 'a/b' must be letters"),
    ({"method": "wanda"}, "prune: expected a list of rows"),
])
def test_prune_row_errors(tmp_path, prune, match):
    with pytest.raises(SpecError, match=match):
        load_spec(prune_spec(tmp_path, prune))


def test_prune_rows_need_the_dense_run(tmp_path):
    with pytest.raises(SpecError, match="prune: prune rows start from the dense pre-training run; add 0.0 to sparsities"):
        load_spec(prune_spec(tmp_path, sparsities=[0.5]))


def test_a_grid_started_before_prune_rows_existed_still_resumes(tmp_path):
    from sparselm.experiments.runner import _check_spec_file

    spec = load_spec("cpu-demo")
    saved = spec.to_dict()
    del saved["prune"]  # spec.yaml of a grid run before the field existed
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(saved))
    _check_spec_file(spec, tmp_path)  # no error: the missing field is read as its default
    (tmp_path / "other").mkdir()
    with_prune = load_spec(prune_spec(tmp_path / "other"))
    with pytest.raises(SpecError, match=r"fields \['prune'\] differ"):
        _check_spec_file(with_prune, tmp_path)


@pytest.mark.slow
def test_prune_rows_run_end_to_end_report_and_resume(tmp_path, small_corpus, cache_dir, monkeypatch):
    """dense pre-training -> magnitude and Wanda pruning -> dense and sparse fine-tuning -> evaluation;
    the report shows the rows at the dense run's FLOPs, and a rerun redoes nothing."""
    from safetensors.torch import load_file

    from sparselm.experiments.runner import run

    monkeypatch.setenv("SPARSELM_CACHE", str(cache_dir))
    monkeypatch.setattr("sparselm.evaluation.metrics.java_available", lambda: False)  # METEOR's JVM: 5-30 s a cell
    spec_data = yaml.safe_load(open(micro_spec(tmp_path, small_corpus)))
    spec_data.update(sparsities=[0.0], prune=[{"method": "magnitude", "sparsity": 0.5},
                                              {"method": "wanda", "sparsity": 0.5, "nsamples": 4, "seqlen": 32}])
    spec_data["pretrain"]["optim"]["max_steps"] = 20
    spec_data["finetune"]["optim"]["max_steps"] = 3
    spec_data.update(eval_limit=2, decoding={"num_beams": 1, "max_new_tokens": 8})
    (tmp_path / "micro.yaml").write_text(yaml.safe_dump(spec_data))
    spec = load_spec(str(tmp_path / "micro.yaml"))
    out = tmp_path / "grid"
    logs = []
    results = run(spec, out, device="cpu", progress=False, log=logs.append)

    assert not (out / "failures").exists(), [p.read_text()[-600:] for p in (out / "failures").glob("*")]
    dense = json.loads((out / "pretrain" / "s00-dense-seed1337" / "summary.json").read_text())
    for method in ("magnitude", "wanda"):
        run_dir = out / "prune" / f"pruned-{method}-s50-seed1337"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["pruning"]["method"] == method and summary["pruned_from"] == str(out / "pretrain" / "s00-dense-seed1337")
        masks = load_file(str(run_dir / "masks.safetensors"))
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert kept == pytest.approx(0.5, abs=1e-3)
        # sparse fine-tuning kept the pruned weights at zero
        from sparselm.models.runs import load_run

        model, _, _, _ = load_run(out / "finetune" / run_dir.name / "e2e-sparse")
        weights = dict(model.named_parameters())
        for name, mask in masks.items():
            assert not weights[name].detach()[~mask.bool()].any(), name
        assert summary["pruning"]["calibration"] == (None if method == "magnitude" else
                                                     {"source": "corpus", "nsamples": 4, "seqlen": 32, "seed": 1337})

    pruned = [p for p in results["pretrain"] if p.get("pruning")]
    assert [(p["cell"], p["label"], p["status"]) for p in pruned] == [
        ("pruned-magnitude-s50-seed1337", "50% pruned: magnitude", "done"), ("pruned-wanda-s50-seed1337", "50% pruned: wanda", "done")]
    assert all(p["train_flops"] == dense["train_flops"] and p["val_loss"] is None for p in pruned)
    rows = [r for r in results["rows"] if r["method"].startswith("pruned-")]
    assert len(rows) == 4 and all(r["status"] == "done" and r["bleu"] is not None for r in rows)
    assert all(r["pretrain_flops"] == dense["train_flops"] for r in rows)
    md = (out / "report.md").read_text()
    assert "| 50% pruned: wanda | " in md and "| 50% pruned: magnitude | " in md and "pruned one-shot" in md
    assert {c["what"] for c in results["comparisons"]} <= {"pruned_vs_dense", "dense_ft_vs_sparse_ft"}
    assert len(results["comparisons"]) == 4

    stamp = (out / "prune" / "pruned-wanda-s50-seed1337" / "summary.json").stat().st_mtime_ns
    logs.clear()
    run(spec, out, device="cpu", progress=False, log=logs.append)
    assert "[2/3] prune pruned-magnitude-s50-seed1337: done, skipped" in logs
    assert sum("done, skipped" in line for line in logs) == 3 + 5
    assert (out / "prune" / "pruned-wanda-s50-seed1337" / "summary.json").stat().st_mtime_ns == stamp

"""``evaluate`` writes its result under ``eval/`` and nothing else; the grid reads a cell's state
from such files, and results read the grid without the runner."""

import json
import subprocess
import sys

import pytest

from sparselm.evaluation.evaluate import eval_path, evaluate
from sparselm.evaluation.generate import DecodingConfig
from sparselm.experiments.grid import plan
from sparselm.experiments.spec import ExperimentSpec
from sparselm.experiments.results import collect


@pytest.fixture
def jsonl_task(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    rows = [{"source": f"name[Cafe {i}], area[riverside]", "target": f"Cafe {i} is by the river."} for i in range(4)]
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def test_evaluate_writes_only_its_eval_files_and_the_card(tiny_run, jsonl_task):
    summary = tiny_run / "summary.json"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tiny_run.iterdir()}
    dec = DecodingConfig(num_beams=1, max_new_tokens=4, batch_size=2)
    result = evaluate(tiny_run, "jsonl", "test", limit=2, decoding=dec, data_dir=jsonl_task, progress=False, val_limit=4)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tiny_run.iterdir() if p.name not in ("eval", "README.md")}
    assert after == before  # summary.json included: same bytes, same mtime
    assert "## Evaluation" in (tiny_run / "README.md").read_text()  # the model card shows the metrics
    assert "metrics" not in json.loads(summary.read_text())
    path = eval_path(tiny_run, "jsonl", "test")
    assert path == tiny_run / "eval" / "jsonl-test.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert list(result["metrics"]) == ["bleu", "meteor", "rouge_l", "ter", "val_ppl"]
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "jsonl-test.hyp.txt", "jsonl-test.json", "jsonl-test.ref.txt", "jsonl-test.src.txt"]


def grid_spec(**kw):
    """A small grid: dense and 50% static, E2E, dense and sparse fine-tuning."""
    fields = dict(name="grid", seeds=[1], sparsities=[0.0, 0.5], methods=["static"], tasks=["e2e"],
                  modes=["dense", "sparse"], eval_split="test")
    fields.update(kw)
    return ExperimentSpec(**fields)


def test_plan_paths_and_cell_status_from_files(tmp_path):
    pre, fine = plan(grid_spec(), tmp_path)
    assert [c.name for c in pre] == ["s00-dense-seed1", "s50-static-seed1"]
    assert [c.name for c in fine] == ["s00-dense-seed1/e2e-dense", "s50-static-seed1/e2e-dense", "s50-static-seed1/e2e-sparse"]
    dense, sparse = pre
    done, failed, missing = fine
    assert dense.dir == tmp_path / "pretrain" / "s00-dense-seed1"
    assert dense.failure_file == tmp_path / "failures" / "pretrain-s00-dense-seed1.txt"
    assert done.dir == tmp_path / "finetune" / "s00-dense-seed1" / "e2e-dense"
    assert done.eval_file == eval_path(done.dir, "e2e", "test") == done.dir / "eval" / "e2e-test.json"
    assert failed.failure_file == tmp_path / "failures" / "finetune-s50-static-seed1__e2e-dense.txt"
    assert [c.status() for c in pre + fine] == ["missing"] * 5

    dense.dir.mkdir(parents=True)
    (dense.dir / "summary.json").write_text("{}")
    sparse.failure_file.parent.mkdir(parents=True)
    sparse.failure_file.write_text("Traceback ...")
    done.eval_file.parent.mkdir(parents=True)
    done.eval_file.write_text(json.dumps({"metrics": {"bleu": 12.5}}))
    failed.failure_file.write_text("Traceback ...")
    # fine-tuned but not evaluated: not done, even with metrics in its summary (the old marker)
    missing.dir.mkdir(parents=True)
    (missing.dir / "summary.json").write_text(json.dumps({"kind": "finetune", "metrics": {"e2e-test": {"bleu": 1.0}}}))
    assert [c.status() for c in pre + fine] == ["done", "failed", "done", "failed", "missing"]
    assert [c.done() for c in fine] == [True, False, False]

    results = collect(grid_spec(), tmp_path)
    assert [r["status"] for r in results["pretrain"]] == ["done", "failed"]
    assert [r["status"] for r in results["rows"]] == ["done", "failed", "missing"]
    assert results["rows"][0]["bleu"] == 12.5
    assert not plan(grid_spec(eval_split="validation"), tmp_path)[1][0].done()  # another split's result


def test_results_import_without_the_runner():
    code = "import sys, sparselm.experiments.results; print('sparselm.experiments.runner' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"

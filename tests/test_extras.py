"""The core install works without the extras (eval, report, lora, data): pre-training and sparsity
never import them, metrics that need a missing extra or Java are skipped with the reason, the report
is written without plots, and LoRA fails with a message naming ``sparselm[lora]``.

A missing package is simulated the way the import system documents: ``sys.modules[name] = None``
makes ``import name`` (and of its submodules) raise ModuleNotFoundError and ``importlib.util.find_spec``
answer None, as for a package that is not installed."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparselm._optional import MissingExtra
from sparselm.cli.main import main
from sparselm.evaluation import metrics
from sparselm.evaluation.evaluate import eval_path, evaluate, format_table
from sparselm.evaluation.generate import DecodingConfig

EXTRAS = ("matplotlib", "peft", "sacrebleu", "pycocoevalcap", "pyarrow", "zstandard")
COCO = ["meteor", "rouge_l", "cider"]


def block(monkeypatch, *packages):
    """Make ``packages`` (and their already imported submodules) unimportable until the test ends."""
    for name in list(sys.modules):
        if name.split(".")[0] in packages:
            monkeypatch.setitem(sys.modules, name, None)
    for name in packages:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def no_java(monkeypatch):
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **kw: None if cmd == "java" else which(cmd, *a, **kw))


@pytest.fixture(autouse=True)
def fresh_skip_log(monkeypatch):
    monkeypatch.setattr(metrics, "_LOGGED", set())  # "logged once" is per process: start each test afresh


# ---- pre-training without any extra (a fresh interpreter, nothing imported before the block) ----------
CORE_ONLY = textwrap.dedent("""
    import json, sys
    BLOCKED = {blocked!r}
    for name in BLOCKED:
        sys.modules[name] = None  # not installed, as far as the import system can tell

    import torch
    import sparselm, sparselm.sparsity, sparselm.training
    from sparselm.models import ModelShape, build_model
    from sparselm.sparsity import Static

    torch.manual_seed(0)
    shape = ModelShape(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64)
    model = build_model(shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sp = Static(0.5).attach(model, opt)
    x = torch.randint(0, shape.vocab_size, (2, shape.block_size))
    model(input_ids=x, labels=x).loss.backward()
    sp.after_backward(0)
    opt.step()
    sp.after_step(0)
    sp.check()

    from sparselm.cli.main import main
    rc = main(["pretrain", "--preset", "tiny", "--sparsity", "0.5", "--corpus", sys.argv[1], "--out", sys.argv[2],
               "--max-steps", "2", "--batch-size", "4", "--no-progress", "--set", "model.n_layer=1",
               "--set", "model.n_embd=16", "--set", "model.n_head=2", "--set", "model.vocab_size=512",
               "--set", "model.block_size=16", "--set", "optim.warmup_steps=1", "--set", "run.eval_batches=1"])
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None)
    print("RESULT", json.dumps({{"rc": rc, "leaked": leaked}}))
""")


def test_pretrain_and_sparsity_need_no_extra(small_corpus, cache_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "SPARSELM_CACHE": str(cache_dir), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", CORE_ONLY.format(blocked=EXTRAS), str(small_corpus), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result == {"rc": 0, "leaked": []}, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sparsity"]["measured"] == pytest.approx(0.5, abs=0.01)


# ---- metrics and evaluate ------------------------------------------------------------------------
E2E_HYPS = ["The Eagle is a cheap pub near the river.", "Aromi is a coffee shop."]
E2E_REFS = [["There is a cheap pub called The Eagle near the river.", "The Eagle is a cheap pub by the river."],
            ["Aromi is a coffee shop in the city centre."]]


def test_without_java_coco_metrics_are_skipped_and_bleu_nist_kept(no_java, caplog):
    skipped: dict = {}
    with caplog.at_level(logging.WARNING, logger="sparselm"):
        got = metrics.score("e2e", E2E_HYPS, E2E_REFS, skipped)
        metrics.score("e2e", E2E_HYPS, E2E_REFS)  # a second time: not logged again
    assert got == metrics.mteval_bleu_nist(E2E_HYPS, E2E_REFS)  # BLEU and NIST, the E2E scorer's own numbers
    assert sorted(skipped) == sorted(COCO)
    assert all(r.startswith("needs Java (java not on PATH)") for r in skipped.values())
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("METEOR, ROUGE-L, CIDEr skipped: needs Java")


def test_without_the_eval_extra_sacrebleu_and_coco_metrics_name_it(monkeypatch):
    block(monkeypatch, "sacrebleu", "pycocoevalcap")
    skipped: dict = {}
    assert metrics.score("jsonl", ["a cafe ."], [["a cafe .", "the cafe ."]], skipped) == {}
    assert sorted(skipped) == ["bleu", "meteor", "rouge_l", "ter"]
    assert "needs sacrebleu: pip install 'sparselm[eval]'" in skipped["bleu"] == skipped["ter"]
    assert "needs pycocoevalcap: pip install 'sparselm[eval]'" in skipped["meteor"]
    assert set(metrics.score("e2e", E2E_HYPS, E2E_REFS)) == {"bleu", "nist"}  # mteval is ours: no extra needed


DECODING = DecodingConfig(num_beams=1, max_new_tokens=4, batch_size=2)


def test_evaluate_without_java_records_the_skip_in_its_json(tiny_run, no_java, caplog):
    with caplog.at_level(logging.WARNING, logger="sparselm"):
        result = evaluate(tiny_run, "e2e", "test", limit=2, decoding=DECODING, progress=False, val_limit=2)
    assert list(result["metrics"]) == ["bleu", "nist", "val_ppl"]
    assert list(result["skipped"]) == COCO and "needs Java" in result["skipped"]["meteor"]
    assert "bleu" in result["confidence"] and len(result["bleu_segments"]) == 2
    assert json.loads(eval_path(tiny_run, "e2e", "test").read_text())["skipped"] == result["skipped"]
    assert "\n  meteor   skipped: needs Java (java not on PATH)" in format_table(result)
    assert sum("METEOR, ROUGE-L, CIDEr skipped" in r.getMessage() for r in caplog.records) == 1


def test_evaluate_without_the_eval_extra_still_finishes(tiny_run, tmp_path, monkeypatch):
    block(monkeypatch, "sacrebleu", "pycocoevalcap")
    folder = tmp_path / "task"
    folder.mkdir()
    rows = [{"source": f"name[Cafe {i}]", "target": f"Cafe {i} is by the river."} for i in range(3)]
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = evaluate(tiny_run, "jsonl", "test", limit=2, decoding=DECODING, data_dir=folder, progress=False, val_limit=2)
    assert list(result["metrics"]) == ["val_ppl"]
    assert sorted(result["skipped"]) == ["bleu", "meteor", "rouge_l", "ter"]
    assert "confidence" not in result and "bleu_segments" not in result  # sacrebleu's BLEU: no statistics to bootstrap


# ---- LoRA, report ------------------------------------------------------------------------------------
def test_lora_without_peft_names_the_extra(monkeypatch, tmp_path, capsys):
    block(monkeypatch, "peft")
    from sparselm.training.finetuning import _peft

    with pytest.raises(ImportError, match=r"^LoRA fine-tuning needs peft: pip install 'sparselm\[lora\]'$") as e:
        _peft()
    assert isinstance(e.value, MissingExtra) and e.value.extra == "lora"
    # the CLI: one line, before any model or data is loaded (the --from directory does not even exist)
    rc = main(["finetune", "--from", str(tmp_path / "no-such-run"), "--mode", "lora", "--out", str(tmp_path / "ft")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == "sparselm finetune: error: LoRA fine-tuning needs peft: pip install 'sparselm[lora]'"


def test_report_without_matplotlib_is_written_without_plots(monkeypatch, tmp_path, caplog):
    block(monkeypatch, "matplotlib")
    from sparselm.experiments.report import write_report

    results = {"spec": {"name": "t", "preset": "tiny", "sparsities": [0.0, 0.5], "methods": ["static"], "tasks": ["e2e"],
                        "modes": ["dense"], "seeds": [1]},
               "eval_split": "test", "pretrain": [], "rows": []}
    with caplog.at_level(logging.WARNING, logger="sparselm"):
        path = write_report(results, tmp_path)
    assert path.read_text().startswith("# SPDF report: t") and (tmp_path / "report.html").is_file()
    assert not (tmp_path / "plots").exists()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["report plots skipped: needs matplotlib: pip install 'sparselm[report]'"]


# ---- the declared extras ---------------------------------------------------------------------------
def test_extras_are_declared_consistently():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs):
        return {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in reqs}

    parts = set(extras) - {"all", "test"}
    assert names(project["dependencies"]) == {"torch", "transformers", "tokenizers", "safetensors", "numpy", "pyyaml", "tqdm"}
    assert set(extras["all"]) == {r for p in parts for r in extras[p]}  # same packages, same floors
    assert set(extras["all"]) <= set(extras["test"])  # CI installs .[test]: every extra's code is tested
    assert {"eval", "report", "lora", "data", "log"} <= parts

"""Tasks and metrics are declared once, in registries: a task or metric registered from here is
loaded, scored and reported by name like the built-in ones, and leaves nothing behind."""

import contextlib
import json

import pytest

from sparselm.data import tasks
from sparselm.data.tasks import Example, Task, TaskData, get_task, load_task, register_task
from sparselm.evaluation import metrics
from sparselm.evaluation.metrics import Metric, get_metric, mteval_bleu_nist, register_metric, sacrebleu_scores, score
from sparselm.experiments.report import write_report


@contextlib.contextmanager
def restored_registries():
    """Whatever is registered inside is gone afterwards, and replaced declarations come back."""
    saved_tasks, saved_metrics = dict(tasks.TASKS), dict(metrics.METRICS)
    try:
        yield
    finally:
        tasks.TASKS.clear()
        tasks.TASKS.update(saved_tasks)
        metrics.METRICS.clear()
        metrics.METRICS.update(saved_metrics)


@pytest.fixture
def registries():
    with restored_registries():
        yield


def load_qa(folder, skip_bad_rows):
    """A loader of ``qa.jsonl`` rows ``{"q": ..., "a": ...}``; every split is the whole file."""
    rows = [json.loads(line) for line in (folder / "qa.jsonl").read_text().splitlines()]
    examples = [Example(id=str(i), source=r["q"], refs=[r["a"]]) for i, r in enumerate(rows)]
    return TaskData("qa", {"train": examples, "validation": examples, "test": examples})


QA = [{"q": "capital of France", "a": "Paris"}, {"q": "capital of Spain", "a": "Madrid"},
      {"q": "two plus two", "a": "four is the answer to that sum"}]
HYPS = ["Paris", "Barcelona", "four is the answer to that sum"]
REFS = [[r["a"]] for r in QA]


@pytest.fixture
def qa_dir(tmp_path):
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in QA))
    return tmp_path


def exact_match(hyps, refs):
    return {"exact_match": 100.0 * sum(h in rs for h, rs in zip(hyps, refs)) / len(hyps)}


def test_a_task_and_a_metric_registered_here_are_loaded_and_scored(registries, qa_dir):
    register_metric(Metric("exact_match", "EM", True, {"exact": exact_match}))
    register_task(Task("qa", load_qa, None, ("exact_match", "bleu")))
    data = load_task("qa", qa_dir)
    assert [e.refs for e in data.splits["test"]] == REFS
    got = score("qa", HYPS, REFS)
    assert list(got) == ["exact_match", "bleu"]  # the task's order
    assert got["exact_match"] == pytest.approx(200 / 3)
    assert got["bleu"] == sacrebleu_scores(HYPS, REFS)["bleu"]  # BLEU's default implementation
    with pytest.raises(ValueError, match="task 'qa' has no folder in the shared data: it needs --data-dir"):
        load_task("qa")


def test_a_task_picks_a_metric_implementation_and_each_runs_once(registries):
    calls = []

    def lengths(hyps, refs):
        calls.append(len(hyps))
        return {"hyp_words": sum(len(h.split()) for h in hyps), "ref_words": sum(len(r[0].split()) for r in refs)}

    register_metric(Metric("hyp_words", "hyp words", True, {"count": lengths}))
    register_metric(Metric("ref_words", "ref words", True, {"count": lengths}))
    register_task(Task("qa", load_qa, None, ("nist", "hyp_words", "bleu", "ref_words"), {"bleu": "mteval"}))
    got = score("qa", HYPS, REFS)
    assert calls == [3]  # one call gives both counts
    assert list(got) == ["nist", "hyp_words", "bleu", "ref_words"]
    assert (got["hyp_words"], got["ref_words"]) == (9, 9)
    assert {k: got[k] for k in ("bleu", "nist")} == mteval_bleu_nist(HYPS, REFS)  # as E2E does
    assert got["bleu"] != sacrebleu_scores(HYPS, REFS)["bleu"]

    register_task(Task("qa", load_qa, None, ("bleu",), {"bleu": "nltk"}), replace=True)
    with pytest.raises(ValueError, match=r"task qa: metric 'bleu' has no implementation 'nltk'; it has \['mteval', 'sacrebleu'\]"):
        score("qa", HYPS, REFS)
    register_task(Task("qa", load_qa, None, ("bleu", "val_ppl")), replace=True)
    with pytest.raises(ValueError, match="metric 'val_ppl' is not computed from outputs"):
        score("qa", HYPS, REFS)


def test_unknown_names_list_the_registered_ones(registries):
    with pytest.raises(ValueError, match=r"unknown task 'cnn'; registered tasks: \['dart', 'e2e', 'e2e-cleaned', 'jsonl', 'webnlg'\]"):
        get_task("cnn")
    with pytest.raises(ValueError, match="unknown task 'cnn'"):
        score("cnn", HYPS, REFS)
    with pytest.raises(ValueError, match=r"unknown metric 'rouge'; registered metrics: \['bleu', 'cider', 'meteor', 'nist', "
                                         r"'rouge_l', 'ter', 'val_ppl'\]"):
        get_metric("rouge")
    register_task(Task("qa", load_qa, None, ("rouge",)))
    with pytest.raises(ValueError, match="unknown metric 'rouge'"):
        score("qa", HYPS, REFS)


def test_duplicate_names_are_refused_unless_replacing(registries):
    e2e, bleu = get_task("e2e"), get_metric("bleu")
    with pytest.raises(ValueError, match="task 'e2e' is already registered; pass replace=True"):
        register_task(Task("e2e", load_qa, None, ("bleu",)))
    with pytest.raises(ValueError, match="metric 'bleu' is already registered; pass replace=True"):
        register_metric(Metric("bleu", "BLEU-4", True, {"exact": exact_match}))
    assert get_task("e2e") is e2e and get_metric("bleu") is bleu
    register_metric(Metric("bleu", "BLEU-4", True, bleu.scorers), replace=True)
    assert get_metric("bleu").display == "BLEU-4"


def test_registrations_are_undone_after_a_test():
    before_tasks, before_metrics = dict(tasks.TASKS), dict(metrics.METRICS)
    e2e = get_task("e2e")
    with restored_registries():
        register_task(Task("qa", load_qa, None, ("exact_match",)))
        register_task(Task("e2e", load_qa, None, ("bleu",)), replace=True)
        register_metric(Metric("exact_match", "EM", True, {"exact": exact_match}))
        assert "qa" in tasks.TASKS and "exact_match" in metrics.METRICS
    assert tasks.TASKS == before_tasks and metrics.METRICS == before_metrics
    assert get_task("e2e") is e2e
    assert list(tasks.TASKS) == ["e2e", "e2e-cleaned", "webnlg", "dart", "jsonl"]
    assert list(metrics.METRICS) == ["bleu", "nist", "meteor", "rouge_l", "cider", "ter", "val_ppl"]


def test_report_names_and_directions_come_from_the_registry(registries, tmp_path):
    register_metric(Metric("exact_match", "EM", True, {"exact": exact_match}))
    register_metric(Metric("edits", "Edits", False, {"exact": exact_match}))
    spec = {"name": "qa-grid", "preset": "tiny", "sparsities": [0.0], "methods": ["static"], "tasks": ["qa"],
            "modes": ["dense"], "seeds": [1], "eval_limit": None}
    row = {"cell": "s00-dense-seed1/qa-dense", "sparsity": 0.0, "method": "dense", "seed": 1, "task": "qa", "mode": "dense",
           "status": "done", "pretrain_flops": 1e9, "finetune_flops": 1e8, "finetune_val_loss": 1.0,
           "bleu": 12.5, "exact_match": 66.7, "edits": 3.0, "val_ppl": 2.5}
    write_report({"spec": spec, "eval_split": "test", "pretrain": [], "rows": [row]}, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| pre-training | FT | BLEU ↑ | val PPL ↓ | EM ↑ | Edits ↓ | FT val loss | FT FLOPs |" in md
    assert "| dense | dense | 12.50 | 2.50 | 66.70 | 3.00 |" in md

"""Task loaders: real data sets, splits, and the promised errors on malformed rows."""

import json

import pytest

from sparselm.data.tasks import SEPARATOR, TaskDataError, load_task


def test_real_tasks_load_with_disjoint_splits(shared_data):
    for name in ("e2e", "webnlg", "dart"):
        task = load_task(name)
        ids = {s: {e.source for e in exs} for s, exs in task.splits.items()}
        assert all(ids.values())
        # no input in two splits (DART repeats triplesets in its dev file: split by tripleset, not index)
        assert not ids["train"] & ids["test"] and not ids["train"] & ids["validation"] and not ids["validation"] & ids["test"]
        if name == "dart":  # a repeated tripleset is one input with all its references
            assert sum(len(exs) for exs in task.splits.values()) == len(set().union(*ids.values()))
        assert all(e.refs for exs in task.splits.values() for e in exs)
    e2e = load_task("e2e")
    assert len(e2e.splits["test"]) == 630 and sum(len(e.refs) for e in e2e.splits["test"]) == 4693
    assert len(e2e.splits["train"]) + len(e2e.splits["validation"]) == 547  # dev MRs, split by hash
    ex = load_task("webnlg").splits["train"][0]
    assert " : " in ex.source and ex.prompt.endswith(SEPARATOR)


def write_e2e(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    body = "mr,ref\n" + "\n".join(f'"{mr}","{ref}"' for mr, ref in rows) + "\n"
    (folder / "devset.csv").write_text(body)
    (folder / "testset_w_refs.csv").write_text(body)


def test_malformed_e2e_row_names_file_line_and_field(tmp_path):
    write_e2e(tmp_path / "e2e", [("name[A]", "A is nice."), ("name[B]", ""), ("name[C]", "C is ok.")])
    with pytest.raises(TaskDataError, match=r"devset\.csv:3: field 'ref' is empty"):
        load_task("e2e", tmp_path / "e2e")
    with pytest.raises(TaskDataError, match="missing column"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "devset.csv").write_text("meaning,text\na,b\n")
        (tmp_path / "bad" / "testset_w_refs.csv").write_text("mr,ref\na,b\n")
        load_task("e2e", tmp_path / "bad")


def test_skip_bad_rows_counts_and_warns(tmp_path, caplog):
    rows = [(f"name[R{i}]", f"R{i} is a pub.") for i in range(40)] + [("", "orphan ref")]
    write_e2e(tmp_path / "e2e", rows)
    task = load_task("e2e", tmp_path / "e2e", skip_bad_rows=True)
    assert task.skipped == 2  # the bad row in dev and in test
    assert "skipped 2 malformed rows" in caplog.text
    assert sum(len(v) for k, v in task.splits.items() if k != "test") == 40


def test_jsonl_task_and_its_errors(tmp_path):
    d = tmp_path / "task"
    d.mkdir()
    rows = [{"source": f"s{i % 5}", "target": f"t{i}"} for i in range(10)]
    for split in ("train", "validation", "test"):
        (d / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task("jsonl", d)
    assert len(task.splits["test"]) == 5 and all(len(e.refs) == 2 for e in task.splits["test"])
    (d / "test.jsonl").write_text('{"source": "x", "target": "y"}\n{"source": "x"}\n')
    with pytest.raises(TaskDataError, match=r"test\.jsonl:2: field 'target'"):
        load_task("jsonl", d)
    with pytest.raises(ValueError, match="needs --data-dir"):
        load_task("jsonl")
    with pytest.raises(ValueError, match="unknown task"):
        load_task("cnn")


def test_malformed_webnlg_and_dart_entries(tmp_path):
    (tmp_path / "w").mkdir()
    entries = {"entries": [{"1": {"modifiedtripleset": [{"subject": "A", "property": "p", "object": "B"}],
                                  "lexicalisations": [{"lex": "A p B."}]}},
                           {"2": {"modifiedtripleset": [], "lexicalisations": [{"lex": "x"}]}}]}
    (tmp_path / "w" / "dev.json").write_text(json.dumps(entries))
    with pytest.raises(TaskDataError, match=r"entry 1 \(id 2\): field 'modifiedtripleset'"):
        load_task("webnlg", tmp_path / "w")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dart-v1.1.1-full-dev.json").write_text(json.dumps([{"tripleset": [["a", "b", "c"]], "annotations": []}]))
    with pytest.raises(TaskDataError, match=r"example 0: field 'annotations'"):
        load_task("dart", tmp_path / "d")


def test_non_utf8_bytes_name_the_file_and_line_and_can_be_skipped(tmp_path):
    from sparselm.data.tasks import TaskDataError

    rows = [json.dumps({"source": f"s{i}", "target": f"t{i}"}).encode() for i in range(4)]
    rows[2] = b'{"source": "caf\xe9", "target": "x"}'  # Latin-1, not UTF-8
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(TaskDataError, match=r"train.jsonl:3: field '\(line\)' is not valid UTF-8 \(byte 0xe9 at column 16;"):
        load_task("jsonl", tmp_path)
    task = load_task("jsonl", tmp_path, skip_bad_rows=True)
    assert task.skipped == 3 and len(task.splits["train"]) == 3  # one bad row per split file
    e2e = tmp_path / "e2e"
    e2e.mkdir()
    (e2e / "devset.csv").write_bytes(b"mr,ref\nname[A],A is good.\nname[B],B is caf\xe9.\n")
    with pytest.raises(TaskDataError, match=r"devset.csv:3: not valid UTF-8 \(byte 0xe9\)"):
        load_task("e2e", e2e)

"""Deterministic hypothesis/reference sets for the golden metric tests, built from the shared data
at test time (no data set is committed): a leave-one-out "human" system and a copy-the-input
baseline for E2E, a leave-one-out system for WebNLG and DART."""

from sparselm.data.tasks import load_task


def leave_one_out(examples, n):
    multi = [e for e in examples if len(e.refs) > 1][:n]
    return [e.refs[0] for e in multi], [e.refs[1:] for e in multi]


def systems():
    e2e = load_task("e2e").splits["test"][:40]
    web = load_task("webnlg").splits["test"]
    dart = load_task("dart").splits["test"]
    return {
        "e2e-human": ("e2e", *leave_one_out(e2e, 40)),
        "e2e-copy": ("e2e", [e.source for e in e2e], [e.refs for e in e2e]),
        "webnlg-human": ("webnlg", *leave_one_out(web, 30)),
        "dart-human": ("dart", *leave_one_out(dart, 30)),
    }

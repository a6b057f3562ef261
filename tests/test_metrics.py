"""Every metric reproduces its official scorer's number (golden values computed once, committed)."""

import json
from pathlib import Path

import pytest

from metric_fixtures import systems
from sparselm.evaluation import metrics

GOLDEN = json.loads((Path(__file__).parent / "golden_metrics.json").read_text())


@pytest.fixture(scope="module")
def fixture_sets(shared_data):
    return systems()


@pytest.mark.parametrize("name", ["e2e-human", "e2e-copy", "webnlg-human", "dart-human"])
def test_metrics_match_official_scorers(fixture_sets, name):
    task, hyps, refs = fixture_sets[name]
    got = metrics.score(task, hyps, refs)
    want = GOLDEN[name]
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=0.01), key


def test_mteval_tokenization_matches_v13a_rules():
    # expected output taken from mteval-v13a.pl's own tokenization subroutine run by Perl
    assert " ".join(metrics.mteval_tokenize("The Eagle's price-range is £20-25, near 3.5 km.")) == \
        "the eagle's price-range is £20 - 25 , near 3.5 km ."


def test_human_beats_copy_baseline_and_errors(fixture_sets):
    human = metrics.mteval_bleu_nist(*fixture_sets["e2e-human"][1:])
    copy = metrics.mteval_bleu_nist(*fixture_sets["e2e-copy"][1:])
    assert human["bleu"] > 5 * copy["bleu"] and human["nist"] > copy["nist"]
    perfect = metrics.mteval_bleu_nist(["a small cafe near the river ."], [["a small cafe near the river ."]])
    assert perfect["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="hypotheses but"):
        metrics.score("e2e", ["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one reference"):
        metrics.mteval_bleu_nist(["a"], [[]])

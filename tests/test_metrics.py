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


@pytest.mark.parametrize("name", ["e2e-human", "e2e-copy", "e2e-short", "e2e-dot", "e2e-shifted"])
def test_e2e_bleu_and_nist_equal_the_official_sig_scorer(fixture_sets, name):
    """Outputs shorter than their references, on MRs with 1 to 45 references: padding references must
    not shorten BLEU's closest reference length or NIST's average one (mteval-v13a-sig)."""
    _, hyps, refs = fixture_sets[name]
    got = metrics.mteval_bleu_nist(hyps, refs)
    want = GOLDEN["e2e-mteval-sig"][name]
    assert got["bleu"] == pytest.approx(want["bleu"], abs=1e-4) and got["nist"] == pytest.approx(want["nist"], abs=1e-4)


def test_a_degenerate_output_scores_near_zero_not_sixty():
    """"." for every input once scored BLEU 60.65: the empty padding references made the closest
    reference length 0, so no brevity penalty applied."""
    refs = [["There is a cheap pub called The Eagle near the river.", "The Eagle is a cheap pub by the river."],
            ["Aromi is a coffee shop."]]
    assert metrics.mteval_bleu_nist([".", "."], refs)["bleu"] < 1.0  # 0.09: mteval smoothing of empty matches


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

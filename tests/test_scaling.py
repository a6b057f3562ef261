"""The scaling-law fit recovers a known law and reports its error."""

import math

import pytest

from sparselm.experiments import scaling


def synthetic(E=1.8, A=400.0, alpha=0.34, B=410.0, beta=0.28, noise=0.0):
    pts = []
    for i, n in enumerate((2e5, 5e5, 1e6, 3e6)):
        for j, d in enumerate((1e6, 4e6, 1.6e7)):
            wobble = noise * math.sin(7 * i + 3 * j)
            pts.append(scaling.Point(f"n{i}d{j}", n, d, E + A / n**alpha + B / d**beta + wobble))
    return pts


def test_fit_recovers_a_known_law():
    pts = synthetic()
    fit = scaling.fit(pts)
    assert fit.rmse < 1e-3 and fit.mean_abs_rel_error < 1e-3
    assert fit.E == pytest.approx(1.8, rel=0.05)
    assert fit.alpha == pytest.approx(0.34, rel=0.1) and fit.beta == pytest.approx(0.28, rel=0.1)
    assert fit.predict(1e7, 1e8) == pytest.approx(1.8 + 400 / 1e7**0.34 + 410 / 1e8**0.28, rel=1e-2)  # extrapolates


def test_fit_error_reflects_noise_and_too_few_points(tmp_path):
    noisy = scaling.fit(synthetic(noise=0.05))
    assert 0.005 < noisy.rmse < 0.06
    text = scaling.report(synthetic()[:4], scaling.fit(synthetic()[:4]))
    assert "not identifiable" in text
    scaling.plot(synthetic(), noisy, tmp_path / "fit.png")
    assert (tmp_path / "fit.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="at least 3"):
        scaling.fit(synthetic()[:2])
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        scaling.load_points([tmp_path])

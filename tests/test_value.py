"""BG/NBD and Gamma-Gamma (app/ml/value.py) against the papers' own table on the CDNOW sample.

Fader, Hardie and Lee (2005) fit BG/NBD to the 2,357 customers of the CDNOW sample over 39 weeks
(to 1997-09-30): r = 0.243, alpha = 4.414, a = 0.793, b = 2.426, log-likelihood -9582.4. Fader
and Hardie (2013) fit Gamma-Gamma to its 946 repeat customers: p = 6.25, q = 3.74, gamma = 15.44,
log-likelihood -4055.9. The sample ships inside the `lifetimes` package, whose formulas (given the
same parameters) are the oracle for the per-customer expectations; it is read as data and called
as a test dependency only.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from scipy import optimize

from app.ml.value import (
    BGNBD,
    GammaGamma,
    PurchaseSummary,
    ValueModelError,
    bgnbd_log_likelihood,
    gamma_gamma_log_likelihood,
    summarise,
)

lifetimes = pytest.importorskip("lifetimes", reason="the CDNOW sample ships with lifetimes (requirements-dev.txt)")

AS_OF = np.datetime64("1997-09-30")


@pytest.fixture(scope="module")
def cdnow_log() -> pd.DataFrame:
    path = os.path.join(os.path.dirname(lifetimes.__file__), "datasets", "CDNOW_sample.txt")
    log = pd.read_csv(path, sep=r"\s+", header=None, names=["master", "customer", "date", "cds", "dollars"], dtype=str)
    log["day"] = pd.to_datetime(log["date"], format="%Y%m%d")
    log["dollars"] = log["dollars"].astype(float)
    return log


@pytest.fixture(scope="module")
def cdnow(cdnow_log) -> PurchaseSummary:
    return summarise(cdnow_log["customer"], cdnow_log["day"].to_numpy(), cdnow_log["dollars"], as_of=AS_OF)


@pytest.fixture(scope="module")
def bgnbd(cdnow) -> BGNBD:
    return BGNBD.fit(cdnow)


@pytest.fixture(scope="module")
def gamma_gamma(cdnow) -> GammaGamma:
    return GammaGamma.fit(cdnow)


def test_the_summary_has_the_papers_customers(cdnow):
    assert len(cdnow) == 2357
    assert int((cdnow.x > 0).sum()) == 946
    assert cdnow.T.max() <= 39.0 and cdnow.T.min() > 26.0  # every first purchase in the first quarter of 1997


def test_bgnbd_reproduces_the_2005_estimates(bgnbd):
    assert bgnbd.r == pytest.approx(0.243, abs=0.0005)
    assert bgnbd.alpha == pytest.approx(4.414, abs=0.0005)
    assert bgnbd.a == pytest.approx(0.793, abs=0.0005)
    assert bgnbd.b == pytest.approx(2.426, abs=0.0005)
    assert bgnbd.log_likelihood == pytest.approx(-9582.4, abs=0.05)
    assert bgnbd.n_customers == 2357


def test_gamma_gamma_reproduces_the_2013_estimates(gamma_gamma):
    assert gamma_gamma.p == pytest.approx(6.25, abs=0.005)
    assert gamma_gamma.q == pytest.approx(3.74, abs=0.005)
    assert gamma_gamma.gamma == pytest.approx(15.44, abs=0.005)
    assert gamma_gamma.log_likelihood == pytest.approx(-4055.9, abs=0.05)
    assert gamma_gamma.n_customers == 946


def test_the_fits_reach_the_maximum_of_a_tight_optimisation(cdnow, bgnbd, gamma_gamma):
    def bg(log_params):
        return -bgnbd_log_likelihood(*np.exp(log_params), cdnow.x, cdnow.t_x, cdnow.T).sum()

    tight = optimize.minimize(
        bg,
        np.log([0.3, 4.0, 0.8, 2.5]),
        method="Nelder-Mead",
        options={"xatol": 1e-12, "fatol": 1e-12, "maxiter": 20_000},
    )
    assert bgnbd.log_likelihood >= -tight.fun - 1e-6
    np.testing.assert_allclose([bgnbd.r, bgnbd.alpha, bgnbd.a, bgnbd.b], np.exp(tight.x), rtol=1e-3)

    repeat = (cdnow.x > 0) & (cdnow.repeat_spend > 0)

    def gg(log_params):
        return -gamma_gamma_log_likelihood(*np.exp(log_params), cdnow.x[repeat], cdnow.repeat_spend[repeat]).sum()

    tight = optimize.minimize(
        gg, np.log([6.0, 4.0, 15.0]), method="Nelder-Mead", options={"xatol": 1e-12, "fatol": 1e-12, "maxiter": 20_000}
    )
    assert gamma_gamma.log_likelihood >= -tight.fun - 1e-6


def test_per_customer_expectations_match_the_reference_formulas(cdnow, bgnbd, gamma_gamma):
    reference = lifetimes.BetaGeoFitter()
    reference.params_ = pd.Series({"r": bgnbd.r, "alpha": bgnbd.alpha, "a": bgnbd.a, "b": bgnbd.b})
    x, t_x, T = cdnow.x, cdnow.t_x, cdnow.T
    np.testing.assert_allclose(bgnbd.p_alive(x, t_x, T), reference.conditional_probability_alive(x, t_x, T), rtol=1e-9)
    for weeks in (1.0, 13.0, 39.0, 52.0 * 5):
        np.testing.assert_allclose(
            bgnbd.expected_purchases(weeks, x, t_x, T),
            reference.conditional_expected_number_of_purchases_up_to_time(weeks, x, t_x, T),
            rtol=1e-9,
        )

    spend = lifetimes.GammaGammaFitter()
    spend.params_ = pd.Series({"p": gamma_gamma.p, "q": gamma_gamma.q, "v": gamma_gamma.gamma})
    repeat = cdnow.x > 0
    np.testing.assert_allclose(
        gamma_gamma.expected_order_value(x[repeat], cdnow.repeat_spend[repeat]),
        spend.conditional_expected_average_profit(x[repeat], cdnow.repeat_spend[repeat]),
        rtol=1e-9,
    )


def test_one_time_buyers_are_alive_and_get_the_population_mean_spend(cdnow, bgnbd, gamma_gamma):
    once = cdnow.x == 0
    assert np.all(bgnbd.p_alive(cdnow.x[once], cdnow.t_x[once], cdnow.T[once]) == 1.0)
    values = gamma_gamma.expected_order_value(cdnow.x[once], cdnow.repeat_spend[once])
    assert np.allclose(values, gamma_gamma.p * gamma_gamma.gamma / (gamma_gamma.q - 1))
    # The more often a customer bought, the more its own mean counts.
    few, many = gamma_gamma.expected_order_value(np.array([1.0, 20.0]), np.array([100.0, 100.0]))
    assert gamma_gamma.population_mean < few < many < 100.0


def test_the_holdout_prediction_tracks_the_next_39_weeks(cdnow_log, cdnow, bgnbd):
    # Fit to 1997-09-30, predict weeks 40-78, count the purchase days that really came (the 2005
    # paper's tracking of the holdout period): the forecast is within a sixth of what happened.
    later = cdnow_log[cdnow_log["day"] > pd.Timestamp(AS_OF)]
    actual = later.groupby(["customer", "day"])["dollars"].sum().ge(0).sum()
    predicted = bgnbd.expected_purchases(39.0, cdnow.x, cdnow.t_x, cdnow.T).sum()
    assert actual > 1000
    assert abs(predicted - actual) / actual < 1 / 6


def _summary(x, t_x, T, spend=None) -> PurchaseSummary:
    x = np.asarray(x, dtype=float)
    spend = np.where(x > 0, 10.0, np.nan) if spend is None else np.asarray(spend, dtype=float)
    return PurchaseSummary(x=x, t_x=np.asarray(t_x, dtype=float), T=np.asarray(T, dtype=float), repeat_spend=spend)


@pytest.mark.parametrize(
    ("summary", "says"),
    [
        (_summary([0] * 500, [0] * 500, [20] * 500), "0 customers bought more than once"),
        (_summary([0], [0], [1]), "0 customers bought more than once"),
        (_summary([1] * 49 + [0] * 10, [3] * 49 + [0] * 10, [10] * 59), "49 customers bought more than once"),
    ],
)
def test_too_little_to_fit_is_a_reason_not_a_crash(summary, says):
    with pytest.raises(ValueModelError, match=says):
        BGNBD.fit(summary)
    with pytest.raises(ValueModelError):
        GammaGamma.fit(summary)


def test_degenerate_data_gives_a_model_or_a_reason_never_anything_else():
    rng = np.random.default_rng(0)
    n = 400
    cases = [
        _summary([2] * n, [5] * n, [10] * n),  # every customer alike
        _summary(rng.integers(1, 5, n), rng.uniform(0, 5, n), np.full(n, 5.0), np.full(n, 1e12)),  # huge amounts
        _summary(rng.integers(1, 5, n), np.zeros(n), rng.uniform(1, 30, n)),  # every repeat on the first day
    ]
    for summary in cases:
        for model in (BGNBD, GammaGamma):
            try:
                fitted = model.fit(summary)
            except ValueModelError:
                continue
            values = np.array(list(fitted.as_dict().values()), dtype=float)
            assert np.all(np.isfinite(values))


def test_the_summary_counts_days_not_lines_and_ignores_returns_and_later_rows():
    customers = ["a", "a", "a", "a", "b", "b", "c"]
    days = np.array(
        ["2025-01-01", "2025-01-01", "2025-01-15", "2025-02-01", "2025-01-08", "2025-01-22", "2025-03-01"],
        dtype="datetime64[D]",
    )
    amounts = [10.0, 5.0, -20.0, 30.0, 8.0, 12.0, 50.0]
    summary = summarise(customers, days, amounts, as_of=np.datetime64("2025-01-29"))
    # a: 2025-01-01 (15), the 15th nets to a return; the 1 February is after as_of. b: two days. c: after as_of.
    assert summary.x.tolist() == [0.0, 1.0]
    assert summary.t_x.tolist() == [0.0, 2.0]
    assert summary.T.tolist() == [4.0, 3.0]
    assert np.isnan(summary.repeat_spend[0]) and summary.repeat_spend[1] == 12.0

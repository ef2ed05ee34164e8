"""Predicted customer value: the BG/NBD model of purchase counts and the Gamma-Gamma model of spend.

Written from the papers:

- Fader, Hardie and Lee (2005), "'Counting your customers' the easy way: an alternative to the
  Pareto/NBD model", Marketing Science 24(2). A customer buys at a Poisson rate λ while alive
  (λ ~ Gamma(r, α) across customers) and, after each purchase, drops out for good with
  probability p (p ~ Beta(a, b)). Its data are x (repeat purchases), t_x (the time of the last
  one) and T (the time it has been watched), all measured from its first purchase.
- Fader and Hardie (2013), "The Gamma-Gamma model of monetary value". A customer's spend per
  purchase is Gamma(p, ν) around its own mean, with ν ~ Gamma(q, γ) across customers; the mean
  of its x repeat purchases, m̄, has a closed-form density given x.

Both are fitted by maximum likelihood over log-parameters (every parameter is positive), on the
distinct (x, t_x, T) or (x, m̄) rows weighted by how many customers share them. Time is in weeks.
Nothing here knows HTTP or the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, special
from threadpoolctl import threadpool_limits

from app.ml.errors import MLError

MIN_REPEAT_CUSTOMERS = 50
"""Fewer repeat customers than this and neither model is fitted (too little to say anything)."""

_LOG_BOUND = 12.0
"""Log-parameters stay within ±this (e^12 ≈ 160,000): a run-away fit stops at a bound, not at inf."""


_NEAR_BOUND = 2.0
"""A log-parameter within this of a bound (beyond e^±10) has run off along a flat ridge of the
likelihood: where it stops says nothing about the data, so the fit is refused."""

_LIMIT_PAIR_MIN = 50.0
"""A pair of parameters allowed at a bound (see `_maximise`) is that far from 0 too: a Beta(a, b) with
a and b over 50 is already a narrow spike, so its limit at the bound predicts the same."""


class ValueModelError(MLError):
    """A value model that cannot be fitted on this data (the reason says why)."""


@dataclass(frozen=True)
class PurchaseSummary:
    """Per customer: repeat purchases x, weeks from first to last purchase t_x, weeks watched T, and
    the mean spend of its repeat purchases (NaN without a repeat purchase)."""

    x: np.ndarray
    t_x: np.ndarray
    T: np.ndarray
    repeat_spend: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def summarise(customer_ids: Any, days: Any, amounts: Any, *, as_of: np.datetime64) -> PurchaseSummary:
    """The summary of a transaction log as of `as_of` (rows dated after it left out).

    A purchase occasion is a calendar day whose lines do not net to a return (an amount of 0 or more,
    as RFM counts a purchase); its spend is that net amount. Customers without one are left out. Rows are read in any order.
    """
    frame = pd.DataFrame(
        {
            "customer": np.asarray(customer_ids),
            "day": np.asarray(days, dtype="datetime64[D]"),
            "amount": np.asarray(amounts, dtype=np.float64),
        }
    )
    end = np.asarray(as_of).astype("datetime64[D]")
    frame = frame[frame["day"] <= end]
    daily = frame.groupby(["customer", "day"], sort=True)["amount"].sum()
    daily = daily[daily >= 0]
    if daily.empty:
        empty = np.empty(0)
        return PurchaseSummary(empty, empty, empty, empty)
    table = daily.reset_index()
    grouped = table.groupby("customer", sort=True)
    first = grouped["day"].min()
    last = grouped["day"].max()
    occasions = grouped["day"].size()
    total = grouped["amount"].sum()
    first_spend = table.loc[grouped["day"].idxmin(), ["customer", "amount"]].set_index("customer")["amount"]
    x = (occasions - 1).to_numpy(dtype=np.float64)
    week = np.timedelta64(7, "D")
    t_x = ((last - first).to_numpy() / week).astype(np.float64)
    T = ((end - first.to_numpy()) / week).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        repeat_spend = np.where(x > 0, (total - first_spend).to_numpy() / x, np.nan)
    return PurchaseSummary(x=x, t_x=t_x, T=T, repeat_spend=repeat_spend)


def _weighted_rows(*columns: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """The distinct rows of the columns and how many times each occurs (hashed, not sorted)."""
    counts = pd.DataFrame(dict(enumerate(columns))).value_counts(sort=False)
    index = counts.index
    return [index.get_level_values(i).to_numpy(dtype=np.float64) for i in range(len(columns))], counts.to_numpy(
        dtype=np.float64
    )


def _maximise(
    negative: Any, start: np.ndarray, *, what: str, limit_pair: tuple[int, int] | None = None
) -> tuple[np.ndarray, float]:  # (the parameters, the log-likelihood)
    """The top of a log-likelihood over log-parameters; `negative` gives (−LL, its gradient).

    `limit_pair`: two parameters that may run to the upper bound, where the model has a proper limit
    (BG/NBD's a and b growing together: every customer drops out with the same probability a/(a+b),
    which stays pinned down); any other parameter at a bound refuses the fit.
    """
    bounds = [(-_LOG_BOUND, _LOG_BOUND)] * len(start)
    result = optimize.minimize(negative, start, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 5000})
    if not result.success or not np.isfinite(result.fun):
        raise ValueModelError(f"the {what} fit did not converge ({result.message})")
    # Then on to the top within float precision (its stopping rule above is relative: about 1e-9 of
    # the log-likelihood); a line search that can no longer improve ends this one, as it should.
    polished = optimize.minimize(
        negative,
        result.x,
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": 500, "ftol": 1e-15, "gtol": 1e-10},
    )
    if np.isfinite(polished.fun) and polished.fun <= result.fun:
        result = polished
    at_bound = np.abs(result.x) >= _LOG_BOUND - _NEAR_BOUND
    if limit_pair is not None:
        pair = result.x[list(limit_pair)]
        if np.all(pair >= np.log(_LIMIT_PAIR_MIN)) and np.all(pair <= _LOG_BOUND):
            at_bound[list(limit_pair)] = False
    if np.any(at_bound):
        raise ValueModelError(f"the {what} fit ran off to a parameter bound: the data do not pin the model down")
    return np.exp(result.x), -float(result.fun)


# --- BG/NBD ---------------------------------------------------------------------------------------


def bgnbd_log_likelihood(
    r: float, alpha: float, a: float, b: float, x: np.ndarray, t_x: np.ndarray, T: np.ndarray
) -> np.ndarray:
    """Each customer's log-likelihood (equation 6 of the 2005 paper)."""
    a1 = special.gammaln(r + x) - special.gammaln(r) + r * np.log(alpha)
    a2 = special.gammaln(a + b) + special.gammaln(b + x) - special.gammaln(b) - special.gammaln(a + b + x)
    a3 = -(r + x) * np.log(alpha + T)
    repeat = x > 0
    a4 = np.full_like(x, -np.inf, dtype=np.float64)
    xr = x[repeat]
    a4[repeat] = np.log(a) - np.log(b + xr - 1) - (r + xr) * np.log(alpha + t_x[repeat])
    return a1 + a2 + np.logaddexp(a3, a4)


class _Levels:
    """The distinct values of x and where each row's is: special functions of (θ + x) are computed
    once a level (a few dozen) instead of once a row (up to millions)."""

    def __init__(self, x: np.ndarray) -> None:
        self.values, self.index = np.unique(x, return_inverse=True)

    def of(self, function: Any, shift: float) -> np.ndarray:
        return function(shift + self.values)[self.index]


def bgnbd_gradient(
    r: float, alpha: float, a: float, b: float, x: np.ndarray, t_x: np.ndarray, T: np.ndarray, levels: _Levels
) -> tuple[np.ndarray, np.ndarray]:
    """Each customer's log-likelihood (as `bgnbd_log_likelihood`) and its derivatives in (r, α, a, b),
    shape (4, n); `levels` are x's.

    With L = log(e^A3 + e^A4) and w3, w4 the two terms' shares of it, each derivative is the
    derivative of A1 + A2 plus w3·∂A3 + w4·∂A4 (A4 is only there for x > 0).
    """
    gammaln, digamma = special.gammaln, special.digamma
    a1 = levels.of(gammaln, r) - gammaln(r) + r * np.log(alpha)
    a2 = gammaln(a + b) + levels.of(gammaln, b) - gammaln(b) - levels.of(gammaln, a + b)
    log_T, log_t = np.log(alpha + T), np.log(alpha + t_x)
    a3 = -(r + x) * log_T
    repeat = x > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        log_b_x = levels.of(np.log, b - 1)  # log(b + x - 1), used where x > 0 only
    a4 = np.where(repeat, np.log(a) - np.where(repeat, log_b_x, 0.0) - (r + x) * log_t, -np.inf)
    last = np.logaddexp(a3, a4)
    w3, w4 = np.exp(a3 - last), np.exp(a4 - last)
    inverse_b = np.where(repeat, 1.0 / np.where(repeat, b + x - 1, 1.0), 0.0)
    digamma_abx = levels.of(digamma, a + b)
    grad = np.stack(
        [
            levels.of(digamma, r) - digamma(r) + np.log(alpha) - w3 * log_T - w4 * log_t,
            r / alpha - (r + x) * (w3 / (alpha + T) + w4 / (alpha + t_x)),
            digamma(a + b) - digamma_abx + w4 / a,
            digamma(a + b) + levels.of(digamma, b) - digamma(b) - digamma_abx - w4 * inverse_b,
        ]
    )
    return a1 + a2 + last, grad


@dataclass(frozen=True)
class BGNBD:
    """A fitted BG/NBD model: its parameters, and each customer's expectations."""

    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float
    n_customers: int

    @classmethod
    def fit(cls, summary: PurchaseSummary) -> BGNBD:
        x, t_x, T = summary.x, summary.t_x, summary.T
        if int(np.sum(x > 0)) < MIN_REPEAT_CUSTOMERS:
            raise ValueModelError(
                f"{int(np.sum(x > 0))} customers bought more than once; BG/NBD needs {MIN_REPEAT_CUSTOMERS}"
            )
        (ux, ut, uT), weight = _weighted_rows(x, t_x, T)
        levels = _Levels(ux)
        scale = max(float(np.mean(T)), 1e-3)  # α is on the scale of the time watched

        def negative(log_params: np.ndarray) -> tuple[float, np.ndarray]:
            params = np.exp(log_params)
            r, alpha, a, b = params
            ll, grad = bgnbd_gradient(r, alpha, a, b, ux, ut, uT, levels)
            value = -float((weight * ll).sum())
            if not np.isfinite(value):
                return 1e300, np.zeros(4)
            return value, -(grad * weight).sum(axis=1) * params

        (r, alpha, a, b), ll = _maximise(negative, np.log([1.0, scale, 1.0, 1.0]), what="BG/NBD", limit_pair=(2, 3))
        return cls(r=float(r), alpha=float(alpha), a=float(a), b=float(b), log_likelihood=ll, n_customers=len(summary))

    def p_alive(self, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
        """P(alive | x, t_x, T); 1 for a customer without a repeat purchase (no chance yet to drop out)."""
        x = np.asarray(x, dtype=np.float64)
        ratio = np.zeros_like(x)
        repeat = x > 0
        xr = x[repeat]
        ratio[repeat] = np.exp(
            np.log(self.a)
            - np.log(self.b + xr - 1)
            + (self.r + xr)
            * (np.log(self.alpha + np.asarray(T)[repeat]) - np.log(self.alpha + np.asarray(t_x)[repeat]))
        )
        return 1.0 / (1.0 + ratio)

    def expected_purchases(self, t: float, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
        """E[Y(t) | x, t_x, T]: purchases expected in the next t weeks (equation 10 of the 2005 paper)."""
        x = np.asarray(x, dtype=np.float64)
        T = np.asarray(T, dtype=np.float64)
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        z = t / (alpha + T + t)
        hyper = special.hyp2f1(r + x, b + x, a + b + x - 1, z)
        bracket = 1.0 - np.exp((r + x) * (np.log(alpha + T) - np.log(alpha + T + t))) * hyper
        numerator = (a + b + x - 1) / (a - 1) * bracket
        return numerator * self.p_alive(x, t_x, T)

    def as_dict(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "a": self.a,
            "b": self.b,
            "log_likelihood": self.log_likelihood,
            "n_customers": self.n_customers,
        }


# --- Gamma-Gamma ----------------------------------------------------------------------------------


def gamma_gamma_log_likelihood(p: float, q: float, gamma: float, x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Each repeat customer's log density of its mean spend m̄ given x (Fader and Hardie 2013)."""
    px = p * x
    return (
        special.gammaln(px + q)
        - special.gammaln(px)
        - special.gammaln(q)
        + q * np.log(gamma)
        + (px - 1) * np.log(m)
        + px * np.log(x)
        - (px + q) * np.log(gamma + x * m)
    )


def gamma_gamma_objective(
    p: float, q: float, gamma: float, x: np.ndarray, m: np.ndarray, levels: _Levels
) -> tuple[np.ndarray, np.ndarray]:
    """Each repeat customer's log density (as `gamma_gamma_log_likelihood`) and its derivatives in
    (p, q, γ), shape (3, n); `levels` are x's."""
    gammaln, digamma = special.gammaln, special.digamma
    px = p * x
    values = levels.values
    at = levels.index
    log_total = np.log(gamma + x * m)
    log_m, log_x = np.log(m), np.log(x)
    digamma_pxq = digamma(p * values + q)[at]
    ll = (
        (gammaln(p * values + q) - gammaln(p * values))[at]
        - gammaln(q)
        + q * np.log(gamma)
        + (px - 1) * log_m
        + px * log_x
        - (px + q) * log_total
    )
    grad = np.stack(
        [
            x * (digamma_pxq - digamma(p * values)[at] + log_m + log_x - log_total),
            digamma_pxq - digamma(q) + np.log(gamma) - log_total,
            q / gamma - (px + q) / (gamma + x * m),
        ]
    )
    return ll, grad


@dataclass(frozen=True)
class GammaGamma:
    """A fitted Gamma-Gamma model: its parameters, and each customer's expected spend per purchase."""

    p: float
    q: float
    gamma: float
    log_likelihood: float
    n_customers: int

    @classmethod
    def fit(cls, summary: PurchaseSummary) -> GammaGamma:
        keep = (summary.x > 0) & np.isfinite(summary.repeat_spend) & (summary.repeat_spend > 0)
        if int(keep.sum()) < MIN_REPEAT_CUSTOMERS:
            raise ValueModelError(
                f"{int(keep.sum())} customers have a positive repeat spend; Gamma-Gamma needs {MIN_REPEAT_CUSTOMERS}"
            )
        # Spend is fitted in units of its median: γ scales with the currency and the log-likelihood
        # moves by n·log(scale), so a shop in cents or in yen fits as well as one in dollars.
        scale = float(np.median(summary.repeat_spend[keep]))
        (ux, um), weight = _weighted_rows(summary.x[keep], summary.repeat_spend[keep] / scale)
        levels = _Levels(ux)

        def negative(log_params: np.ndarray) -> tuple[float, np.ndarray]:
            params = np.exp(log_params)
            p, q, gamma = params
            ll, grad = gamma_gamma_objective(p, q, gamma, ux, um, levels)
            value = -float((weight * ll).sum())
            if not np.isfinite(value):
                return 1e300, np.zeros(3)
            return value, -(grad * weight).sum(axis=1) * params

        (p, q, gamma), ll = _maximise(negative, np.log([1.0, 2.0, 1.0]), what="Gamma-Gamma")
        gamma *= scale
        ll -= float(weight.sum()) * np.log(scale)
        if q <= 1:
            raise ValueModelError(f"the Gamma-Gamma fit gave q = {q:.3g} ≤ 1: its population mean spend is not finite")
        return cls(p=float(p), q=float(q), gamma=float(gamma), log_likelihood=float(ll), n_customers=int(keep.sum()))

    @property
    def population_mean(self) -> float:
        """The mean spend per purchase of a customer about whom nothing is known: p·γ/(q − 1)."""
        return self.p * self.gamma / (self.q - 1)

    def expected_order_value(self, x: np.ndarray, m: np.ndarray) -> np.ndarray:
        """E[M | x, m̄]: the population mean weighed against the customer's own (x = 0: the population's)."""
        x = np.asarray(x, dtype=np.float64)
        m = np.where(x > 0, np.nan_to_num(np.asarray(m, dtype=np.float64)), 0.0)
        weight = self.p * x / (self.p * x + self.q - 1)
        return (1 - weight) * self.population_mean + weight * m

    def as_dict(self) -> dict[str, Any]:
        return {
            "p": self.p,
            "q": self.q,
            "gamma": self.gamma,
            "log_likelihood": self.log_likelihood,
            "n_customers": self.n_customers,
        }


# --- both, as a version keeps them ----------------------------------------------------------------

DEFAULT_HORIZON_DAYS = 90
"""The horizon of `clv` when none is asked for (and of what the customer base and /clusters keep)."""
MAX_HORIZON_DAYS = 3650
VALUE_FIELDS = ("p_alive", "expected_purchases", "expected_order_value", "clv")
"""Per customer, in this order: on /predict and as columns of an rfm batch answer."""
_WEEK_DAYS = 7.0


def table_summary(frame: pd.DataFrame) -> PurchaseSummary | None:
    """The summary of an RFM table (app.ml.rfm) that carries ``occasions`` and ``repeat_spend``; None
    for a table without them (one computed from RFM values alone)."""
    if "occasions" not in frame.columns or "repeat_spend" not in frame.columns:
        return None
    occasions = frame["occasions"].to_numpy(dtype=np.float64)
    tenure = frame["tenure_days"].to_numpy(dtype=np.float64)
    recency = frame["recency_days"].to_numpy(dtype=np.float64)
    return PurchaseSummary(
        x=np.maximum(occasions - 1, 0),
        t_x=np.maximum(tenure - recency, 0) / _WEEK_DAYS,
        T=tenure / _WEEK_DAYS,
        repeat_spend=frame["repeat_spend"].to_numpy(dtype=np.float64),
    )


@dataclass(frozen=True)
class ValueModel:
    """A version's value models: BG/NBD for how many purchases, Gamma-Gamma (or None) for their value."""

    bgnbd: BGNBD
    gamma_gamma: GammaGamma | None

    @classmethod
    def fit(cls, summary: PurchaseSummary) -> tuple[ValueModel | None, list[str]]:
        """Both models fitted on the training customers, and the warnings saying what could not be.

        Never raises on the data: a model that cannot be fitted is None and a warning says why. The
        optimiser's vectors have four entries: BLAS threads would only wait on each other there.
        """
        with threadpool_limits(limits=1):
            return cls._fit(summary)

    @classmethod
    def _fit(cls, summary: PurchaseSummary) -> tuple[ValueModel | None, list[str]]:
        try:
            bgnbd = BGNBD.fit(summary)
        except (ValueModelError, ArithmeticError, ValueError) as exc:
            return None, [f"No value model (p_alive, expected purchases, clv): {exc}"]
        try:
            gamma_gamma: GammaGamma | None = GammaGamma.fit(summary)
        except (ValueModelError, ArithmeticError, ValueError) as exc:
            return cls(bgnbd, None), [f"No Gamma-Gamma model (expected_order_value and clv are null): {exc}"]
        return cls(bgnbd, gamma_gamma), []

    def as_dict(self) -> dict[str, Any]:
        return {
            "bgnbd": self.bgnbd.as_dict(),
            "gamma_gamma": self.gamma_gamma.as_dict() if self.gamma_gamma is not None else None,
        }

    @classmethod
    def from_dict(cls, stored: Any) -> ValueModel | None:
        """The model a version's metadata keeps (``value_model``), or None where it has none."""
        if not isinstance(stored, dict) or not isinstance(stored.get("bgnbd"), dict):
            return None
        spend = stored.get("gamma_gamma")
        return cls(BGNBD(**stored["bgnbd"]), GammaGamma(**spend) if isinstance(spend, dict) else None)

    def predict(self, summary: PurchaseSummary, horizon_days: int) -> dict[str, np.ndarray]:
        """Each customer's VALUE_FIELDS at `horizon_days` (NaN where the Gamma-Gamma model is missing)."""
        x, t_x, T = summary.x, summary.t_x, summary.T
        p_alive = self.bgnbd.p_alive(x, t_x, T)
        with np.errstate(over="ignore", invalid="ignore"):
            purchases = self.bgnbd.expected_purchases(horizon_days / _WEEK_DAYS, x, t_x, T)
        if self.gamma_gamma is None:
            value = np.full(len(x), np.nan)
        else:
            value = self.gamma_gamma.expected_order_value(x, summary.repeat_spend)
        return {
            "p_alive": p_alive,
            "expected_purchases": purchases,
            "expected_order_value": value,
            "clv": purchases * value,
        }

"""RFM quintile scores, the classic segment grid, and the words that name and describe segments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Any

import numpy as np
import pandas as pd

from app.ml.rfm.columns import QUANTILES, RFM_FEATURES, SEGMENT_GRID

# --------------------------------------------------------------------------- #
# Scores and segments


def fit_cuts(frame: pd.DataFrame) -> dict[str, list[float]]:
    """The 20/40/60/80 % quantiles of recency_days, frequency and monetary over the training customers."""
    return {
        name: [round(float(q), 6) for q in np.quantile(frame[name].to_numpy(dtype=np.float64), QUANTILES)]
        for name in RFM_FEATURES
    }


def scores(values: Mapping[str, Any], cuts: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
    """r/f/m scores 1..5 of arrays of recency_days, frequency and monetary.

    f and m: 1 + the number of cut points below the value; r: 1 + the
    number of cut points above it (tied cuts leave some scores unused).
    """
    recency = np.asarray(values["recency_days"], dtype=np.float64)
    frequency = np.asarray(values["frequency"], dtype=np.float64)
    monetary = np.asarray(values["monetary"], dtype=np.float64)
    r_cuts, f_cuts, m_cuts = (np.asarray(cuts[name], dtype=np.float64) for name in RFM_FEATURES)
    return {
        "r_score": 1 + len(r_cuts) - np.searchsorted(r_cuts, recency, side="right"),
        "f_score": 1 + np.searchsorted(f_cuts, frequency, side="left"),
        "m_score": 1 + np.searchsorted(m_cuts, monetary, side="left"),
    }


_GRID = np.array(SEGMENT_GRID, dtype=object)


def rfm_segments(r_score: np.ndarray, f_score: np.ndarray) -> np.ndarray:
    """The classic segment name of each (r_score, f_score)."""
    return _GRID[np.asarray(r_score, dtype=np.int64) - 1, np.asarray(f_score, dtype=np.int64) - 1]


def scored_table(frame: pd.DataFrame, cuts: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    """``frame`` with r_score, f_score, m_score and rfm_segment added."""
    out = frame.copy()
    got = scores(frame, cuts)
    for name, value in got.items():
        out[name] = value
    out["rfm_segment"] = rfm_segments(got["r_score"], got["f_score"])
    return out


def one_customer(record: Mapping[str, Any], cuts: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """One customer's RFM values with their scores and segment (avg_order_value when it is defined)."""
    got = {name: int(v[0]) for name, v in scores({k: [record[k]] for k in RFM_FEATURES}, cuts).items()}
    row: dict[str, Any] = {name: record[name] for name in RFM_FEATURES}
    for name in ("tenure_days", "avg_order_value"):
        if record.get(name) is not None:
            row[name] = record[name]
    if "avg_order_value" not in row and record["frequency"]:
        row["avg_order_value"] = round(float(record["monetary"]) / float(record["frequency"]), 6)
    return row | got | {"rfm_segment": SEGMENT_GRID[got["r_score"] - 1][got["f_score"] - 1]}


def clustering_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """What K-Means sees (before its log1p and scaling): monetary clipped at 0."""
    return pd.DataFrame(
        {
            "recency_days": frame["recency_days"].to_numpy(dtype=np.float64),
            "frequency": frame["frequency"].to_numpy(dtype=np.float64),
            "monetary": np.maximum(frame["monetary"].to_numpy(dtype=np.float64), 0.0),
        }
    )


# --------------------------------------------------------------------------- #
# Segment names in RFM words

_SPEND_WORDS = ("big spenders", "low spenders", "mid spenders")


NEW_TENURE_DAYS = 90
"""A recent segment whose customers first bought this many days ago or less, on average, is new."""


def segment_names(mean_scores: np.ndarray, mean_tenure: np.ndarray | None = None) -> list[str]:
    """A name per segment from its members' mean (r, f, m) scores, unique within the model.

    The base is the classic name of the rounded (r, f), except that a recent
    segment (r 4 or 5) of short tenure (``NEW_TENURE_DAYS``) is "New
    customers" whatever its frequency; segments that share a base get a
    further word from their spending ("At risk, big spenders").
    """
    k = len(mean_scores)
    rounded = np.clip(np.floor(mean_scores + 0.5).astype(np.int64), 1, 5)
    base = [SEGMENT_GRID[r - 1][f - 1] for r, f, _ in rounded.tolist()]
    if mean_tenure is not None:
        for i in range(k):
            if rounded[i, 0] >= 4 and mean_tenure[i] <= NEW_TENURE_DAYS:
                base[i] = "New customers"
    names = list(base)
    for name in set(base):
        members = [i for i in range(k) if base[i] == name]
        if len(members) < 2:
            continue
        ranked = sorted(members, key=lambda i: (-mean_scores[i, 2], i))
        words = [_SPEND_WORDS[0], *([_SPEND_WORDS[2]] * (len(ranked) - 2)), _SPEND_WORDS[1]]
        for i, word in zip(ranked, words, strict=True):
            names[i] = f"{name}, {word}"
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name} {seen[name]}"
    return names


def describe_segment(size: int, share: float, revenue_share: float, means: Mapping[str, float]) -> str:
    return (
        f"{size:,} customers ({share:.1f}%) bringing {revenue_share:.1f}% of revenue: last purchase "
        f"{means['recency_days']:.0f} days ago on average, {means['frequency']:.1f} purchases, "
        f"{means['monetary']:,.2f} spent in all ({means['avg_order_value']:,.2f} a purchase)."
    )


def parse_as_of(value: str | date | None) -> date | None:
    """An ``as_of`` query value: an ISO date (a time part is ignored) or YYYYMMDD; raises ValueError."""
    if value is None or isinstance(value, date):
        return value
    text = value.strip()
    if len(text) == 8 and text.isdigit():
        return datetime.strptime(text, "%Y%m%d").date()
    return date.fromisoformat(text[:10])

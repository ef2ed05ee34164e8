"""Generate a synthetic customer dataset for the segmentation service.

Customers are drawn from five latent customer types with overlapping
distributions, so that clustering finds real but imperfect structure:

    Young high spenders        young, modest income, spend a lot and often
    Affluent high spenders     high income, high spending
    Affluent savers            high income, spend little and rarely
    Budget-conscious seniors   older, low income, careful spenders
    Average mid-lifers         middle of the road on every axis

Usage:
    python generate_dataset.py                      # data/customers.csv, 5000 rows
    python generate_dataset.py --rows 1000000 --out /tmp/big.csv
    python generate_dataset.py --with-labels        # adds the latent Segment column
    python generate_dataset.py --kind mixed         # data/customers_mixed.csv: 17 numeric + 3 categorical

`--kind mixed` is a wider table for custom segmentations: a customer_id,
17 numeric columns (normal, log-normal, counts and rates) and 3 categorical
ones (plan and channel follow the latent segment; region has 40 levels of
pure noise), drawn from five latent segments. With `--with-labels` it adds a
latent_segment column, for measuring quality only: it is not a feature.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ("CustomerID", "Sex", "Age", "Annual_Income", "Spending_Score", "Purchase_Frequency")
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "customers.csv"
DEFAULT_MIXED_OUT = DEFAULT_OUT.with_name("customers_mixed.csv")


@dataclass(frozen=True)
class CustomerType:
    name: str
    weight: float
    age_mean: float
    age_sd: float
    income_median: float  # thousands per year; income is log-normal within a type
    income_log_sd: float
    spending_mean: float
    spending_sd: float
    purchases_median: float  # purchases per year
    purchases_log_sd: float
    sex_p: tuple[float, float, float]  # Male, Female, Other


CUSTOMER_TYPES: tuple[CustomerType, ...] = (
    CustomerType("Young high spenders", 0.17, 25, 4.0, 29, 0.28, 77, 9, 52, 0.30, (0.42, 0.55, 0.03)),
    CustomerType("Affluent high spenders", 0.16, 37, 6.5, 118, 0.20, 80, 8, 40, 0.30, (0.50, 0.48, 0.02)),
    CustomerType("Affluent savers", 0.17, 49, 8.0, 110, 0.22, 21, 8, 12, 0.35, (0.55, 0.43, 0.02)),
    CustomerType("Budget-conscious seniors", 0.20, 68, 6.5, 33, 0.30, 25, 8, 15, 0.35, (0.46, 0.53, 0.01)),
    CustomerType("Average mid-lifers", 0.30, 43, 7.0, 63, 0.22, 50, 9, 27, 0.30, (0.49, 0.49, 0.02)),
)
SEX_LABELS = np.array(["Male", "Female", "Other"], dtype=object)

# Within a type, people who spend more also tend to buy more often.
_SPENDING_PURCHASES_CORR = 0.45


def generate(rows: int = 5000, seed: int = 42, with_labels: bool = False) -> pd.DataFrame:
    """Return `rows` synthetic customers with the dataset's column names.

    Deterministic for a given (rows, seed). With `with_labels`, a `Segment`
    column holds the latent customer type, for evaluation only.
    """
    if rows < 0:
        raise ValueError("rows must be >= 0")
    rng = np.random.default_rng(seed)
    weights = np.array([t.weight for t in CUSTOMER_TYPES])
    types = rng.choice(len(CUSTOMER_TYPES), size=rows, p=weights / weights.sum())

    def per_type(attr: str) -> np.ndarray:
        return np.array([getattr(t, attr) for t in CUSTOMER_TYPES], dtype=np.float64)[types]

    z = rng.standard_normal((rows, 4))
    # Correlate the spending and purchase-frequency noise.
    z[:, 3] = _SPENDING_PURCHASES_CORR * z[:, 2] + np.sqrt(1 - _SPENDING_PURCHASES_CORR**2) * z[:, 3]

    age = per_type("age_mean") + per_type("age_sd") * z[:, 0]
    income = per_type("income_median") * np.exp(per_type("income_log_sd") * z[:, 1])
    spending = per_type("spending_mean") + per_type("spending_sd") * z[:, 2]
    purchase_rate = per_type("purchases_median") * np.exp(per_type("purchases_log_sd") * z[:, 3])
    purchases = rng.poisson(purchase_rate)

    sex_cum = np.cumsum(np.array([t.sex_p for t in CUSTOMER_TYPES]), axis=1)[types]
    sex_idx = (rng.random(rows)[:, None] > sex_cum[:, :2]).sum(axis=1)

    frame = pd.DataFrame(
        {
            "CustomerID": np.arange(1, rows + 1, dtype=np.int64),
            "Sex": SEX_LABELS[sex_idx],
            "Age": np.clip(np.rint(age), 18, 100).astype(np.int64),
            "Annual_Income": np.round(np.clip(income, 0.0, 10000.0), 1),
            "Spending_Score": np.clip(np.rint(spending), 1, 100).astype(np.int64),
            "Purchase_Frequency": np.clip(purchases, 0, 1000).astype(np.int64),
        }
    )
    if with_labels:
        frame["Segment"] = np.array([t.name for t in CUSTOMER_TYPES], dtype=object)[types]
    return frame


# --------------------------------------------------------------------------- #
# The mixed table: many numeric columns and a few categorical ones

# (name, kind, location, spread): normal -> loc + spread * x; lognormal -> exp(loc + spread * x);
# count -> Poisson(exp(loc + spread * x)); rate -> logistic(loc + spread * x); x = segment offset + noise.
MIXED_NUMERIC: tuple[tuple[str, str, float, float], ...] = (
    ("age", "normal", 44.0, 9.0),
    ("tenure_months", "normal", 40.0, 14.0),
    ("annual_income", "lognormal", 4.1, 0.35),
    ("monthly_spend", "lognormal", 4.6, 0.4),
    ("orders_per_year", "count", 2.6, 0.45),
    ("avg_basket", "lognormal", 3.8, 0.35),
    ("days_since_last_order", "count", 3.2, 0.5),
    ("support_tickets", "count", 0.4, 0.6),
    ("return_rate", "rate", -2.2, 0.5),
    ("discount_share", "rate", -1.0, 0.6),
    ("web_visits_per_month", "count", 2.0, 0.45),
    ("app_sessions_per_month", "count", 1.8, 0.6),
    ("email_open_rate", "rate", -0.5, 0.7),
    ("review_count", "count", 1.0, 0.6),
    ("loyalty_points", "lognormal", 6.5, 0.6),
    ("household_size", "normal", 2.6, 0.8),
    ("distance_to_store_km", "lognormal", 2.3, 0.5),
)
MIXED_WEIGHTS = (0.3, 0.25, 0.2, 0.15, 0.1)
MIXED_PLANS = ("basic", "plus", "pro", "enterprise")
MIXED_PLAN_P = (
    (0.70, 0.20, 0.08, 0.02),
    (0.15, 0.55, 0.25, 0.05),
    (0.05, 0.15, 0.60, 0.20),
    (0.40, 0.40, 0.15, 0.05),
    (0.05, 0.10, 0.25, 0.60),
)
MIXED_CHANNELS = ("web", "app", "store", "phone")
MIXED_CHANNEL_P = (
    (0.50, 0.30, 0.15, 0.05),
    (0.20, 0.60, 0.15, 0.05),
    (0.30, 0.20, 0.40, 0.10),
    (0.10, 0.10, 0.50, 0.30),
    (0.40, 0.40, 0.10, 0.10),
)
MIXED_REGIONS = tuple(f"region_{i:02d}" for i in range(1, 41))


def mixed_offsets() -> np.ndarray:
    """Each latent segment's offset on each numeric column, in noise standard deviations.

    Fixed (not drawn from --seed): the segments are the same in every file.
    """
    rng = np.random.default_rng(20240601)
    return rng.choice(np.array([-1.5, -0.75, 0.0, 0.75, 1.5]), size=(len(MIXED_WEIGHTS), len(MIXED_NUMERIC)))


def generate_mixed(rows: int = 5000, seed: int = 42, with_labels: bool = False) -> pd.DataFrame:
    """Return `rows` customers with a customer_id, 17 numeric and 3 categorical columns.

    Deterministic for a given (rows, seed). With `with_labels`, a
    `latent_segment` column (0..4) holds the segment each row was drawn from.
    """
    if rows < 0:
        raise ValueError("rows must be >= 0")
    rng = np.random.default_rng(seed)
    weights = np.array(MIXED_WEIGHTS)
    segment = rng.choice(len(weights), size=rows, p=weights / weights.sum())
    x = mixed_offsets()[segment] + rng.standard_normal((rows, len(MIXED_NUMERIC)))
    columns: dict[str, np.ndarray] = {"customer_id": np.char.add("C", np.arange(1, rows + 1).astype(str))}
    for j, (name, kind, loc, spread) in enumerate(MIXED_NUMERIC):
        latent = loc + spread * x[:, j]
        if kind == "normal":
            columns[name] = np.round(np.maximum(latent, 0.0), 1)
        elif kind == "lognormal":
            columns[name] = np.round(np.exp(latent), 2)
        elif kind == "count":
            columns[name] = rng.poisson(np.exp(latent)).astype(np.int64)
        else:
            columns[name] = np.round(1.0 / (1.0 + np.exp(-latent)), 4)

    def pick(levels: tuple[str, ...], p: tuple[tuple[float, ...], ...]) -> np.ndarray:
        cum = np.cumsum(np.array(p), axis=1)[segment]
        idx = (rng.random(rows)[:, None] > cum[:, :-1]).sum(axis=1)
        return np.array(levels, dtype=object)[idx]

    columns["plan"] = pick(MIXED_PLANS, MIXED_PLAN_P)
    columns["channel"] = pick(MIXED_CHANNELS, MIXED_CHANNEL_P)
    columns["region"] = np.array(MIXED_REGIONS, dtype=object)[rng.integers(0, len(MIXED_REGIONS), rows)]
    frame = pd.DataFrame(columns)
    if with_labels:
        frame["latent_segment"] = segment.astype(np.int64)
    return frame


def mixed_features() -> list[dict[str, str]]:
    """The declaration of every feature of the mixed table (transform left to `auto`)."""
    numeric = [{"name": name, "type": "numeric"} for name, *_ in MIXED_NUMERIC]
    return numeric + [{"name": name, "type": "categorical"} for name in ("plan", "channel", "region")]


def write_csv(frame: pd.DataFrame, out: Path) -> None:
    """Write through a temporary file so a reader never sees a half-written CSV."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        frame.to_csv(tmp, index=False)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate a synthetic customer dataset (CSV).")
    parser.add_argument("--rows", type=int, default=5000, help="number of customers (default 5000)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    parser.add_argument(
        "--kind",
        choices=("customers", "mixed"),
        default="customers",
        help="customers: the service's dataset (default); mixed: 17 numeric + 3 categorical columns",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"output CSV (default {DEFAULT_OUT}, or {DEFAULT_MIXED_OUT} for mixed)"
    )
    parser.add_argument(
        "--with-labels",
        action="store_true",
        help="add the latent type (Segment; latent_segment for mixed), for evaluation only",
    )
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be at least 1")

    started = time.perf_counter()
    if args.kind == "mixed":
        out = args.out or DEFAULT_MIXED_OUT
        frame = generate_mixed(args.rows, args.seed, with_labels=args.with_labels)
        what = f"{len(MIXED_WEIGHTS)} latent segments, {len(MIXED_NUMERIC)} numeric + 3 categorical columns"
        labels = "latent_segment"
    else:
        out = args.out or DEFAULT_OUT
        frame = generate(args.rows, args.seed, with_labels=args.with_labels)
        what = f"{len(CUSTOMER_TYPES)} latent types"
        labels = "Segment"
    write_csv(frame, out)
    elapsed = time.perf_counter() - started
    print(
        f"wrote {len(frame):,} customers ({what}, seed {args.seed}"
        f"{f', with {labels} labels' if args.with_labels else ''}) to {out} in {elapsed:.2f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output CSV (default {DEFAULT_OUT})")
    parser.add_argument("--with-labels", action="store_true", help="add a Segment column with the latent customer type")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be at least 1")

    started = time.perf_counter()
    frame = generate(args.rows, args.seed, with_labels=args.with_labels)
    write_csv(frame, args.out)
    elapsed = time.perf_counter() - started
    print(
        f"wrote {len(frame):,} customers ({len(CUSTOMER_TYPES)} latent types, seed {args.seed}"
        f"{', with Segment labels' if args.with_labels else ''}) to {args.out} in {elapsed:.2f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generate a synthetic order log for RFM segmentations.

Each customer follows one of five latent buying behaviours over two years of
orders ending on 2025-12-31:

    loyal          many orders over the whole period, the last one recent
    lapsing        a fair number of orders, none in the last six months
    one-off        a single order, some time ago
    big spenders   a few recent orders of high value
    new            one to three orders, all in the last month

An order has one to a few lines (same order_id and date); about 3% of orders
get a return line a few days later (a negative amount under the same
order_id). Lines are written in date order. Customer ids are zero-padded
text ("0000042"), as shop systems export them.

Usage:
    python generate_transactions.py                              # data/transactions.csv, 20,000 customers
    python generate_transactions.py --customers 1000000 --out /tmp/log.csv   # about 10M lines
    python generate_transactions.py --labels /tmp/behaviours.csv # also each customer's latent behaviour
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "transactions.csv"
END = np.datetime64("2025-12-31")
RETURN_SHARE = 0.03
EXTRA_LINES = 0.5
"""Lines of an order beyond the first: Poisson with this mean."""


@dataclass(frozen=True)
class Behaviour:
    name: str
    weight: float
    recency: tuple[int, int]  # days from the last order to END
    tenure: tuple[int, int]  # days from the first order to END (at least the recency)
    orders_base: int
    orders_extra: float  # orders = base + Poisson(extra), capped at orders_max
    orders_max: int
    order_value: float  # median order value; log-normal per customer
    value_log_sd: float


BEHAVIOURS: tuple[Behaviour, ...] = (
    Behaviour("loyal", 0.10, (0, 20), (500, 730), 16, 12.0, 60, 60.0, 0.30),
    Behaviour("lapsing", 0.20, (180, 400), (450, 730), 5, 5.0, 30, 60.0, 0.30),
    Behaviour("one-off", 0.30, (240, 700), (0, 0), 1, 0.0, 1, 40.0, 0.45),
    Behaviour("big spenders", 0.15, (0, 60), (200, 730), 3, 4.0, 20, 500.0, 0.35),
    Behaviour("new", 0.25, (0, 30), (0, 45), 1, 0.8, 3, 50.0, 0.40),
)


def generate(customers: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """(the order log, each customer's latent behaviour), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    weights = np.array([b.weight for b in BEHAVIOURS])
    kind = rng.choice(len(BEHAVIOURS), size=customers, p=weights / weights.sum())
    pick = lambda values: np.asarray(values)[kind]  # noqa: E731 - per-behaviour parameter of every customer
    r_lo, r_hi = pick([b.recency[0] for b in BEHAVIOURS]), pick([b.recency[1] for b in BEHAVIOURS])
    t_lo, t_hi = pick([b.tenure[0] for b in BEHAVIOURS]), pick([b.tenure[1] for b in BEHAVIOURS])
    recency = rng.integers(r_lo, r_hi + 1)
    tenure = np.maximum(rng.integers(t_lo, t_hi + 1), recency)
    orders = pick([b.orders_base for b in BEHAVIOURS]) + rng.poisson(pick([b.orders_extra for b in BEHAVIOURS]))
    orders = np.minimum(orders, pick([b.orders_max for b in BEHAVIOURS]))
    orders = np.where(tenure > recency, orders, 1)  # one day of history holds one order
    value = pick([b.order_value for b in BEHAVIOURS]) * np.exp(
        rng.normal(0.0, pick([b.value_log_sd for b in BEHAVIOURS]))
    )

    # Orders: the last at `recency`, the first at `tenure` days before END, the others in between.
    customer = np.repeat(np.arange(customers), orders)
    position = np.arange(len(customer)) - np.repeat(np.cumsum(orders) - orders, orders)
    days_back = rng.integers(recency[customer], tenure[customer] + 1)
    days_back = np.where(position == 0, recency[customer], days_back)
    days_back = np.where((position == 1) & (orders[customer] > 1), tenure[customer], days_back)
    order_value = value[customer] * np.exp(rng.normal(0.0, 0.25, len(customer)))

    # Lines: one or more per order, the order's value split between them.
    lines = 1 + rng.poisson(EXTRA_LINES, len(customer))
    order = np.repeat(np.arange(len(customer)), lines)
    share = rng.uniform(0.5, 1.5, len(order))
    share /= np.bincount(order, weights=share)[order]
    amount = np.round(order_value[order] * share, 2)
    line_days = days_back[order]

    # Returns: part of an order's first line, a few days later (not after END).
    returned = np.flatnonzero(rng.random(len(customer)) < RETURN_SHARE)
    first_line = np.cumsum(lines) - lines
    return_amount = -np.round(amount[first_line[returned]] * rng.uniform(0.2, 1.0, len(returned)), 2)
    return_days = np.maximum(days_back[returned] - rng.integers(1, 15, len(returned)), 0)
    order = np.concatenate([order, returned])
    amount = np.concatenate([amount, return_amount])
    line_days = np.concatenate([line_days, return_days])

    chronological = np.lexsort((order, -line_days))
    order = order[chronological]
    dates = (END - line_days[chronological].astype("timedelta64[D]")).astype("datetime64[D]")
    ids = _padded(customer[order] + 1, 7)
    log = pa.table(
        {
            "customer_id": ids,
            "order_id": pc.binary_join_element_wise("O", _padded(order + 1, 9), ""),
            "date": pa.array(dates).cast(pa.string()),
            "amount": pa.array(amount[chronological]),
        }
    )
    labels = pa.table(
        {
            "customer_id": _padded(np.arange(1, customers + 1), 7),
            "behaviour": pa.array([BEHAVIOURS[k].name for k in range(len(BEHAVIOURS))]).take(pa.array(kind)),
        }
    )
    return log, labels


def _padded(numbers: np.ndarray, width: int) -> pa.Array:
    return pc.utf8_lpad(pa.array(numbers).cast(pa.string()), width=width, padding="0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate a synthetic order log (CSV) for RFM segmentations.")
    parser.add_argument("--customers", type=int, default=20_000, help="customers (default 20,000; ~10 lines each)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output CSV (default {DEFAULT_OUT})")
    parser.add_argument("--labels", type=Path, help="also write customer_id,behaviour to this CSV")
    args = parser.parse_args(argv)
    if args.customers < 1:
        parser.error("--customers must be at least 1")
    started = time.perf_counter()
    log, labels = generate(args.customers, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(log, args.out, pacsv.WriteOptions(quoting_style="none"))
    if args.labels is not None:
        args.labels.parent.mkdir(parents=True, exist_ok=True)
        pacsv.write_csv(labels, args.labels, pacsv.WriteOptions(quoting_style="none"))
    print(
        f"Wrote {log.num_rows:,} lines for {args.customers:,} customers to {args.out} "
        f"in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

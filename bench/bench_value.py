"""Benchmark the value models (BG/NBD and Gamma-Gamma, app/ml/value.py) as kind rfm fits and serves them.

    .venv/bin/python bench/bench_value.py              # 1,000,000 customers (about 10M lines)
    .venv/bin/python bench/bench_value.py --quick      # 100,000 customers
    .venv/bin/python bench/bench_value.py --customers 300000

Rows, all in this one process and run:

1. Holdout on CDNOW (the sample that ships with `lifetimes`): fitted as of 1997-09-30, the repeat
   purchases expected over the 39 weeks after next to those the log holds (the 2005 paper's
   tracking figure), and the same for generate_transactions.py's log, fitted as of 2025-06-30 and
   checked over the half year after.
2. Fitting both models on the per-customer table of a generated log of --customers customers, as
   training does (the table read by app.ml.rfm first, its time shown apart), with the process'
   peak RSS; the baseline is `lifetimes` fitting the same two models to the same summary.
3. An rfm batch of that log scored with the value columns, against the same batch scored by a
   version without a value model (rows per second; the target is a ratio of at least 0.8).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.ml import rfm  # noqa: E402
from app.ml.estimator import SegmentationModel  # noqa: E402
from app.ml.value import ValueModel, summarise, table_summary  # noqa: E402
from app.segmentations.kinds.rfm import score_log  # noqa: E402
from app.versions.served import ServedModel  # noqa: E402

TARGET_FIT_SECONDS = 10.0
TARGET_BATCH_RATIO = 0.8
LOG_COLUMNS = rfm.LogColumns.from_mapping(
    {"customer_id": "customer_id", "date": "date", "amount": "amount", "order_id": "order_id"}
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def holdout(log: pd.DataFrame, calibration_end: str, holdout_end: str) -> tuple[float, int, int]:
    """(predicted, actual) repeat purchase days in (calibration_end, holdout_end] of the customers
    who bought by calibration_end, and how many customers."""
    end = np.datetime64(calibration_end)
    summary = summarise(log["customer_id"], log["day"].to_numpy(), log["amount"], as_of=end)
    model, notes = ValueModel.fit(summary)
    if model is None:
        raise SystemExit(f"no value model on the holdout log: {notes}")
    weeks = (np.datetime64(holdout_end) - end) / np.timedelta64(7, "D")
    predicted = float(model.bgnbd.expected_purchases(float(weeks), summary.x, summary.t_x, summary.T).sum())
    before = log[log["day"] <= end]
    known = set(before["customer_id"])
    later = log[(log["day"] > end) & (log["day"] <= np.datetime64(holdout_end)) & log["customer_id"].isin(known)]
    daily = later.groupby(["customer_id", "day"])["amount"].sum()
    return predicted, int((daily >= 0).sum()), len(summary)


def cdnow_log() -> pd.DataFrame | None:
    try:
        import lifetimes
    except ImportError:
        return None
    path = Path(lifetimes.__file__).parent / "datasets" / "CDNOW_sample.txt"
    log = pd.read_csv(path, sep=r"\s+", header=None, names=["m", "customer_id", "date", "cds", "amount"], dtype=str)
    return pd.DataFrame(
        {
            "customer_id": log["customer_id"],
            "day": pd.to_datetime(log["date"], format="%Y%m%d"),
            "amount": log["amount"].astype(float),
        }
    )


def generated_log(customers: int, out: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, str(ROOT / "generate_transactions.py"), "--customers", str(customers), "--seed", "11"]
        + ["--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def lifetimes_fit(summary) -> tuple[float, str] | None:
    """Seconds for `lifetimes` to fit BG/NBD and Gamma-Gamma on the same per-customer summary, and
    how it ended."""
    try:
        import lifetimes
    except ImportError:
        return None
    started = time.perf_counter()
    outcome = "fitted"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            lifetimes.BetaGeoFitter().fit(summary.x, summary.t_x, summary.T)
        except Exception as exc:  # noqa: BLE001 - its ConvergenceError, reported as the row's outcome
            outcome = f"BG/NBD: {type(exc).__name__}"
        repeat = (summary.x > 0) & (summary.repeat_spend > 0)
        try:
            lifetimes.GammaGammaFitter().fit(summary.x[repeat], summary.repeat_spend[repeat])
        except Exception as exc:  # noqa: BLE001
            outcome += f"; Gamma-Gamma: {type(exc).__name__}"
    return time.perf_counter() - started, outcome


def batch_seconds(versions: list[ServedModel], log: Path, as_of, rounds: int = 3) -> list[float]:
    """Each version's best time over `rounds` to score the log to a CSV answer, the versions taking
    turns so that a busy moment of the machine falls on both."""
    best = [float("inf")] * len(versions)
    for _ in range(rounds):
        for i, served in enumerate(versions):
            started = time.perf_counter()
            with open(log, "rb") as fh:
                scored = score_log(served, fh, LOG_COLUMNS, as_of=as_of, as_csv=True)
            assert scored.csv_answer is not None
            while scored.csv_answer.read(1 << 20):
                pass
            best[i] = min(best[i], time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="100,000 customers")
    parser.add_argument("--no-baseline", action="store_true", help="skip the lifetimes fit (it takes minutes)")
    args = parser.parse_args(argv)
    customers = args.customers or (100_000 if args.quick else 1_000_000)
    print(
        f"value-model benchmark: {customers:,} customers; load average {os.getloadavg()[0]:.2f}; cpus {os.cpu_count()}"
    )

    print()
    print(f"{'holdout (repeat purchase days)':<58}{'predicted':>11}{'actual':>9}{'ratio':>8}")
    cdnow = cdnow_log()
    if cdnow is None:
        print("  CDNOW: lifetimes is not installed (requirements-dev.txt ships the sample)")
    else:
        predicted, actual, n = holdout(cdnow, "1997-09-30", "1998-06-30")
        print(
            f"{f'CDNOW, {n:,} customers, 39 weeks after 1997-09-30':<58}{predicted:>11,.0f}{actual:>9,}{predicted / actual:>8.3f}"
        )

    with tempfile.TemporaryDirectory(prefix="bench-value-") as tmp:
        small = Path(tmp) / "small.csv"
        generated_log(50_000, small)
        frame = pd.read_csv(small, dtype={"customer_id": str, "order_id": str})
        generated = pd.DataFrame(
            {"customer_id": frame["customer_id"], "day": pd.to_datetime(frame["date"]), "amount": frame["amount"]}
        )
        predicted, actual, n = holdout(generated, "2025-06-30", "2025-12-31")
        label = f"generated log, {n:,} customers, 2025-07-01..12-31"
        print(f"{label:<58}{predicted:>11,.0f}{actual:>9,}{predicted / actual:>8.3f}")

        log = Path(tmp) / "log.csv"
        seconds = generated_log(customers, log)
        print(
            f"\ngenerated {customers:,} customers ({log.stat().st_size / 1e6:,.0f} MB) in {seconds:.1f} s", flush=True
        )
        started = time.perf_counter()
        with open(log, "rb") as fh:
            table = rfm.read_log(fh, LOG_COLUMNS, as_of=None, ids=False)
        read_seconds = time.perf_counter() - started
        summary = table_summary(table.frame)
        assert summary is not None
        started = time.perf_counter()
        model, notes = ValueModel.fit(summary)
        fit_seconds = time.perf_counter() - started
        fit_rss = peak_rss_mb()
        baseline = None if args.no_baseline else lifetimes_fit(summary)

        print()
        print(f"{'row':<58}{'seconds':>9}{'peak RSS MB':>13}")
        print(f"{'the per-customer table read from the log (app.ml.rfm)':<58}{read_seconds:>9.2f}")
        print(f"{'fit BG/NBD + Gamma-Gamma (app.ml.value)':<58}{fit_seconds:>9.2f}{fit_rss:>13,.0f}")
        if baseline is None:
            print("baseline: lifetimes not run (not installed, or --no-baseline)")
        else:
            print(f"{'baseline: lifetimes BetaGeoFitter + GammaGammaFitter':<58}{baseline[0]:>9.2f}   ({baseline[1]})")
        if model is None:
            raise SystemExit(f"no value model fitted: {notes}")
        print(f"fitted: {model.as_dict()}")

        k_model = SegmentationModel(n_clusters=5, random_state=0).fit(table)
        with_value = ServedModel(k_model)
        without = SegmentationModel(n_clusters=5, random_state=0).fit(table)
        without.metadata_["value_model"] = None
        without_value = ServedModel(without)
        as_of = table.facts.as_of
        plain, valued = batch_seconds([without_value, with_value], log, as_of)
        ratio = plain / valued
        rows = len(table.frame)
        print()
        print(f"{'batch (rfm log → CSV answer, best of 3)':<58}{'seconds':>9}{'rows/s':>13}")
        print(f"{'baseline: a version without a value model':<58}{plain:>9.2f}{rows / plain:>13,.0f}")
        print(
            f"{'with p_alive, expected_purchases, expected_order_value, clv':<58}{valued:>9.2f}{rows / valued:>13,.0f}"
        )

    print()
    print("targets" + (" (a smaller log than the target's 1,000,000 customers)" if customers < 1_000_000 else ""))
    for name, shown, met in (
        ("fit both models < 10 s", f"{fit_seconds:.2f} s", fit_seconds < TARGET_FIT_SECONDS),
        ("batch with value columns >= 0.8 of without", f"{ratio:.2f}", ratio >= TARGET_BATCH_RATIO),
    ):
        print(f"  {name:<46}{shown:>12}   {'met' if met else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

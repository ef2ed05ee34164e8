"""`python -m app run`: a file scored into a segmentation's customer base, as POST .../runs does it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from app.ml.preprocess import DataValidationError
from app.segmentations.as_of import as_of_date


def add_command(commands, segmentation_option) -> None:
    command = commands.add_parser(
        "run",
        help="score a file into the customer base (a run, as POST .../runs)",
        description="Score every customer of --input (CSV or Parquet; kind rfm: a transaction log) with the "
        "active version and land the run in the segmentation's customer base: whole or not at all.",
    )
    segmentation_option(command)
    command.add_argument("--input", type=Path, required=True, metavar="PATH", help="the customers to score")
    command.add_argument(
        "--mode",
        choices=("replace", "upsert"),
        default="replace",
        help="replace: customers absent from the file are gone (default); upsert: they stay",
    )
    command.add_argument(
        "--as-of", default=None, metavar="DATE", help="kind rfm: RFM as of this day (default: the day after the last)"
    )


def _parse(args: argparse.Namespace):
    return as_of_date(args.as_of)


async def run(args: argparse.Namespace, store, settings) -> int:
    from app.customers.service import CustomerBase, RunRequest

    source: Path = args.input
    if not await asyncio.to_thread(source.is_file):
        print(f"error: no such file: {source}", file=sys.stderr)
        return 2
    base = CustomerBase(settings=settings, database=store.database)
    await base.start()
    try:
        request = RunRequest(mode=args.mode, as_of=_parse(args), by="cli", filename=source.name)
        print(f"Scoring {source} into the customer base of {store.segmentation.name} ...")
        with source.open("rb") as upload:
            started = await base.submit(store, upload=upload, request=request)
        try:
            body = await base.wait(started)
        except DataValidationError as exc:
            print(f"error: {source}: {exc.message}", file=sys.stderr)
            return 2
    finally:
        await base.stop()
    print(
        f"Run {body['run_id']} completed with version {body['model_version']}: {body['n_customers']:,} customers, "
        f"{body['n_new']:,} new, {body['n_changed']:,} changed, {body['n_unchanged']:,} unchanged, "
        f"{body['n_gone']:,} gone"
    )
    return 0
